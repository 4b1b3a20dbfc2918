"""Host (CPU) cost per call of the eager launch path, against a bare torch kernel launch.

An engine calls the fused op twice per layer (160 times per forward of an 80-layer model), so the
Python + dispatcher + launch cost matters whenever the GPU waits for the host. Measures, on one GPU:
  bare_launch        torch.Tensor.add_ on a tiny tensor (one kernel launch through the dispatcher)
  torch_op_direct    torch.ops.tokenweave.add_rmsnorm (dispatcher + C++ checks + launch)
  tokenweave_api     tokenweave.add_rmsnorm (+ Python validation)
  torch_rmsnorm      torch.nn.functional.rms_norm (eager, several kernels)
Each: wall time of N back-to-back calls (the GPU work is tiny, so the host is the bottleneck),
median of repeats, microseconds per call. Writes <out-dir>/host_overhead-<card>.json (default
./tokenweave-results; --out-dir bench/results replaces the committed file).
The collective ops add Communicator.check(), order_stream() and a cached plan lookup on top of this
path; tests/cpu/test_host_overhead.py measures those pieces with pytest-benchmark.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tokenweave as tw  # noqa: E402
from tokenweave.bench import harness  # noqa: E402


def per_call_us(fn, calls=2000, repeats=7):
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_out_dir_argument(parser)
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and tw.HAS_EXTENSION):
        raise SystemExit("host_overhead: needs a GPU and tokenweave's CUDA extension")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    res, w, out = torch.randn_like(x), torch.randn(4096, device="cuda", dtype=torch.bfloat16), torch.empty_like(x)
    variants = {
        "bare_launch": lambda: x.add_(0),
        "torch_op_direct": lambda: torch.ops.tokenweave.add_rmsnorm(x, res, w, out, 1e-6),
        "tokenweave_api": lambda: tw.add_rmsnorm(x, res, w, 1e-6, out=out),
        "torch_rmsnorm": lambda: torch.nn.functional.rms_norm(x, (4096,), w, 1e-6),
    }
    rows = [{"variant": k, "us": round(per_call_us(f), 2)} for k, f in variants.items()]
    doc = {"bench": "host_overhead", "device": harness.device_slug(), "device_name": torch.cuda.get_device_name(),
           "torch": torch.__version__, "git": harness.git_sha(), "rows": rows,
           "timing": "wall clock of 2000 back-to-back eager calls, median of 7, us per call"}
    path = Path(args.out_dir) / f"host_overhead-{harness.device_slug()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    for r in rows:
        print(f"{r['variant']:>16}: {r['us']:7.2f} us/call")
    print(f"wrote {path.resolve()}")


if __name__ == "__main__":
    main()
