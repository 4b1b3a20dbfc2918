"""What an SM partition costs a GEMM, on one GPU: the tables behind every partitioned-overlap decision.

    python bench/partition_costs.py --out-dir bench/results          # one H200: about 1 minute
    python bench/partition_costs.py --quick                          # a smaller grid (smoke test)

Two tables, Llama-3-70B GEMMs per rank at TP2 and TP4 (qkv, o_proj, gate_up, down_proj; N and K split by
TP as in :meth:`tokenweave.models.llama.LlamaShape.gemms`), bf16 cuBLAS (``torch.matmul``), fresh random
data per shape:

1. ``partition``: the GEMM's time on all SMs (an ordinary stream) and on the GEMM stream of each candidate
   partition (SMs minus ``comm_sms`` for communication, :func:`tokenweave.partition.get_partition`), with
   the ratio to all SMs. The SM counts are the driver's (``gemm_sms``, ``comm_sms``), not the requests.
2. ``interference``: the same GEMM on the partition's GEMM stream while the communication partition streams
   local HBM traffic: a 256 MiB device copy (``copy``) or ``tokenweave.add_rmsnorm`` on 16384 x 8192 rows
   (``add_rmsnorm``, the fused op's epilogue pattern), back to back for longer than the GEMM runs. Reported:
   the GEMM's time, its slowdown against the GEMM alone on the same partition and against all SMs, and what
   the traffic achieves alone on the partition.

Timing: CUDA events around back-to-back calls (at least ``--window-us`` per sample), warm-up first, the
median of the samples. Noise: the first configuration is timed again at the end (``noise``).
Writes ``<out-dir>/partition_costs-<card>.json`` and a PNG next to it (default out-dir:
``~/tokenweave-results``; pass ``bench/results`` to commit).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

try:
    import tokenweave as tw
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tokenweave as tw

import torch

from tokenweave import partition as sm
from tokenweave.bench import harness
from tokenweave.models.llama import LLAMA3_70B

BENCH = "partition_costs"
DTYPE = torch.bfloat16
GEMM_NAMES = ("qkv", "o_proj", "gate_up", "down_proj")  # the order of LlamaShape.gemms
TPS = (2, 4)
MS = (512, 2048, 4096, 8192, 16384)
INTERFERENCE_MS = (4096, 16384)
COMM_SMS = (8, 16, 24, 32)
QUICK = {"ms": (2048, 8192), "interference_ms": (8192,), "comm_sms": (16, 32)}
COPY_BYTES = 256 << 20
NORM_ROWS, NORM_HIDDEN = 16384, 8192
HEAD_START_CYCLES = 40_000  # about 20 us at H200 clocks


def time_on(stream, fn, *, window_us: float, samples: int, warmup: int = 3) -> float:
    """Median microseconds per ``fn()`` on ``stream``: CUDA events around enough back-to-back calls to fill
    ``window_us`` per sample."""
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(3):
            fn()
        end.record(stream)
    end.synchronize()
    reps = max(1, math.ceil(window_us / max(start.elapsed_time(end) * 1e3 / 3, 1.0)))
    times = []
    for _ in range(samples):
        with torch.cuda.stream(stream):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(reps):
                fn()
            end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(times)


def time_beside(gemm_stream, gemm, side_stream, side, side_us: float, gemm_us: float, *, window_us: float,
                samples: int) -> tuple[float, bool]:
    """Median microseconds per ``gemm()`` on ``gemm_stream`` while ``side()`` runs back to back on
    ``side_stream`` for longer than the timed GEMMs (1.5x plus a head start); and whether the side work was
    still running when the last timed GEMM ended (checked with the events' times, where the driver allows)."""
    reps = max(1, math.ceil(window_us / gemm_us))
    sides = math.ceil(1.5 * reps * gemm_us / side_us) + 2
    times, covered = [], True
    for _ in range(samples):
        with torch.cuda.stream(side_stream):
            for _ in range(sides):
                side()
            side_end = torch.cuda.Event(enable_timing=True)
            side_end.record(side_stream)
        with torch.cuda.stream(gemm_stream):
            torch.cuda._sleep(HEAD_START_CYCLES)  # the side work is streaming before the first timed GEMM
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(gemm_stream)
            for _ in range(reps):
                gemm()
            end.record(gemm_stream)
        end.synchronize()
        side_end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
        try:
            covered &= start.elapsed_time(side_end) >= start.elapsed_time(end)
        except RuntimeError:  # events of streams in different contexts: not comparable here
            covered = None
    return statistics.median(times), covered


def gemm_shapes(tp: int) -> dict:
    return {name: (g.n, g.k) for name, g in zip(GEMM_NAMES, LLAMA3_70B.gemms(tp))}


def run(args) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    ordinary = torch.cuda.Stream(device)
    partitions = {c: sm.get_partition(device, c) for c in args.comm_sms}
    info = {}
    for c, part in partitions.items():
        info[c] = part.describe()
        if part.active:
            try:
                info[c]["sm_ids_seen"] = {"comm": len(sm.observed_sm_ids(part.comm_stream)),
                                          "gemm": len(sm.observed_sm_ids(part.gemm_stream))}
            except Exception as e:  # triton missing or unable to launch there: the driver's sizes stand
                info[c]["sm_ids_seen"] = f"{type(e).__name__}: {e}"
        print(f"partition comm_sms={c}: {info[c]}", flush=True)
    active = {c: p for c, p in partitions.items() if p.active}
    timing = {"window_us": args.window_us, "samples": args.samples}
    rows, interference = [], []
    first = None
    for tp in TPS:
        for name, (n, k) in gemm_shapes(tp).items():
            w = torch.randn(n, k, device=device).to(DTYPE) / k ** 0.5
            for m in args.ms:
                x = torch.randn(m, k, device=device).to(DTYPE)
                y = torch.empty(m, n, device=device, dtype=DTYPE)

                def gemm():
                    torch.matmul(x, w.t(), out=y)

                all_us = time_on(ordinary, gemm, **timing)
                if first is None:
                    first = (tp, name, m, all_us)
                row = {"tp": tp, "gemm": name, "M": m, "N": n, "K": k, "all_sms": sms, "all_us": round(all_us, 2),
                       "partitions": []}
                for c, part in active.items():
                    us = time_on(part.gemm_stream, gemm, **timing)
                    row["partitions"].append({"comm_sms": part.comm_sms, "gemm_sms": part.gemm_sms,
                                              "requested_comm_sms": c, "us": round(us, 2),
                                              "ratio": round(us / all_us, 4)})
                    if m in args.interference_ms:
                        interference.extend(beside(tp, name, m, part, c, gemm, us, all_us, args, timing))
                rows.append(row)
                print(f"tp{tp} {name:9s} M={m:5d}: all {all_us:8.1f} us | " +
                      " ".join(f"-{p['comm_sms']}: {p['ratio']:.3f}" for p in row["partitions"]), flush=True)
                del x, y
            del w
    # noise: the first configuration again, fresh data
    tp, name, m, before = first
    n, k = gemm_shapes(tp)[name]
    x, w = torch.randn(m, k, device=device).to(DTYPE), torch.randn(n, k, device=device).to(DTYPE)
    y = torch.empty(m, n, device=device, dtype=DTYPE)
    again = time_on(ordinary, lambda: torch.matmul(x, w.t(), out=y), **timing)
    noise = {"tp": tp, "gemm": name, "M": m, "us": [round(before, 2), round(again, 2)],
             "noise": round(abs(again - before) / before, 4)}
    return {"sm_count": sms, "partitions": info, "rows": rows, "interference": interference, "noise": noise}


_SIDE = {}
_SIDE_ALONE_US = {}


def side_work(kind: str, device):
    """(fn, description): the local traffic a communication partition runs, made once."""
    if kind not in _SIDE:
        if kind == "copy":
            src = torch.randn(COPY_BYTES // 2, device=device).to(DTYPE)
            dst = torch.empty_like(src)
            _SIDE[kind] = (lambda: dst.copy_(src), {"bytes_moved": 2 * COPY_BYTES})
        else:
            x = torch.randn(NORM_ROWS, NORM_HIDDEN, device=device).to(DTYPE)
            residual = torch.randn_like(x)
            weight = (1 + 0.2 * torch.randn(NORM_HIDDEN, device=device)).to(DTYPE)
            out = torch.empty_like(x)
            # reads x and residual, writes residual and out
            _SIDE[kind] = (lambda: tw.add_rmsnorm(x, residual, weight, 1e-5, out=out),
                           {"bytes_moved": 4 * x.numel() * x.element_size()})
    return _SIDE[kind]


def beside(tp, name, m, part, requested, gemm, alone_us, all_us, args, timing) -> list[dict]:
    out = []
    for kind in args.kinds:
        fn, meta = side_work(kind, part.device)
        if (kind, requested) not in _SIDE_ALONE_US:
            _SIDE_ALONE_US[kind, requested] = time_on(part.comm_stream, fn, **timing)
        side_us = _SIDE_ALONE_US[kind, requested]
        us, covered = time_beside(part.gemm_stream, gemm, part.comm_stream, fn, side_us, alone_us,
                                  window_us=args.window_us, samples=max(3, args.samples // 2))
        out.append({"tp": tp, "gemm": name, "M": m, "traffic": kind, "requested_comm_sms": requested,
                    "comm_sms": part.comm_sms, "gemm_sms": part.gemm_sms, "gemm_alone_us": round(alone_us, 2),
                    "gemm_beside_us": round(us, 2), "slowdown_vs_partition": round(us / alone_us, 4),
                    "slowdown_vs_all_sms": round(us / all_us, 4), "traffic_alone_us": round(side_us, 2),
                    "traffic_alone_gbps": round(meta["bytes_moved"] / side_us / 1e3, 1), "traffic_covered": covered})
        print(f"    beside {kind:11s} on {part.comm_sms:3d} SMs: GEMM x{us / alone_us:.3f} vs alone on "
              f"{part.gemm_sms} SMs, x{us / all_us:.3f} vs all ({meta['bytes_moved'] / side_us / 1e3:.0f} GB/s "
              "alone)", flush=True)
    return out


def plot(doc: dict, path: Path) -> Path | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return None
    fig = Figure(figsize=(16, 4 * len(GEMM_NAMES)), layout="constrained")
    axes = fig.subplots(len(GEMM_NAMES), len(TPS) + 1, squeeze=False)
    for r, name in enumerate(GEMM_NAMES):
        for col, tp in enumerate(TPS):
            ax = axes[r][col]
            rows = [row for row in doc["rows"] if row["tp"] == tp and row["gemm"] == name]
            for c in sorted({p["requested_comm_sms"] for row in rows for p in row["partitions"]}):
                pts = [(row["M"], p["ratio"], p["gemm_sms"]) for row in rows for p in row["partitions"]
                       if p["requested_comm_sms"] == c]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"GEMM on {pts[0][2]} SMs")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"TP{tp} {name}: time on the partition / all SMs", fontsize=9)
            ax.set_xlabel("M (tokens)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        ax = axes[r][len(TPS)]
        series = {}
        for row in doc["interference"]:
            if row["gemm"] == name:
                series.setdefault((row["tp"], row["M"], row["traffic"]), []).append(
                    (row["comm_sms"], row["slowdown_vs_partition"]))
        for (tp, m, kind), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"TP{tp} M={m} {kind}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{name}: slowdown beside local traffic on the comm SMs", fontsize=9)
        ax.set_xlabel("communication SMs")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{BENCH} on {doc['device']} ({doc['sm_count']} SMs), git {doc['git']}")
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=os.path.join(os.path.expanduser("~"), "tokenweave-results"))
    parser.add_argument("--quick", action="store_true", help="a smaller grid (M, partitions)")
    parser.add_argument("--window-us", type=float, default=3000.0, help="minimum timed window per sample")
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--kinds", nargs="+", default=["copy", "add_rmsnorm"], choices=["copy", "add_rmsnorm"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{BENCH}: needs a CUDA GPU (it measures SM partitions of one)", file=sys.stderr)
        return 2
    if "add_rmsnorm" in args.kinds and not tw.HAS_EXTENSION:
        print("tokenweave was built without its CUDA extension: add_rmsnorm traffic skipped", file=sys.stderr)
        args.kinds = [k for k in args.kinds if k != "add_rmsnorm"]
    args.ms = QUICK["ms"] if args.quick else MS
    args.interference_ms = QUICK["interference_ms"] if args.quick else INTERFERENCE_MS
    args.comm_sms = QUICK["comm_sms"] if args.quick else COMM_SMS
    t0 = time.perf_counter()
    torch.manual_seed(0)
    result = run(args)
    device = harness.device_slug()
    doc = {"bench": BENCH, "device": device, "torch": torch.__version__, "git": harness.git_sha(),
           "dtype": str(DTYPE).replace("torch.", ""), "model": LLAMA3_70B.signature,
           "timing": {"window_us": args.window_us, "samples": args.samples, "statistic": "median",
                      "timer": "CUDA events"}, **result, "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{BENCH}-{device}" + ("-quick" if args.quick else "")
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    png = plot(doc, out / f"{stem}.png")
    print(f"noise: {doc['noise']}\nwrote {json_path}" + (f" and {png}" if png else "") +
          f" in {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
