"""Why the standalone add + RMSNorm trails the compiled norm: both kernels under Nsight Compute.

    ncu --clock-control none --csv --page details --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats -k regex:"add_rmsnorm|triton" python bench/debug/norm_profile.py

Runs each kernel a few times at 1 and 8192 tokens x hidden 8192 and 1 and 16 tokens x hidden 4096, bf16 (fresh random data): tokenweave.add_rmsnorm
(its default shape) and the add + RMSNorm of tokenweave.bench compiled for that static shape.
"""
import torch

import tokenweave as tw
from tokenweave.bench.fused import EPS, baseline_add_rmsnorm
from tokenweave.bench.harness import StaticCompiled

norm = StaticCompiled(baseline_add_rmsnorm)
for tokens, hidden in ((1, 8192), (8192, 8192), (1, 4096), (16, 4096)):
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    res = torch.randn_like(x)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
    out = torch.empty_like(x)
    for _ in range(3):
        norm(x, res, w, EPS)
        tw.add_rmsnorm(x, res, w, EPS, out=out)
    torch.cuda.synchronize()
print("done")
