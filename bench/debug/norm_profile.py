"""Why the standalone add + RMSNorm trails the compiled norm: both kernels under Nsight Compute.

    ncu --clock-control none --csv --page details --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats -k regex:"add_rmsnorm|triton" python bench/debug/norm_profile.py

Runs each kernel a few times at 16 and 128 tokens x hidden 4096 and 1024 x 8192, bf16 (fresh random data): tokenweave.add_rmsnorm
(the shape the card's config picks) and the add + RMSNorm of tokenweave.bench compiled for that static shape.
"""
import torch

import tokenweave as tw
from tokenweave.bench.fused import EPS, baseline_add_rmsnorm
from tokenweave.bench.harness import StaticCompiled

norm = StaticCompiled(baseline_add_rmsnorm)
for tokens, hidden in ((16, 4096), (128, 4096), (1024, 8192)):
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    res = torch.randn_like(x)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
    out = torch.empty_like(x)
    for _ in range(3):
        norm(x, res, w, EPS)
        tw.add_rmsnorm(x, res, w, EPS, out=out)
    torch.cuda.synchronize()
print("done")
