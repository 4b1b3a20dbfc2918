"""What carving SMs out of cuBLAS costs the row-parallel GEMMs (one GPU, no extension needed).

The stream consumer with an explicit ``ctas`` tells cuBLAS to leave that many SMs free (torch's SM carveout,
which calls cublasSetSmCountTarget). This times ``torch.matmul`` for the Llama-3-70B row-parallel shapes of
bench/gemm_allreduce.py with carveouts 0..64, CUDA graphs, median of replays, and writes JSON to $OUT (or
bench/results/logs). It also shows whether this torch applies the carveout at all (no slowdown = ignored).

    python bench/debug/carveout_probe.py
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from tokenweave.bench import harness  # noqa: E402
from tokenweave.trigger import sm_carveout as _sm_carveout  # noqa: E402

CARVEOUTS = (0, 16, 32, 48, 64)
SHAPES = [(tp, layer, k_total // tp) for tp in (2, 4) for layer, k_total in (("o_proj", 8192), ("down_proj", 28672))]
M_VALUES = (512, 2048, 4096, 16384)
N = 8192


def main():
    if not torch.cuda.is_available():
        raise SystemExit("carveout_probe: needs a CUDA GPU")
    rows = []
    for tp, layer, K in SHAPES:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        for M in M_VALUES:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            base = None
            for sms in CARVEOUTS:
                def gemm(sms=sms):
                    with _sm_carveout(sms):
                        torch.matmul(x, w.t(), out=y)
                us = harness.time_cuda_graph(gemm, calls=10, replays=5)
                base = base or us
                rows.append({"tp": tp, "layer": layer, "M": M, "K": K, "N": N, "carveout": sms, "us": us,
                             "slowdown": us / base})
                print(f"tp{tp} {layer} M={M} K={K} carveout={sms}: {us:.1f} us ({us / base:.3f}x)", flush=True)
    out = Path(os.environ.get("OUT", "bench/results/logs"))
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device_name": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": torch.__version__, "git": harness.git_sha(),
            "timing": "CUDA graph of 10 calls, median of 5 replays, us per call"}
    (out / "carveout_probe.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
