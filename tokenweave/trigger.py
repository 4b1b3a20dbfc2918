"""T3-style track-and-trigger: overlap a row-parallel GEMM with its all-reduce (+ residual + RMSNorm).

The consumer is the core's fused two-shot kernel on a few CTAs of a high-priority stream; the producer
computes ``y = x @ w.T`` on the compute stream and reports progress in per-chunk counters of a
:class:`Tracker`. Two producers and two consumers, any pairing:

producer ``cublas``  one cuBLAS GEMM per row group, then a tiny kernel that adds to the group's counters
                     (red.release.gpu; any stream-ordered producer we do not own can be marked this way).
producer ``triton``  one persistent Triton GEMM whose epilogue stores a tile, syncs the CTA and adds the
                     tile's rows to its chunk's counter with one release atomic (producer_triton.py).
consumer ``sm``      the fused kernel in its tracked form: each CTA acquires its chunk's counter (bounded by
                     the Communicator's timeout), then scatters, reduces, all-gathers and normalises it.
consumer ``copy_engine``  the scatter runs on the copy engines, gated by cuStreamWaitValue32 on per-group
                     counters (copy_engine.cu); the kernel starts each chunk at the reduce.
consumer ``stream``  no kernel waits at all: per row group, the consumer stream waits (cuStreamWaitValue32)
                     until the group's counter is complete, then launches the ordinary fused kernel on those
                     rows, which takes SMs only as the GEMM's CTAs retire (the high-priority stream's CTAs are
                     scheduled first). The SM and copy-engine consumers spin on their CTAs for the whole GEMM,
                     which costs the GEMM those SMs (README, "Track-and-trigger").

SM partitions (``sm_partition=``, :mod:`tokenweave.partition`): the producer runs on the partition's GEMM
stream (its SMs minus the communication ones) and the consumer (its kernel, or the stream consumer's gated
calls) on the communication stream, with at most as many CTAs as that partition has SMs, so it never waits
for GEMM CTAs to retire and never takes SMs from the GEMM. The copy engines' stage keeps its own stream.
Both streams fork from the caller's stream and join back before the call returns.

Counters of the SM consumer only grow (the kernel keeps its own ``consumed`` count), so CUDA-graph
replays need no reset; the stream waits (copy engine, stream) compare with constants captured in the graph,
so their group counters are re-armed to 0 by the waiting stream after each wait.

Forward progress: the consumer spins on at most half the SMs (each of its CTAs fills an SM: 512 threads
x 128 registers) and the Triton producer's persistent grid is capped to the SMs left over, so the
producer always runs; the producer never waits for the consumer. One more hazard: CUDA's lazy module
loading may synchronise the context when a kernel is first launched; if that kernel is the producer and
the consumer already spins, that is a deadlock (seen on the GPU: every rank timed out on chunk 0). The
first call of each shape on a Tracker therefore runs the producer before launching the consumer (no
overlap, same result), which loads every kernel the overlapped calls use; CUDA-graph capture launches
nothing and needs no such call.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch

from tokenweave._ext import _C
from tokenweave.comm import ALGOS, Communicator
from tokenweave.ops import _collective, _ops, _validate, fused_allreduce_rmsnorm, all_reduce

MODES = ("auto", "sequential", "trigger")
PRODUCERS = ("cublas", "triton")
CONSUMERS = ("sm", "copy_engine", "stream")
# consumer="stream": one row group per this many bytes of the GEMM output, at most STREAM_MAX_GROUPS. Each
# group is one collective with its own barriers and tail; 4 groups beat 8 and 16 at M >= 4096 on 2 x H100
# (bench/results/gemm_allreduce-h100-tp2.json, _g4 vs the then-default 8 MiB / 8 groups: 671 vs 769 us at
# o_proj M = 4096, 1766 vs 1979 at down_proj M = 4096; _g16 lost everywhere).
STREAM_GROUP_BYTES = 16 << 20
STREAM_MAX_GROUPS = 4
_MAX_GROUPS = 64  # an explicit groups=: more collectives than this would cost more in barriers than they hide
# Where the overlap measured faster than cuBLAS + the fused kernel, (world, K, N) -> (smallest M, producer,
# consumer). Only TP4 o_proj (K = 8192 / 4) at M = 16384 won clearly: the stream consumer 2056 vs 2197 us
# (1.07x; the SM consumer with the Triton producer 2099, 1.05x) on 4 x H200 (bench/results/
# gemm_allreduce-h200-tp4.json, 612f684); the SM consumer 1.02x on 4 x H100 (gemm_allreduce-h100-tp4.json,
# d91f742). Elsewhere the best overlap was within 2% (M = 8192, down_proj M >= 8192: run-to-run noise) or
# lost up to 22%, because the GEMM keeps every SM busy (README, "Track-and-trigger"), so mode="auto" stays
# sequential there.
TRIGGER_WINS: dict[tuple[int, int, int], tuple[int, str, str]] = {(4, 2048, 8192): (16384, "cublas", "stream")}
# mode="trigger" without consumer=: with the cuBLAS producer the stream consumer was the fastest of the three
# at every measured shape (TP4 on 4 x H200, TP2 on 2 x H200 and 2 x H100: 586 vs 640 (SM) vs 654 (copy
# engine) us at TP4 o_proj M = 4096). The gated copy engines beat the SM consumer on TP4 down_proj from
# M = 1024 and on TP2 from M = 1024 (4 x H100, 2 x H200), the SM consumer won TP4 o_proj.
DEFAULT_CONSUMER = "stream"
_DTYPE_CODE = {torch.bfloat16: 2, torch.float16: 1}


class Tracker:
    """Progress counters, streams and warm-up state of one producer/consumer pair, on one GPU.

    Parameters
    ----------
    device : torch.device
        The GPU the producer and the consumer run on.

    Notes
    -----
    One Tracker serves one sequence of calls at a time (calls on it are ordered by the compute stream).
    Make one per layer position and reuse it; CUDA graphs need it to outlive the graph.
    """

    def __init__(self, device):
        device = torch.device(device)
        max_chunks = int(_C.MAX_CHUNKS) if _C is not None else 4096
        self.ready = torch.zeros(max_chunks, dtype=torch.int32, device=device)       # per chunk, only grows
        self.consumed = torch.zeros_like(self.ready)                                 # the SM consumer's copy
        self.group_ready = torch.zeros_like(self.ready)                              # copy engine: re-armed to 0
        self.go = torch.zeros(1, dtype=torch.int32, device=device)                   # copy engine handshake
        self.ones = torch.ones(max_chunks, dtype=torch.int32, device=device)         # the staged flags' value
        on_gpu = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device, priority=-1) if on_gpu else None
        self.copy_stream = torch.cuda.Stream(device=device, priority=-1) if on_gpu else None
        self.broken = False  # a failed copy-engine enqueue may leave `go`/group counters armed
        self._warm: set = set()


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


def _tracker_of(comm: Communicator, device) -> Tracker:
    """The Communicator's own Tracker, for callers that pass none. Kept: a fresh Tracker per call would run
    every call producer-first (its first-call state is empty) and free counters a captured graph still uses.
    One per Communicator suffices because the Communicator already orders its calls across streams."""
    tracker = comm._tracker
    if tracker is None:
        tracker = comm._tracker = Tracker(device)
    return tracker


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


def _choose_mode(op, comm, mode, x, w):
    """("sequential" | "trigger", producer, consumer); the roles only for "auto" (from TRIGGER_WINS)."""
    if mode not in MODES:
        raise ValueError(f"tokenweave.{op}: mode={mode!r}; use one of {MODES}")
    can_trigger = comm.transport in ("p2p", "multimem") and x.dtype in _DTYPE_CODE and x.is_cuda
    if mode == "trigger" and not can_trigger:
        raise ValueError(f"tokenweave.{op}: mode='trigger' needs the p2p or multimem transport and bfloat16/float16 "
                         f"CUDA tensors (transport is {comm.transport!r}, dtype {x.dtype}); use mode='sequential'")
    if mode != "auto":
        return mode, None, None
    # TRIGGER_WINS was measured on the p2p transport; multimem would need its own measurement.
    roles = _auto_roles(comm.world_size, *x.shape, w.shape[0]) if can_trigger and comm.transport == "p2p" else None
    return ("trigger", *roles) if roles else ("sequential", None, None)


def _auto_roles(world: int, M: int, K: int, N: int) -> tuple[str, str] | None:
    """(producer, consumer) where the overlap measured faster at this shape, else None (TRIGGER_WINS).

    Measured with the norm (matmul_allreduce_rmsnorm); the plain all-reduce runs the same kernel, minus the epilogue.
    """
    win = TRIGGER_WINS.get((world, K, N))
    if win is None or M < win[0]:
        return None
    if win[1] == "triton":
        from tokenweave import producer_triton
        if not producer_triton.HAS_TRITON:
            return None
    return win[1], win[2]


def _choose_roles(op, comm, producer, consumer):
    if producer not in PRODUCERS:
        raise ValueError(f"tokenweave.{op}: producer={producer!r}; use one of {PRODUCERS}")
    if consumer not in CONSUMERS:
        raise ValueError(f"tokenweave.{op}: consumer={consumer!r}; use one of {CONSUMERS}")
    if consumer == "copy_engine" and comm.transport != "p2p":
        raise ValueError(f"tokenweave.{op}: consumer='copy_engine' needs the p2p transport (the copy engines write "
                         f"peers' unicast buffers); transport is {comm.transport!r}: use consumer='sm'")
    if producer == "triton":
        from tokenweave import producer_triton
        if not producer_triton.HAS_TRITON:
            raise ValueError(f"tokenweave.{op}: producer='triton' needs the triton package; use producer='cublas'")


def _trigger(op, comm: Communicator, x, w, residual, norm_weight, eps, out, ctas, tracker, partial, producer,
             consumer, groups, part=None):
    M, N = x.shape[0], w.shape[0]
    itemsize = x.element_size()
    if M * N * itemsize > comm.capacity_bytes:
        raise ValueError(f"tokenweave.{op}: mode='trigger' takes at most the workspace ({comm.capacity_bytes} bytes) "
                         "in one call; make the Communicator with a larger max_tokens or use mode='sequential'")
    _choose_roles(op, comm, producer, consumer)
    if tracker.broken:
        raise ValueError(f"tokenweave.{op}: an enqueue on this Tracker failed earlier and its counters may be "
                         "armed; make a new Tracker (and Communicator)")
    if groups is not None and (consumer != "stream" or not 1 <= int(groups) <= _MAX_GROUPS):
        raise ValueError(f"tokenweave.{op}: groups={groups!r} applies to consumer='stream' only, 1..{_MAX_GROUPS}")
    comm.check()
    part = part if part is not None and part.usable() else None
    # At most half the SMs spin; on a partition, at most its communication SMs (each consumer CTA fills an SM).
    half_sms = part.comm_sms if part is not None else max(1, comm._num_sms // 2)
    if consumer == "stream":
        return _gated_launches(op, comm, x, w, residual, norm_weight, eps, out, ctas, tracker, partial, producer,
                               groups, half_sms, part)
    ctas = min(ctas or min(32, half_sms), half_sms)
    plan = comm.plan(M, N, itemsize, "two_shot", ctas)
    geo = _C.plan(comm._id, M, N, _DTYPE_CODE[x.dtype], ALGOS["two_shot"], plan.ctas, plan.chunks_per_cta)
    ctas, chunk_rows, n_chunks = geo["ctas"], geo["chunk_rows"], geo["n_chunks"]
    y = partial if partial is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    if out is None:
        out = torch.empty_like(y)
    groups = producer_groups(M, chunk_rows, n_chunks, ctas)
    ce = consumer == "copy_engine"
    counters = tracker.group_ready if ce else tracker.ready

    # A counter per chunk for the SM consumer, per producer group for the copy engines; its target per call
    # is known before anything is launched (the consumer goes first).
    unit_rows, units = (ctas * chunk_rows, len(groups)) if ce else (chunk_rows, n_chunks)
    pieces = _targets(producer, M, N, unit_rows, units)

    def produce():
        marks = [(g.row_begin, g.row_end, *((k, k + 1) if ce else (g.chunk_begin, g.chunk_end)))
                 for k, g in enumerate(groups)]
        with torch.cuda.stream(producer_stream):
            _produce(producer, x, w, y, counters, unit_rows, units, marks,
                     part.gemm_sms if part is not None else comm._num_sms - ctas)

    def consume():
        with torch.cuda.stream(consumer_stream):
            comm.order_stream()
            if ce:
                _ops().allreduce_staged(y, residual, norm_weight, out, float(eps), comm._id, ctas,
                                        plan.chunks_per_cta, tracker.go)
            else:
                _ops().allreduce_tracked(y, residual, norm_weight, out, float(eps), comm._id, ALGOS["two_shot"],
                                         ctas, plan.chunks_per_cta, tracker.ready, tracker.consumed, *pieces)

    def stage():
        # The copy stream starts from `inputs_ready`, recorded before the producer was enqueued: its per-group
        # counter waits then gate each copy. (Waiting on the compute stream here would wait for the whole GEMM:
        # the copy-engine numbers in bench/results were taken that way, before this was fixed.)
        tracker.copy_stream.wait_event(inputs_ready)
        with torch.cuda.stream(tracker.copy_stream):
            try:
                _ops().copy_engine_stage(y, comm._id, ctas, plan.chunks_per_cta, tracker.group_ready, ctas, *pieces,
                                         tracker.go, tracker.ones)
            except Exception:
                tracker.broken = True  # `go` and the group counters may be left armed: never reuse them
                raise

    compute = torch.cuda.current_stream(x.device)
    producer_stream, consumer_stream = _roles_streams(part, compute, tracker)
    inputs_ready = torch.cuda.Event()
    inputs_ready.record(compute)  # x, w, residual and the buffers are ready; the last call is done
    consumer_stream.wait_event(inputs_ready)
    if producer_stream is not compute:
        producer_stream.wait_event(inputs_ready)
    key = (M, x.shape[1], N, x.dtype, ctas, producer, consumer, part is not None)
    # CUDA_MODULE_LOADING=EAGER loads every CUDA kernel up front, but not Triton's, which loads on first launch.
    preloaded = os.environ.get("CUDA_MODULE_LOADING") == "EAGER" and producer != "triton"
    if key in tracker._warm or torch.cuda.is_current_stream_capturing() or preloaded:
        consume()  # the consumer first: it spins on few SMs
        produce()
    else:  # first call of this shape: load every kernel before anything spins (see the module docstring)
        produce()
        consumer_stream.wait_stream(producer_stream)
        consume()
        tracker._warm.add(key)
    if ce:  # enqueued last: its stream waits are unbounded, so only once the producer is fully enqueued
        stage()
        compute.wait_stream(tracker.copy_stream)
    _join(compute, producer_stream, consumer_stream, (y, out, residual))
    if ce:
        for t in (y, out, residual):
            if t is not None:
                t.record_stream(tracker.copy_stream)
    return out


def _roles_streams(part, compute, tracker):
    """(producer stream, consumer stream): the partition's GEMM and communication streams, else the caller's
    stream and the Tracker's high-priority stream."""
    if part is not None:
        return part.gemm_stream, part.comm_stream
    return compute, tracker.stream


def _join(compute, producer_stream, consumer_stream, tensors):
    """The caller's stream waits for both roles; tensors used on the side streams are not reusable before."""
    if producer_stream is not compute:
        compute.wait_stream(producer_stream)
    compute.wait_stream(consumer_stream)
    for t in tensors:
        if t is not None:
            t.record_stream(consumer_stream)
            if producer_stream is not compute:
                t.record_stream(producer_stream)


def _produce(producer, x, w, y, counters, unit_rows, units, marks, max_programs, carveout=0):
    """y = x @ w.T on the current stream, adding to ``counters`` as rows complete.

    cuBLAS: one GEMM per (row_begin, row_end, counter_begin, counter_end) of ``marks``, each followed by a
    kernel adding 1 to its counters; with ``carveout`` > 0 cuBLAS is told to plan for that many fewer SMs
    (cublasSetSmCountTarget, through torch's SM carveout), so its CTAs leave them free. Triton: one persistent
    GEMM on at most ``max_programs`` CTAs adding, per tile, its rows inside each unit of ``unit_rows`` rows
    (``units`` of them) to that unit's counter."""
    if producer == "triton":
        from tokenweave.producer_triton import matmul_mark_ready
        matmul_mark_ready(x, w, y, counters, unit_rows, units, max_programs=max_programs)
        return
    with _sm_carveout(carveout):
        for r0, r1, c0, c1 in marks:
            torch.matmul(x[r0:r1], w.t(), out=y[r0:r1])
            _ops().mark_ready(counters, c0, c1, 1)


@contextlib.contextmanager
def _sm_carveout(sms: int):
    """cuBLAS GEMMs launched inside plan for ``sms`` fewer SMs (torch's experimental carveout, which calls
    cublasSetSmCountTarget); restored on exit. A no-op for 0 or a torch without the hook."""
    get = getattr(torch._C, "_get_sm_carveout_experimental", None)
    set_ = getattr(torch._C, "_set_sm_carveout_experimental", None)
    if not sms or get is None or set_ is None:
        yield
        return
    previous = get()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*SM carveout.*")  # torch warns that the hook is experimental
        set_(int(sms))
    try:
        yield
    finally:
        set_(previous)


def stream_groups(rows: int, row_bytes: int, groups: int | None = None) -> tuple[int, int]:
    """(rows per group, groups) of consumer="stream": ``groups`` if given, else one per STREAM_GROUP_BYTES of
    output, 1..STREAM_MAX_GROUPS; the last group holds the remainder."""
    n = groups or min(STREAM_MAX_GROUPS, max(1, rows * row_bytes // STREAM_GROUP_BYTES))
    group_rows = -(-rows // min(n, rows))
    return group_rows, -(-rows // group_rows)


def _gated_launches(op, comm, x, w, residual, norm_weight, eps, out, ctas, tracker, partial, producer, groups,
                    half_sms, part=None):
    """consumer="stream": per row group, a stream wait on the group's counter, then the fused kernel on its rows.

    The producer is enqueued first: the waits can only be satisfied by it, so no kernel the waits depend on is
    launched (and lazily loaded) behind them. Each group's kernel is an ordinary collective call, so its
    timeouts, checks and numerics are the fused op's. ``ctas`` is each call's CTA count (default: the fused op's
    choice); the Triton producer leaves that many SMs (default 32, at most half) free for them, since its
    persistent CTAs would otherwise hold every SM until the GEMM ends; with an explicit ``ctas`` cuBLAS leaves
    them free too (see ``reserve`` below). On an SM partition the producer runs on its GEMM stream, the group
    calls on its communication stream with at most that partition's SMs as CTAs, and nothing is reserved."""
    M, N = x.shape[0], w.shape[0]
    y = partial if partial is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    if out is None:
        out = torch.empty_like(y)
    # Everything the group calls check, checked before the producer bumps counters no wait would re-arm.
    _validate(op, y, residual, norm_weight, out, comm.device)
    if residual is not None and out.data_ptr() == residual.data_ptr():
        raise ValueError(f"tokenweave.{op}: out must not be the residual tensor (both are written)")
    group_rows, n = stream_groups(M, N * x.element_size(), groups)
    targets = _targets(producer, M, N, group_rows, n)
    counters = tracker.group_ready
    compute = torch.cuda.current_stream(x.device)
    producer_stream, consumer_stream = _roles_streams(part, compute, tracker)
    inputs_ready = torch.cuda.Event()
    inputs_ready.record(compute)  # x, w, residual and the buffers are ready; the last call is done
    marks = [(k * group_rows, min(M, (k + 1) * group_rows), k, k + 1) for k in range(n)]
    if part is not None:  # the partition keeps the GEMM off the communication SMs: nothing to reserve
        ctas = part.fit_ctas(ctas)
        producer_stream.wait_event(inputs_ready)
        with torch.cuda.stream(producer_stream):
            _produce(producer, x, w, y, counters, group_rows, n, marks, part.gemm_sms)
    else:
        # Explicit ctas: the producer leaves that many SMs free for the group calls (cuBLAS through the carveout,
        # Triton by capping its persistent grid). Without, cuBLAS takes every SM (its GEMMs end between groups,
        # so the calls get SMs then) and Triton leaves 32, at most half.
        reserve = min(ctas or 32, half_sms)
        _produce(producer, x, w, y, counters, group_rows, n, marks, comm._num_sms - reserve,
                 carveout=ctas and reserve)
    consumer_stream.wait_event(inputs_ready)
    with torch.cuda.stream(consumer_stream):
        try:
            for k, (r0, r1, _, _) in enumerate(marks):
                _ops().gate_on_counter(counters, k, targets[k == n - 1])
                _collective(op, comm, y[r0:r1], None if residual is None else residual[r0:r1], norm_weight, eps,
                            out[r0:r1], None, ctas)
        except Exception:
            tracker.broken = True  # groups not yet gated keep the producer's counts: never reuse the counters
            raise
    _join(compute, producer_stream, consumer_stream, (y, out, residual))
    return out


def _matmul(x, w, partial):
    """x @ w.T, into ``partial`` when given (the sequential path; no allocation in a hot loop)."""
    return x @ w.t() if partial is None else torch.matmul(x, w.t(), out=partial)


def _targets(producer, M, N, unit_rows, units):
    """(full, last): what one call adds to each counter of `units` units of `unit_rows` rows."""
    if producer == "cublas":
        return 1, 1  # one mark_ready per unit
    from tokenweave.producer_triton import BLOCK_N, ready_targets
    return ready_targets(M, N, unit_rows, units, BLOCK_N)


def matmul_allreduce_rmsnorm(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None,
                             norm_weight: torch.Tensor, comm: Communicator, eps: float = 1e-6, *, mode: str = "auto",
                             ctas: int | None = None, tracker: Tracker | None = None, out: torch.Tensor | None = None,
                             partial: torch.Tensor | None = None, producer: str | None = None,
                             consumer: str | None = None, groups: int | None = None,
                             sm_partition: str | int | None = None) -> torch.Tensor:
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
        overlap (p2p/multimem, bf16/fp16). ``auto``: trigger only where it measured faster (``TRIGGER_WINS``,
        with the measured producer and consumer), sequential everywhere else.
    ctas : int, optional
        CTAs of the communication kernel in trigger mode (sm and copy_engine: at most half the SMs, default 32;
        stream: per group call, default the fused op's choice).
    tracker : Tracker, optional
        Counters and streams of the overlap; by default the Communicator's own (one per Communicator, kept
        across calls, so its first-call state and buffers persist, CUDA graphs included).
    out : Tensor [M, N], optional
    partial : Tensor [M, N], optional
        Buffer for this rank's GEMM output; allocated if not given.
    producer : {"cublas", "triton"}, optional
        Trigger mode: cuBLAS per row group + a marking kernel (default), or one Triton GEMM that marks from its
        epilogue.
    consumer : {"sm", "copy_engine", "stream"}, optional
        Trigger mode: the scatter on the consumer's CTAs, on the copy engines (p2p only), or ``stream``: the
        fused kernel launched per row group once a stream wait sees the group complete (the default: it
        measured fastest at every shape, ``DEFAULT_CONSUMER``).
    groups : int, optional
        ``consumer="stream"``: row groups (one collective each); default one per 16 MiB of output, at most 4.
    sm_partition : {"auto", "off"} or int, optional
        Trigger mode: a number of SMs reserved for the consumer, the producer GEMM on the rest
        (:mod:`tokenweave.partition`). ``"auto"`` and ``"off"``: no partition (none is tuned for this op
        yet). Default: ``TOKENWEAVE_SM_PARTITION``, else ``"auto"``.

    Returns
    -------
    Tensor
        ``out``, bitwise identical on every rank.
    """
    _check_matmul("matmul_allreduce_rmsnorm", x, w, partial)
    mode, auto_producer, auto_consumer = _choose_mode("matmul_allreduce_rmsnorm", comm, mode, x, w)
    if mode == "sequential":
        return fused_allreduce_rmsnorm(comm, _matmul(x, w, partial), residual, norm_weight, eps, out=out)
    return _trigger("matmul_allreduce_rmsnorm", comm, x, w, residual, norm_weight, eps, out, ctas,
                    tracker or _tracker_of(comm, x.device), partial, producer or auto_producer or "cublas",
                    consumer or auto_consumer or DEFAULT_CONSUMER, groups, _partition_of(sm_partition, x.device))


def matmul_allreduce(x: torch.Tensor, w: torch.Tensor, comm: Communicator, *, mode: str = "auto",
                     ctas: int | None = None, tracker: Tracker | None = None, out: torch.Tensor | None = None,
                     partial: torch.Tensor | None = None, producer: str | None = None,
                     consumer: str | None = None, groups: int | None = None,
                     sm_partition: str | int | None = None) -> torch.Tensor:
    """Row-parallel linear + all-reduce: ``sum_r x_r @ w_r.T``. Parameters as in :func:`matmul_allreduce_rmsnorm`."""
    _check_matmul("matmul_allreduce", x, w, partial)
    mode, auto_producer, auto_consumer = _choose_mode("matmul_allreduce", comm, mode, x, w)
    if mode == "sequential":
        return all_reduce(comm, _matmul(x, w, partial), out=out)
    return _trigger("matmul_allreduce", comm, x, w, None, None, 0.0, out, ctas, tracker or _tracker_of(comm, x.device),
                    partial, producer or auto_producer or "cublas",
                    consumer or auto_consumer or DEFAULT_CONSUMER, groups, _partition_of(sm_partition, x.device))


def _partition_of(sm_partition, device):
    """The SM partition a trigger-mode call runs on: only for an explicit number of SMs (argument or
    TOKENWEAVE_SM_PARTITION); ``auto`` has no tuned choice for this op, so it means none. Inactive partitions
    (no green contexts) come back as given and are not used."""
    from tokenweave import partition as sm_partitions

    switch = sm_partitions.resolve_switch(sm_partition)
    return sm_partitions.get_partition(device, switch) if isinstance(switch, int) else None
