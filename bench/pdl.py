"""Programmatic dependent launch (PDL) on one GPU: what it hides between dependent kernels.

    python bench/pdl.py --out-dir bench/results

Every number is µs per call inside a CUDA graph of ``--calls`` dependent calls (CUDA events around graph
replays, median of ``--replays``), bf16, hidden 8192. Variants: ``pdl_off`` (the baseline: ordinary
launches), ``pdl_on`` (``tokenweave.set_programmatic_launch(True)`` while the graph is captured: its
kernels become programmatic dependents of the kernel before them), ``pdl_off_repeat`` (the baseline again,
last: the run-to-run noise). Tables:

``norm_chain``  ``tokenweave.add_rmsnorm`` back to back; each call reads the residual the previous one wrote.
``gemm_norm``   per call a cuBLAS GEMM writes x ([T, 1024] @ [1024, 8192]), then ``tokenweave.add_rmsnorm``
                reads it: the norm's launch can overlap the GEMM's tail (the GEMM's launch is not ours).
``emulated``    the fused all-reduce + residual + RMSNorm back to back on every rank of the emulated world
                (W ranks on this GPU, tokenweave.testing), algorithm as dispatched.

What it cannot show: PDL across the NVLink collective of a real multi-GPU group (the multi-GPU run's job).
Writes ``pdl-<card>-tp1`` and ``pdl_emulated-<card>-tp<W>`` (.json, .png) into --out-dir.
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

from tokenweave.bench import harness

HIDDEN = 8192
K = 1024
DTYPE = torch.bfloat16
EPS = 1e-5
TOKENS = (1, 16, 128, 1024, 8192)
GEMM_TOKENS = (1, 16, 128, 1024)
EMULATED_TOKENS = (1, 16, 128)
VARIANTS = (("pdl_off", False), ("pdl_on", True), ("pdl_off_repeat", False))


def _timed(fn, reset, args, world=None) -> dict:
    out = {}
    for name, on in VARIANTS:
        tw.set_programmatic_launch(on)  # recorded into the graph's kernel nodes at capture
        out[name] = harness.time_cuda_graph(fn, calls=args.calls, replays=args.replays, before_replay=reset,
                                            world=world)
    tw.set_programmatic_launch(False)
    return out


def one_gpu_rows(args) -> list[dict]:
    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(dev).manual_seed(0)
    weight = (1 + 0.1 * torch.randn(HIDDEN, generator=gen, device=dev)).to(DTYPE)
    w = (torch.randn(HIDDEN, K, generator=gen, device=dev) / K ** 0.5).to(DTYPE)
    rows = []
    for table, tokens_list in (("norm_chain", TOKENS), ("gemm_norm", GEMM_TOKENS)):
        for T in tokens_list:
            x = torch.randn(T, HIDDEN, generator=gen, device=dev).to(DTYPE)
            a = torch.randn(T, K, generator=gen, device=dev).to(DTYPE)
            residual0 = torch.randn(T, HIDDEN, generator=gen, device=dev).to(DTYPE)
            res, out = residual0.clone(), torch.empty_like(x)
            if table == "norm_chain":
                def fn():
                    tw.add_rmsnorm(x, res, weight, EPS, out=out)
            else:
                def fn():
                    torch.mm(a, w.t(), out=x)
                    tw.add_rmsnorm(x, res, weight, EPS, out=out)
            for name, us in _timed(fn, lambda: res.copy_(residual0), args).items():
                rows.append({"table": table, "hidden": HIDDEN, "tokens": T, "variant": name, "us": us})
                print(f"{table:10s} T={T:5d} {name:15s} {us:8.2f} us", flush=True)
    return rows


def emulated_rows(W: int, args) -> list[dict]:
    from tokenweave.testing import EmulatedWorld

    rows = []
    with EmulatedWorld(W, max_tokens=W * max(EMULATED_TOKENS), hidden=HIDDEN, dtype=DTYPE) as world:
        gen = torch.Generator(world.device).manual_seed(W)
        weight = (1 + 0.1 * torch.randn(HIDDEN, generator=gen, device=world.device)).to(DTYPE)
        for T in EMULATED_TOKENS:
            xs = [torch.randn(T, HIDDEN, generator=gen, device=world.device).to(DTYPE) for _ in range(W)]
            residual0 = torch.randn(T, HIDDEN, generator=gen, device=world.device).to(DTYPE)
            res = [residual0.clone() for _ in range(W)]
            outs = [torch.empty_like(residual0) for _ in range(W)]

            def fn(comm, r):
                tw.fused_allreduce_rmsnorm(comm, xs[r], res[r], weight, EPS, out=outs[r])

            def reset():
                for r in res:
                    r.copy_(residual0)

            for name, us in _timed(fn, reset, args, world).items():
                world.synchronize()
                rows.append({"table": "emulated", "W": W, "hidden": HIDDEN, "tokens": T, "variant": name, "us": us})
                print(f"emulated W={W} T={T:4d} {name:15s} {us:8.2f} us", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_out_dir_argument(parser)
    parser.add_argument("--worlds", type=int, nargs="*", default=[2, 4], help="emulated world sizes (none: skip)")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--replays", type=int, default=15)
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and tw.HAS_EXTENSION):
        raise SystemExit("bench/pdl.py needs a CUDA GPU and the tokenweave extension")
    what = __doc__.split("\n\n", 2)[2]
    rows = one_gpu_rows(args)
    print("wrote", *harness.write_results("pdl", 1, rows, args.out_dir, {"what": what}, x_key="tokens",
                                          panel_keys=("table",), baseline="pdl_off"))
    for W in args.worlds:
        rows = emulated_rows(W, args)
        print("wrote", *harness.write_results("pdl_emulated", W, rows, args.out_dir, {"what": what}, x_key="tokens",
                                              panel_keys=("W",), baseline="pdl_off"))


if __name__ == "__main__":
    main()
