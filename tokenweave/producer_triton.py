"""Track-and-trigger producer in Triton: ``y = x @ w.T`` that marks each chunk's readiness from its epilogue.

The consumer (the tracked all-reduce kernel, see ``wait_ready`` in csrc/include/tokenweave/sync.cuh) reads
``y`` chunk by chunk, chunk ``c`` being rows ``[c * chunk_rows, min((c + 1) * chunk_rows, M))``. It waits,
with an acquire at gpu scope, until ``ready[c]`` has grown by its target since its previous call. Here every
output tile, once stored, adds the number of its rows inside chunk ``c`` to ``ready[c]`` for each chunk it
overlaps, with one release atomic at gpu scope. A chunk is therefore complete exactly when its counter has grown
by ``rows_in_chunk(c) * cdiv(N, BLOCK_N)`` (:func:`ready_targets`), for any ``chunk_rows``: no alignment of
chunks to tiles is needed.

Counters only grow: int32, wrapping. Each call adds at most ``chunk_rows * cdiv(N, BLOCK_N)`` (< 2**31,
checked) to a counter, and the consumer finishes call i before the producer of call i + 1 starts (the caller
orders the streams), so the counter is never more than 2**31 - 1 ahead of the consumer's own ``consumed`` copy
and the consumer's comparison ``int32(ready - want) >= 0`` stays right across the wrap. CUDA-graph replays
therefore need no reset.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

HAS_TRITON = triton is not None

_OP = "tokenweave.matmul_mark_ready"
_DTYPES = (torch.bfloat16, torch.float16)
_INT32_LIMIT = 2 ** 31


# Columns per output tile, the same for every config: callers compute the counter targets (ready_targets) before
# the launch, for the consumer that goes first, so they must not depend on the config picked.
BLOCK_N = 128


class _Config(NamedTuple):
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int


# Fixed configs, no autotuning: autotune would benchmark again under CUDA-graph capture and its pick may differ
# from run to run (and with it the rounding of y). Large M: 128x128x64 tiles, two warpgroups of 64x128 wgmma,
# 4 stages (128 KiB of Hopper's 227 KiB shared memory), the usual Hopper bf16/fp16 shape; 128 columns rather
# than 256 give twice the tiles, so readiness is finer and the tail of the persistent loop shorter. M <= 64
# (decode): one warpgroup of 64 rows (the smallest wgmma M; 96 KiB), so half of each MMA is not spent on rows
# past M. Both compile for sm_90a without spills (ptxas: 128 registers).
_SMALL_M = _Config(block_m=64, block_k=64, num_warps=4, num_stages=4)
_LARGE_M = _Config(block_m=128, block_k=64, num_warps=8, num_stages=4)


def _config(M: int) -> _Config:
    return _SMALL_M if M <= 64 else _LARGE_M


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _targets(op: str, M: int, N: int, chunk_rows: int, n_chunks: int, block_n: int) -> tuple[int, int]:
    if M < 1 or N < 1 or chunk_rows < 1 or block_n < 1:
        raise ValueError(f"{op}: M={M}, N={N}, chunk_rows={chunk_rows} and block_n={block_n} must all be >= 1")
    if n_chunks != _cdiv(M, chunk_rows):
        raise ValueError(f"{op}: n_chunks={n_chunks} but M={M} rows in chunks of {chunk_rows} make "
                         f"{_cdiv(M, chunk_rows)}; pass n_chunks = cdiv(M, chunk_rows)")
    tiles_n = _cdiv(N, block_n)
    full = chunk_rows * tiles_n
    if full >= _INT32_LIMIT:  # the consumer's wrap-safe comparison needs every per-call step below 2**31
        raise ValueError(f"{op}: chunk_rows * cdiv(N, {block_n}) = {full} does not fit the int32 counters; "
                         "use smaller chunks")
    return full, (M - (n_chunks - 1) * chunk_rows) * tiles_n


def ready_targets(M: int, N: int, chunk_rows: int, n_chunks: int, block_n: int) -> tuple[int, int]:
    """How much one producer call adds to each chunk's ``ready`` counter.

    Parameters
    ----------
    M, N : int
        Shape of the output ``y``.
    chunk_rows : int
        Rows per chunk; the last chunk holds the remainder.
    n_chunks : int
        ``cdiv(M, chunk_rows)``.
    block_n : int
        Columns per output tile of the producer: :data:`BLOCK_N` for :func:`matmul_mark_ready`.

    Returns
    -------
    (int, int)
        ``(pieces_full, pieces_last)``: ``chunk_rows * cdiv(N, block_n)`` for every chunk but the last, and the
        last chunk's row count times ``cdiv(N, block_n)`` for the last one (equal when the last chunk is full).

    Raises
    ------
    ValueError
        If ``n_chunks`` does not match ``M`` and ``chunk_rows``, or a target does not fit the int32 counters.
    """
    return _targets("tokenweave.ready_targets", M, N, chunk_rows, n_chunks, block_n)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


if HAS_TRITON:
    @triton.jit
    def _matmul_mark_ready_kernel(x_ptr, w_ptr, y_ptr, ready_ptr, M, N, K, chunk_rows,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Persistent: program p takes tiles p, p + nprog, ...; tile ids are M-major (every N-block of row block
        # 0, then of row block 1, ...), so chunks complete in the order the consumer waits for them. The grid is
        # capped so that every program is resident next to the consumer (see matmul_mark_ready, Notes).
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        tiles_n = tl.cdiv(N, BLOCK_N)
        n_tiles = tl.cdiv(M, BLOCK_M) * tiles_n
        for tile in range(pid, n_tiles, nprog):
            r0 = (tile // tiles_n) * BLOCK_M
            rows = r0 + tl.arange(0, BLOCK_M)
            cols = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
            ks = tl.arange(0, BLOCK_K)
            # Rows/columns past the edge load a valid row/column again instead of being masked (keeps the loads
            # vectorised); their results are never stored. int64 offsets: M * K may exceed 2**31.
            x_ptrs = x_ptr + (rows % M).to(tl.int64)[:, None] * K + ks[None, :]
            w_ptrs = w_ptr + (cols % N).to(tl.int64)[None, :] * K + ks[:, None]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                a = tl.load(x_ptrs, mask=ks[None, :] < K - k, other=0.0)
                b = tl.load(w_ptrs, mask=ks[:, None] < K - k, other=0.0)
                acc = tl.dot(a, b, acc)
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K
            y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))
            # Publish the tile. Every thread stored its part with a plain st.global; the CTA barrier orders those
            # stores before the single atomic below, whose release at gpu scope is cumulative over them, so a
            # consumer's acquire of ready[c] at gpu scope sees the whole tile. (Plain stores are why the barrier
            # suffices: TMA stores are async-proxy writes and would need a full store wait first.) The atomic is
            # on a scalar pointer, which Triton lowers to one atom per program, not one per thread: scalars get
            # getAllFreeVarMasks() (every thread redundant) in the AtomicRMWOp lowering, so one thread issues it.
            # Checked in Triton 3.6's sm_90a PTX: bar.sync 0, then one `@p atom.global.gpu.release.add.u32` with
            # p = (tid.x % threads == 0).
            tl.debug_barrier()
            r1 = tl.minimum(r0 + BLOCK_M, M)
            for c in range(r0 // chunk_rows, (r1 - 1) // chunk_rows + 1):  # 1-2 chunks unless BLOCK_M > chunk_rows
                n_rows = tl.minimum(r1, (c + 1) * chunk_rows) - tl.maximum(r0, c * chunk_rows)
                tl.atomic_add(ready_ptr + c, n_rows, sem="release", scope="gpu")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _as_int(name, v):
    try:
        return operator.index(v)  # ints of any kind (Python, NumPy, 0-d torch), never floats
    except TypeError:
        raise TypeError(f"{_OP}: {name} must be an int, got {type(v).__name__}") from None


def _check(x, w, y, ready, chunk_rows, n_chunks, max_programs):
    for name, t in (("x", x), ("w", w), ("y", y), ("ready", ready)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"{_OP}: x must be 2-D [M, K] and w 2-D [N, K] (nn.Linear layout); got x of shape "
                         f"{tuple(x.shape)} and w of shape {tuple(w.shape)}; flatten the leading dims of x")
    if x.dtype not in _DTYPES or w.dtype != x.dtype or y.dtype != x.dtype:
        raise TypeError(f"{_OP}: x, w and y must share one dtype, bfloat16 or float16; got x {x.dtype}, "
                        f"w {w.dtype}, y {y.dtype}; cast them")
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"{_OP}: x has K={K} but w has K={w.shape[1]}; w must be [N, K] (out, in), "
                         "the nn.Linear weight itself, not its transpose")
    if tuple(y.shape) != (M, N):
        raise ValueError(f"{_OP}: y has shape {tuple(y.shape)}; it must be [M, N] = [{M}, {N}]")
    if M == 0 or N == 0:
        raise ValueError(f"{_OP}: nothing to compute (M={M}, N={N}); skip the call and the consumer")
    for name, t in (("x", x), ("w", w), ("y", y), ("ready", ready)):
        if not t.is_contiguous():
            raise ValueError(f"{_OP}: {name} must be contiguous; pass {name}.contiguous()")
    if ready.dtype != torch.int32 or ready.dim() != 1 or ready.numel() < n_chunks:
        raise ValueError(f"{_OP}: ready must be a 1-D int32 tensor with at least n_chunks={n_chunks} entries; "
                         f"got {ready.dtype} of shape {tuple(ready.shape)} (use Tracker.ready)")
    if chunk_rows < 1 or n_chunks != _cdiv(M, chunk_rows):
        raise ValueError(f"{_OP}: chunk_rows={chunk_rows!r} and n_chunks={n_chunks!r} do not chunk M={M} rows; "
                         "pass chunk_rows >= 1 and n_chunks = cdiv(M, chunk_rows)")
    if max_programs is not None and max_programs < 1:
        raise ValueError(f"{_OP}: max_programs={max_programs!r}; pass None or an int >= 1")
    devices = {t.device for t in (x, w, y, ready)}
    if len(devices) != 1:
        raise ValueError(f"{_OP}: x, w, y and ready must be on one device; got {sorted(map(str, devices))}")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{_OP}: tensors are on {x.device}; move them to a CUDA device "
                         "(CPU tensors only run under TRITON_INTERPRET=1)")


def matmul_mark_ready(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, ready: torch.Tensor, chunk_rows: int,
                      n_chunks: int, *, max_programs: int | None = None) -> tuple[int, int]:
    """``y = x @ w.T``; after each output tile is stored, add its row count inside each chunk it overlaps to
    ``ready[chunk]`` (one release atomic at gpu scope per tile and chunk).

    Parameters
    ----------
    x : Tensor [M, K]
        bfloat16 or float16, contiguous.
    w : Tensor [N, K]
        Same dtype, contiguous (the nn.Linear weight).
    y : Tensor [M, N]
        Output, same dtype, contiguous. Accumulated in float32, rounded to y's dtype once.
    ready : Tensor
        1-D int32 counters with at least ``n_chunks`` entries (e.g. ``Tracker.ready``). Never reset: they only
        grow, by the returned targets per call.
    chunk_rows : int
        Rows per chunk of the consumer; any value >= 1 (no alignment to the tiles needed).
    n_chunks : int
        ``cdiv(M, chunk_rows)``.
    max_programs : int, optional
        Most programs (CTAs) of the persistent grid; default the SM count. Next to a running consumer pass at
        most the SMs its CTAs leave free (see Notes).

    Returns
    -------
    (int, int)
        ``(pieces_full, pieces_last)``: what this call adds to ``ready[c]`` for ``c < n_chunks - 1`` and for
        the last chunk (:func:`ready_targets`); the consumer's per-chunk targets.

    Raises
    ------
    RuntimeError
        If Triton is not installed.
    TypeError, ValueError
        On inputs it cannot run (the message says what to change).

    Notes
    -----
    Forward progress: the producer never waits on the consumer, but the consumer's CTAs, launched first, spin
    on whole SMs (each fills an SM's registers) until their chunks are ready. Tiles are assigned to programs
    statically, so a producer program that can only start once a consumer CTA exits would never run, and the
    pair would hang until the consumer's timeout. Capping the grid at the SMs the consumer leaves free keeps
    every program resident from the start (a free SM holds at least one producer CTA).

    Runs on the current stream of x's device, asynchronously. The kernel compiles on the first call for each
    dtype and shape class: make one eager call before capturing a CUDA graph.
    """
    if not HAS_TRITON:
        raise RuntimeError(f"{_OP} needs Triton (import triton failed); install it with `pip install triton` "
                           "(the version your torch pins; tested with 3.6)")
    chunk_rows, n_chunks = _as_int("chunk_rows", chunk_rows), _as_int("n_chunks", n_chunks)
    if max_programs is not None:
        max_programs = _as_int("max_programs", max_programs)
    _check(x, w, y, ready, chunk_rows, n_chunks, max_programs)
    M, K = x.shape
    N = w.shape[0]
    cfg = _config(M)
    pieces = _targets(_OP, M, N, chunk_rows, n_chunks, BLOCK_N)
    n_tiles = _cdiv(M, cfg.block_m) * _cdiv(N, BLOCK_N)
    on_gpu = x.device.type == "cuda"
    # Triton launches on the current device (and its current stream): make it x's.
    with torch.cuda.device(x.device) if on_gpu else contextlib.nullcontext():
        cap = max_programs or (_sm_count(torch.cuda.current_device()) if on_gpu else n_tiles)
        _matmul_mark_ready_kernel[(min(n_tiles, cap),)](
            x, w, y, ready, M, N, K, chunk_rows, BLOCK_M=cfg.block_m, BLOCK_N=BLOCK_N, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return pieces
