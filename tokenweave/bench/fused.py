"""Fused all-reduce + residual-add + RMSNorm: tokenweave against what a TP layer pays today.

Variants, all on the same machine in one run (bf16, us per call inside a CUDA graph); each column
times exactly what its name says:

``baseline``
    NCCL ``dist.all_reduce`` then the compiled residual-add + RMSNorm. At world size 1 (one GPU needs
    no all-reduce) the compiled norm alone.
``baseline_repeat``
    The baseline timed again, last at each size: ``|baseline - baseline_repeat| / baseline`` is the
    run-to-run noise stated next to every ratio (table column ``noise``, JSON key ``noise``).
``norm``
    The compiled residual-add + RMSNorm alone; its achieved bandwidth (bytes read + written / time) is
    printed against the card's copy bandwidth (a large device copy timed once in the same run) and
    flagged below 70% at sizes large enough for a copy of the same bytes to reach 70%.
``nccl``
    NCCL ``dist.all_reduce`` alone (no norm).
``symm_two_shot`` / ``symm_one_shot``
    torch's symmetric-memory all-reduce alone (``torch.ops.symm_mem.two_shot_all_reduce_`` in place,
    ``one_shot_all_reduce`` into a new tensor), no norm.
``symm_two_shot+norm`` / ``symm_one_shot+norm``
    The same all-reduce followed by the compiled norm.
``tokenweave``
    ``tokenweave.fused_allreduce_rmsnorm`` at the dispatcher's settings (all-reduce + add + norm) into
    plain tensors (the dispatcher never picks lean there); ``tokenweave_one_shot`` /
    ``tokenweave_two_shot`` force the algorithm, ``tokenweave_ctasN`` the CTA count at the dispatcher's
    algorithm (only from 1024 tokens, where few-CTA launches matter for overlap).
``tokenweave_symm``
    The dispatcher's settings with ``out`` and ``residual`` from ``comm.empty``: what a user who allocates
    with ``comm.empty`` gets (lean where the card's config says so).
``tokenweave_lamport``
    ``algo="lamport"`` (flag-free one-shot) where it applies (at most 2 MiB of x); skipped above, saying why.
``tokenweave_lean`` / ``tokenweave_lean_sharded``
    ``algo="lean"``, ``out`` from ``comm.empty``; the residual replicated (from ``comm.empty``) or sharded
    (``sharded_residual=True``: only this rank's rows, ``comm.shard_rows``, fewer bytes per call).
    The symmetric tensors are allocated once per size (collective, in the same order on every rank).
    ``tokenweave_lean_ctasN``: ``tokenweave_lean`` at N CTAs (from 1024 tokens).

The compiled norm is the best a user would get: ``torch.compile(fullgraph=True, dynamic=False)``
afresh for every (tokens, hidden) (:class:`tokenweave.bench.harness.StaticCompiled`), compiled and
warmed up before any timing. Compiling one function for hidden 4096 and then 8192 would leave a
symbolic-shape kernel 1.5-2.8x slower at hidden 8192.

Every tokenweave variant is also checked against the baseline's output and residual (``max_err``;
the sharded variant: the full output and this rank's residual rows).
Variants that need more than one rank skip at world size 1, saying why. Without GPUs the run uses 2
gloo processes, tokenweave's torch reference path and wall-clock timing at small sizes: a smoke test
of the pipeline, not a measurement. Performance targets live with the scripts (``bench/targets.py``,
printed by ``bench/fused_allreduce_rmsnorm.py``), not here.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tokenweave.bench import harness
from tokenweave.comm import max_across_ranks
from tokenweave.reference import add_rmsnorm_reference

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
LEAN_CTAS = (4, 8, 16)  # the few-CTA range lean is built for (<= 16 CTAs within 90% of the best)
CTAS_MIN_TOKENS = 1024
BASELINE, BASELINE_REPEAT = harness.BASELINE, harness.BASELINE_REPEAT
# Column order of the table: baselines and references, the dispatched calls, forced algorithms, CTA sweeps.
BASE_VARIANTS = (BASELINE, "norm", "nccl", "symm_two_shot", "symm_one_shot", "symm_two_shot+norm",
                 "symm_one_shot+norm", "tokenweave", "tokenweave_symm", "tokenweave_one_shot", "tokenweave_two_shot",
                 "tokenweave_lamport", "tokenweave_lean", "tokenweave_lean_sharded")
# baseline_repeat comes last so the noise it measures spans everything timed at that size
VARIANTS = (BASE_VARIANTS + tuple(f"tokenweave_ctas{n}" for n in CTAS)
            + tuple(f"tokenweave_lean_ctas{n}" for n in LEAN_CTAS) + (BASELINE_REPEAT,))
# Variants that need a collective: they skip at world size 1.
MULTI_RANK_VARIANTS = ("nccl", "symm_two_shot", "symm_one_shot", "symm_two_shot+norm", "symm_one_shot+norm")
# bf16 tolerance of tokenweave vs the baseline: NCCL rounds partial sums to bf16 along its ring while
# tokenweave sums in fp32 and rounds once, so sums of a few N(0,1) terms may differ by a few ulps.
RTOL, ATOL = 3e-2, 6.25e-2
CPU_NOTE = ("NOTE: no CUDA GPU here. This ran tokenweave's torch REFERENCE path (transport 'torch') on "
            "{} gloo CPU processes with eager wall-clock timing: it checks the benchmark pipeline, it is NOT a "
            "GPU measurement.")


# Argument errors tokenweave raises on every rank alike before communicating (e.g. one-shot over its size
# limit): the variant is recorded as failed and the run goes on. Anything else aborts the run.
VALIDATION_ERRORS = (ValueError, TypeError, NotImplementedError)


class Skip(Exception):
    """A variant that cannot run in this configuration (the reason is recorded)."""


# ---------------------------------------------------------------------------------------------- pieces
def baseline_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The baseline's residual-add + RMSNorm as a serving layer calls it: ``residual`` updated in place.

    :func:`tokenweave.reference.add_rmsnorm_reference` (the kernels' rounding points) plus the write-back,
    compiled into one kernel on GPU. Returns the normalised output.
    """
    out, z = add_rmsnorm_reference(x, residual, weight, eps)
    residual.copy_(z)
    return out


def make_norm(compile: bool):
    """The baseline norm: compiled per static shape (:class:`~tokenweave.bench.harness.StaticCompiled`) or eager."""
    return harness.StaticCompiled(baseline_add_rmsnorm) if compile else baseline_add_rmsnorm


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
        self.copy: harness.CopyBandwidth | None = None  # the device-copy yardstick of the baseline norm

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


# Where a tokenweave variant's out and residual live (Case.destinations).
PLAIN, SYMMETRIC, SHARDED = "plain", "symmetric", "sharded"
_CTA_SWEEPS = ("tokenweave_ctas", "tokenweave_lean_ctas")


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
        # comm.empty tensors of the lean / symmetric variants, allocated on first use (see destinations)
        self.sym_out = self.sym_res = self.res_shard = None
        self.shard = (0, tokens)  # (first_row, n_rows) of this rank's residual rows

    def destinations(self, comm, kind: str) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """``(out, residual, rows of the full residual it holds)`` for destinations ``kind``.

        ``"symmetric"``: out and residual from ``comm.empty``; ``"sharded"``: out from ``comm.empty`` and this
        rank's residual rows (``comm.shard_rows``); ``"plain"``: the case's own tensors. The symmetric
        tensors are allocated once per size, at the first variant that needs them: a collective, reached in
        the same variant order on every rank. They live until ``comm.close()``.
        """
        if kind == PLAIN:
            return self.out, self.res_work, slice(None)
        if self.sym_out is None:
            self.sym_out = comm.empty(self.tokens, self.hidden, dtype=DTYPE)
            self.sym_res = comm.empty(self.tokens, self.hidden, dtype=DTYPE)
            self.shard = comm.shard_rows(self.tokens)
            self.res_shard = torch.empty(self.shard[1], self.hidden, dtype=DTYPE, device=self.x.device)
        if kind == SYMMETRIC:
            return self.sym_out, self.sym_res, slice(None)
        first, n = self.shard
        return self.sym_out, self.res_shard, slice(first, first + n)


def _tokenweave_spec(variant: str) -> tuple[dict, str]:
    """``(keyword arguments of fused_allreduce_rmsnorm, destinations kind)`` of a tokenweave variant."""
    if variant == "tokenweave":
        return {}, PLAIN
    suffix = variant[len("tokenweave_"):]
    if suffix == "symm":
        return {}, SYMMETRIC
    if suffix in ("one_shot", "two_shot", "lamport"):
        return {"algo": suffix}, PLAIN
    if suffix == "lean":
        return {"algo": "lean"}, SYMMETRIC
    if suffix == "lean_sharded":
        return {"algo": "lean", "sharded_residual": True}, SHARDED
    if suffix.startswith("lean_ctas"):
        return {"algo": "lean", "ctas": int(suffix[len("lean_ctas"):])}, SYMMETRIC
    if suffix.startswith("ctas"):
        return {"ctas": int(suffix[len("ctas"):])}, PLAIN
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

    if variant in (BASELINE, BASELINE_REPEAT):
        if ctx.world_size == 1:  # one GPU: nothing to all-reduce, the user runs the norm alone
            return (lambda: norm(c.x_work, c.res_work, c.weight, EPS)), reset_both

        def fn():
            dist.all_reduce(c.x_work, group=group)
            return norm(c.x_work, c.res_work, c.weight, EPS)
        return fn, reset_both
    if variant == "norm":
        return (lambda: norm(c.x, c.res_work, c.weight, EPS)), reset_residual
    if variant in MULTI_RANK_VARIANTS and ctx.world_size == 1:
        raise Skip("needs more than one rank: world size 1 has nothing to all-reduce")
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

        def two_shot_only():
            two_shot(c.symm_x, "sum", name)  # in place: the sum lands in symm_x

        def two_shot_then_norm():
            two_shot(c.symm_x, "sum", name)
            return norm(c.symm_x, c.res_work, c.weight, EPS)

        fns = {"symm_two_shot": two_shot_only,
               "symm_one_shot": lambda: one_shot(c.symm_x, "sum", name),
               "symm_two_shot+norm": two_shot_then_norm,
               "symm_one_shot+norm": lambda: norm(one_shot(c.symm_x, "sum", name), c.res_work, c.weight, EPS)}
        if variant not in fns:
            raise ValueError(f"unknown variant {variant!r}")
        return fns[variant], reset_symm
    if variant.startswith("tokenweave"):
        kwargs, kind = _tokenweave_spec(variant)
        if kwargs and ctx.world_size == 1:
            raise Skip("world size 1 runs no collective: there is no algorithm or CTA count to force")
        if kind != PLAIN and ctx.world_size == 1:
            raise Skip("world size 1: comm.empty gives a plain tensor, so this is the 'tokenweave' call")
        if kwargs and ctx.comm.transport == "torch":
            raise Skip("the 'torch' transport has no algo or CTA choice")
        if "ctas" in kwargs and c.tokens < CTAS_MIN_TOKENS:
            raise Skip(f"CTA sweeps start at {CTAS_MIN_TOKENS} tokens")
        if kwargs.get("algo") == "lamport":
            try:  # the dispatcher's own limits (2-byte dtypes, at most 2 MiB of x): skipped where they say no
                ctx.comm.plan(c.tokens, c.hidden, DTYPE.itemsize, "lamport")
            except ValueError as e:
                raise Skip(str(e)) from None
        out, res, rows = c.destinations(ctx.comm, kind)

        def reset_destination():
            res.copy_(c.residual[rows])

        return (lambda: tw.fused_allreduce_rmsnorm(ctx.comm, c.x, res, c.weight, EPS, out=out,
                                                   **kwargs)), reset_destination
    raise ValueError(f"unknown variant {variant!r}")


def check(ctx: Context, case: Case, variants) -> dict[str, dict]:
    """Run each tokenweave variant once and compare output and residual with the baseline's.

    The sharded-residual variant: its full output and this rank's residual rows. Returns
    ``{variant: {"max_err": float, "ok": bool}}`` (max over ranks) for those that ran.
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
        _, res, rows = case.destinations(ctx.comm, _tokenweave_spec(v)[1])  # allocated by build: no collective
        err, bad = 0.0, False
        for got, ref in ((out, ref_out), (res, ref_res[rows])):
            diff = (got.float() - ref.float()).abs().nan_to_num(nan=float("inf"))
            err = max(err, float(diff.max())) if diff.numel() else err  # a rank may own no residual rows
            bad |= not bool((diff <= ATOL + RTOL * ref.float().abs()).all())
        results[v] = {"max_err": max_across_ranks(err, ctx.group, ctx.device),
                      "ok": max_across_ranks(float(bad), ctx.group, ctx.device) == 0.0}
    return results


def dispatched_plan(ctx: Context, tokens: int, hidden: int, lean_ok: bool = False) -> dict:
    """The dispatcher's (algo, ctas) for this size, when the transport has a choice.

    ``lean_ok``: out and residual come from ``comm.empty`` (``tokenweave_symm``), so lean may be chosen.
    """
    from tokenweave.comm import ALGOS

    plan = getattr(ctx.comm, "plan", None)
    if ctx.comm.transport == "torch" or plan is None:
        return {}
    try:
        p = plan(tokens, hidden, DTYPE.itemsize, lean_ok=lean_ok)
    except Exception:  # the plan is annotation only
        return {}
    return {"algo": {code: name for name, code in ALGOS.items()}.get(p.algo, p.algo), "ctas": p.ctas}


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
    harness.add_out_dir_argument(parser)
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
    # baseline first (speedups and the correctness check are against it), baseline_repeat last (the noise)
    variants = [v for v in (args.variants or VARIANTS) if v not in (BASELINE, BASELINE_REPEAT)]
    variants = [BASELINE] + variants + [BASELINE_REPEAT]
    compile_norm = on_gpu and not args.no_compile  # inductor on CPU needs a C++ toolchain and minutes
    transport = args.transport or (None if on_gpu else "torch")
    comm = tw.Communicator(max_tokens=max(tokens), hidden=max(hiddens), dtype=DTYPE, transport=transport)
    ctx = Context(args, comm, make_norm(compile_norm), device)
    if ctx.rank == 0:
        print(f"fused bench: results go to {Path(args.out_dir).resolve()}", flush=True)
    if not on_gpu:
        ctx.notes.append(CPU_NOTE.format(ctx.world_size))
        _say(ctx, ctx.notes[-1])
    if not compile_norm:
        ctx.notes.append("baseline norm ran eagerly (not torch.compile'd)")
    if ctx.world_size == 1:
        ctx.notes.append("world size 1: baseline = the add+RMSNorm alone (one GPU has nothing to "
                         "all-reduce); tokenweave = tokenweave.fused_allreduce_rmsnorm on a one-rank Communicator; "
                         "variants that need a collective were skipped")
    elif any(v.startswith("symm_") for v in variants):
        ctx.setup_symm(max(tokens) * max(hiddens))
    ctx.copy = harness.CopyBandwidth(device)  # once per run, before anything is timed
    _say(ctx, f"fused bench: TP{ctx.world_size} on {harness.device_slug()}, tokenweave transport {comm.transport!r}, "
              f"tokens {tokens}, hidden {hiddens}; device copy {ctx.copy.peak_gbps:.0f} GB/s "
              f"({ctx.copy.peak_bytes >> 20} MiB read + written)")
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
            if not (v.startswith(_CTA_SWEEPS) and case.tokens < CTAS_MIN_TOKENS):
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
        if v == "norm":  # every rank times its copy alike, so no rank waits on another
            row.update(harness.bandwidth_fields(row["us"], harness.add_rmsnorm_traffic_bytes(
                case.tokens, case.hidden, DTYPE.itemsize), ctx.copy))
        harness.barrier(ctx.group, ctx.device)
        row.update(checks.get(v, {}))
        if v in ("tokenweave", "tokenweave_symm"):
            row.update(dispatched_plan(ctx, case.tokens, case.hidden, lean_ok=v == "tokenweave_symm"))
        rows.append(row)
        bandwidth = harness.format_bandwidth(row)
        line.append((f"{v} {row['us']:.1f}" + (f" ({bandwidth})" if bandwidth else ""))
                    if row["us"] is not None else f"{v} failed")
    bad = [f"{v} (max_err {r['max_err']:.3g})" for v, r in checks.items() if r.get("ok") is False]
    _say(ctx, f"T={case.tokens} H={case.hidden}: " + " | ".join(line))
    if bad:
        _say(ctx, f"!! MISMATCH vs baseline at T={case.tokens} H={case.hidden}: {', '.join(bad)}")
    return rows


def format_bandwidth_table(rows: list[dict], copy: harness.CopyBandwidth, variants=("norm",)) -> str:
    """The baseline norm's achieved bandwidth per size against the card's copy bandwidth (and a same-size copy)."""
    pct = 100 * harness.LOW_BANDWIDTH_FRACTION
    lines = [f"== baseline norm bandwidth (bytes read + written / time) against the device copy, {copy.peak_gbps:.0f} "
             f"GB/s at {copy.peak_bytes >> 20} MiB; LOW = below {pct:.0f}% of it where a copy of the same bytes "
             f"reaches {pct:.0f}% (smaller sizes are latency-bound: '-')",
             f"{'hidden':>6} {'tokens':>6} {'variant':>8} {'us':>9} {'GB/s':>7} {'of copy':>7} "
             f"{'same-size copy':>14}  flag"]
    for r in rows:
        if r["variant"] in variants and "GBps" in r:
            flag = "-" if r.get("bw_low") is None else ("LOW" if r["bw_low"] else "ok")
            lines.append(f"{r['hidden']:>6} {r['tokens']:>6} {r['variant']:>8} {r['us']:>9.1f} {r['GBps']:>7.0f} "
                         f"{100 * r['frac_of_peak_copy']:>6.0f}% {r['copy_GBps_same_bytes']:>9.0f} GB/s  {flag}")
    return "\n".join(lines)


def report(ctx: Context, rows: list[dict], compile_s: float) -> None:
    """Rank 0: table, noise, baseline bandwidth, correctness summary, results files."""
    print()
    harness.print_table(rows)
    tp = ctx.world_size
    on_gpu = ctx.device.type == "cuda"
    noise = harness.run_to_run_noise(rows)
    if noise:
        print(f"run-to-run noise (|baseline - baseline_repeat| / baseline): max {100 * noise['max']:.1f}% over "
              f"{len(noise['per_size'])} sizes; every ratio above carries its line's noise")
    print(format_bandwidth_table(rows, ctx.copy))
    low = [f"T={r['tokens']} H={r['hidden']}" for r in rows if r["variant"] == "norm" and r.get("bw_low")]
    if low:
        print(f"!! baseline norm below {100 * harness.LOW_BANDWIDTH_FRACTION:.0f}% of copy bandwidth at: "
              f"{', '.join(low)}")
    compiled = ctx.norm.summary() if isinstance(ctx.norm, harness.StaticCompiled) else None
    if compiled and (compiled["max_cache_entries_per_signature"] or 1) > 1:
        print(f"!! the compiled baseline recompiled: {compiled}")
    failed = [r for r in rows if r.get("ok") is False]
    print(f"correctness vs baseline: {'all tokenweave variants matched' if not failed else f'{len(failed)} MISMATCHES'}"
          f" (|diff| <= {ATOL} + {RTOL}|ref| on output and residual)")
    skipped = {r["variant"]: r["skipped"] for r in rows if r.get("skipped")}
    for variant, why in skipped.items():
        print(f"skipped {variant}: {why}")
    for note in ctx.notes:
        print(note)
    extra = {"device_name": torch.cuda.get_device_name() if on_gpu else "cpu", "transport": ctx.comm.transport,
             "timing": (f"CUDA graph of {ctx.args.calls} calls, median of {ctx.args.replays} replays, us per call"
                        if on_gpu else f"eager wall clock, {ctx.args.calls} calls, median of {ctx.args.replays}"),
             "variants": {v: _legend(v) for v in dict.fromkeys(r["variant"] for r in rows)},
             "copy_bandwidth": {**ctx.copy.describe(),
                                "low_flag": f"norm below {harness.LOW_BANDWIDTH_FRACTION} x this bandwidth where a "
                                            "copy of the same bytes reaches that fraction (bw_low null elsewhere)"},
             "baseline_norm_low_bandwidth": low, "baseline_compile": compiled or "eager",
             "compile_s": round(compile_s, 1), "notes": ctx.notes}
    json_path, png_path = harness.write_results(BENCH, tp, rows, ctx.args.out_dir, extra)
    print(f"wrote {json_path.resolve()}" + (f" and {png_path.name}" if png_path else ""), flush=True)


def _legend(variant: str) -> str:
    """What a column times, for the results JSON."""
    fixed = {
        BASELINE: "NCCL all_reduce + compiled add+RMSNorm (world size 1: the compiled norm alone)",
        BASELINE_REPEAT: "the baseline timed again, last at each size (run-to-run noise)",
        "norm": "compiled add+RMSNorm alone",
        "nccl": "NCCL all_reduce alone",
        "symm_two_shot": "torch symm_mem two_shot_all_reduce_ alone (no norm)",
        "symm_one_shot": "torch symm_mem one_shot_all_reduce alone (no norm)",
        "symm_two_shot+norm": "torch symm_mem two_shot_all_reduce_ + compiled add+RMSNorm",
        "symm_one_shot+norm": "torch symm_mem one_shot_all_reduce + compiled add+RMSNorm",
        "tokenweave": "tokenweave.fused_allreduce_rmsnorm into plain tensors, dispatcher's algo (never lean) and CTAs",
        "tokenweave_symm": "tokenweave.fused_allreduce_rmsnorm, dispatcher's algo and CTAs, out and residual from "
                           "comm.empty (lean where the card's config says so)",
        "tokenweave_one_shot": "tokenweave.fused_allreduce_rmsnorm, algo='one_shot'",
        "tokenweave_two_shot": "tokenweave.fused_allreduce_rmsnorm, algo='two_shot'",
        "tokenweave_lamport": "tokenweave.fused_allreduce_rmsnorm, algo='lamport' (flag-free one-shot; skipped "
                              "above its 2 MiB limit)",
        "tokenweave_lean": "tokenweave.fused_allreduce_rmsnorm, algo='lean', out and (replicated) residual from "
                           "comm.empty",
        "tokenweave_lean_sharded": "tokenweave.fused_allreduce_rmsnorm, algo='lean', sharded_residual=True: out from "
                                   "comm.empty, residual = this rank's rows (comm.shard_rows)",
    }
    if variant in fixed:
        return fixed[variant]
    if variant.startswith("tokenweave_lean_ctas"):
        return (f"tokenweave.fused_allreduce_rmsnorm, algo='lean', out and (replicated) residual from comm.empty, "
                f"ctas={variant[len('tokenweave_lean_ctas'):]}")
    if variant.startswith("tokenweave_ctas"):
        return (f"tokenweave.fused_allreduce_rmsnorm into plain tensors, dispatcher's algo (never lean), "
                f"ctas={variant[len('tokenweave_ctas'):]}")
    return variant


def main(argv=None):
    """This benchmark through the CLI launcher; returns ``(args, world_size)`` (:func:`tokenweave.bench.cli.run`)."""
    from tokenweave.bench.cli import run

    return run(BENCH, argv)
