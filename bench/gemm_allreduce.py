"""Row-parallel GEMM followed by its all-reduce + residual + RMSNorm: track-and-trigger vs the rest.

    torchrun --nproc-per-node 4 bench/gemm_allreduce.py [--quick]
    python bench/gemm_allreduce.py --tp 2                     # spawns the ranks itself

Llama-3-70B row-parallel shapes (o_proj: K = 8192/TP; down_proj: K = 28672/TP; N = 8192), bf16,
M from 512 to 16384. Variants, same run: ``gemm_only`` (cuBLAS, communication removed),
``gemm_carveout32`` (cuBLAS told to leave 32 SMs free: the GEMM's cost of the stream consumer's _ctas32),
``sequential`` (cuBLAS + NCCL all_reduce + the compiled add+RMSNorm, compiled afresh per shape with
``dynamic=False``: :class:`tokenweave.bench.harness.StaticCompiled`), ``sequential_repeat`` (the same, timed
again last at each shape: the run-to-run noise, column ``noise`` and JSON key ``noise``), ``sequential_fused``
(cuBLAS + tokenweave's fused kernel), ``async_tp`` (torch symm_mem fused_matmul_reduce_scatter +
all_gather_into_tensor + the same norm), ``tokenweave_<producer>_<consumer>`` (track-and-trigger with a
cuBLAS or Triton producer and an SM, copy-engine or stream-gated consumer; ``_ctasN``: N consumer CTAs,
``_gN``: N row groups of the stream consumer), ``tokenweave`` (the best pairing) and ``tokenweave_auto``
(``mode="auto"``, the dispatched op). CUDA graphs, median of replays (the bench harness). Rows carry M, K,
N; ``hidden_fraction`` = how much of the communication the overlap hid:
(sequential_fused - tokenweave) / (sequential_fused - gemm_only).
Writes ``<out-dir>/gemm_allreduce-<card>-tp<N>.{json,png}`` (default ``./tokenweave-results``). Needs GPUs.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

try:
    import tokenweave as tw
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tokenweave as tw

import torch
import torch.distributed as dist

from tokenweave import trigger
from tokenweave.bench import harness
from tokenweave.bench.fused import baseline_add_rmsnorm

BENCH = "gemm_allreduce"
EPS = 1e-5
DTYPE = torch.bfloat16
HIDDEN, INTERMEDIATE = 8192, 28672
M_VALUES = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_M = (1024, 4096, 8192)
# tokenweave_<producer>_<consumer>[_ctasN][_gN]: the track-and-trigger pairings (tokenweave.trigger);
# "tokenweave" is the best of them at each shape, so the per-shape choice is visible in the rows.
# _ctasN sets the consumer's CTAs (sm/copy_engine default 32: fewer leave more SMs to the GEMM; stream: per
# group call, default the fused op's choice); _gN the stream consumer's row groups (default one per 16 MiB, at most 4).
ROLES = (("cublas", "sm"), ("triton", "sm"), ("cublas", "copy_engine"), ("triton", "copy_engine"),
         ("cublas", "stream"), ("triton", "stream"))
STREAM_SWEEP = ("ctas16", "ctas24", "ctas32", "ctas48", "ctas32_g4", "ctas32_g16")
TRIGGERS = (tuple(f"tokenweave_{p}_{c}" for p, c in ROLES)
            + tuple(f"tokenweave_cublas_stream_{s}" for s in STREAM_SWEEP))
# Measured on 4 and 2 x H100 (bench/results/gemm_allreduce-h100-tp{4,2}.json, the _ctas8/_ctas16 rows): fewer
# CTAs for the spinning consumers than the default 32 mostly lost (faster in 10 of 96 pairings at TP4, 20 of 96
# at TP2); kept runnable with --variants, not timed by default.
SPIN_CTAS = tuple(f"tokenweave_{p}_{c}_ctas{n}" for n in (8, 16) for p, c in ROLES[:4])
TRIGGER_NAME = re.compile(r"tokenweave_(cublas|triton)_(sm|copy_engine|stream)(?:_ctas(\d+))?(?:_g(\d+))?")
# gemm_carveout32: cuBLAS told to leave 32 SMs free (what the stream consumer's _ctas32 costs the GEMM).
# tokenweave_auto: the op as users call it (mode="auto": the overlap only where the card's config says it
# won, tokenweave.tuning.trigger_config, else cuBLAS + the fused kernel), so the dispatcher itself is timed.
VARIANTS = ("gemm_only", "gemm_carveout32", "sequential", "sequential_fused", "async_tp", "tokenweave_auto") + TRIGGERS
ALL_VARIANTS = VARIANTS + SPIN_CTAS
BASELINE = "sequential"
REPEAT = f"{BASELINE}_repeat"  # timed last at each shape, whatever --variants says


def worker(args) -> None:
    tp, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device())
    m_values = args.m or (QUICK_M if args.quick else M_VALUES)
    comm = tw.Communicator(max_tokens=max(m_values), hidden=HIDDEN, dtype=DTYPE)
    tracker = tw.Tracker(device)
    norm = harness.StaticCompiled(baseline_add_rmsnorm)  # one static compile per M: no symbolic-shape kernel
    group_name = dist.group.WORLD.group_name
    if rank == 0:
        print(f"[{BENCH}] TP{tp}; results go to {Path(args.out_dir).resolve()}", flush=True)
    rows = []
    for layer, k_total in (("o_proj", HIDDEN), ("down_proj", INTERMEDIATE)):
        K = k_total // tp
        w = (torch.randn(HIDDEN, K, device=device) / K ** 0.5).to(DTYPE)
        nw = (1 + 0.1 * torch.randn(HIDDEN, device=device)).to(DTYPE)
        for M in m_values:
            x = torch.randn(M, K, device=device).to(DTYPE)
            residual = torch.randn(M, HIDDEN, device=device).to(DTYPE)
            res = residual.clone()
            y = torch.empty(M, HIDDEN, device=device, dtype=DTYPE)
            out = torch.empty_like(y)
            gathered = torch.empty_like(y)

            def gemm_only():
                torch.matmul(x, w.t(), out=y)

            def gemm_carveout32():
                with trigger.sm_carveout(32):
                    torch.matmul(x, w.t(), out=y)

            # The torch paths return the norm's own output tensor: copying it into `out` would add a pass over
            # M x N that a user would not pay.
            def sequential():
                torch.matmul(x, w.t(), out=y)
                dist.all_reduce(y)
                return norm(y, res, nw, EPS)

            def sequential_fused():
                torch.matmul(x, w.t(), out=y)
                tw.fused_allreduce_rmsnorm(comm, y, res, nw, EPS, out=out)

            def async_tp():
                from torch.distributed import _symmetric_memory  # noqa: F401  (registers the op)
                shard = torch.ops.symm_mem.fused_matmul_reduce_scatter(x, w.t(), "sum", 0, group_name)
                dist.all_gather_into_tensor(gathered, shard)
                return norm(gathered, res, nw, EPS)

            def auto():
                tw.matmul_allreduce_rmsnorm(comm, x, w, res, nw, EPS, mode="auto", tracker=tracker, out=out,
                                            partial=y)

            def overlapped(name):
                producer, consumer, ctas, groups = TRIGGER_NAME.fullmatch(name).groups()
                return lambda: tw.matmul_allreduce_rmsnorm(
                    comm, x, w, res, nw, EPS, mode="trigger", tracker=tracker, out=out, partial=y, producer=producer,
                    consumer=consumer, ctas=ctas and int(ctas), groups=groups and int(groups))

            fns = dict(gemm_only=gemm_only, gemm_carveout32=gemm_carveout32, sequential=sequential, sequential_fused=sequential_fused,
                       async_tp=async_tp, tokenweave_auto=auto)
            fns[REPEAT] = sequential
            fns.update({name: overlapped(name) for name in TRIGGERS + SPIN_CTAS})
            timings, size_rows = {}, {}
            names = [n for n in (args.variants or VARIANTS) if n != BASELINE]
            for name in [BASELINE] + names + [REPEAT]:
                row = {"M": M, "K": K, "N": HIDDEN, "layer": layer, "dtype": "bfloat16", "variant": name, "us": None}
                try:
                    harness.align_ranks(device=device)
                    row["us"] = harness.time_cuda_graph(fns[name], calls=args.calls, replays=args.replays,
                                                        before_replay=lambda: res.copy_(residual))
                    timings[name] = row["us"]
                except Exception as e:  # a variant this torch cannot capture (async_tp) is recorded, not fatal
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                size_rows[name] = row
            ran = [t for t in TRIGGERS + SPIN_CTAS if t in timings]
            if ran:  # the best pairing at this shape, as its own row
                best = min(ran, key=timings.get)
                timings["tokenweave"] = timings[best]
                size_rows["tokenweave"] = {**size_rows[best], "variant": "tokenweave", "choice": best}
                rows.append(size_rows["tokenweave"])
                if {"gemm_only", "sequential_fused"} <= timings.keys():
                    comm_cost = timings["sequential_fused"] - timings["gemm_only"]
                    size_rows["tokenweave"]["hidden_fraction"] = (
                        (timings["sequential_fused"] - timings["tokenweave"]) / comm_cost if comm_cost > 0 else None)
            if rank == 0:
                print(f"{layer} M={M} K={K}: " + " | ".join(f"{k} {v:.1f}" for k, v in timings.items()), flush=True)
    comm.close()
    if rank == 0:
        harness.print_table(rows, x_key="M", panel_keys=("K", "N"), baseline=BASELINE)
        noise = harness.run_to_run_noise(rows, x_key="M", panel_keys=("K", "N"), first=BASELINE, repeat=REPEAT)
        if noise:
            print(f"run-to-run noise (|{BASELINE} - {REPEAT}| / {BASELINE}): max {100 * noise['max']:.1f}%")
        extra = {"device_name": torch.cuda.get_device_name(), "transport": comm.transport,
                 "timing": f"CUDA graph of {args.calls} calls, median of {args.replays} replays, us per call",
                 "baseline_compile": norm.summary()}
        json_path, png = harness.write_results(BENCH, tp, rows, args.out_dir, extra, x_key="M", panel_keys=("K", "N"),
                                               baseline=BASELINE)
        print(f"wrote {json_path.resolve()}" + (f" and {png.name}" if png else ""))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=None, help="ranks to spawn when not under torchrun")
    parser.add_argument("--m", type=int, nargs="+", default=None, help=f"M values (default {M_VALUES})")
    parser.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, default=None)
    parser.add_argument("--quick", action="store_true", help=f"M in {QUICK_M}")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--replays", type=int, default=5)
    harness.add_out_dir_argument(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(f"{BENCH}: needs CUDA GPUs")
    world = int(os.environ["WORLD_SIZE"]) if harness.launched_by_torchrun() else (args.tp or torch.cuda.device_count())
    harness.spawn(worker, world, "nccl", args)


if __name__ == "__main__":
    main()
