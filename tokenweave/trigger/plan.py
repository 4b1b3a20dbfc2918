"""The launch plan of one trigger-mode call: decided once, before anything is enqueued, then handed to the
producer and the consumer (:mod:`.producers`, :mod:`.consumers`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tokenweave import _abi
from tokenweave._ext import _C
from tokenweave.ops import _validate
from tokenweave.trigger import policy, producers
from tokenweave.trigger.tracker import Tracker
from tokenweave.tuning import TriggerConfig

_TWO_SHOT = "two_shot"  # the tracked and copy-engine feeds are two-shot kernels


@dataclass(frozen=True, eq=False)
class TriggerCall:
    """One trigger-mode call as the caller made it, with its roles chosen (:func:`policy.choose`).

    ``part`` is the SM partition asked for (None: none); ``config`` the shape's trigger config.
    """

    op: str
    comm: object  # tokenweave.Communicator
    x: torch.Tensor
    w: torch.Tensor
    residual: torch.Tensor | None
    norm_weight: torch.Tensor | None
    eps: float
    out: torch.Tensor | None
    partial: torch.Tensor | None
    ctas: int | None
    tracker: Tracker
    producer: str
    consumer: str
    groups: int | None
    part: object | None  # tokenweave.partition.Partition
    config: TriggerConfig


@dataclass(frozen=True)
class ProducerGroup:
    chunk_begin: int
    chunk_end: int
    row_begin: int
    row_end: int


@dataclass(eq=False)
class TriggerPlan:
    """Everything one trigger-mode call launches.

    Attributes
    ----------
    call : TriggerCall
    part : Partition or None
        The SM partition the call runs on (only a usable one).
    y, out : Tensor [M, N]
        The producer's output (``partial`` or a new tensor) and the consumer's.
    ctas : int or None
        Consumer CTAs: the planned count (sm, copy_engine) or each group call's (stream; None: the fused
        op's choice).
    chunks_per_cta, chunk_rows, n_chunks : int
        The kernel's chunking (sm, copy_engine; 0 for stream).
    marks : tuple of (row_begin, row_end, counter_begin, counter_end)
        The producer's row ranges and the counters each one completes.
    counters : Tensor
        The Tracker's counters the producer adds to.
    unit_rows, units : int
        Rows per counter and counters used (the Triton producer marks per unit).
    targets : (int, int)
        What one call adds to a full counter and to the last one.
    max_programs : int
        Cap on the Triton producer's persistent grid (the SMs left to it).
    carveout : int
        SMs cuBLAS is told to leave free (0: none).
    compute, producer_stream, consumer_stream : torch.cuda.Stream
        The caller's stream and the roles' streams (the partition's, or the caller's and the Tracker's).
    warm_key : tuple or None
        The shape's key in the Tracker's first-call state (sm, copy_engine).
    """

    call: TriggerCall
    part: object | None
    y: torch.Tensor
    out: torch.Tensor
    ctas: int | None
    chunks_per_cta: int
    chunk_rows: int
    n_chunks: int
    marks: tuple
    counters: torch.Tensor
    unit_rows: int
    units: int
    targets: tuple
    max_programs: int
    carveout: int
    compute: object
    producer_stream: object
    consumer_stream: object
    warm_key: tuple | None = None


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


@functools.lru_cache(maxsize=1024)
def _geometry(comm_id: int, tokens: int, hidden: int, dtype_code: int, algo: int, ctas: int,
              chunks_per_cta: int) -> tuple[int, int, int]:
    """(ctas, chunk_rows, n_chunks) from csrc plan_allreduce: the call's one geometry decision. It is handed
    to the consumer and copy-engine ops as is (their ``chunk_rows`` argument; C++ checks it, never re-derives
    it). A pure function of its arguments (a communicator's layout never changes and ids are never reused),
    so asked once per shape."""
    geo = _C.plan(comm_id, tokens, hidden, dtype_code, algo, ctas, chunks_per_cta)
    return int(geo["ctas"]), int(geo["chunk_rows"]), int(geo["n_chunks"])


def plan_call(call: TriggerCall) -> TriggerPlan:
    """Check ``call`` and plan it. Raises ValueError before anything is launched or allocated on a side
    stream; the only allocations are ``y`` / ``out`` when not given."""
    c = call
    M, N = c.x.shape[0], c.w.shape[0]
    if M * N * c.x.element_size() > c.comm.capacity_bytes:
        raise ValueError(f"tokenweave.{c.op}: mode='trigger' takes at most the workspace ({c.comm.capacity_bytes} "
                         "bytes) in one call; make the Communicator with a larger max_tokens or use mode='sequential'")
    if c.x.device != c.comm.device:
        raise ValueError(f"tokenweave.{c.op}: x is on {c.x.device} but the Communicator is on {c.comm.device}; "
                         "move x and w there")
    policy.check_roles(c.op, c.comm.transport, c.producer, c.consumer)
    if c.tracker.broken:
        raise ValueError(f"tokenweave.{c.op}: an enqueue on this Tracker failed earlier and its counters may be "
                         "armed; make a new Tracker (and Communicator)")
    if c.groups is not None and (c.consumer != "stream" or not 1 <= int(c.groups) <= policy.MAX_GROUPS):
        raise ValueError(f"tokenweave.{c.op}: groups={c.groups!r} applies to consumer='stream' only, "
                         f"1..{policy.MAX_GROUPS}")
    c.comm.check()
    part = c.part if c.part is not None and c.part.usable() else None
    # At most half the SMs spin; on a partition, at most its communication SMs (each consumer CTA fills an SM).
    half_sms = part.comm_sms if part is not None else max(1, c.comm.num_sms // 2)
    compute = torch.cuda.current_stream(c.x.device)
    if part is None:
        c.tracker.keep_streams_apart(compute)
    streams = (part.gemm_stream, part.comm_stream) if part is not None else (compute, c.tracker.stream)
    if c.consumer == "stream":
        return _plan_stream(c, part, half_sms, compute, *streams)
    return _plan_chunked(c, part, half_sms, compute, *streams)


def _buffers(c: TriggerCall) -> tuple[torch.Tensor, torch.Tensor]:
    y = c.partial if c.partial is not None else torch.empty(c.x.shape[0], c.w.shape[0], dtype=c.x.dtype,
                                                            device=c.x.device)
    return y, (c.out if c.out is not None else torch.empty_like(y))


def _plan_chunked(c: TriggerCall, part, half_sms, compute, producer_stream, consumer_stream) -> TriggerPlan:
    """consumer "sm" / "copy_engine": one tracked kernel, chunk by chunk, fed by the producer's row groups."""
    M, K, N = c.x.shape[0], c.x.shape[1], c.w.shape[0]
    ctas = min(c.ctas or min(policy.DEFAULT_CONSUMER_CTAS, half_sms), half_sms)
    launch = c.comm.plan(M, N, c.x.element_size(), _TWO_SHOT, ctas)
    ctas, chunk_rows, n_chunks = _geometry(c.comm.comm_id, M, N, _abi.dtype_code(c.x.dtype),
                                           _abi.ALGO_CODES[_TWO_SHOT], launch.ctas, launch.chunks_per_cta)
    y, out = _buffers(c)
    groups = producer_groups(M, chunk_rows, n_chunks, ctas)
    ce = c.consumer == "copy_engine"
    # A counter per chunk for the SM consumer, per producer group for the copy engines; its target per call
    # is known before anything is launched (the consumer goes first).
    unit_rows, units = (ctas * chunk_rows, len(groups)) if ce else (chunk_rows, n_chunks)
    marks = tuple((g.row_begin, g.row_end, *((k, k + 1) if ce else (g.chunk_begin, g.chunk_end)))
                  for k, g in enumerate(groups))
    return TriggerPlan(
        call=c, part=part, y=y, out=out, ctas=ctas, chunks_per_cta=launch.chunks_per_cta, chunk_rows=chunk_rows,
        n_chunks=n_chunks, marks=marks, counters=c.tracker.group_ready if ce else c.tracker.ready,
        unit_rows=unit_rows, units=units, targets=producers.targets(c.producer, M, N, unit_rows, units),
        max_programs=part.gemm_sms if part is not None else c.comm.num_sms - ctas, carveout=0, compute=compute,
        producer_stream=producer_stream, consumer_stream=consumer_stream,
        warm_key=(M, K, N, c.x.dtype, ctas, c.producer, c.consumer, part is not None))


def _plan_stream(c: TriggerCall, part, half_sms, compute, producer_stream, consumer_stream) -> TriggerPlan:
    """consumer "stream": per row group, a stream wait on the group's counter, then the fused op on its rows.

    ``ctas`` is each group call's CTA count (default: the fused op's choice). Without a partition the Triton
    producer leaves that many SMs (default DEFAULT_CONSUMER_CTAS, at most half) free for them, since its
    persistent CTAs would otherwise hold every SM until the GEMM ends; with an explicit ``ctas`` cuBLAS
    leaves them free too (its SM carveout); without, cuBLAS takes every SM (its GEMMs end between groups, so
    the calls get SMs then). On an SM partition the group calls get at most its communication SMs and
    nothing is reserved (the partition keeps the GEMM off them).
    """
    M, N = c.x.shape[0], c.w.shape[0]
    y, out = _buffers(c)
    # Everything the group calls check, checked before the producer bumps counters no wait would re-arm.
    _validate(c.op, y, c.residual, c.norm_weight, out, c.comm.device)
    if c.residual is not None and out.data_ptr() == c.residual.data_ptr():
        raise ValueError(f"tokenweave.{c.op}: out must not be the residual tensor (both are written)")
    group_rows, n = policy.stream_groups(M, N * c.x.element_size(), c.groups, c.config)
    if part is not None:
        ctas, max_programs, carveout = part.fit_ctas(c.ctas), part.gemm_sms, 0
    else:
        reserve = min(c.ctas or policy.DEFAULT_CONSUMER_CTAS, half_sms)
        ctas, max_programs, carveout = c.ctas, c.comm.num_sms - reserve, (reserve if c.ctas else 0)
    return TriggerPlan(
        call=c, part=part, y=y, out=out, ctas=ctas, chunks_per_cta=0, chunk_rows=0, n_chunks=0,
        marks=tuple((k * group_rows, min(M, (k + 1) * group_rows), k, k + 1) for k in range(n)),
        counters=c.tracker.group_ready, unit_rows=group_rows, units=n,
        targets=producers.targets(c.producer, M, N, group_rows, n), max_programs=max_programs, carveout=carveout,
        compute=compute, producer_stream=producer_stream, consumer_stream=consumer_stream)
