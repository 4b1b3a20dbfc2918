"""Reusable benchmark pieces: timing, process launch, results files and tables.

Nothing here knows about a particular benchmark; the runners (e.g. :mod:`tokenweave.bench.fused`)
build on it. Rows are flat dicts: an x key (``tokens``, or ``M`` for GEMM benches), panel keys
(``hidden``, or ``K``/``N``), ``dtype``, ``variant`` and ``us`` (microseconds per call, ``None``
when the variant did not run).
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import time
import types
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from tokenweave.tuning import device_slug

BASELINE = "baseline"
# The baseline timed a second time, last at each size: |baseline - baseline_repeat| / baseline is the run's noise.
BASELINE_REPEAT = "baseline_repeat"
# Results go to a user folder by default: run inside the repository, the bench must not overwrite the committed
# bench/results files (pass --out-dir bench/results to do that on purpose).
DEFAULT_OUT_DIR = "tokenweave-results"
# A baseline norm moving less than this fraction of what a device copy of the same bytes achieves is flagged.
LOW_BANDWIDTH_FRACTION = 0.7


# ---------------------------------------------------------------------------------------------- timing
def time_cuda_graph(fn: Callable[..., object], *, calls: int = 20, replays: int = 5, warmup: int = 3,
                    before_replay: Callable[[], None] | None = None, world=None, clean: bool = False) -> float:
    """Median time of one ``fn()`` call, measured inside a CUDA graph.

    ``calls`` back-to-back calls are captured into one graph, so launch overhead is excluded the
    way it is in a CUDA-graphed model. The graph is replayed ``warmup`` times, then timed with CUDA
    events over ``replays`` replays.

    Parameters
    ----------
    fn : callable
        Issues the work on the current stream. Called ``warmup`` times eagerly first (on a side
        stream, as graph capture requires) so lazy initialisation and compilation happen outside
        the graph.
    calls, replays, warmup : int
    before_replay : callable, optional
        Called before every timed replay, outside the timed region (reset in-place inputs so
        repeated all-reduces do not overflow; align the ranks).
    clean : bool
        :func:`clean_l2` first, so that the time does not depend on what was timed before (the norm benches:
        variants run one after another on the same tensors).
    world : tokenweave.testing.EmulatedWorld, optional
        ``fn`` is then ``fn(comm, rank)``, issued for every emulated rank, and each rank's ``calls`` calls
        are captured into a graph of its own (``EmulatedWorld.capture``: one graph with every rank as a
        branch may serialise the ranks).

    Returns
    -------
    float
        Median over replays of (replay time / ``calls``), in microseconds.
    """
    if clean:
        clean_l2()
    if world is not None:
        rank_fn = fn
        fn = lambda: world.run(rank_fn)  # noqa: E731
    side = _side_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    if world is not None:
        graph = world.capture(lambda comm, r: [rank_fn(comm, r) for _ in range(calls)])
    else:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    try:
        for _ in range(warmup):
            if before_replay is not None:
                before_replay()
            graph.replay()
        return _event_median(graph.replay, calls, replays, before_replay)
    finally:
        graph.reset()  # give the graph's private memory pool back before the next variant


_SCRUB: dict = {}


def clean_l2() -> None:
    """Leave the current device's L2 as no earlier kernel chose it: lines marked persisting (loaded with
    L2::evict_last, as the compiled norm and the re-read norm shapes load x and the residual) back to normal
    priority, then every line replaced by writing a buffer of twice the L2's size. Without it a variant inherits
    the lines an earlier one kept: on one H200 (bench/debug/norm_l2_carryover.py, bench/results/variants/95d8f74)
    norm shape 22 took 67.3-67.8 us at 4096 x 8192 after this, but 64.7-64.9 right after shape 20 or the compiled
    norm on the same tensors (both load x and the residual with L2::evict_last), and shape 18 at 4096 x 4096 31.4
    us after shape 24 against 34.2-34.6. The reset and the write were measured together, not each alone."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("tokenweave.bench.clean_l2: called during a CUDA graph capture; clean before capturing")
    device = torch.cuda.current_device()
    torch.cuda.synchronize(device)
    from tokenweave._ext import _C

    if _C is not None:  # without the extension the write below still evicts every line of normal priority
        if not hasattr(_C, "reset_persisting_l2_cache"):
            raise RuntimeError("tokenweave.bench.clean_l2: the built extension predates reset_persisting_l2_cache; "
                               "rebuild it (pip install --no-build-isolation --no-deps -e .)")
        _C.reset_persisting_l2_cache()
    if device not in _SCRUB:  # kept for the process (2 x L2: about 120 MiB on an H200), not allocated per timing
        _SCRUB[device] = torch.empty(2 * torch.cuda.get_device_properties(device).L2_cache_size // 4,
                                     dtype=torch.float32, device=device)
    _SCRUB[device].fill_(1.0)
    torch.cuda.synchronize(device)


_SIDE_STREAMS: dict = {}


def _side_stream() -> torch.cuda.Stream:
    """One warm-up stream per device for the whole process: a new ``torch.cuda.Stream()`` per timing would walk
    torch's round-robin pool of 32 and hand out, sooner or later, a stream something else is using."""
    device = torch.cuda.current_device()
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream()
    return _SIDE_STREAMS[device]


def time_wall(fn: Callable[[], object], *, calls: int = 20, replays: int = 5, warmup: int = 3,
              before_replay: Callable[[], None] | None = None, clean: bool = False) -> float:
    """Like :func:`time_cuda_graph` but eager and wall-clock timed (for CPU runs; ``clean`` does nothing here).

    Returns
    -------
    float
        Median over replays of (wall time of ``calls`` calls / ``calls``), in microseconds.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(replays):
        if before_replay is not None:
            before_replay()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(times)


def time_cuda_eager(fn: Callable[[], object], *, calls: int = 20, replays: int = 5, warmup: int = 3) -> float:
    """Like :func:`time_cuda_graph` but the ``calls`` calls are launched eagerly between the CUDA events.

    For long calls (hundreds of microseconds each, as in the emulated world's per-CTA table): the host enqueues far
    faster than the GPU runs them, so launch cost stays hidden.

    Returns
    -------
    float
        Median over replays of (event time of ``calls`` calls / ``calls``), in microseconds.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return _event_median(lambda: [fn() for _ in range(calls)], calls, replays)


def _event_median(run: Callable[[], object], calls: int, replays: int,
                  before: Callable[[], None] | None = None) -> float:
    """Median over ``replays`` of the CUDA-event time of ``run()`` (which issues ``calls`` calls) / ``calls``, in us;
    ``before()`` runs outside the timed region."""
    events = []
    for _ in range(replays):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 / calls for s, e in events)


def timer_for(device: torch.device) -> Callable[..., float]:
    """:func:`time_cuda_graph` for CUDA devices, :func:`time_wall` otherwise (same signature)."""
    return time_cuda_graph if device.type == "cuda" else time_wall


def align_ranks(group: dist.ProcessGroup | None = None, device: torch.device | None = None,
                spin_cycles: int = 1_000_000) -> None:
    """Make every rank start its next timed region at (nearly) the same moment.

    On CUDA this is GPU-side: a spin kernel keeps the GPU busy while the CPU queues what follows
    (so no launch gap is timed), then a one-element all-reduce releases all GPUs together; a CPU
    barrier would leave tens of microseconds of skew, which a 20-call graph of 7 us calls cannot
    hide. Elsewhere it is a plain barrier.
    """
    if device is None or device.type != "cuda":
        dist.barrier(group=group)
        return
    torch.cuda._sleep(spin_cycles)
    if dist.get_world_size(group) > 1:  # one rank: nothing to align with, the spin alone hides the launch gap
        dist.all_reduce(torch.zeros(1, device=device), group=group)


def barrier(group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> None:
    """Finish this rank's queued GPU work, then wait for every rank."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=group)


# ---------------------------------------------------------------------------------------------- compiled baselines
class StaticCompiled:
    """``fn`` under ``torch.compile``, compiled afresh for every static input signature.

    Compiling one function for several shapes lets dynamo's automatic dynamic shapes kick in: the second
    hidden size recompiles with symbolic dimensions, and that generic kernel ran 1.5-2.8x slower than the
    one compiled for hidden 8192 alone on an H200 (the "compiled-norm trap"). A baseline must be the best
    a user would get, so each signature (shape, dtype and device of every tensor argument, plus the other
    arguments) gets its own copy of ``fn``'s code object (dynamo keeps its cache on the code object, so the
    copies share no entries, recompile counters or dynamic-shape decisions) compiled with
    ``dynamic=False``: exactly one static graph per signature, whatever was compiled before.

    Parameters
    ----------
    fn : callable
        A plain Python function (not a bound method or a module).
    backend : str or callable
        torch.compile backend ("inductor" by default; the tests pass a recording backend).
    fullgraph : bool
    """

    def __init__(self, fn: Callable, *, backend="inductor", fullgraph: bool = True):
        if not isinstance(fn, types.FunctionType):
            raise TypeError(f"StaticCompiled: fn must be a plain Python function, got {type(fn).__name__}")
        self.fn = fn
        self.backend = backend
        self.fullgraph = fullgraph
        self._compiled: dict[tuple, tuple[Callable, types.CodeType]] = {}

    @staticmethod
    def signature(*args, **kwargs) -> tuple:
        """The key of one static compile: every tensor's (shape, dtype, device), every other argument itself."""
        def key(a):
            if isinstance(a, torch.Tensor):
                return ("tensor", tuple(a.shape), a.dtype, str(a.device))
            return a
        return tuple(key(a) for a in args) + tuple((k, key(v)) for k, v in sorted(kwargs.items()))

    def __call__(self, *args, **kwargs):
        sig = self.signature(*args, **kwargs)
        entry = self._compiled.get(sig)
        if entry is None:
            entry = self._compiled[sig] = self._fresh()
        return entry[0](*args, **kwargs)

    def _fresh(self) -> tuple[Callable, types.CodeType]:
        fn = self.fn
        code = fn.__code__.replace()  # a new code object: a cache of its own
        copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__kwdefaults__ = fn.__kwdefaults__
        copy.__qualname__ = fn.__qualname__
        return torch.compile(copy, fullgraph=self.fullgraph, dynamic=False, backend=self.backend), code

    def signatures(self) -> list[tuple]:
        """The signatures compiled so far, in order."""
        return list(self._compiled)

    def cache_entries(self) -> dict[tuple, int | None]:
        """Dynamo cache entries per signature (1 each when nothing recompiled; None where torch cannot say)."""
        try:
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        except ImportError:
            return {sig: None for sig in self._compiled}
        return {sig: len(_debug_get_cache_entry_list(code)) for sig, (_, code) in self._compiled.items()}

    def summary(self) -> dict:
        """What the results JSON records about the compiled baseline."""
        entries = self.cache_entries()
        counts = [n for n in entries.values() if n is not None]
        return {"compile": "torch.compile(fullgraph=True, dynamic=False), a fresh compile per static input signature",
                "signatures": len(entries), "max_cache_entries_per_signature": max(counts) if counts else None}


# ---------------------------------------------------------------------------------------------- bandwidth
def add_rmsnorm_traffic_bytes(tokens: int, hidden: int, itemsize: int) -> int:
    """Bytes a residual-add + RMSNorm must move: read x, residual, weight; write residual, out."""
    return (4 * tokens + 1) * hidden * itemsize


class CopyBandwidth:
    """Device-to-device copy bandwidth, the yardstick of memory-bound kernels (read + write bytes counted).

    A size's bandwidth is the fastest of the copies in :attr:`methods` (:meth:`default_methods`). cudaMemcpy alone
    moved 2716 GB/s at 2 GiB of traffic on one H200 at 95d8f74, where the norm kernels reached about 4.2 TB/s, so it
    was no ceiling. ``peak_gbps`` is a large copy (``peak_bytes`` of traffic): the card's copy bandwidth, and
    :attr:`peak_by_method` each method's; :attr:`nominal_gbps` the card's nominal memory bandwidth. :meth:`gbps`
    times a copy moving the same traffic as a kernel, which tells whether that size is bandwidth-bound at all (at a
    few KB launch and tail latency bound a copy and a kernel alike).
    """

    def __init__(self, device: torch.device, timer: Callable[..., float] | None = None, *,
                 peak_bytes: int | None = None, calls: int = 10, replays: int = 5,
                 methods: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] | None = None):
        self.device = device
        self.timer = timer or timer_for(device)
        self.calls, self.replays = calls, replays
        self.methods = methods if methods is not None else self.default_methods(device)
        self._by_method: dict[int, dict[str, float]] = {}
        # 512 MiB of traffic on a GPU, about 10x the L2 of an H100 or H200: there cudaMemcpy moved 4238 GB/s on one
        # H200 and at 2 GiB 2770 (bench/results/variants/783db04/copy_probe.json); a CPU run only checks the pipeline
        if peak_bytes is None:
            peak_bytes = 512 << 20 if device.type == "cuda" else 32 << 20
        self.peak_bytes = peak_bytes
        self.peak_by_method = self.by_method(peak_bytes)
        self.peak_gbps = max(self.peak_by_method.values())
        self.nominal_gbps = self.nominal_memory_gbps(device)

    @staticmethod
    def nominal_memory_gbps(device: torch.device) -> float | None:
        """The card's nominal memory bandwidth (GB/s, from its memory clock and bus width; ``_C``), None on a CPU,
        without the extension, or where the device reports no memory clock."""
        if device.type != "cuda":
            return None
        from tokenweave._ext import _C

        if _C is None or not hasattr(_C, "nominal_memory_gbps"):
            return None
        with torch.cuda.device(device):
            gbps = float(_C.nominal_memory_gbps())
        return gbps if gbps > 0 else None

    @staticmethod
    def default_methods(device: torch.device) -> dict[str, Callable[[torch.Tensor, torch.Tensor], object]]:
        """name -> copy(dst, src): ``copy_`` everywhere; on a GPU torch's elementwise kernel (``bitwise_not`` of int64
        views: a read and a write of each byte) and, with the extension built, ``stream_copy``. None is fastest at
        every size (bench/debug/copy_probe.py: at 1 GiB copied the elementwise kernel, at 256 MiB cudaMemcpy)."""
        methods: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {"copy_": lambda dst, src: dst.copy_(src)}
        if device.type == "cuda":
            methods["torch_elementwise"] = lambda dst, src: torch.bitwise_not(src.view(torch.int64),
                                                                              out=dst.view(torch.int64))
            from tokenweave._ext import _C

            if _C is not None and hasattr(_C, "stream_copy"):
                methods["stream_copy"] = _C.stream_copy
        return methods

    @staticmethod
    def _half(traffic_bytes: int) -> int:
        return max(16, (int(traffic_bytes) // 2 + 15) // 16 * 16)

    def by_method(self, traffic_bytes: int) -> dict[str, float]:
        """method -> GB/s (1e9 bytes) of a copy of ``traffic_bytes / 2`` bytes into another buffer (cached per
        size)."""
        half = self._half(traffic_bytes)
        if half not in self._by_method:
            src = torch.empty(half, dtype=torch.uint8, device=self.device).random_(0, 256)
            dst = torch.empty_like(src)
            self._by_method[half] = {
                name: 2 * half / (self.timer(lambda: copy(dst, src), calls=self.calls, replays=self.replays) * 1e3)
                for name, copy in self.methods.items()}
            del src, dst
        return self._by_method[half]

    def gbps(self, traffic_bytes: int) -> float:
        """GB/s of the fastest copy of ``traffic_bytes / 2`` bytes into another buffer (:meth:`by_method`)."""
        return max(self.by_method(traffic_bytes).values())

    def describe(self) -> dict:
        """The results file's ``copy_bandwidth``: the card's copy bandwidth and how it was measured."""
        return {"GBps": round(self.peak_gbps, 1), "traffic_bytes": self.peak_bytes,
                "by_method": {name: round(g, 1) for name, g in self.peak_by_method.items()},
                "nominal_GBps": None if self.nominal_gbps is None else round(self.nominal_gbps, 1),
                "method": "the fastest of " + ", ".join(self.methods) + " device to device, read + written bytes / "
                          "time (copy_: cudaMemcpy; torch_elementwise: torch.bitwise_not of int64 views; stream_copy: "
                          "tokenweave's 16-byte SM copy, _C.stream_copy)"}


def bandwidth_fields(us: float | None, traffic_bytes: int, copy: CopyBandwidth | None) -> dict:
    """Row fields of a memory-bound kernel: achieved GB/s against the card's copy bandwidth.

    ``frac_of_peak_copy`` compares with the large copy (the card's copy bandwidth), ``frac_of_copy`` with a
    copy of the same bytes. ``bw_low`` is True when the kernel reaches less than
    :data:`LOW_BANDWIDTH_FRACTION` of the card's copy bandwidth at a size where a copy of the same bytes
    reaches at least that fraction itself (a bandwidth-bound size); None at smaller, latency-bound sizes,
    where no kernel can reach it.
    """
    if us is None or us <= 0:
        return {}
    gbps = traffic_bytes / (us * 1e3)
    fields = {"bytes": int(traffic_bytes), "GBps": round(gbps, 1)}
    if copy is not None:
        same = copy.gbps(traffic_bytes)
        bandwidth_bound = same >= LOW_BANDWIDTH_FRACTION * copy.peak_gbps
        fields.update(copy_GBps_same_bytes=round(same, 1), frac_of_copy=round(gbps / same, 3),
                      frac_of_peak_copy=round(gbps / copy.peak_gbps, 3),
                      bw_low=(gbps < LOW_BANDWIDTH_FRACTION * copy.peak_gbps) if bandwidth_bound else None)
    return fields


def format_bandwidth(row: dict) -> str:
    """``"4012 GB/s = 85% of copy"`` (``LOW`` appended when flagged) for a row with :func:`bandwidth_fields`."""
    if "GBps" not in row:
        return ""
    text = f"{row['GBps']:.0f} GB/s"
    if "frac_of_peak_copy" in row:
        text += f" = {100 * row['frac_of_peak_copy']:.0f}% of copy"
        if row.get("bw_low") is None:
            text += " (latency-bound size)"
        elif row["bw_low"]:
            text += f" LOW (< {100 * LOW_BANDWIDTH_FRACTION:.0f}%)"
    return text


# ---------------------------------------------------------------------------------------------- noise
def run_to_run_noise(rows: Sequence[dict], *, x_key: str = "tokens", panel_keys: Sequence[str] = ("hidden",),
                     first: str = BASELINE, repeat: str = BASELINE_REPEAT) -> dict | None:
    """``|first - repeat| / first`` of the same variant timed twice in one run, per size and the maximum.

    Returns
    -------
    dict or None
        ``{"variants": [first, repeat], "max": float, "per_size": [{panel keys, x_key, "noise"}]}``,
        or None when no size has both timings.
    """
    us = {(_panel_of(r, panel_keys), r[x_key], r["variant"]): r.get("us") for r in rows}
    per_size = []
    for (panel, x, variant), a in us.items():
        b = us.get((panel, x, repeat))
        if variant != first or not a or not b:
            continue
        per_size.append({**dict(panel), x_key: x, "noise": round(abs(a - b) / a, 4)})
    if not per_size:
        return None
    return {"variants": [first, repeat], "max": max(p["noise"] for p in per_size), "per_size": per_size}


# ---------------------------------------------------------------------------------------------- where
def git_sha() -> str:
    """``TOKENWEAVE_GIT_SHA`` when set (the lent GPU machines get a copy of the tree whose .git, if any, is a
    stale snapshot: the device script sets it); else ``git describe --always --dirty``; else "unknown"."""
    fallback = os.environ.get("TOKENWEAVE_GIT_SHA", "unknown")
    if fallback != "unknown":
        return fallback
    try:
        res = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                             cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return fallback
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else fallback


# ---------------------------------------------------------------------------------------------- processes
def launched_by_torchrun() -> bool:
    """True when this process was started by torchrun (or another launcher that sets RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., object], world_size: int, backend: str, *args) -> None:
    """Run ``fn(*args)`` on ``world_size`` ranks with an initialised default process group.

    Under torchrun the current process is one rank: the group is initialised from the environment
    (``world_size`` is then ignored). Otherwise ``world_size`` processes are spawned on this host,
    rendezvousing on a free TCP port of 127.0.0.1; they inherit a copy of ``os.environ``. With
    the "nccl" backend rank ``r`` uses GPU ``LOCAL_RANK`` (``r`` when spawned).

    Parameters
    ----------
    fn : callable
        Module-level function (it is pickled for spawned processes).
    world_size : int
    backend : {"nccl", "gloo"}
    *args
        Passed to ``fn``; must be picklable.
    """
    if launched_by_torchrun():
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        _run_rank(fn, backend, rank, size, local, "env://", args)
        return
    import torch.multiprocessing as mp

    init_method = f"tcp://127.0.0.1:{free_port()}"
    mp.spawn(_spawned_rank, args=(fn, world_size, backend, init_method, args), nprocs=world_size, join=True)


def _spawned_rank(rank, fn, world_size, backend, init_method, args):
    _run_rank(fn, backend, rank, world_size, rank, init_method, args)


def _run_rank(fn, backend, rank, world_size, local_rank, init_method, args):
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device_id = torch.device("cuda", local_rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, device_id=device_id)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- results
def _panel_of(row: dict, panel_keys: Sequence[str]) -> tuple:
    keys = tuple(panel_keys) + (("dtype",) if "dtype" in row else ())
    return tuple((k, row.get(k)) for k in keys)


def _panel_title(panel: tuple) -> str:
    return " ".join(f"{k}={v}" for k, v in panel)


def _variants(rows: Iterable[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r["variant"], None)
    return list(seen)


def _by_panel(rows: Sequence[dict], panel_keys: Sequence[str]) -> dict[tuple, list[dict]]:
    panels: dict[tuple, list[dict]] = {}
    for r in rows:
        panels.setdefault(_panel_of(r, panel_keys), []).append(r)
    return panels


def format_table(rows: Sequence[dict], *, x_key: str = "tokens", panel_keys: Sequence[str] = ("hidden",),
                 baseline: str = BASELINE) -> str:
    """One table per panel: a line per ``x_key`` value, a column per variant.

    Cells are microseconds per call followed by the speedup over ``baseline`` (baseline time /
    variant time) when the panel has a baseline; "-" marks a variant that did not run there (a variant
    that ran nowhere in the panel gets no column; its rows say why). When the
    panel also has ``baseline_repeat`` (the baseline timed again, last), a final ``noise`` column gives
    ``|baseline - baseline_repeat| / baseline``: the run-to-run noise every ratio of that line carries.
    """
    out = []
    repeat = f"{baseline}_repeat"
    for panel, prows in _by_panel(rows, panel_keys).items():
        variants = _variants(r for r in prows if r.get("us"))  # a variant skipped at every size gets no column
        us = {(r[x_key], r["variant"]): r.get("us") for r in prows}
        xs = sorted({r[x_key] for r in prows})
        with_noise = any(us.get((x, baseline)) and us.get((x, repeat)) for x in xs)
        header = [x_key] + variants + (["noise"] if with_noise else [])
        lines = []
        for x in xs:
            base = us.get((x, baseline))
            cells = [str(x)]
            for v in variants:
                t = us.get((x, v))
                if t is None:
                    cells.append("-")
                elif v != baseline and base:
                    cells.append(f"{t:.1f} ({base / t:.2f}x)")
                else:
                    cells.append(f"{t:.1f}")
            if with_noise:
                again = us.get((x, repeat))
                cells.append(f"{100 * abs(base - again) / base:.1f}%" if base and again else "-")
            lines.append(cells)
        widths = [max(len(c) for c in col) for col in zip(header, *lines)]
        noise_note = f"; noise = |{baseline} - {repeat}| / {baseline}" if with_noise else ""
        out.append(f"== {_panel_title(panel)} (us per call; speedup vs {baseline}{noise_note})")
        out.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        out.extend("  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in lines)
        out.append("")
    return "\n".join(out)


def print_table(rows: Sequence[dict], *, x_key: str = "tokens", panel_keys: Sequence[str] = ("hidden",),
                baseline: str = BASELINE) -> str:
    """Print :func:`format_table` and return it."""
    text = format_table(rows, x_key=x_key, panel_keys=panel_keys, baseline=baseline)
    print(text, flush=True)
    return text


def add_out_dir_argument(parser) -> None:
    """The ``--out-dir`` option every benchmark shares (default :data:`DEFAULT_OUT_DIR`)."""
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                        help=f"folder for the results files (default: ./{DEFAULT_OUT_DIR}; the committed "
                             "results are replaced only when you pass --out-dir bench/results)")


def result_stem(bench: str, tp: int, device: str | None = None) -> str:
    """``<bench>-<card>-tp<N>``: the file name (without suffix) of a results file."""
    return f"{bench}-{device or device_slug()}-tp{tp}"


def write_results(bench: str, tp: int, rows: list[dict], out_dir: str | os.PathLike = DEFAULT_OUT_DIR,
                  extra: dict | None = None, *, device: str | None = None, x_key: str = "tokens",
                  panel_keys: Sequence[str] = ("hidden",), baseline: str = BASELINE) -> tuple[Path, Path | None]:
    """Write ``<out_dir>/<bench>-<card>-tp<N>.json`` and a latency plot next to it.

    Parameters
    ----------
    bench : str
        Benchmark name (file prefix and the JSON's "bench").
    tp : int
        Tensor-parallel size (number of ranks).
    rows : list of dict
        See the module docstring.
    out_dir : path
        Created if missing. Default :data:`DEFAULT_OUT_DIR` (relative to the working directory), never
        the repository's committed ``bench/results`` unless passed explicitly.
    extra : dict, optional
        More top-level JSON keys (e.g. "targets", "notes"); may not replace the fixed ones.
    device : str, optional
        Card slug; :func:`tokenweave.tuning.device_slug` by default (the name the card's config file has).
    x_key, panel_keys
        Plot axes: latency against ``x_key`` (log-log), a line per variant, a subplot per panel.
    baseline : str
        The variant timed twice (``<baseline>`` and ``<baseline>_repeat``) for the "noise" key.

    Returns
    -------
    (Path, Path or None)
        The JSON path, and the PNG path (None when matplotlib is missing).

    Notes
    -----
    The JSON holds "bench", "device", "tp", "torch", "git" (:func:`git_sha`), "rows", the ``extra`` keys,
    and "noise" (:func:`run_to_run_noise`) when the rows time the baseline twice.
    """
    device = device or device_slug()
    doc = {"bench": bench, "device": device, "tp": tp, "torch": torch.__version__, "git": git_sha(), "rows": rows}
    noise = run_to_run_noise(rows, x_key=x_key, panel_keys=panel_keys, first=baseline, repeat=f"{baseline}_repeat")
    if noise is not None:
        doc["noise"] = noise
    clash = set(extra or {}) & set(doc)
    if clash:
        raise ValueError(f"write_results: extra may not replace {sorted(clash)}")
    doc.update(extra or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(bench, tp, device)
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    png_path = plot_rows(rows, out / f"{stem}.png", title=f"{bench} on {device}, TP{tp}", x_key=x_key,
                         panel_keys=panel_keys)
    return json_path, png_path


# 20 distinguishable colours (matplotlib's tab20, as hex so no colormap lookup is needed).
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
            "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d",
            "#9edae5", "#393b79")
_LEAD_VARIANTS = {"baseline": "#000000", "sequential": "#000000", "tokenweave": "#d62728"}


def replot(json_path: str | os.PathLike) -> Path | None:
    """Redraw the PNG next to a results JSON written by :func:`write_results` (same name, .png)."""
    data = json.loads(Path(json_path).read_text())
    rows = data["rows"]
    x_key = "M" if rows and "M" in rows[0] else "tokens"
    panel_keys = ("K", "N") if x_key == "M" else ("hidden",)
    return plot_rows(rows, Path(json_path).with_suffix(".png"), title=f"{data['bench']} on {data['device']}, "
                     f"TP{data['tp']}", x_key=x_key, panel_keys=panel_keys)


def plot_rows(rows: Sequence[dict], path: str | os.PathLike, *, title: str = "", x_key: str = "tokens",
              panel_keys: Sequence[str] = ("hidden",)) -> Path | None:
    """Latency against ``x_key`` on log-log axes, a line per variant, a subplot per panel.

    Returns the PNG path, or None (with a warning) when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the process's backend alone
    except ImportError:
        warnings.warn("matplotlib is not installed: the results JSON was written, the PNG was not", stacklevel=2)
        return None
    panels = _by_panel([r for r in rows if r.get("us")], panel_keys)
    if not panels:
        return None
    fig = Figure(figsize=(6.5 * len(panels), 4.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel, prows) in zip(axes, panels.items()):
        for i, variant in enumerate(_variants(prows)):
            pts = sorted((r[x_key], r["us"]) for r in prows if r["variant"] == variant)
            lead = variant in _LEAD_VARIANTS  # what the reader compares: drawn thicker, in black/red
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=variant,
                    color=_LEAD_VARIANTS.get(variant) or _PALETTE[i % len(_PALETTE)],
                    linewidth=2.4 if lead else 1.2, linestyle="-" if lead or i < len(_PALETTE) else "--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel("us per call")
        ax.set_title(_panel_title(panel), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
