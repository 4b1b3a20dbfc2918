"""The TokenWeave overlap schedule: two streams, events, and a split of the tokens into parts.

A TP decoder stack is a chain of *stages* (attention, MLP, attention, ...). Each stage maps
normalised hidden states to a row-parallel partial sum, which a fused all-reduce + residual-add +
RMSNorm (with the weight of the norm that follows) turns into the next stage's input.
With the tokens split into parts A and B, the compute stream runs

    stage k (A), stage k (B), stage k+1 (A), stage k+1 (B), ...

and the communication stream, at high priority and on few CTAs, runs

              AR+norm k (A), AR+norm k (B), AR+norm k+1 (A), ...

so each part's all-reduce + norm hides behind the other part's compute; only the first stage of A
and the last AR+norm of B are exposed. Events carry the dependencies, so nothing waits on the host
and the whole schedule can be captured in a CUDA graph (fixed shapes per captured size).

On CPU, or with a single part, everything runs in the same order on the current stream: the same
code path, sequentially.

SM partitions (:mod:`tokenweave.partition`): given an active partition, the pass forks from the caller's
stream into the partition's GEMM stream, runs every part's stage (its GEMMs, attention, ...) there, issues
each AR+norm on the partition's communication stream with at most as many CTAs as that partition has SMs,
and joins back at :meth:`WovenPass.finish`. The GEMMs then never share SMs with the communication kernel,
which never waits for GEMM CTAs to retire. The order of operations and every kernel's inputs are the same
as without the partition. A partition whose streams failed the capture probe is not used under capture.

Memory safety across streams: every tensor the communication stream touches is allocated on the
compute stream (the caller's current stream, or the partition's GEMM stream) and kept referenced until
the compute stream has waited for the event that ends that use; only then is it released, so the
caching allocator can never hand its memory to a later compute-stream allocation while the
communication stream still reads or writes it. This holds under CUDA-graph capture too. The GEMM
stream of a partition is private to tokenweave and every use of it starts by waiting for the caller's
stream, so a block the caller frees later (the returned output) is reused there only after the
caller's earlier work.

Symmetric rows (:class:`SymmetricRows`, optional): the stages' partial sums and the fused op's outputs then live in
the communicator's symmetric memory, one [max_tokens, hidden] buffer each, reused by every stage and part, so the
dispatcher may run the lean two-shot (outputs written on every rank by the rows' owners) and lean_pull (partial
sums read in place, no scatter). Reuse is safe because every write to a part's rows is ordered after every read
of them: on this rank by stream order and the part's events; on peers by the kernels' protocol (an owner writes
this rank's ``out`` only after this rank entered the call, i.e. after its stage read those rows, and a call ends
only once every owner has read this rank's partial sums). Where the dispatcher runs lean, the pass can keep the
residual sharded (each rank updates only the rows it owns of each part: fewer bytes per call).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import tokenweave as tw

StageFn = Callable[[int, torch.Tensor], torch.Tensor]
"""``stage(part_index, normalised_input_rows) -> partial_sum_rows`` (same shape). With :class:`SymmetricRows` the
pass calls ``stage(part_index, rows, out=buffer)``: the stage should write its partial sum into ``buffer`` (a
symmetric tensor of that shape); one that returns another tensor is copied into it."""


class SymmetricRows:
    """The symmetric buffers a :class:`WovenPass` reuses for every stage: ``partial`` (the stages' partial sums,
    the fused op's x) and ``out`` (its normalised output, the next stage's input), ``[max_tokens, hidden]`` each.

    Collective (two ``comm.empty`` calls, the same order on every rank); the memory lives until ``comm.close()``.
    On the ``torch`` transport they are plain tensors (and the pass runs as without them).
    """

    def __init__(self, comm, max_tokens: int, hidden: int, dtype=torch.bfloat16):
        if max_tokens < 1:
            raise ValueError(f"SymmetricRows: max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens, self.hidden, self.dtype = int(max_tokens), int(hidden), dtype
        self.partial = comm.empty(self.max_tokens, self.hidden, dtype=dtype)
        self.out = comm.empty(self.max_tokens, self.hidden, dtype=dtype)

    @classmethod
    def of(cls, partial: torch.Tensor, out: torch.Tensor) -> "SymmetricRows":
        """Buffers already in symmetric memory (``[max_tokens, hidden]`` each, e.g. one rank's share of
        :meth:`tokenweave.testing.EmulatedWorld.empty`)."""
        if partial.shape != out.shape or partial.dim() != 2 or partial.dtype != out.dtype:
            raise ValueError(f"SymmetricRows.of: partial and out must be 2-D with one shape and dtype, got "
                             f"{tuple(partial.shape)} {partial.dtype} and {tuple(out.shape)} {out.dtype}")
        rows = cls.__new__(cls)
        rows.max_tokens, rows.hidden, rows.dtype = partial.shape[0], partial.shape[1], partial.dtype
        rows.partial, rows.out = partial, out
        return rows

    def fits(self, x: torch.Tensor) -> bool:
        """Whether a pass over ``x`` [T, hidden] can use these buffers."""
        return x.dim() == 2 and x.shape[0] <= self.max_tokens and x.shape[1] == self.hidden and x.dtype == self.dtype


class StreamPair:
    """The caller's compute stream and a high-priority communication stream on ``device``.

    On a non-CUDA device both are absent and every method is a no-op, so the schedule runs in
    program order.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda"
        if self.enabled:
            _, highest = torch.cuda.Stream.priority_range()  # (least, greatest): greatest is numerically lowest
            self._draw = lambda: torch.cuda.Stream(device=self.device, priority=highest)
            self.comm = self._draw()
        else:
            self.comm = None

    def keep_apart(self, caller) -> None:
        """Replace the communication stream if it is ``caller``'s: torch's stream pool hands out 32 streams
        round-robin, and a communication stream that is the caller's would silently serialise the overlap."""
        if self.enabled and self.comm.cuda_stream == caller.cuda_stream:
            self.comm = self._draw()  # the pool's next stream: a different one

    def compute(self):
        return torch.cuda.current_stream(self.device) if self.enabled else None

    def on_comm(self):
        """Context manager: issue the enclosed work on the communication stream."""
        return torch.cuda.stream(self.comm) if self.enabled else contextlib.nullcontext()

    def record(self, stream) -> torch.cuda.Event | None:
        if not self.enabled:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream, event) -> None:
        if self.enabled and event is not None:
            stream.wait_event(event)


@dataclass
class _InFlight:
    """A part's AR+norm issued on the communication stream, with the tensors it uses."""

    done: torch.cuda.Event | None
    keep_alive: tuple


class WovenPass:
    """One forward pass through a chain of stages with the tokens split into parts.

    Parameters
    ----------
    comm : tokenweave.Communicator
    x : Tensor [T, hidden]
        Normalised input of the first stage, replicated on every rank.
    residual : Tensor [T, hidden]
        The residual stream; updated in place (each part's rows by its own all-reduces).
    bounds : sequence of (start, stop)
        Row ranges of the parts, covering ``[0, T)`` in order (see :class:`tokenweave.split.Split`).
    streams : StreamPair, optional
        Without one (or with a single part) everything runs on the current stream.
    ctas : int, optional
        CTAs of the fused kernel while it overlaps compute; ``None`` lets the dispatcher choose
        (right when there is nothing to overlap with).
    partition : tokenweave.partition.Partition, optional
        Run the stages on its GEMM stream and the AR+norms on its communication stream (ctas capped to
        its SMs). Ignored when inactive, without streams or a second part, or under a capture its streams
        cannot join.
    rows : SymmetricRows, optional
        Symmetric buffers for the partial sums and outputs (see the module notes); ignored when ``x`` does not
        fit them. :meth:`finish` then returns a copy of the output (the buffer is reused by the next pass).
    sharded_residual : bool
        With ``rows``: for each part the dispatcher runs a lean two-shot on, keep the residual sharded: each rank
        updates only the rows it owns of that part (``comm.shard_rows``) and the other rows of ``residual`` go
        stale. For callers that use the residual only through the pass (a decoder stack's own residual stream).

    Notes
    -----
    Call :meth:`stage` once per stage, then :meth:`finish` exactly once; the output of
    :meth:`finish` is valid on the caller's stream. Rows are views of [T, hidden] buffers, so each
    part is contiguous; with 2-byte dtypes the kernels' 16-byte alignment needs
    ``start * hidden`` to be a multiple of 8, which holds for any hidden size the ops accept.
    """

    def __init__(self, comm, x: torch.Tensor, residual: torch.Tensor, bounds: Sequence[tuple[int, int]], *,
                 streams: StreamPair | None = None, ctas: int | None = None, partition=None,
                 rows: SymmetricRows | None = None, sharded_residual: bool = False):
        if x.dim() != 2 or residual.shape != x.shape:
            raise ValueError(f"WovenPass: x and residual must both be [T, hidden]; got {tuple(x.shape)} and "
                             f"{tuple(residual.shape)}")
        _check_bounds(bounds, x.shape[0])
        self.comm = comm
        self.bounds = [tuple(b) for b in bounds]
        self.streams = streams if streams is not None and streams.enabled and len(self.bounds) > 1 else None
        self.ctas = ctas if self.streams is not None else None
        self.partition = partition if self.streams is not None and partition is not None and partition.usable() \
            else None
        if self.partition is not None:
            self.ctas = self.partition.fit_ctas(self.ctas)
            self._caller = self.streams.compute()
            self._compute, self._comm_stream = self.partition.gemm_stream, self.partition.comm_stream
            self._compute.wait_stream(self._caller)  # fork: inputs and residual are ready on the caller's stream
        elif self.streams is not None:
            self._caller = self._compute = self.streams.compute()
            self.streams.keep_apart(self._caller)
            self._comm_stream = self.streams.comm
        else:
            self._caller = self._compute = self._comm_stream = None
        self.rows = rows if rows is not None and rows.fits(x) else None
        self.sharded = [self.rows is not None and sharded_residual and _lean_runs(comm, b - a, x) for a, b in self.bounds]
        self.residual_parts = []
        for (a, b), sharded in zip(self.bounds, self.sharded):
            first, n = comm.shard_rows(b - a) if sharded else (0, b - a)
            self.residual_parts.append(residual[a + first:a + first + n])
        self.x_parts = [x[a:b] for a, b in self.bounds]
        self._like = x
        self._in_flight: list[_InFlight | None] = [None] * len(self.bounds)
        self._finished = False

    def stage(self, compute: StageFn, norm_weight: torch.Tensor, eps: float) -> None:
        """Run ``compute`` on every part, each followed by fused all-reduce + add + RMSNorm with
        ``norm_weight``; the normalised result becomes the next stage's input."""
        if self._finished:
            raise RuntimeError("WovenPass.stage called after finish()")
        with self._on(self._compute):
            self._stage(compute, norm_weight, eps)

    def _stage(self, compute, norm_weight, eps):
        # Allocated on the compute stream, written by the communication stream: see the module notes.
        T = self._like.shape[0]
        out = self.rows.out[:T] if self.rows is not None else torch.empty_like(self._like)
        for i, (a, b) in enumerate(self.bounds):
            self._await(i)
            if self.rows is not None:
                dest = self.rows.partial[a:b]
                partial = compute(i, self.x_parts[i], out=dest)
            else:
                partial = compute(i, self.x_parts[i])
            if partial.shape != self.x_parts[i].shape:
                raise ValueError(f"WovenPass: stage returned shape {tuple(partial.shape)} for part {i}, expected "
                                 f"{tuple(self.x_parts[i].shape)}")
            if self.rows is not None and partial.data_ptr() != dest.data_ptr():
                partial = dest.copy_(partial)  # a stage that ignored out=: its sum must be in symmetric memory
            partial = partial.contiguous()
            if self.streams is None:
                tw.fused_allreduce_rmsnorm(self.comm, partial, self.residual_parts[i], norm_weight, eps,
                                           out=out[a:b], sharded_residual=self.sharded[i])
            else:
                self._issue_on_comm(i, partial, norm_weight, eps, out[a:b])
            self.x_parts[i] = out[a:b]
        self._out = out

    def finish(self) -> torch.Tensor:
        """Join the communication stream; returns the last stage's normalised output [T, hidden]."""
        if self._finished:
            raise RuntimeError("WovenPass.finish called twice")
        for i in range(len(self.bounds)):
            self._await(i)
        if self.partition is not None:
            self._caller.wait_stream(self._compute)  # join: the compute stream already waited for every AR+norm
        self._finished = True
        return self._out.clone() if self.rows is not None else self._out

    # ------------------------------------------------------------------ internals
    def _on(self, stream):
        """Issue the enclosed work on ``stream`` (a no-op without streams)."""
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _issue_on_comm(self, i, partial, norm_weight, eps, out_rows):
        # Recorded after the part's compute, so it also covers everything the caller queued before
        # the pass (inputs, residual; with a partition, through the fork into the compute stream).
        ready = self.streams.record(self._compute)
        with self._on(self._comm_stream):
            self.streams.wait(self._comm_stream, ready)
            tw.fused_allreduce_rmsnorm(self.comm, partial, self.residual_parts[i], norm_weight, eps, out=out_rows,
                                       ctas=self.ctas, sharded_residual=self.sharded[i])
            done = self.streams.record(self._comm_stream)
        self._in_flight[i] = _InFlight(done, (partial, out_rows, self.residual_parts[i]))

    def _await(self, i):
        """Make the compute stream wait for part ``i``'s pending AR+norm, then release its tensors."""
        pending = self._in_flight[i]
        if pending is not None:
            self.streams.wait(self._compute, pending.done)
            self._in_flight[i] = None


def run_stages(comm, stages: Sequence[tuple[StageFn, torch.Tensor]], x: torch.Tensor, residual: torch.Tensor,
               bounds: Sequence[tuple[int, int]], eps: float, *, streams: StreamPair | None = None,
               ctas: int | None = None, partition=None, rows: SymmetricRows | None = None,
               sharded_residual: bool = False) -> torch.Tensor:
    """Run a whole chain of ``(stage_fn, norm_weight)`` through one :class:`WovenPass`."""
    woven = WovenPass(comm, x, residual, bounds, streams=streams, ctas=ctas, partition=partition, rows=rows,
                      sharded_residual=sharded_residual)
    for fn, weight in stages:
        woven.stage(fn, weight, eps)
    return woven.finish()


def _lean_runs(comm, tokens: int, x: torch.Tensor) -> bool:
    """Whether the dispatcher runs a lean two-shot for a part of ``tokens`` rows of ``x``'s width and dtype whose
    partial sums and outputs are symmetric (the residual can then stay sharded)."""
    if comm.transport not in ("p2p", "multimem") or comm.world_size < 2:
        return False
    hidden, itemsize = x.shape[1], x.element_size()
    if tokens * hidden * itemsize > comm.capacity_bytes:
        return False  # row chunks of the workspace: the flagged algorithms
    plan = comm.plan(tokens, hidden, itemsize, lean_ok=True, pull_ok=True)
    return plan.algo in (tw.comm.ALGOS["lean"], tw.comm.ALGOS["lean_pull"], tw.comm.ALGOS["lean_bulk"])


def _check_bounds(bounds, tokens):
    expected = 0
    for a, b in bounds:
        if a != expected or b <= a:
            raise ValueError(f"WovenPass: parts {list(bounds)} must be non-empty, in order and contiguous from 0")
        expected = b
    if expected != tokens:
        raise ValueError(f"WovenPass: parts {list(bounds)} must cover all {tokens} rows")
