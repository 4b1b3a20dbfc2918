"""Consumers: the all-reduce (+ residual + RMSNorm) of the producer's output, and the schedule that runs it.

``sm``           the fused kernel in its tracked form on a few CTAs of a high-priority stream: each CTA
                 acquires its chunk's counter (bounded by the Communicator's timeout), then scatters,
                 reduces, all-gathers and normalises it.
``copy_engine``  the scatter runs on the copy engines, gated by cuStreamWaitValue32 on per-group counters
                 (copy_engine.cu); the kernel starts each chunk at the reduce.
``stream``       no kernel waits at all: per row group, the consumer stream waits (cuStreamWaitValue32) until
                 the group's counter is complete, then launches the ordinary fused kernel on those rows.
"""
from __future__ import annotations

import os

import torch

from tokenweave import _abi
from tokenweave.ops import _collective, _ops
from tokenweave.trigger.producers import produce


def run(plan) -> torch.Tensor:
    """Enqueue the plan (producer and consumer) and join the caller's stream to it; returns ``plan.out``."""
    return _run_stream(plan) if plan.call.consumer == "stream" else _run_chunked(plan)


def _consume(plan) -> None:
    """The tracked (sm) or staged (copy_engine) kernel on the consumer stream."""
    c = plan.call
    with torch.cuda.stream(plan.consumer_stream):
        c.comm.order_stream()
        if c.consumer == "copy_engine":
            _ops().allreduce_staged(plan.y, c.residual, c.norm_weight, plan.out, float(c.eps), c.comm.comm_id,
                                    plan.ctas, plan.chunk_rows, c.tracker.go)
        else:
            _ops().allreduce_tracked(plan.y, c.residual, c.norm_weight, plan.out, float(c.eps), c.comm.comm_id,
                                     _abi.ALGO_CODES["two_shot"], plan.ctas, plan.chunk_rows, c.tracker.ready,
                                     c.tracker.consumed, *plan.targets)


def _stage(plan, inputs_ready) -> None:
    """The copy engines' scatter, on the Tracker's copy stream.

    The copy stream starts from ``inputs_ready``, recorded before the producer was enqueued: its per-group
    counter waits then gate each copy. (Waiting on the compute stream here would wait for the whole GEMM:
    the copy-engine numbers in bench/results were taken that way, before this was fixed.)
    """
    c, tracker = plan.call, plan.call.tracker
    tracker.copy_stream.wait_event(inputs_ready)
    with torch.cuda.stream(tracker.copy_stream):
        try:
            _ops().copy_engine_stage(plan.y, c.comm.comm_id, plan.ctas, plan.chunk_rows, tracker.group_ready,
                                     plan.ctas, *plan.targets, tracker.go, tracker.ones)
        except Exception:
            tracker.broken = True  # `go` and the group counters may be left armed: never reuse them
            raise


def _run_chunked(plan) -> torch.Tensor:
    """consumer "sm" / "copy_engine": the consumer first (it spins on few SMs), then the producer; on the
    first call of a shape the other way round (see the package docstring, "Forward progress")."""
    c = plan.call
    ce = c.consumer == "copy_engine"
    inputs_ready = torch.cuda.Event()
    inputs_ready.record(plan.compute)  # x, w, residual and the buffers are ready; the last call is done
    plan.consumer_stream.wait_event(inputs_ready)
    if plan.producer_stream is not plan.compute:
        plan.producer_stream.wait_event(inputs_ready)
    # CUDA_MODULE_LOADING=EAGER loads every CUDA kernel up front, but not Triton's, which loads on first launch.
    preloaded = os.environ.get("CUDA_MODULE_LOADING") == "EAGER" and c.producer != "triton"
    if c.tracker.is_warm(plan.warm_key) or torch.cuda.is_current_stream_capturing() or preloaded:
        _consume(plan)
        produce(plan)
    else:  # first call of this shape: load every kernel before anything spins
        produce(plan)
        plan.consumer_stream.wait_stream(plan.producer_stream)
        _consume(plan)
        c.tracker.mark_warm(plan.warm_key)
    if ce:  # enqueued last: its stream waits are unbounded, so only once the producer is fully enqueued
        _stage(plan, inputs_ready)
        plan.compute.wait_stream(c.tracker.copy_stream)
    _join(plan)
    if ce:
        for t in (plan.y, plan.out, c.residual):
            if t is not None:
                t.record_stream(c.tracker.copy_stream)
    return plan.out


def _run_stream(plan) -> torch.Tensor:
    """consumer "stream": the producer is enqueued first (the waits can only be satisfied by it, so no kernel
    they depend on is launched, and lazily loaded, behind them); each group's kernel is an ordinary collective
    call, so its timeouts, checks and numerics are the fused op's."""
    c = plan.call
    inputs_ready = torch.cuda.Event()
    inputs_ready.record(plan.compute)  # x, w, residual and the buffers are ready; the last call is done
    if plan.producer_stream is not plan.compute:
        plan.producer_stream.wait_event(inputs_ready)
    produce(plan)
    plan.consumer_stream.wait_event(inputs_ready)
    last = len(plan.marks) - 1
    with torch.cuda.stream(plan.consumer_stream):
        try:
            for k, (r0, r1, _, _) in enumerate(plan.marks):
                _ops().gate_on_counter(plan.counters, k, plan.targets[k == last])
                _collective(c.op, c.comm, plan.y[r0:r1], None if c.residual is None else c.residual[r0:r1],
                            c.norm_weight, c.eps, plan.out[r0:r1], None, plan.ctas)
        except Exception:
            c.tracker.broken = True  # groups not yet gated keep the producer's counts: never reuse the counters
            raise
    _join(plan)
    return plan.out


def _join(plan) -> None:
    """The caller's stream waits for both roles; tensors used on the side streams are not reusable before."""
    compute, producer_stream, consumer_stream = plan.compute, plan.producer_stream, plan.consumer_stream
    if producer_stream is not compute:
        compute.wait_stream(producer_stream)
    compute.wait_stream(consumer_stream)
    for t in (plan.y, plan.out, plan.call.residual):
        if t is not None:
            t.record_stream(consumer_stream)
            if producer_stream is not compute:
                t.record_stream(producer_stream)
