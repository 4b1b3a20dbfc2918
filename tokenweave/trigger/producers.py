"""Producers: ``y = x @ w.T`` on the producer stream, adding to the Tracker's counters as rows complete.

``cublas``  one cuBLAS GEMM per row range of the plan, each followed by a tiny kernel that adds 1 to its
            counters (red.release.gpu; any stream-ordered producer we do not own can be marked this way).
``triton``  one persistent Triton GEMM whose epilogue stores a tile, syncs the CTA and adds the tile's rows
            to its unit's counter with one release atomic (:mod:`tokenweave.producer_triton`).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from tokenweave.ops import _ops


def produce(plan) -> None:
    """Enqueue the plan's producer on ``plan.producer_stream``.

    cuBLAS: one GEMM per ``plan.marks`` range, each followed by a mark of its counters; with
    ``plan.carveout`` > 0 cuBLAS plans for that many fewer SMs, so its CTAs leave them free. Triton: one
    persistent GEMM on at most ``plan.max_programs`` CTAs, adding per tile its rows inside each unit of
    ``plan.unit_rows`` rows to that unit's counter.
    """
    x, w, y = plan.call.x, plan.call.w, plan.y
    with torch.cuda.stream(plan.producer_stream):
        if plan.call.producer == "triton":
            from tokenweave.producer_triton import matmul_mark_ready

            matmul_mark_ready(x, w, y, plan.counters, plan.unit_rows, plan.units, max_programs=plan.max_programs)
            return
        with sm_carveout(plan.carveout):
            for r0, r1, c0, c1 in plan.marks:
                torch.matmul(x[r0:r1], w.t(), out=y[r0:r1])
                _ops().mark_ready(plan.counters, c0, c1, 1)


def targets(producer: str, M: int, N: int, unit_rows: int, units: int) -> tuple[int, int]:
    """(full, last): what one call adds to each counter of ``units`` units of ``unit_rows`` rows."""
    if producer == "cublas":
        return 1, 1  # one mark_ready per unit
    from tokenweave.producer_triton import BLOCK_N, ready_targets

    return ready_targets(M, N, unit_rows, units, BLOCK_N)


@contextlib.contextmanager
def sm_carveout(sms: int):
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
