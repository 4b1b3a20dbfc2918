"""Why the standalone add + RMSNorm trails the compiled norm: both kernels under Nsight Compute.

    ncu --clock-control none --csv --page details --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats -k regex:"add_rmsnorm|triton" python bench/debug/norm_profile.py

Runs, at each size (bf16, fresh random data), the add + RMSNorm of tokenweave.bench compiled for that static
shape (its autotuning candidates first, then 3 launches of the chosen kernel), then tokenweave.add_rmsnorm in the
shape the card's config picks and in each block shape listed that can hold the row (2 launches each), in that order.
Sizes: NORM_PROFILE_SIZES="tokens:hidden ..." (default 16:4096 128:4096 1024:8192); block shapes:
NORM_PROFILE_SHAPES="k ..." (default none).
"""
import os

import torch

import tokenweave as tw
from tokenweave._ext import _C
from tokenweave.bench.fused import EPS, baseline_add_rmsnorm
from tokenweave.bench.harness import StaticCompiled

sizes = [tuple(map(int, s.split(":"))) for s in os.environ.get("NORM_PROFILE_SIZES", "16:4096 128:4096 1024:8192").split()]
shapes = [int(k) for k in os.environ.get("NORM_PROFILE_SHAPES", "").split()]
norm = StaticCompiled(baseline_add_rmsnorm)
for tokens, hidden in sizes:
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    res = torch.randn_like(x)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
    out = torch.empty_like(x)
    for _ in range(3):
        norm(x, res, w, EPS)
    for _ in range(2):
        tw.add_rmsnorm(x, res, w, EPS, out=out)
    for k in shapes:
        if _C.add_rmsnorm_row_group(k, hidden, x.element_size()) < 0:  # cannot hold this row: not launched
            continue
        for _ in range(2):
            torch.ops.tokenweave.add_rmsnorm(x, res, w, out, EPS, k)
    torch.cuda.synchronize()
    print(f"{tokens}x{hidden}: baseline x3, configured x2, shapes {shapes} x2 each", flush=True)
print("done")
