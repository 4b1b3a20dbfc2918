"""Fakes for CPU tests of the CUDA launch path: a Communicator that looks like a device transport (no GPU, no
extension) and a recorder standing in for the extension's ops (``monkeypatch.setattr(ops, "_OPS", Recorder())``)."""
from types import SimpleNamespace

import numpy as np
import torch

from tokenweave import comm as comm_mod


class Recorder:
    def __init__(self):
        self.calls = []

    def allreduce(self, x, residual, weight, out, eps, comm_id, algo, ctas, chunks_per_cta):
        self.calls.append(dict(x=x, residual=residual, weight=weight, out=out, eps=eps, comm=comm_id, algo=algo,
                               ctas=ctas, chunks=chunks_per_cta))

    def allreduce_sharded(self, x, residual, weight, out, eps, comm_id, algo, ctas, chunks_per_cta):
        self.allreduce(x, residual, weight, out, eps, comm_id, algo, ctas, chunks_per_cta)
        self.calls[-1]["op"] = "sharded"

    def allreduce_lean(self, x, residual, weight, out, eps, comm_id, algo, ctas, chunks_per_cta, sharded_residual):
        self.allreduce(x, residual, weight, out, eps, comm_id, algo, ctas, chunks_per_cta)
        self.calls[-1].update(op="lean", sharded=sharded_residual)


def fake_comm(capacity_bytes=64 * 1024 * 2, world=4, sms=132):
    c = comm_mod.Communicator.__new__(comm_mod.Communicator)
    c.transport, c._closed, c._error, c._id, c._plans = "p2p", False, None, 7, {}
    c.capacity_bytes, c.world_size, c._num_sms = capacity_bytes, world, sms
    c._layout = {"one_shot_bytes": capacity_bytes // world, "lamport_max_bytes": 2 << 20}
    c._card = "h200"  # the shipped measured config (tokenweave/configs/h200.json)
    c._symm_allocs = []
    c.empty = lambda *shape, dtype=torch.bfloat16: symmetric_empty(c, *shape, dtype=dtype)
    c._err_view = np.zeros(8, dtype=np.int64)
    c.device = torch.device("cpu")
    c.order_stream = lambda: None
    return c


def symmetric_empty(c, *shape, dtype=torch.bfloat16):
    """What ``comm.empty`` gives: a tensor ``c.is_symmetric`` recognises (here plain host memory)."""
    t = torch.zeros(*shape, dtype=dtype)
    c._symm_allocs.append(SimpleNamespace(tensor=t.view(-1).view(torch.uint8)))
    return t
