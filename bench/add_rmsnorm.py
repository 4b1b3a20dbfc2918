"""One-GPU residual-add + RMSNorm: ``tokenweave.add_rmsnorm`` against the per-shape compiled add+RMSNorm.

    python bench/add_rmsnorm.py                              # bf16, hidden 4096 8192, tokens 1 .. 16384
    python bench/add_rmsnorm.py --out-dir bench/results      # replace the committed results

Variants (us per call; one process, no communication):

``baseline``
    The residual-add + RMSNorm in torch (:func:`tokenweave.bench.fused.baseline_add_rmsnorm`) under
    ``torch.compile(fullgraph=True, dynamic=False)``, compiled afresh for every (tokens, hidden) and
    warmed up before anything is timed: the best a torch user gets, and the fused bench's baseline norm.
``tokenweave``
    ``tokenweave.add_rmsnorm`` (the CUDA kernel in the block shape the card's tuning config picks for the size;
    world size 1 of the fused op runs it too).
``tokenweave_cfgK``
    The same kernel in block shape K (``torch.ops.tokenweave.add_rmsnorm(..., shape=K)``).
``baseline_repeat``
    The baseline timed again, last at each size: ``|baseline - baseline_repeat| / baseline`` is the
    run-to-run noise every ratio carries (table column ``noise``, JSON key ``noise``).

Timing: CUDA events around replays of a CUDA graph of ``--calls`` calls, after eager and graph warm-up,
median of ``--replays``; before each variant the L2 is cleaned (``harness.clean_l2``), so that no variant inherits
the cache lines another left. Each row also carries its achieved bandwidth (bytes read + written / time)
against the card's copy bandwidth (a large device copy measured once in the same run: ``frac_of_peak_copy``;
``bw_low`` below 70% at sizes where a copy of the same bytes reaches 70%, null at latency-bound sizes) and
against a copy of the same bytes (``frac_of_copy``). Each tokenweave row is checked against the baseline's
output and residual (``max_err``, ``ok``).

Writes ``<out-dir>/add_rmsnorm-<card>-tp1.{json,png}`` (default ``./tokenweave-results``). About 40-60 s
on one H200, compiles included. Without a GPU it runs tiny sizes eagerly with wall-clock timing: a
smoke test of the script, NOT a measurement.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import tokenweave as tw
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tokenweave as tw

import torch

from tokenweave.bench import harness
from tokenweave.bench.fused import ATOL, EPS, RTOL, baseline_add_rmsnorm

BENCH = "add_rmsnorm"
DTYPE = torch.bfloat16
TOKENS = (1, 16, 128, 1024, 4096, 8192, 16384)
HIDDEN = (4096, 8192)
CPU_TOKENS = (1, 4, 16)
CPU_HIDDEN = (64, 256)
# tokenweave_cfgK: the same kernel with block shape K of csrc/kernels/launch.cu kNormConfigs (the op's `shape`
# argument); measured side by side so that the card's "norm" config (tokenweave.tuning.norm_shape, which
# ``tokenweave`` runs as dispatched) is chosen from data.
NORM_CONFIGS = (1, 4, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27)
VARIANTS = (harness.BASELINE, "tokenweave") + tuple(f"tokenweave_cfg{k}" for k in NORM_CONFIGS) + (harness.BASELINE_REPEAT,)
CPU_NOTE = ("NOTE: no CUDA GPU here: tiny sizes, eager torch on both sides, wall-clock timing. It checks the "
            "script; it is NOT a measurement.")


class Case:
    """Inputs of one (tokens, hidden): fresh random data, never zeros; ``res_work`` is reset before each replay."""

    def __init__(self, tokens: int, hidden: int, device: torch.device, seed: int):
        gen = torch.Generator(device).manual_seed(seed)
        self.tokens, self.hidden = tokens, hidden
        self.x = torch.randn(tokens, hidden, generator=gen, device=device, dtype=DTYPE)
        self.residual = torch.randn(tokens, hidden, generator=gen, device=device, dtype=DTYPE)
        self.weight = (1 + 0.1 * torch.randn(hidden, generator=gen, device=device)).to(DTYPE)
        self.res_work = self.residual.clone()
        self.out = torch.full_like(self.x, float("nan"))  # poisoned: a kernel that writes nothing shows

    def reset(self):
        self.res_work.copy_(self.residual)


def calls_of(case: Case, norm) -> dict:
    """One timed call of each variant."""
    c = case
    baseline = lambda: norm(c.x, c.res_work, c.weight, EPS)  # noqa: E731
    calls = {harness.BASELINE: baseline, harness.BASELINE_REPEAT: baseline,
             "tokenweave": lambda: tw.add_rmsnorm(c.x, c.res_work, c.weight, EPS, out=c.out)}
    if c.x.is_cuda and tw.HAS_EXTENSION:
        from tokenweave._ext import _C

        op = torch.ops.tokenweave.add_rmsnorm.default
        for k in NORM_CONFIGS:
            if _C.add_rmsnorm_row_group(k, c.hidden, c.x.element_size()) > 0:  # shapes that cannot hold the row: left out
                calls[f"tokenweave_cfg{k}"] = lambda k=k: op(c.x, c.res_work, c.weight, c.out, EPS, k)
    return calls


def check(case: Case, norm) -> dict:
    """tokenweave's output and residual against the baseline's (one call each from the same inputs)."""
    case.reset()
    ref_out = norm(case.x, case.res_work, case.weight, EPS).clone()
    ref_res = case.res_work.clone()
    case.reset()
    tw.add_rmsnorm(case.x, case.res_work, case.weight, EPS, out=case.out)
    err, ok = 0.0, True
    for got, ref in ((case.out, ref_out), (case.res_work, ref_res)):
        diff = (got.float() - ref.float()).abs().nan_to_num(nan=float("inf"))
        err = max(err, float(diff.max()))
        ok &= bool((diff <= ATOL + RTOL * ref.float().abs()).all())
    return {"max_err": err, "ok": ok}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help=f"token counts (default {' '.join(map(str, TOKENS))}; on CPU {CPU_TOKENS})")
    parser.add_argument("--hidden", type=int, nargs="+", default=None,
                        help=f"hidden sizes (default {' '.join(map(str, HIDDEN))}; on CPU {CPU_HIDDEN})")
    parser.add_argument("--calls", type=int, default=20, help="calls captured per CUDA graph")
    parser.add_argument("--replays", type=int, default=15, help="timed replays (the median is reported)")
    parser.add_argument("--no-compile", action="store_true", help="eager baseline instead of torch.compile")
    parser.add_argument("--seed", type=int, default=0)
    harness.add_out_dir_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Run the benchmark; returns the results document's extra keys (rows are in the JSON)."""
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    tokens = sorted(args.tokens or (TOKENS if on_gpu else CPU_TOKENS))
    hiddens = sorted(args.hidden or (HIDDEN if on_gpu else CPU_HIDDEN))
    compiled = on_gpu and not args.no_compile  # inductor on CPU needs a C++ toolchain and minutes
    norm = harness.StaticCompiled(baseline_add_rmsnorm) if compiled else baseline_add_rmsnorm
    timer = harness.timer_for(device)
    notes = [] if on_gpu else [CPU_NOTE]
    if not compiled:
        notes.append("baseline ran eagerly (not torch.compile'd)")
    if on_gpu and not tw.HAS_EXTENSION:
        notes.append("tokenweave was built without its CUDA extension: 'tokenweave' is its torch fallback here")
    print(f"[{BENCH}] {harness.device_slug()}, tokens {tokens}, hidden {hiddens}; results go to "
          f"{Path(args.out_dir).resolve()}", flush=True)
    for note in notes:
        print(note, flush=True)

    copy = harness.CopyBandwidth(device)  # once, before anything is timed
    methods = ", ".join(f"{name} {g:.0f}" for name, g in copy.peak_by_method.items())
    nominal = f"; the card's nominal memory bandwidth {copy.nominal_gbps:.0f} GB/s" if copy.nominal_gbps else ""
    print(f"[{BENCH}] device copy {copy.peak_gbps:.0f} GB/s ({copy.peak_bytes >> 20} MiB read + written; {methods})"
          f"{nominal}", flush=True)
    t0 = time.perf_counter()
    if compiled:  # every shape compiled and run once before any timing
        for hidden in hiddens:
            for t in tokens:
                case = Case(t, hidden, device, args.seed)
                norm(case.x, case.res_work, case.weight, EPS)
        torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - t0

    rows = []
    for hidden in hiddens:
        for t in tokens:
            case = Case(t, hidden, device, args.seed + t)
            checked = check(case, norm)
            traffic = harness.add_rmsnorm_traffic_bytes(t, hidden, DTYPE.itemsize)
            line = []
            calls = calls_of(case, norm)
            for variant, fn in ((v, calls[v]) for v in VARIANTS if v in calls):
                case.reset()
                us = timer(fn, calls=args.calls, replays=args.replays, before_replay=case.reset, clean=True)
                row = {"tokens": t, "hidden": hidden, "dtype": "bfloat16", "variant": variant, "us": us,
                       **harness.bandwidth_fields(us, traffic, copy)}
                if variant == "tokenweave":
                    row.update(checked)
                rows.append(row)
                line.append(f"{variant} {us:.1f} ({harness.format_bandwidth(row)})")
            print(f"[{BENCH}] T={t} H={hidden}: " + " | ".join(line), flush=True)
            if not checked["ok"]:
                print(f"!! MISMATCH vs baseline at T={t} H={hidden}: max_err {checked['max_err']:.3g}", flush=True)
            del case

    print()
    harness.print_table(rows)
    noise = harness.run_to_run_noise(rows)
    if noise:
        print(f"run-to-run noise (|baseline - baseline_repeat| / baseline): max {100 * noise['max']:.1f}%")
    low = [f"{r['variant']} T={r['tokens']} H={r['hidden']}" for r in rows if r.get("bw_low")]
    print(f"bandwidth below {100 * harness.LOW_BANDWIDTH_FRACTION:.0f}% of the device copy (bandwidth-bound sizes): "
          f"{', '.join(low) if low else 'none'}")
    summary = norm.summary() if isinstance(norm, harness.StaticCompiled) else "eager"
    if isinstance(summary, dict) and (summary["max_cache_entries_per_signature"] or 1) > 1:
        print(f"!! the compiled baseline recompiled: {summary}")
    bad = [r for r in rows if r.get("ok") is False]
    print(f"correctness vs baseline: {'tokenweave matched at every size' if not bad else f'{len(bad)} MISMATCHES'}"
          f" (|diff| <= {ATOL} + {RTOL}|ref| on output and residual)")
    for note in notes:
        print(note)
    extra = {"device_name": torch.cuda.get_device_name(device) if on_gpu else "cpu",
             "measurement": on_gpu,
             "timing": (f"CUDA events around replays of a CUDA graph of {args.calls} calls, median of {args.replays} "
                        "replays, us per call; the L2 cleaned before each variant (harness.clean_l2)" if on_gpu else
                        f"eager wall clock, {args.calls} calls, median of {args.replays}"),
             "variants": {harness.BASELINE: "compiled add+RMSNorm, torch.compile(fullgraph, dynamic=False) per shape",
                          "tokenweave": "tokenweave.add_rmsnorm",
                          harness.BASELINE_REPEAT: "the baseline timed again, last at each size (run-to-run noise)"},
             "extension": tw.HAS_EXTENSION,
             "copy_bandwidth": copy.describe(),
             "low_bandwidth": low, "baseline_compile": summary, "compile_s": round(compile_s, 1), "notes": notes}
    json_path, png_path = harness.write_results(BENCH, 1, rows, args.out_dir, extra)
    print(f"wrote {json_path.resolve()}" + (f" and {png_path.name}" if png_path else ""), flush=True)
    return extra


if __name__ == "__main__":
    main()
