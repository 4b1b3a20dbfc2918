"""Failure modes on 2 GPUs: a peer that never arrives, a peer making a different call, recovery.

Each case is bounded by run_workers' timeout: a hang fails the test instead of hanging the suite.
"""
import time

import pytest
import torch

from dist_utils import run_workers

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]
TIMEOUT_MS = 1000


def _ok_call(tw, comm, tokens=64, hidden=1024):
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
    tw.all_reduce(comm, x)
    comm.synchronize()


def _peer_never_arrives(rank, world, algo):
    import tokenweave as tw

    comm = tw.Communicator(max_tokens=1024, hidden=1024, transport="p2p", timeout_ms=TIMEOUT_MS)
    _ok_call(tw, comm)
    result = {}
    if rank == 0:
        x = torch.randn(256, 1024, dtype=torch.bfloat16, device="cuda")
        t0 = time.monotonic()
        out = tw.all_reduce(comm, x, algo=algo)  # rank 1 never makes this call
        try:
            comm.synchronize()
            result["raised"] = None
        except tw.CollectiveTimeoutError as e:
            result.update(raised=str(e), rank=e.rank, peer=e.peer, seq=e.seq, seconds=time.monotonic() - t0,
                          nan=bool(torch.isnan(out).any()))
        try:  # broken: the next call raises at once
            tw.all_reduce(comm, x)
            result["second"] = None
        except tw.CollectiveTimeoutError as e:
            result["second"] = str(e)
    dist_barrier()
    # recovery: a new Communicator works
    comm2 = tw.Communicator(max_tokens=1024, hidden=1024, transport="p2p", timeout_ms=TIMEOUT_MS)
    x = torch.full((8, 1024), float(rank + 1), dtype=torch.bfloat16, device="cuda")
    y = tw.all_reduce(comm2, x)
    comm2.synchronize()
    result["recovered"] = bool((y == sum(range(1, world + 1))).all())
    comm2.close()
    return result


def dist_barrier():
    import torch.distributed as dist

    dist.barrier()


@pytest.mark.parametrize("algo", ["one_shot", "two_shot"])
def test_timeout_names_op_rank_peer(algo):
    r0 = run_workers(_peer_never_arrives, 2, algo, backend="nccl", timeout=120)[0]
    assert r0["raised"] is not None, "no timeout raised"
    assert (r0["rank"], r0["peer"]) == (0, 1) and r0["seq"] == 2
    assert "all_reduce" in r0["raised"] and "rank 0" in r0["raised"] and "rank 1" in r0["raised"]
    assert r0["seconds"] < TIMEOUT_MS / 1000 + 30
    assert r0["nan"], "a call that gave up must not leave valid-looking output"
    assert r0["second"] is not None
    assert r0["recovered"]


def _different_shapes(rank, world):
    import tokenweave as tw

    comm = tw.Communicator(max_tokens=1024, hidden=1024, transport="p2p", timeout_ms=TIMEOUT_MS)
    _ok_call(tw, comm)
    x = torch.randn(64 if rank == 0 else 32, 1024, dtype=torch.bfloat16, device="cuda")
    w = torch.ones(1024, dtype=torch.bfloat16, device="cuda")
    t0 = time.monotonic()
    tw.fused_allreduce_rmsnorm(comm, x, None, w)
    try:
        comm.synchronize()
        return None
    except (tw.CollectiveMismatchError, tw.CollectiveTimeoutError) as e:
        assert time.monotonic() - t0 < TIMEOUT_MS / 1000 + 30, "raised later than the timeout + 30 s"
        return f"{type(e).__name__}: {e}"


def test_shape_mismatch_is_reported_by_both_ranks():
    for rank, msg in enumerate(run_workers(_different_shapes, 2, backend="nccl", timeout=120)):
        assert msg is not None and msg.startswith("CollectiveMismatchError"), (rank, msg)
        assert "tokens=64" in msg and "tokens=32" in msg, msg


def _two_streams(rank, world):
    import tokenweave as tw

    comm = tw.Communicator(max_tokens=4096, hidden=4096, transport="p2p", timeout_ms=5000)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    xs = [torch.full((512, 4096), float(i + rank), dtype=torch.bfloat16, device="cuda") for i in range(20)]
    torch.cuda.synchronize()  # inputs are written on the default stream
    outs = []
    for i, x in enumerate(xs):
        with torch.cuda.stream(streams[i % 2]):
            outs.append(tw.all_reduce(comm, x))
    torch.cuda.synchronize()
    comm.check()
    expect = [sum(float(i + r) for r in range(world)) for i in range(20)]
    return all(bool((o == e).all()) for o, e in zip(outs, expect))


def test_two_streams_one_communicator():
    assert all(run_workers(_two_streams, 2, backend="nccl", timeout=120))
