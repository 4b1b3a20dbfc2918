"""Fused all-reduce + residual-add + RMSNorm: tokenweave against what a TP layer pays today.

Variants, all on the same machine in one run (bf16, us per call inside a CUDA graph):

``baseline``
    NCCL ``dist.all_reduce`` then the torch.compile'd residual-add + RMSNorm.
``norm`` / ``nccl``
    The two halves of the baseline alone.
``symm_two_shot`` / ``symm_one_shot``
    torch's symmetric-memory all-reduce (``torch.ops.symm_mem``) then the same compiled norm.
``tokenweave``
    ``tokenweave.fused_allreduce_rmsnorm`` at the dispatcher's settings;
    ``tokenweave_one_shot`` / ``tokenweave_two_shot`` force the algorithm, ``tokenweave_ctasN``
    the CTA count (only from 1024 tokens, where few-CTA launches matter for overlap).

Every tokenweave variant is also checked against the baseline's output and residual (``max_err``).
Without GPUs the run uses 2 gloo processes, tokenweave's torch reference path and wall-clock timing
at small sizes: a smoke test of the pipeline, not a measurement.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from tokenweave.bench import harness

BENCH = "fused_allreduce_rmsnorm"
DTYPE = torch.bfloat16
EPS = 1e-6
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
HIDDEN = (4096, 8192)
QUICK_TOKENS = (1, 16, 128, 1024, 4096, 8192)  # one size per target below
QUICK_HIDDEN = (8192,)
CPU_TOKENS = (1, 2, 4, 8, 16, 32, 64)
CPU_HIDDEN = (512,)
CPU_WORLD_SIZE = 2
CTAS = (2, 4, 8, 16, 32, 64)
CTAS_MIN_TOKENS = 1024
BASE_VARIANTS = ("baseline", "norm", "nccl", "symm_two_shot", "symm_one_shot", "tokenweave",
                 "tokenweave_one_shot", "tokenweave_two_shot")
VARIANTS = BASE_VARIANTS + tuple(f"tokenweave_ctas{n}" for n in CTAS)
# bf16 tolerance of tokenweave vs the baseline: NCCL rounds partial sums to bf16 along its ring while
# tokenweave sums in fp32 and rounds once, so sums of a few N(0,1) terms may differ by a few ulps.
RTOL, ATOL = 3e-2, 6.25e-2
TARGET_TP, TARGET_HIDDEN = 4, 8192
CPU_NOTE = ("NOTE: no CUDA GPU here. This ran tokenweave's torch REFERENCE path (transport 'torch') on "
            "{} gloo CPU processes with eager wall-clock timing: it checks the benchmark pipeline, it is NOT a "
            "GPU measurement.")


# Argument errors tokenweave raises on every rank alike before communicating (e.g. one-shot over its size
# limit): the variant is recorded as failed and the run goes on. Anything else aborts the run.
VALIDATION_ERRORS = (ValueError, TypeError, NotImplementedError)


class Skip(Exception):
    """A variant that cannot run in this configuration (the reason is recorded)."""


# ---------------------------------------------------------------------------------------------- pieces
def add_rmsnorm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The baseline's residual-add + RMSNorm, written in torch (compiled into one kernel on GPU).

    ``residual`` is updated in place to ``round(x + residual)``; the norm is taken of the fp32 sum.
    """
    z = x.float() + residual.float()
    residual.copy_(z.to(residual.dtype))
    return (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def make_norm(compile: bool, n_shapes: int):
    """The baseline norm: torch.compile'd (fullgraph) or eager.

    Default dynamic-shape handling: the second token count of a hidden size recompiles with the token
    dimension symbolic, so a hidden costs two compiles, not one per size; hidden stays static, so the
    reduction kernel is specialised as it would be in a served model. The recompile limit is raised
    so no shape falls back to eager.
    """
    if not compile:
        return add_rmsnorm_reference
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch releases
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 2 * n_shapes + 8))
            break
    return torch.compile(add_rmsnorm_reference, fullgraph=True)


def _symm_ops():
    """torch's symmetric-memory all-reduce ops, or raise Skip saying why they are unavailable."""
    try:
        import torch.distributed._symmetric_memory  # noqa: F401  (registers the Python side of the ops)

        ops = torch.ops.symm_mem
        return ops.two_shot_all_reduce_, ops.one_shot_all_reduce
    except (AttributeError, ImportError, RuntimeError) as e:
        raise Skip(f"torch.ops.symm_mem all-reduce ops unavailable in torch {torch.__version__}: {e}") from e


class Context:
    """Per-rank state shared by every size: process group, communicator, norm, symmetric buffer."""

    def __init__(self, args, comm, norm, device):
        self.args = args
        self.comm = comm
        self.norm = norm
        self.device = device
        self.group = comm.group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.timer = harness.timer_for(device)
        self.symm = None          # (allocation, its flat bf16 view) for the symm_* variants
        self.symm_skip = None     # why symm_* variants cannot run, if they cannot
        self.notes: list[str] = []

    def setup_symm(self, numel: int):
        """Collective: allocate torch symmetric memory for the symm_* variants (or record why not)."""
        if self.device.type != "cuda":
            self.symm_skip = "torch symmetric memory needs CUDA"
            return
        try:
            _symm_ops()
            from tokenweave import _symm  # the one place that adapts to torch's symmetric-memory API

            buf = _symm.allocate(numel * DTYPE.itemsize, self.device, self.group)
            self.symm = (buf, buf.tensor.view(DTYPE))  # keep the handle: it owns the peer mappings
        except Skip as e:
            self.symm_skip = str(e)
        except Exception as e:  # an API difference we have not seen: report it, run the rest
            self.symm_skip = f"torch symmetric memory setup failed: {type(e).__name__}: {e}"
        if self.symm_skip:
            self.notes.append(f"symm_* variants skipped: {self.symm_skip}")

    def align(self):
        harness.align_ranks(self.group, self.device)


class Case:
    """Inputs and scratch buffers of one (tokens, hidden); fresh random data, never zeros."""

    def __init__(self, ctx: Context, tokens: int, hidden: int, seed: int):
        dev = ctx.device
        rank_gen = torch.Generator(dev).manual_seed(seed + 1009 * (ctx.rank + 1))
        shared_gen = torch.Generator(dev).manual_seed(seed)  # residual and weight are replicated in TP
        self.tokens, self.hidden = tokens, hidden
        self.x = torch.randn(tokens, hidden, generator=rank_gen, device=dev, dtype=DTYPE)
        self.residual = torch.randn(tokens, hidden, generator=shared_gen, device=dev, dtype=DTYPE)
        self.weight = (1 + 0.1 * torch.randn(hidden, generator=shared_gen, device=dev)).to(DTYPE)
        self.x_work = torch.empty_like(self.x)
        self.res_work = torch.empty_like(self.residual)
        self.out = torch.empty_like(self.x)
        self.symm_x = ctx.symm[1][: tokens * hidden].view(tokens, hidden) if ctx.symm else None


def _tokenweave_kwargs(variant: str) -> dict:
    if variant == "tokenweave":
        return {}
    suffix = variant[len("tokenweave_"):]
    if suffix in ("one_shot", "two_shot"):
        return {"algo": suffix}
    if suffix.startswith("ctas"):
        return {"ctas": int(suffix[len("ctas"):])}
    raise ValueError(f"unknown tokenweave variant {variant!r}")


def build(ctx: Context, case: Case, variant: str):
    """``(fn, reset)`` for one variant: ``fn`` is one timed call, ``reset`` restores the inputs it mutates.

    Raises
    ------
    Skip
        When the variant cannot run here.
    """
    import tokenweave as tw

    norm, group, c = ctx.norm, ctx.group, case

    def reset_residual():
        c.res_work.copy_(c.residual)

    def reset_both():
        c.x_work.copy_(c.x)
        c.res_work.copy_(c.residual)

    if variant == "baseline":
        def fn():
            dist.all_reduce(c.x_work, group=group)
            return norm(c.x_work, c.res_work, c.weight, EPS)
        return fn, reset_both
    if variant == "norm":
        return (lambda: norm(c.x, c.res_work, c.weight, EPS)), reset_residual
    if variant == "nccl":
        return (lambda: dist.all_reduce(c.x_work, group=group)), reset_both
    if variant.startswith("symm_"):
        if ctx.symm_skip:
            raise Skip(ctx.symm_skip)
        two_shot, one_shot = _symm_ops()
        name = group.group_name

        def reset_symm():
            c.symm_x.copy_(c.x)
            c.res_work.copy_(c.residual)

        if variant == "symm_two_shot":
            def fn():
                two_shot(c.symm_x, "sum", name)
                return norm(c.symm_x, c.res_work, c.weight, EPS)
        else:
            def fn():
                return norm(one_shot(c.symm_x, "sum", name), c.res_work, c.weight, EPS)
        return fn, reset_symm
    if variant.startswith("tokenweave"):
        kwargs = _tokenweave_kwargs(variant)
        if kwargs and ctx.comm.transport == "torch":
            raise Skip("the 'torch' transport has no algo or CTA choice")
        if "ctas" in kwargs and c.tokens < CTAS_MIN_TOKENS:
            raise Skip(f"CTA sweeps start at {CTAS_MIN_TOKENS} tokens")
        return (lambda: tw.fused_allreduce_rmsnorm(ctx.comm, c.x, c.res_work, c.weight, EPS, out=c.out,
                                                   **kwargs)), reset_residual
    raise ValueError(f"unknown variant {variant!r}")


def _max_across_ranks(ctx: Context, value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)
    return float(t.item())


def check(ctx: Context, case: Case, variants) -> dict[str, dict]:
    """Run each tokenweave variant once and compare output and residual with the baseline's.

    Returns ``{variant: {"max_err": float, "ok": bool}}`` (max over ranks) for those that ran.
    """
    baseline, _ = build(ctx, case, "baseline")
    case.x_work.copy_(case.x)
    case.res_work.copy_(case.residual)
    ref_out = baseline().clone()
    ref_res = case.res_work.clone()
    results = {}
    for v in variants:
        if not v.startswith("tokenweave"):
            continue
        try:
            fn, reset = build(ctx, case, v)
            reset()
            out = fn().clone()
        except Skip:
            continue
        except VALIDATION_ERRORS as e:  # raised identically on every rank before any communication
            results[v] = {"error": f"{type(e).__name__}: {e}"}
            continue
        err, bad = 0.0, False
        for got, ref in ((out, ref_out), (case.res_work, ref_res)):
            diff = (got.float() - ref.float()).abs().nan_to_num(nan=float("inf"))
            err = max(err, float(diff.max()))
            bad |= not bool((diff <= ATOL + RTOL * ref.float().abs()).all())
        results[v] = {"max_err": _max_across_ranks(ctx, err), "ok": _max_across_ranks(ctx, float(bad)) == 0.0}
    return results


def dispatched_plan(ctx: Context, tokens: int, hidden: int) -> dict:
    """The dispatcher's (algo, ctas) for this size, when the transport has a choice."""
    plan = getattr(ctx.comm, "plan", None)
    if ctx.comm.transport == "torch" or plan is None:
        return {}
    try:
        p = plan(tokens, hidden, DTYPE.itemsize)
    except Exception:  # the plan is annotation only
        return {}
    return {"algo": {1: "one_shot", 2: "two_shot"}.get(p.algo, p.algo), "ctas": p.ctas}


# ---------------------------------------------------------------------------------------------- targets
def check_targets(rows: list[dict], tp: int, hidden: int = TARGET_HIDDEN) -> list[dict]:
    """Evaluate the issue's performance targets on ``rows`` (set for TP4, hidden 8192).

    Each target is ``{"name", "status": "PASS"|"MISS"|"N/A", "values": {tokens: ratio}, "threshold",
    "binding"}``; ratios are "higher is better" and ``binding`` is False away from TP4.
    """
    us = {(r["tokens"], r["variant"]): r["us"] for r in rows if r.get("hidden") == hidden and r.get("us")}
    tokens = sorted({t for t, _ in us})
    tw_variants = sorted({v for _, v in us if v.startswith("tokenweave")})

    def ratio(t, slow, fast):
        return us[(t, slow)] / us[(t, fast)] if (t, slow) in us and (t, fast) in us else None

    def best(t, names):
        vals = [us[(t, v)] for v in names if (t, v) in us]
        return min(vals) if vals else None

    def small_ctas_ratio(t):
        small = best(t, [f"tokenweave_ctas{n}" for n in CTAS if n <= 16])
        overall = best(t, tw_variants)
        return overall / small if small and overall else None

    def vs_baseline(t):
        return ratio(t, "baseline", "tokenweave")

    specs = [
        ("tokenweave >= 2.5x baseline at T <= 16", lambda t: t <= 16, vs_baseline, 2.5),
        ("tokenweave >= 2.0x baseline at T = 128", lambda t: t == 128, vs_baseline, 2.0),
        ("tokenweave >= 1.5x baseline at T = 1024", lambda t: t == 1024, vs_baseline, 1.5),
        ("tokenweave >= 1.3x baseline at T >= 4096", lambda t: t >= 4096, vs_baseline, 1.3),
        ("tokenweave faster than symm_two_shot at every T", lambda t: True,
         lambda t: ratio(t, "symm_two_shot", "tokenweave"), 1.0),
        ("best of ctas <= 16 within 90% of best tokenweave at T >= 1024", lambda t: t >= 1024, small_ctas_ratio, 0.9),
    ]
    targets = []
    for name, select, metric, threshold in specs:
        values = {t: metric(t) for t in tokens if select(t)}
        values = {t: round(v, 3) for t, v in values.items() if v is not None}
        strict = threshold == 1.0  # "faster than" means strictly
        passed = all(v > threshold if strict else v >= threshold for v in values.values())
        targets.append({"name": f"{name} (TP{TARGET_TP}, hidden {hidden})", "threshold": threshold,
                        "status": "N/A" if not values else ("PASS" if passed else "MISS"),
                        "values": {str(t): v for t, v in values.items()}, "binding": tp == TARGET_TP})
    return targets


def format_targets(targets: list[dict], tp: int) -> str:
    lines = ["== targets" + ("" if tp == TARGET_TP else f" (set for TP{TARGET_TP}; informational at TP{tp})")]
    for t in targets:
        vals = t["values"]
        worst = min(vals.items(), key=lambda kv: kv[1]) if vals else None
        detail = f"worst {worst[1]:.2f} at T={worst[0]}" if worst else "not measured in this run"
        lines.append(f"[{t['status']}] {t['name']}: {detail}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- runner
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=None,
                        help="processes to spawn (default: every visible GPU; 2 CPU processes without GPUs)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help=f"token counts (default {TOKENS})")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help=f"hidden sizes (default {HIDDEN})")
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS, metavar="VARIANT",
                        help=f"subset of {', '.join(VARIANTS)}")
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer sizes: tokens {QUICK_TOKENS}, hidden {QUICK_HIDDEN}")
    parser.add_argument("--out-dir", default="bench/results", help="where the JSON and PNG go")
    parser.add_argument("--transport", choices=("multimem", "p2p", "torch"), default=None,
                        help="force tokenweave's transport (default: its own choice)")
    parser.add_argument("--calls", type=int, default=20, help="calls captured per CUDA graph")
    parser.add_argument("--replays", type=int, default=5, help="timed replays (the median is reported)")
    parser.add_argument("--no-compile", action="store_true", help="eager baseline norm instead of torch.compile")
    parser.add_argument("--seed", type=int, default=0)


def default_world_size(args, on_gpu: bool) -> int:
    if not on_gpu:
        return args.tp or CPU_WORLD_SIZE
    visible = torch.cuda.device_count()
    if args.tp and args.tp > visible:
        raise SystemExit(f"--tp {args.tp}: only {visible} GPUs are visible")
    return args.tp or visible


def _sizes(args, on_gpu: bool):
    if not on_gpu:
        default_tokens, default_hidden = CPU_TOKENS, CPU_HIDDEN
    elif args.quick:
        default_tokens, default_hidden = QUICK_TOKENS, QUICK_HIDDEN
    else:
        default_tokens, default_hidden = TOKENS, HIDDEN
    return sorted(args.tokens or default_tokens), sorted(args.hidden or default_hidden)


def _say(ctx: Context, *msg) -> None:
    if ctx.rank == 0:
        print(*msg, flush=True)


def worker(args) -> None:
    """One rank of the benchmark (the default process group is initialised)."""
    import tokenweave as tw

    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    tokens, hiddens = _sizes(args, on_gpu)
    if not on_gpu:  # the ranks share this host's cores: oversubscribed intra-op threads make CPU timings noise
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    variants = list(args.variants or VARIANTS)
    if "baseline" not in variants:
        variants.insert(0, "baseline")  # speedups and the correctness check are against it
    compile_norm = on_gpu and not args.no_compile  # inductor on CPU needs a C++ toolchain and minutes
    transport = args.transport or (None if on_gpu else "torch")
    comm = tw.Communicator(max_tokens=max(tokens), hidden=max(hiddens), dtype=DTYPE, transport=transport)
    ctx = Context(args, comm, make_norm(compile_norm, len(tokens) * len(hiddens)), device)
    if not on_gpu:
        ctx.notes.append(CPU_NOTE.format(ctx.world_size))
        _say(ctx, ctx.notes[-1])
    if not compile_norm:
        ctx.notes.append("baseline norm ran eagerly (not torch.compile'd)")
    if any(v.startswith("symm_") for v in variants):
        ctx.setup_symm(max(tokens) * max(hiddens))
    _say(ctx, f"fused bench: TP{ctx.world_size} on {harness.device_name()}, tokenweave transport {comm.transport!r}, "
              f"tokens {tokens}, hidden {hiddens}")
    rows: list[dict] = []
    compile_s = 0.0
    for hidden in hiddens:
        if compile_norm:  # compile every shape of this hidden now, so no compilation lands in a timed region
            t0 = time.perf_counter()
            for t in tokens:
                case = Case(ctx, t, hidden, args.seed)
                ctx.norm(case.x, case.res_work.copy_(case.residual), case.weight, EPS)
            harness.barrier(ctx.group, device)
            compile_s += time.perf_counter() - t0
        for t in tokens:
            rows.extend(run_size(ctx, Case(ctx, t, hidden, args.seed + t), variants))
    ctx.symm = None  # unmap torch's symmetric buffer before the process group goes away
    comm.close()
    if ctx.rank == 0:
        report(ctx, rows, compile_s)


def run_size(ctx: Context, case: Case, variants) -> list[dict]:
    """Check and time every variant at one (tokens, hidden); returns this size's rows."""
    checks = check(ctx, case, variants)
    harness.barrier(ctx.group, ctx.device)
    rows, line = [], []
    for v in variants:
        row = {"tokens": case.tokens, "hidden": case.hidden, "dtype": str(DTYPE).replace("torch.", ""), "variant": v,
               "us": None}
        try:
            fn, reset = build(ctx, case, v)
        except Skip as e:
            if not (v.startswith("tokenweave_ctas") and case.tokens < CTAS_MIN_TOKENS):
                row["skipped"] = str(e)
                rows.append(row)
            continue

        def before_replay():
            reset()
            ctx.align()

        reset()  # the eager warm-up calls see real data too, not a previous variant's leftovers
        try:
            row["us"] = ctx.timer(fn, calls=ctx.args.calls, replays=ctx.args.replays, before_replay=before_replay)
        except VALIDATION_ERRORS as e:
            row["error"] = f"{type(e).__name__}: {e}"
        harness.barrier(ctx.group, ctx.device)
        row.update(checks.get(v, {}))
        if v == "tokenweave":
            row.update(dispatched_plan(ctx, case.tokens, case.hidden))
        rows.append(row)
        line.append(f"{v} {row['us']:.1f}" if row["us"] is not None else f"{v} failed")
    bad = [f"{v} (max_err {r['max_err']:.3g})" for v, r in checks.items() if r.get("ok") is False]
    _say(ctx, f"T={case.tokens} H={case.hidden}: " + " | ".join(line))
    if bad:
        _say(ctx, f"!! MISMATCH vs baseline at T={case.tokens} H={case.hidden}: {', '.join(bad)}")
    return rows


def report(ctx: Context, rows: list[dict], compile_s: float) -> None:
    """Rank 0: table, targets, correctness summary, results files."""
    print()
    harness.print_table(rows)
    tp = ctx.world_size
    on_gpu = ctx.device.type == "cuda"
    targets = check_targets(rows, tp) if on_gpu else []
    if targets:
        print(format_targets(targets, tp))
    failed = [r for r in rows if r.get("ok") is False]
    print(f"correctness vs baseline: {'all tokenweave variants matched' if not failed else f'{len(failed)} MISMATCHES'}"
          f" (|diff| <= {ATOL} + {RTOL}|ref| on output and residual)")
    for note in ctx.notes:
        print(note)
    extra = {"device_name": torch.cuda.get_device_name() if on_gpu else "cpu", "transport": ctx.comm.transport,
             "timing": (f"CUDA graph of {ctx.args.calls} calls, median of {ctx.args.replays} replays, us per call"
                        if on_gpu else f"eager wall clock, {ctx.args.calls} calls, median of {ctx.args.replays}"),
             "compile_s": round(compile_s, 1), "targets": targets, "notes": ctx.notes}
    json_path, png_path = harness.write_results(BENCH, tp, rows, ctx.args.out_dir, extra)
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""), flush=True)


def main(argv=None) -> None:
    """Entry point of ``bench/fused_allreduce_rmsnorm.py``: this benchmark through the CLI launcher."""
    from tokenweave.bench.cli import run

    run(BENCH, argv)
