"""The public ops: row-parallel GEMM + all-reduce (+ residual + RMSNorm), sequential or overlapped."""
from __future__ import annotations

import torch

from tokenweave.comm import Communicator
from tokenweave.ops import all_reduce, fused_allreduce_rmsnorm
from tokenweave.trigger import consumers, policy
from tokenweave.trigger.plan import TriggerCall, plan_call
from tokenweave.trigger.tracker import Tracker


def matmul_allreduce_rmsnorm(comm: Communicator, x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None,
                             norm_weight: torch.Tensor, eps: float = 1e-6, *, mode: str = "auto",
                             ctas: int | None = None, tracker: Tracker | None = None, out: torch.Tensor | None = None,
                             partial: torch.Tensor | None = None, producer: str | None = None,
                             consumer: str | None = None, groups: int | None = None,
                             sm_partition: str | int | None = None) -> torch.Tensor:
    """Row-parallel linear + all-reduce + residual add + RMSNorm: ``RMSNorm(sum_r x_r @ w_r.T + residual)``.

    Parameters
    ----------
    comm : Communicator
        First, as in every collective op of tokenweave.
    x : Tensor [M, K]
        This rank's input shard (e.g. attention output before o_proj, or the MLP activation before down_proj).
    w : Tensor [N, K]
        This rank's weight shard (nn.Linear layout).
    residual : Tensor [M, N] or None
        Updated in place to ``z = allreduce(x @ w.T) + residual``.
    norm_weight : Tensor [N]
    eps : float
    mode : {"auto", "sequential", "trigger"}
        ``sequential``: cuBLAS, then :func:`tokenweave.fused_allreduce_rmsnorm`. ``trigger``: track-and-trigger
        overlap (p2p/multimem, bf16/fp16). ``auto``: trigger only where the card's config says it measured
        faster (:func:`tokenweave.tuning.trigger_config`, with the measured producer and consumer),
        sequential everywhere else, and on every card and shape without an entry.
    ctas : int, optional
        CTAs of the communication kernel in trigger mode (sm and copy_engine: at most half the SMs, default 32;
        stream: per group call, default the fused op's choice).
    tracker : Tracker, optional
        Counters and streams of the overlap; by default the Communicator's own
        (:meth:`Communicator.default_tracker`: one per Communicator, kept across calls, so its first-call
        state and buffers persist, CUDA graphs included).
    out : Tensor [M, N], optional
    partial : Tensor [M, N], optional
        Buffer for this rank's GEMM output; allocated if not given.
    producer : {"cublas", "triton"}, optional
        Trigger mode: cuBLAS per row group + a marking kernel (default), or one Triton GEMM that marks from its
        epilogue.
    consumer : {"sm", "copy_engine", "stream"}, optional
        Trigger mode: the scatter on the consumer's CTAs, on the copy engines (p2p only), or ``stream``: the
        fused kernel launched per row group once a stream wait sees the group complete. Default: the config's
        ``default_consumer`` (``stream`` on every measured card and in the heuristic).
    groups : int, optional
        ``consumer="stream"``: row groups (one collective each), 1..64; default from the config (one per
        16 MiB of output, at most 4, on every measured card and in the heuristic).
    sm_partition : {"auto", "off"} or int, optional
        Trigger mode: a number of SMs reserved for the consumer, the producer GEMM on the rest
        (:mod:`tokenweave.partition`). ``"auto"`` and ``"off"``: no partition (none is tuned for this op
        yet). Default: ``TOKENWEAVE_SM_PARTITION``, else ``"auto"``.

    Returns
    -------
    Tensor
        ``out``, bitwise identical on every rank.
    """
    op = "matmul_allreduce_rmsnorm"
    _check_comm(op, comm)
    _check_matmul(op, x, w, partial)
    choice, cfg = policy.choose_for(op, comm, mode, x, w, producer, consumer)
    if choice.mode == "sequential":
        return fused_allreduce_rmsnorm(comm, _matmul(x, w, partial), residual, norm_weight, eps, out=out)
    return consumers.run(plan_call(TriggerCall(
        op=op, comm=comm, x=x, w=w, residual=residual, norm_weight=norm_weight, eps=eps, out=out, partial=partial,
        ctas=ctas, tracker=tracker or comm.default_tracker(), producer=choice.producer, consumer=choice.consumer,
        groups=groups, part=_partition_of(sm_partition, x.device), config=cfg)))


def matmul_allreduce(comm: Communicator, x: torch.Tensor, w: torch.Tensor, *, mode: str = "auto",
                     ctas: int | None = None, tracker: Tracker | None = None, out: torch.Tensor | None = None,
                     partial: torch.Tensor | None = None, producer: str | None = None,
                     consumer: str | None = None, groups: int | None = None,
                     sm_partition: str | int | None = None) -> torch.Tensor:
    """Row-parallel linear + all-reduce: ``sum_r x_r @ w_r.T``. Parameters as in :func:`matmul_allreduce_rmsnorm`."""
    op = "matmul_allreduce"
    _check_comm(op, comm)
    _check_matmul(op, x, w, partial)
    choice, cfg = policy.choose_for(op, comm, mode, x, w, producer, consumer)
    if choice.mode == "sequential":
        return all_reduce(comm, _matmul(x, w, partial), out=out)
    return consumers.run(plan_call(TriggerCall(
        op=op, comm=comm, x=x, w=w, residual=None, norm_weight=None, eps=0.0, out=out, partial=partial, ctas=ctas,
        tracker=tracker or comm.default_tracker(), producer=choice.producer, consumer=choice.consumer,
        groups=groups, part=_partition_of(sm_partition, x.device), config=cfg)))


def _check_comm(op, comm):
    if not isinstance(comm, Communicator):
        raise TypeError(f"tokenweave.{op}: comm must be a tokenweave.Communicator (the first argument, as in "
                        f"fused_allreduce_rmsnorm(comm, x, ...)); got {type(comm).__name__}")


def _check_matmul(op, x, w, partial=None):
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"tokenweave.{op}: x must be [M, K] and w [N, K] (a row-parallel nn.Linear weight)")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"tokenweave.{op}: x has K={x.shape[1]} but w has K={w.shape[1]}; w is [N, K] (out, in)")
    if x.dtype != w.dtype:
        raise TypeError(f"tokenweave.{op}: x has dtype {x.dtype} but w has {w.dtype}")
    if partial is not None and (tuple(partial.shape) != (x.shape[0], w.shape[0]) or partial.dtype != x.dtype
                                or partial.device != x.device or not partial.is_contiguous()):
        raise ValueError(f"tokenweave.{op}: partial must be a contiguous [M, N] = [{x.shape[0]}, {w.shape[0]}] "
                         f"{x.dtype} tensor on {x.device}; got {tuple(partial.shape)} {partial.dtype} on "
                         f"{partial.device}")


def _matmul(x, w, partial):
    """x @ w.T, into ``partial`` when given (the sequential path; no allocation in a hot loop)."""
    return x @ w.t() if partial is None else torch.matmul(x, w.t(), out=partial)


def _partition_of(sm_partition, device):
    """The SM partition a trigger-mode call runs on: only for an explicit number of SMs (argument or
    TOKENWEAVE_SM_PARTITION); ``auto`` has no tuned choice for this op, so it means none. Inactive partitions
    (no green contexts) come back as given and are not used."""
    from tokenweave import partition as sm_partitions

    switch = sm_partitions.resolve_switch(sm_partition)
    return sm_partitions.get_partition(device, switch) if isinstance(switch, int) else None
