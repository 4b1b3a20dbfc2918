"""End-to-end TP Llama-3-70B layers: baseline vs fuse_only vs tokenweave vs comm_removed.

    torchrun --nproc-per-node 4 bench/e2e_layers.py                 # TP4, default sizes
    torchrun --nproc-per-node 2 bench/e2e_layers.py --quick
    python bench/e2e_layers.py --tp 2 --tokens 1 64 4096 8192       # spawns the ranks itself

Llama-3-70B shapes (hidden 8192, 64 query / 8 KV heads of 128, intermediate 28672), random bf16
weights, ``--layers`` layers (default 4). Token counts above 256 are prefill batches of
``--seq-len``-token sequences; counts up to 256 are decode-size batches of single-token sequences
(no KV cache: attention is nearly free there, so communication weighs more than in real decode).
Every variant runs inside CUDA graphs (the bench harness' ``time_cuda_graph``); the tokenweave split
of each prefill size is tuned first (seconds; cached under ``$TOKENWEAVE_CACHE_DIR``). Each mode's
output is compared with the baseline's (``max_rel_diff``; comm_removed is wrong by design).

On the ``p2p`` / ``multimem`` transports the stack keeps its stages' partial sums and outputs in symmetric rows
(:class:`tokenweave.weave.SymmetricRows`: lean_pull reads them in place, the residual is sharded where lean
runs); ``tokenweave_private_rows`` is the tokenweave mode again with the same split but the stages writing to
private tensors, as without symmetric rows: what those rows buy (absent on the ``torch`` transport).

The baseline's add+RMSNorm is compiled afresh for every shape with ``dynamic=False``
(:class:`tokenweave.bench.harness.StaticCompiled`), so no shape runs a symbolic-shape kernel; RoPE, which
every mode shares, stays compiled with dynamic shapes (split parts come in many sizes). The baseline is
timed a second time after the other modes (``baseline_repeat``): ``|baseline - baseline_repeat| / baseline``
is the run-to-run noise, printed in the table's ``noise`` column and stored under the JSON's ``noise``.

Writes ``<out-dir>/e2e_layers-<card>-tp<N>.json`` (default ``./tokenweave-results``; schema of the core
benchmark) and a PNG, and prints the table and the targets (``bench/targets.py``: :func:`e2e_targets`).
Without GPUs it runs a small shape on 2 gloo processes with wall-clock timing: a smoke test of the
pipeline, not a measurement.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
import os
import sys
from pathlib import Path

try:
    import tokenweave as tw
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tokenweave as tw

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/targets.py, whatever the working directory
from targets import e2e_targets, format_targets  # noqa: E402

from tokenweave.bench import harness
from tokenweave.comm import max_across_ranks
from tokenweave.models import llama
from tokenweave.reference import add_rmsnorm_reference
from tokenweave.models.llama import (LLAMA3_70B, MODES, LlamaShape, TPLlamaStack, prefill_sequences,
                                     relative_difference)

BENCH = "e2e_layers"
DTYPE = torch.bfloat16
DECODE_MAX_TOKENS = 256
DEFAULT_TOKENS = (1, 8, 32, 128, 256, 1024, 2048, 4096, 8192, 16384)
QUICK_TOKENS = (1, 128, 1024, 4096, 8192)
CPU_TOKENS = (1, 8, 512, 1024)
CPU_SHAPE = LlamaShape(hidden=256, heads=8, kv_heads=4, head_dim=32, intermediate=512)
CPU_WORLD_SIZE = 2
# bf16 over a few layers: NCCL rounds partial sums along its ring, tokenweave once in fp32.
MAX_REL_DIFF = 5e-2
CPU_NOTE = ("NOTE: no CUDA GPU here: a small shape on gloo CPU processes with tokenweave's torch reference "
            "path and wall-clock timing. It checks the pipeline; it is NOT a GPU measurement.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=None,
                        help="ranks to spawn when not under torchrun (default: every visible GPU; 2 on CPU)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help=f"token counts; <= {DECODE_MAX_TOKENS} run as decode batches (default: "
                             f"{' '.join(map(str, DEFAULT_TOKENS))})")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; 2 with --quick)")
    parser.add_argument("--seq-len", type=int, default=1024, help="sequence length of prefill batches")
    parser.add_argument("--quick", action="store_true", help=f"sizes {' '.join(map(str, QUICK_TOKENS))}, 2 layers, "
                                                             "fewer replays")
    parser.add_argument("--no-tune", action="store_true", help="use the cached or default split, do not time splits")
    harness.add_out_dir_argument(parser)


def _timers(on_gpu: bool, quick: bool, align):
    """``(prefill, decode, tune)`` timers: ``timer(fn) -> us per call``."""
    if not on_gpu:
        wall = lambda fn: harness.time_wall(fn, calls=1, replays=2, warmup=1)  # noqa: E731
        return wall, wall, wall
    replays = 2 if quick else 3

    def prefill(fn):
        return harness.time_cuda_graph(fn, calls=1, replays=replays, warmup=1, before_replay=align)

    def decode(fn):
        return harness.time_cuda_graph(fn, calls=10, replays=replays + 2, warmup=2, before_replay=align)

    def tune(fn):
        return harness.time_cuda_graph(fn, calls=1, replays=2, warmup=1, before_replay=align)

    return prefill, decode, tune


PRIVATE_ROWS = "tokenweave_private_rows"


def run_private_rows(stack, seq_lens, timer, split):
    """The tokenweave mode with the stack's symmetric rows switched off (stages write private tensors), or None
    where the stack has none; the rows are restored whatever happens."""
    if stack.rows is None:
        return None
    rows, stack.rows = stack.rows, None
    try:
        return stack.run_modes(seq_lens, timer=timer, split=split, modes=("tokenweave",))
    finally:
        stack.rows = rows


def worker(args) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = torch.cuda.is_available() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    shape = LLAMA3_70B if on_gpu else CPU_SHAPE
    layers = args.layers or (2 if args.quick or not on_gpu else 4)
    tokens = sorted(set(args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS if on_gpu else CPU_TOKENS)))
    comm = tw.Communicator(max_tokens=max(tokens), hidden=shape.hidden, dtype=DTYPE)
    norm = None
    if on_gpu:  # the baseline norm of the torch modes: one fresh static compile per shape (llama picks it up)
        norm = llama._compiled_add_rmsnorm = harness.StaticCompiled(add_rmsnorm_reference)
    stack = TPLlamaStack(comm, shape, layers, dtype=DTYPE, seed=0)
    prefill_timer, decode_timer, tune_timer = _timers(on_gpu, args.quick, lambda: harness.align_ranks(device=device))
    if rank == 0:
        print(f"[{BENCH}] TP{world} on {harness.device_slug()}, transport {comm.transport!r}, {layers} layers of "
              f"hidden {shape.hidden}, tokens {tokens}; results go to {Path(args.out_dir).resolve()}", flush=True)
    rows = []
    for t in tokens:
        decode = t <= DECODE_MAX_TOKENS
        seq_lens = [1] * t if decode else prefill_sequences(t, args.seq_len)
        split = None if decode else "auto"
        if not decode and not args.no_tune:
            split = stack.tune(seq_lens, timer=tune_timer)
        timer = decode_timer if decode else prefill_timer
        result = stack.run_modes(seq_lens, timer=timer, split=split)
        private = run_private_rows(stack, seq_lens, timer, split)
        if private is not None:
            result["outputs"][PRIVATE_ROWS] = private["outputs"]["tokenweave"]
            result["us"][PRIVATE_ROWS] = private["us"]["tokenweave"]
        del private
        again = stack.run_modes(seq_lens, timer=timer, split=split, modes=("baseline",))  # the noise, timed last
        result["outputs"][harness.BASELINE_REPEAT] = again["outputs"]["baseline"]
        result["us"][harness.BASELINE_REPEAT] = again["us"]["baseline"]
        del again
        reference = result["outputs"]["baseline"]
        variants = MODES + ((PRIVATE_ROWS,) if PRIVATE_ROWS in result["us"] else ()) + (harness.BASELINE_REPEAT,)
        for mode in variants:
            rows.append({
                "tokens": t, "hidden": shape.hidden, "dtype": "bfloat16", "variant": mode,
                "us": max_across_ranks(result["us"][mode], device=device),
                "phase": "decode" if decode else "prefill", "layers": layers,
                "sequences": len(seq_lens),
                "split": result["split"].point if mode in ("tokenweave", PRIVATE_ROWS) else None,
                "ctas": result["split"].ctas if mode in ("tokenweave", PRIVATE_ROWS) else None,
                "max_rel_diff": max_across_ranks(relative_difference(result["outputs"][mode], reference),
                                                 device=device),
            })
        if rank == 0:
            line = ", ".join(f"{r['variant']} {r['us']:.0f} us" for r in rows[-len(variants):])
            print(f"[{BENCH}] T={t}: {line}; split {result['split'].point}", flush=True)
        del result
    comm.close()
    if rank != 0:
        return
    noise = harness.run_to_run_noise(rows)
    targets = e2e_targets(rows, world, noise) if on_gpu else []
    bad = [r for r in rows if r["variant"] != "comm_removed" and r["max_rel_diff"] > MAX_REL_DIFF]
    notes = [] if on_gpu else [CPU_NOTE]
    if comm.transport == "torch" and on_gpu:
        notes.append("tokenweave ran its 'torch' transport (no CUDA extension or no P2P): fused variants are "
                     "torch fallbacks here")
    extra = {"targets": targets, "notes": notes, "shape": asdict(shape),
             "layers": layers, "seq_len": args.seq_len, "transport": comm.transport,
             "baseline_compile": norm.summary() if norm is not None else "eager"}
    json_path, png_path = harness.write_results(BENCH, world, rows, args.out_dir, extra=extra)
    harness.print_table(rows)
    if noise:
        print(f"run-to-run noise (|baseline - baseline_repeat| / baseline): max {100 * noise['max']:.1f}%; every ratio "
              "above carries its line's noise")
    if targets:
        print(format_targets(targets, world, "e2e targets (issue 15)"))
    for r in bad:
        print(f"WARNING: {r['variant']} at T={r['tokens']} differs from baseline by {r['max_rel_diff']:.3g} (relative)")
    for note in notes:
        print(note)
    print(f"wrote {json_path.resolve()}" + (f" and {png_path.name}" if png_path else ""), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if harness.launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if args.tp is not None and args.tp != world:
            raise SystemExit(f"{BENCH}: --tp {args.tp} but torchrun started {world} ranks")
    else:
        world = args.tp or (torch.cuda.device_count() if on_gpu else CPU_WORLD_SIZE)
    harness.spawn(worker, world, "nccl" if on_gpu else "gloo", args)


if __name__ == "__main__":  # spawned ranks re-import this file; only the launcher runs main
    main()
