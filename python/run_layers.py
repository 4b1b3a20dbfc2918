"""Run the reference TP Llama stack end to end in every mode and print a latency table.

    torchrun --nproc-per-node 4 python/run_layers.py                         # Llama-3-70B layers, bf16
    torchrun --nproc-per-node 2 python/run_layers.py --tokens 2048 8192 --layers 8
    torchrun --nproc-per-node 2 python/run_layers.py --shape tiny --check    # CPU too (gloo)

Modes: baseline (NCCL all_reduce + torch.compile'd add+RMSNorm), fuse_only, tokenweave (fused op +
token split on two streams), comm_removed (no all-reduce: wrong results, timing only). Latency is
per forward of the whole stack inside a CUDA graph (eager wall clock on CPU). Each mode's output
is compared with the baseline's, or with a float64 single-process reference with ``--check``.
For the recorded benchmark (results file, plot, targets) use bench/e2e_layers.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import tokenweave as tw
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tokenweave as tw

import torch
import torch.distributed as dist

from tokenweave.bench import harness
from tokenweave.models.llama import (LLAMA3_8B, LLAMA3_70B, MODES, TINY, TPLlamaStack, prefill_sequences,
                                     reference_forward, relative_difference)

SHAPES = {"70b": LLAMA3_70B, "8b": LLAMA3_8B, "tiny": TINY}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def worker(args) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    shape, dtype = SHAPES[args.shape], DTYPES[args.dtype]
    comm = tw.Communicator(max_tokens=max(args.tokens), hidden=shape.hidden, dtype=dtype)
    stack = TPLlamaStack(comm, shape, args.layers, dtype=dtype, seed=args.seed)
    if on_gpu:
        def timer(fn):
            return harness.time_cuda_graph(fn, calls=args.calls, replays=3, warmup=1,
                                           before_replay=lambda: harness.align_ranks(device=device))
    else:
        def timer(fn):
            return harness.time_wall(fn, calls=1, replays=3, warmup=1)
    rows = []
    for tokens in args.tokens:
        decode = tokens <= args.decode_max
        seq_lens = [1] * tokens if decode else prefill_sequences(tokens, args.seq_len)
        if args.tune and not decode:
            stack.tune(seq_lens, timer=timer)
        result = stack.run_modes(seq_lens, timer=timer, split=None if decode else "auto", seed=args.seed + tokens)
        if args.check:
            reference = reference_forward(shape, args.layers, world, args.seed, result["input"], seq_lens, dtype)
        else:
            reference = result["outputs"]["baseline"]
        for mode in MODES:
            rows.append({"tokens": tokens, "hidden": shape.hidden, "dtype": args.dtype, "variant": mode,
                         "us": result["us"][mode], "split": result["split"].point if mode == "tokenweave" else None,
                         "diff": relative_difference(result["outputs"][mode], reference)})
    comm.close()
    if rank == 0:
        print(f"TP{world}, {args.layers} x {args.shape} layers, transport {comm.transport!r}, device {device}")
        harness.print_table(rows)
        against = "float64 reference" if args.check else "baseline"
        for r in rows:
            print(f"T={r['tokens']:>6} {r['variant']:>12}: rel. diff vs {against} {r['diff']:.2e}"
                  + (f", split at {r['split']}" if r["split"] is not None else ""))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 1024, 4096, 8192])
    parser.add_argument("--seq-len", type=int, default=1024, help="sequence length of prefill batches")
    parser.add_argument("--decode-max", type=int, default=256,
                        help="token counts up to this run as batches of single-token sequences")
    parser.add_argument("--calls", type=int, default=2, help="forwards per CUDA graph")
    parser.add_argument("--tune", action="store_true", help="tune the split of each prefill size first")
    parser.add_argument("--check", action="store_true", help="compare with a float64 single-process reference "
                                                             "(small shapes: it holds the full model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", type=int, default=None, help="ranks to spawn when not under torchrun")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    world = args.tp or (torch.cuda.device_count() if on_gpu else 2)
    harness.spawn(worker, world, "nccl" if on_gpu else "gloo", args)


if __name__ == "__main__":
    main()
