"""tokenweave: fused AllReduce + residual + RMSNorm and token-splitting overlap for TP inference.

Quick start (under torchrun, one process per GPU)::

    import torch, torch.distributed as dist, tokenweave as tw
    dist.init_process_group("nccl"); torch.cuda.set_device(dist.get_rank())
    comm = tw.Communicator(max_tokens=8192, hidden=8192, dtype=torch.bfloat16)
    out = tw.fused_allreduce_rmsnorm(comm, x, residual, weight, eps=1e-5)
"""
from tokenweave._ext import HAS_EXTENSION
from tokenweave.comm import Communicator, plan_transport
from tokenweave.errors import (CollectiveMismatchError, CollectiveTimeoutError, CommunicatorClosedError,
                               TokenweaveError)
from tokenweave.ops import (add_rmsnorm, all_reduce, fused_allreduce_rmsnorm, programmatic_launch,
                            set_programmatic_launch)
from tokenweave.trigger import Tracker, matmul_allreduce, matmul_allreduce_rmsnorm

__version__ = "0.1.0"
__all__ = [
    "Communicator", "plan_transport", "fused_allreduce_rmsnorm", "all_reduce", "add_rmsnorm", "HAS_EXTENSION",
    "set_programmatic_launch", "programmatic_launch",
    "Tracker", "matmul_allreduce", "matmul_allreduce_rmsnorm", "matmul_mark_ready",
    "TokenweaveError", "CollectiveTimeoutError", "CollectiveMismatchError", "CommunicatorClosedError",
]


def __getattr__(name):  # the Triton producer imports triton: only when asked for
    if name == "matmul_mark_ready":
        from tokenweave.producer_triton import matmul_mark_ready
        return matmul_mark_ready
    raise AttributeError(f"module 'tokenweave' has no attribute {name!r}")
