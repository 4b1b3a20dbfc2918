"""T3-style track-and-trigger: overlap a row-parallel GEMM with its all-reduce (+ residual + RMSNorm).

The producer computes ``y = x @ w.T`` in row groups on the compute stream; after each group a tiny
kernel adds to the per-chunk ``ready`` counters of a :class:`Tracker` (release at gpu scope). The
consumer, launched first on a high-priority stream, is the core's fused all-reduce kernel in its
tracked form: each CTA waits (acquire, bounded by the Communicator's timeout) until its chunk's
producer group landed, then stages it; the core's per-chunk flags already make every rank agree that
the chunk is ready everywhere before it is reduced. Counters only grow (the consumer keeps its own
``consumed`` count), so CUDA-graph replays need no reset.

Forward progress: the consumer spins on at most half the SMs (each of its CTAs fills an SM: 512
threads x 128 registers), so the producer's GEMMs always have SMs, and the producer never waits for
the consumer.

Status: the tracked kernels are compiled and SASS-checked in CI and the Python glue is tested on CPU;
the GPU path has not run yet (tests/gpu/test_trigger_gpu.py, bench/gemm_allreduce.py). ``mode="auto"``
therefore stays sequential (cuBLAS + the fused kernel) until a measured crossover is recorded in
``TRIGGER_MIN_TOKENS``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenweave._ext import _C
from tokenweave.comm import ALGOS, Communicator
from tokenweave.ops import _ops, fused_allreduce_rmsnorm, all_reduce

MODES = ("auto", "sequential", "trigger")
# Smallest M from which mode="auto" overlaps; None until a GPU measurement sets it (bench/gemm_allreduce.py).
TRIGGER_MIN_TOKENS: int | None = None
_DTYPE_CODE = {torch.bfloat16: 2, torch.float16: 1}


class Tracker:
    """Per-chunk readiness counters of one producer/consumer pair, in device memory.

    Parameters
    ----------
    device : torch.device
        The GPU the producer and the consumer run on.

    Notes
    -----
    One Tracker serves one sequence of calls at a time (calls on it are ordered by its stream).
    """

    def __init__(self, device):
        max_chunks = int(_C.MAX_CHUNKS) if _C is not None else 4096
        self.ready = torch.zeros(max_chunks, dtype=torch.int32, device=device)
        self.consumed = torch.zeros_like(self.ready)
        self.stream = torch.cuda.Stream(device=device, priority=-1) if torch.device(device).type == "cuda" else None


@dataclass(frozen=True)
class ProducerGroup:
    chunk_begin: int
    chunk_end: int
    row_begin: int
    row_end: int


def producer_groups(tokens: int, chunk_rows: int, n_chunks: int, ctas: int) -> list[ProducerGroup]:
    """Row groups the producer computes one GEMM each for: one per step of the consumer's pipeline.

    CTA b of the consumer owns chunks b, b + ctas, ...; its step k needs chunk b + k * ctas, so group k
    is chunks [k * ctas, (k + 1) * ctas): the GEMM of group k + 1 runs while group k is communicated.
    """
    groups = []
    for c0 in range(0, n_chunks, ctas):
        c1 = min(c0 + ctas, n_chunks)
        groups.append(ProducerGroup(c0, c1, c0 * chunk_rows, min(c1 * chunk_rows, tokens)))
    return groups


def _check_matmul(op, x, w):
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"tokenweave.{op}: x must be [M, K] and w [N, K] (a row-parallel nn.Linear weight)")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"tokenweave.{op}: x has K={x.shape[1]} but w has K={w.shape[1]}; w is [N, K] (out, in)")
    if x.dtype != w.dtype:
        raise TypeError(f"tokenweave.{op}: x has dtype {x.dtype} but w has {w.dtype}")


def _choose_mode(op, comm, mode, tokens, dtype):
    if mode not in MODES:
        raise ValueError(f"tokenweave.{op}: mode={mode!r}; use one of {MODES}")
    can_trigger = comm.transport in ("p2p", "multimem") and dtype in _DTYPE_CODE
    if mode == "trigger" and not can_trigger:
        raise ValueError(f"tokenweave.{op}: mode='trigger' needs the p2p or multimem transport and bfloat16/float16 "
                         f"(transport is {comm.transport!r}, dtype {dtype}); use mode='sequential'")
    if mode == "auto":
        mode = "trigger" if can_trigger and TRIGGER_MIN_TOKENS is not None and tokens >= TRIGGER_MIN_TOKENS \
            else "sequential"
    return mode


def _trigger(op, comm: Communicator, x, w, residual, norm_weight, eps, out, ctas, tracker, partial):
    M, N = x.shape[0], w.shape[0]
    itemsize = x.element_size()
    if M * N * itemsize > comm.capacity_bytes:
        raise ValueError(f"tokenweave.{op}: mode='trigger' takes at most the workspace ({comm.capacity_bytes} bytes) "
                         "in one call; make the Communicator with a larger max_tokens or use mode='sequential'")
    comm.check()
    half_sms = max(1, comm._num_sms // 2)
    ctas = min(ctas or min(32, half_sms), half_sms)
    plan = comm.plan(M, N, itemsize, "two_shot", ctas)
    geo = _C.plan(comm._id, M, N, _DTYPE_CODE[x.dtype], ALGOS["two_shot"], plan.ctas, plan.chunks_per_cta)
    y = partial if partial is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    if out is None:
        out = torch.empty_like(y)
    compute = torch.cuda.current_stream(x.device)
    tracker.stream.wait_stream(compute)  # x, w, residual and the buffers are ready
    with torch.cuda.stream(tracker.stream):
        comm.order_stream()
        _ops().allreduce_tracked(y, residual, norm_weight, out, float(eps), comm._id, ALGOS["two_shot"], plan.ctas,
                                 plan.chunks_per_cta, tracker.ready, tracker.consumed, 1, 1)
    for g in producer_groups(M, geo["chunk_rows"], geo["n_chunks"], geo["ctas"]):
        torch.matmul(x[g.row_begin:g.row_end], w.t(), out=y[g.row_begin:g.row_end])
        _ops().mark_ready(tracker.ready, g.chunk_begin, g.chunk_end, 1)
    compute.wait_stream(tracker.stream)
    for t in (y, out, residual):  # used on the consumer stream: not reusable before it is done
        if t is not None:
            t.record_stream(tracker.stream)
    return out


def matmul_allreduce_rmsnorm(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None,
                             norm_weight: torch.Tensor, comm: Communicator, eps: float = 1e-6, *, mode: str = "auto",
                             ctas: int | None = None, tracker: Tracker | None = None, out: torch.Tensor | None = None,
                             partial: torch.Tensor | None = None) -> torch.Tensor:
    """Row-parallel linear + all-reduce + residual add + RMSNorm: ``RMSNorm(sum_r x_r @ w_r.T + residual)``.

    Parameters
    ----------
    x : Tensor [M, K]
        This rank's input shard (e.g. attention output before o_proj, or the MLP activation before down_proj).
    w : Tensor [N, K]
        This rank's weight shard (nn.Linear layout).
    residual : Tensor [M, N] or None
        Updated in place to ``z = allreduce(x @ w.T) + residual``.
    norm_weight : Tensor [N]
    comm : Communicator
    eps : float
    mode : {"auto", "sequential", "trigger"}
        ``sequential``: cuBLAS, then :func:`tokenweave.fused_allreduce_rmsnorm`. ``trigger``: track-and-trigger
        overlap (p2p/multimem, bf16/fp16). ``auto``: sequential until a measured crossover is set.
    ctas : int, optional
        CTAs of the communication kernel in trigger mode (at most half the SMs; default 32).
    tracker : Tracker, optional
        Counters and stream of the overlap; one is made per call if not given (make one and reuse it
        for CUDA graphs).
    out : Tensor [M, N], optional
    partial : Tensor [M, N], optional
        Buffer for this rank's GEMM output (trigger mode); allocated if not given.

    Returns
    -------
    Tensor
        ``out``, bitwise identical on every rank.
    """
    _check_matmul("matmul_allreduce_rmsnorm", x, w)
    if _choose_mode("matmul_allreduce_rmsnorm", comm, mode, x.shape[0], x.dtype) == "sequential":
        return fused_allreduce_rmsnorm(comm, x @ w.t(), residual, norm_weight, eps, out=out)
    return _trigger("matmul_allreduce_rmsnorm", comm, x, w, residual, norm_weight, eps, out, ctas,
                    tracker or Tracker(x.device), partial)


def matmul_allreduce(x: torch.Tensor, w: torch.Tensor, comm: Communicator, *, mode: str = "auto",
                     ctas: int | None = None, tracker: Tracker | None = None, out: torch.Tensor | None = None,
                     partial: torch.Tensor | None = None) -> torch.Tensor:
    """Row-parallel linear + all-reduce: ``sum_r x_r @ w_r.T``. Parameters as in :func:`matmul_allreduce_rmsnorm`."""
    _check_matmul("matmul_allreduce", x, w)
    if _choose_mode("matmul_allreduce", comm, mode, x.shape[0], x.dtype) == "sequential":
        return all_reduce(comm, x @ w.t(), out=out)
    return _trigger("matmul_allreduce", comm, x, w, None, None, 0.0, out, ctas, tracker or Tracker(x.device), partial)
