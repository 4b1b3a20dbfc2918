"""Reusable benchmark pieces: timing, process launch, results files and tables.

Nothing here knows about a particular benchmark; the runners (e.g. :mod:`tokenweave.bench.fused`)
build on it. Rows are flat dicts: an x key (``tokens``, or ``M`` for GEMM benches), panel keys
(``hidden``, or ``K``/``N``), ``dtype``, ``variant`` and ``us`` (microseconds per call, ``None``
when the variant did not run).
"""
from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

BASELINE = "baseline"


# ---------------------------------------------------------------------------------------------- timing
def time_cuda_graph(fn: Callable[[], object], *, calls: int = 20, replays: int = 5, warmup: int = 3,
                    before_replay: Callable[[], None] | None = None) -> float:
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

    Returns
    -------
    float
        Median over replays of (replay time / ``calls``), in microseconds.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    try:
        for _ in range(warmup):
            if before_replay is not None:
                before_replay()
            graph.replay()
        events = []
        for _ in range(replays):
            if before_replay is not None:
                before_replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) * 1e3 / calls for s, e in events)
    finally:
        graph.reset()  # give the graph's private memory pool back before the next variant


def time_wall(fn: Callable[[], object], *, calls: int = 20, replays: int = 5, warmup: int = 3,
              before_replay: Callable[[], None] | None = None) -> float:
    """Like :func:`time_cuda_graph` but eager and wall-clock timed (for CPU runs).

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
    dist.all_reduce(torch.zeros(1, device=device), group=group)


def barrier(group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> None:
    """Finish this rank's queued GPU work, then wait for every rank."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=group)


# ---------------------------------------------------------------------------------------------- where
def device_name(index: int | None = None) -> str:
    """Short slug of the GPU model ("h100", "h200", "gh200", ...), or "cpu" without CUDA."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(index)
    match = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", name.upper())
    if match:
        return match.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "gpu"


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
    variant time) when the panel has a baseline; "-" marks a variant that did not run there.
    """
    out = []
    for panel, prows in _by_panel(rows, panel_keys).items():
        variants = _variants(prows)
        us = {(r[x_key], r["variant"]): r.get("us") for r in prows}
        xs = sorted({r[x_key] for r in prows})
        header = [x_key] + variants
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
            lines.append(cells)
        widths = [max(len(c) for c in col) for col in zip(header, *lines)]
        out.append(f"== {_panel_title(panel)} (us per call; speedup vs {baseline})")
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


def result_stem(bench: str, tp: int, device: str | None = None) -> str:
    """``<bench>-<card>-tp<N>``: the file name (without suffix) of a results file."""
    return f"{bench}-{device or device_name()}-tp{tp}"


def write_results(bench: str, tp: int, rows: list[dict], out_dir: str | os.PathLike = "bench/results",
                  extra: dict | None = None, *, device: str | None = None, x_key: str = "tokens",
                  panel_keys: Sequence[str] = ("hidden",)) -> tuple[Path, Path | None]:
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
    extra : dict, optional
        More top-level JSON keys (e.g. "targets", "notes"); may not replace the fixed ones.
    device : str, optional
        Card slug; :func:`device_name` by default.
    x_key, panel_keys
        Plot axes: latency against ``x_key`` (log-log), a line per variant, a subplot per panel.

    Returns
    -------
    (Path, Path or None)
        The JSON path, and the PNG path (None when matplotlib is missing).
    """
    device = device or device_name()
    doc = {"bench": bench, "device": device, "tp": tp, "torch": torch.__version__, "git": git_sha(), "rows": rows}
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
