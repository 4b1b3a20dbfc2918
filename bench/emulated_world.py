"""The lean data path measured in the emulated world (W ranks on one GPU; tokenweave.testing).

    python bench/emulated_world.py --out-dir bench/results

Three tables, bf16, CUDA events around 20 calls, median of 5 repeats; the calls are CUDA-graph replays (one graph
per rank; ``--per-cta-timing eager`` launches the per-CTA table's calls, hundreds of microseconds each, eagerly):

``per_cta``  (hidden 8192, 4096 tokens per rank, W = 2 and 4, CTAs per rank 1..32)
    Time of one fused all-reduce + residual + RMSNorm on every rank at once (all W grids side by side),
    and the useful throughput per CTA: bytes of x one rank completes per second per CTA. Variants:
    ``two_shot`` (out in ordinary memory: the flagged two-shot), ``lean`` (out and residual symmetric),
    ``lean_sharded`` (sharded residual), ``lean_pull`` / ``lean_pull_sharded`` (x symmetric too: no scatter, the
    owners read every rank's x in place), ``lean_bulk`` / ``lean_bulk_sharded`` (the scatter done by a copy warp's
    bulk copies). ``two_shot_repeat`` times two_shot again: the run-to-run noise.
``one_shot`` (hidden 8192, W = 2, 4, 8, tokens 1..128)
    Latency per call of the flagged one-shot against the flag-free Lamport one-shot (dispatcher's CTAs).
``mid_range`` (hidden 8192, W = 2 and 4, tokens 32..512)
    Latency per call of the flag-free Lamport two-shot (``lamport_two_shot``) against the flagged two-shot,
    lean (out and residual symmetric) and lean_pull (x too), replicated residual, each with the CTAs the dispatcher's plan gives it
    (``ctas`` in each row: requested; a kernel runs at most one CTA per chunk). ``lamport_two_shot_repeat``
    times it again: the run-to-run noise. Sizes where a rank's shard exceeds a Lamport slot (2 MiB) are skipped.

What the emulated world cannot show: NVLink. Peer stores land in this GPU's HBM, which all W ranks share,
so the per-CTA numbers compare data paths (bytes issued per byte of x, synchronisation), not link speed.
Writes ``emulated_per_cta-<card>-tp<W>``, ``emulated_one_shot-<card>-tp<W>`` and ``emulated_mid_range-<card>-tp<W>``
(.json, .png) into --out-dir (tp<W> names the emulated world size).
"""
from __future__ import annotations

import os

import argparse
import sys
from pathlib import Path

try:
    import tokenweave as tw
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tokenweave as tw

import torch

# lean_bulk is experimental (tokenweave/env.py): measured here on purpose
os.environ.setdefault("TOKENWEAVE_EXPERIMENTAL_LEAN_BULK", "1")

from tokenweave.bench import harness
from tokenweave.comm import traffic_per_byte
from tokenweave.errors import TokenweaveError
from tokenweave.testing import EmulatedWorld

HIDDEN = 8192
DTYPE = torch.bfloat16
EPS = 1e-5
CTA_TOKENS = 4096
CTAS = (1, 2, 4, 8, 16, 32)
VARIANTS = ("two_shot", "lean", "lean_sharded", "lean_pull", "lean_pull_sharded", "lean_bulk", "lean_bulk_sharded",
            "two_shot_repeat")
ONE_SHOT_TOKENS = (1, 4, 16, 64, 128)
MID_TOKENS = (32, 64, 128, 256, 512)


def _inputs(world, tokens, gen):
    dev = world.device
    xs = [torch.randn(tokens, HIDDEN, generator=gen, device=dev, dtype=DTYPE) for _ in range(world.world_size)]
    residual = torch.randn(tokens, HIDDEN, generator=gen, device=dev, dtype=DTYPE)
    weight = (1 + 0.1 * torch.randn(HIDDEN, generator=gen, device=dev)).to(DTYPE)
    return xs, residual, weight


def per_cta_rows(W: int, args) -> list[dict]:
    """The per-CTA table. A variant whose call fails (a rank's wait timed out) is recorded as a row with its
    error, and the table goes on in a fresh world (the failed one is broken)."""
    rows = []
    tokens = args.cta_tokens
    world = None

    def new_world():
        world = EmulatedWorld(W, max_tokens=tokens, hidden=HIDDEN, dtype=DTYPE, timeout_ms=args.timeout_ms)
        gen = torch.Generator(world.device).manual_seed(1)
        xs, residual, weight = _inputs(world, tokens, gen)
        plain_out = [torch.empty_like(residual) for _ in range(W)]
        plain_res = [residual.clone() for _ in range(W)]
        sym_out = world.empty(tokens, HIDDEN, dtype=DTYPE)
        sym_res = world.empty(tokens, HIDDEN, dtype=DTYPE)
        shard_res = [residual[a:a + n].clone() for a, n in (c.shard_rows(tokens) for c in world.ranks)]
        setups = {
            "two_shot": (plain_out, plain_res, dict(algo="two_shot"), "replicated"),
            "lean": (sym_out, sym_res, dict(algo="lean"), "replicated"),
            "lean_sharded": (sym_out, shard_res, dict(algo="lean", sharded_residual=True), "sharded"),
            "lean_pull": (sym_out, sym_res, dict(algo="lean_pull"), "replicated"),
            "lean_pull_sharded": (sym_out, shard_res, dict(algo="lean_pull", sharded_residual=True), "sharded"),
            "lean_bulk": (sym_out, sym_res, dict(algo="lean_bulk"), "replicated"),
            "lean_bulk_sharded": (sym_out, shard_res, dict(algo="lean_bulk", sharded_residual=True), "sharded"),
        }
        setups["two_shot_repeat"] = setups["two_shot"]
        sym_xs = world.empty(tokens, HIDDEN, dtype=DTYPE)  # lean_pull reads x in place: the same values
        for s, x in zip(sym_xs, xs):
            s.copy_(x)
        return world, {"plain": xs, "symmetric": sym_xs}, weight, setups

    try:
        for ctas in CTAS:
            for variant in VARIANTS:
                if world is None:
                    world, xs, weight, setups = new_world()
                if W * ctas > world.num_sms:
                    continue
                outs, res, kw, residual_mode = setups[variant]
                x_of = xs["symmetric" if kw["algo"] == "lean_pull" else "plain"]

                def fn(comm, r, outs=outs, res=res, kw=kw, x_of=x_of):
                    tw.fused_allreduce_rmsnorm(comm, x_of[r], res[r], weight, EPS, out=outs[r], ctas=ctas, **kw)
                row = {"table": "per_cta", "W": W, "tokens": tokens, "hidden": HIDDEN, "ctas": ctas,
                       "variant": variant,
                       "traffic_per_byte": traffic_per_byte(kw["algo"], W, residual_mode)["total"]}
                row["timing"] = args.per_cta_timing
                try:
                    if args.per_cta_timing == "graph":
                        us = harness.time_cuda_graph(fn, calls=args.calls, replays=args.replays, world=world)
                    else:
                        us = harness.time_cuda_eager(lambda: world.run(fn), calls=args.calls, replays=args.replays)
                    world.synchronize()
                except TokenweaveError as e:
                    torch.cuda.synchronize()
                    row["error"] = f"{e}\n{world.error_report()}"
                    rows.append(row)
                    print(f"W={W} ctas={ctas:3d} {variant:16s} FAILED: {row['error']}", flush=True)
                    try:
                        world.close()
                    except TokenweaveError:
                        pass
                    world = None
                    continue
                x_bytes = tokens * HIDDEN * DTYPE.itemsize
                row.update(us=us, gb_per_s_per_cta=x_bytes / (us * 1e3) / ctas)
                rows.append(row)
                print(f"W={W} ctas={ctas:3d} {variant:16s} {us:9.1f} us  "
                      f"{rows[-1]['gb_per_s_per_cta']:6.2f} GB/s of x per CTA", flush=True)
    finally:
        if world is not None:
            world.close()
    return rows


def one_shot_rows(W: int, args) -> list[dict]:
    rows = []
    # one-shot's slots hold capacity / W: size the workspace so every token count fits at every W
    with EmulatedWorld(W, max_tokens=W * max(ONE_SHOT_TOKENS), hidden=HIDDEN, dtype=DTYPE) as world:
        gen = torch.Generator(world.device).manual_seed(2)
        for tokens in ONE_SHOT_TOKENS:
            xs, residual, weight = _inputs(world, tokens, gen)
            outs = [torch.empty_like(residual) for _ in range(W)]
            res = [residual.clone() for _ in range(W)]
            for variant in ("one_shot", "lamport", "one_shot_repeat"):
                algo = variant.replace("_repeat", "")

                def fn(comm, r, algo=algo):
                    tw.fused_allreduce_rmsnorm(comm, xs[r], res[r], weight, EPS, out=outs[r], algo=algo)
                us = harness.time_cuda_graph(fn, calls=args.calls, replays=args.replays, world=world)
                world.synchronize()
                rows.append({"table": "one_shot", "W": W, "tokens": tokens, "hidden": HIDDEN, "variant": variant,
                             "us": us})
                print(f"W={W} T={tokens:4d} {variant:16s} {us:8.2f} us", flush=True)
    return rows


def mid_range_rows(W: int, args) -> list[dict]:
    rows = []
    with EmulatedWorld(W, max_tokens=max(MID_TOKENS), hidden=HIDDEN, dtype=DTYPE) as world:
        gen = torch.Generator(world.device).manual_seed(3)
        slot_bytes = int(world.layout["lamport_max_bytes"])
        for tokens in MID_TOKENS:
            xs, residual, weight = _inputs(world, tokens, gen)
            plain_out = [torch.empty_like(residual) for _ in range(W)]
            plain_res = [residual.clone() for _ in range(W)]
            sym_out = world.empty(tokens, HIDDEN, dtype=DTYPE)
            sym_res = world.empty(tokens, HIDDEN, dtype=DTYPE)
            for r in sym_res:
                r.copy_(residual)
            sym_xs = world.empty(tokens, HIDDEN, dtype=DTYPE)  # lean_pull reads x in place
            for s, x in zip(sym_xs, xs):
                s.copy_(x)
            setups = {"two_shot": (plain_out, plain_res, "two_shot"), "lean": (sym_out, sym_res, "lean"),
                      "lean_pull": (sym_out, sym_res, "lean_pull"),
                      "lamport_two_shot": (plain_out, plain_res, "lamport_two_shot")}
            setups["lamport_two_shot_repeat"] = setups["lamport_two_shot"]
            for variant, (outs, res, algo) in setups.items():
                if algo == "lamport_two_shot" and -(-tokens // W) * HIDDEN * DTYPE.itemsize > slot_bytes:
                    print(f"W={W} T={tokens:4d} {variant:24s} skipped: a shard exceeds a Lamport slot", flush=True)
                    continue
                lean, pull = algo in ("lean", "lean_pull"), algo == "lean_pull"
                ctas = world.ranks[0].plan(tokens, HIDDEN, DTYPE.itemsize, algo, lean_ok=lean, pull_ok=pull).ctas
                x_of = sym_xs if pull else xs

                def fn(comm, r, outs=outs, res=res, algo=algo, x_of=x_of):
                    tw.fused_allreduce_rmsnorm(comm, x_of[r], res[r], weight, EPS, out=outs[r], algo=algo)
                us = harness.time_cuda_graph(fn, calls=args.calls, replays=args.replays, world=world)
                world.synchronize()
                rows.append({"table": "mid_range", "W": W, "tokens": tokens, "hidden": HIDDEN, "variant": variant,
                             "ctas": ctas, "us": us, "traffic_per_byte": traffic_per_byte(algo, W)["total"]})
                print(f"W={W} T={tokens:4d} {variant:24s} ctas={ctas:3d} {us:8.2f} us", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_out_dir_argument(parser)
    parser.add_argument("--worlds", type=int, nargs="*", default=[2, 4], help="per-CTA table (none: skip)")
    parser.add_argument("--one-shot-worlds", type=int, nargs="*", default=[2, 4, 8], help="one-shot table (none: skip)")
    parser.add_argument("--mid-worlds", type=int, nargs="*", default=[2, 4], help="mid-range table (none: skip)")
    parser.add_argument("--cta-tokens", type=int, default=CTA_TOKENS)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--replays", type=int, default=5)
    parser.add_argument("--timeout-ms", type=int, default=30000, help="bound of every wait (a failed variant: its row)")
    parser.add_argument("--per-cta-timing", choices=("eager", "graph"), default="graph",
                        help="per-CTA table: one CUDA graph per rank (default; the committed table, a117ea7), or "
                             "calls launched eagerly between the events (the tables up to 30e69e6, while graph "
                             "timing timed out on the world's fork order, fixed at 9c4550b)")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and tw.HAS_EXTENSION):
        raise SystemExit("bench/emulated_world.py needs a CUDA GPU and the tokenweave extension")
    what = __doc__.split("\n\n", 2)[2]
    for W in args.worlds:
        rows = per_cta_rows(W, args)
        print("wrote", *harness.write_results("emulated_per_cta", W, rows, args.out_dir,
                                              {"what": what}, x_key="ctas", panel_keys=("W",),
                                              baseline="two_shot"))
    for W in args.one_shot_worlds:
        rows = one_shot_rows(W, args)
        print("wrote", *harness.write_results("emulated_one_shot", W, rows, args.out_dir,
                                              {"what": what}, x_key="tokens", panel_keys=("W",),
                                              baseline="one_shot"))
    for W in args.mid_worlds:
        rows = mid_range_rows(W, args)
        print("wrote", *harness.write_results("emulated_mid_range", W, rows, args.out_dir,
                                              {"what": what}, x_key="tokens", panel_keys=("W",),
                                              baseline="two_shot"))


if __name__ == "__main__":
    main()
