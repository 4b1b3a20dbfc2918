"""Does a norm kernel's time depend on the kernel timed before it? (L2 lines loaded with evict_last.)

    python bench/debug/norm_l2_carryover.py OUT.json [TOKENS:HIDDEN]     # default 4096:8192

On one set of the bench's tensors (bench/add_rmsnorm.py Case, PDL as the card's config says), shapes are timed
(CUDA graph of 20 calls, median of 15 replays) in the sequence SEQUENCE (default below): ``reset`` is not timed; it
is ``tokenweave.bench.harness.clean_l2`` (L2 lines marked persisting back to normal, then a write of twice the L2's
size). The shapes 20, 23-26 and the compiled norm load x and the residual with L2::evict_last (launch.cu
load_piece_hinted; Triton's eviction_policy), 16 and 22 without a hint. Needs a CUDA GPU.
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ (add_rmsnorm.py's Case)
import add_rmsnorm as bench_norm  # noqa: E402

import tokenweave as tw  # noqa: E402
from tokenweave import tune, tuning  # noqa: E402
from tokenweave.bench import harness  # noqa: E402
from tokenweave.bench.fused import baseline_add_rmsnorm  # noqa: E402

SEQUENCE = os.environ.get("NORM_L2_SEQUENCE", "reset 22 22 20 22 22 reset 22 16 22 baseline 22 22 reset 22 "
                          "baseline reset baseline 16 reset 16 20 reset 20").split()
out_path = Path(sys.argv[1] if len(sys.argv) > 1 else "norm_l2_carryover.json")
tokens, hidden = (int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "4096:8192").split(":"))
dev = torch.device("cuda", torch.cuda.current_device())
pdl = tuning.programmatic_launch(tuning.device_slug())[0]
tw.set_programmatic_launch(pdl)
case = bench_norm.Case(tokens, hidden, dev, seed=tokens + hidden)
norm = harness.StaticCompiled(baseline_add_rmsnorm)
norm(case.x, case.res_work, case.weight, tune.EPS)
op = torch.ops.tokenweave.add_rmsnorm.default
l2_bytes = torch.cuda.get_device_properties(dev).L2_cache_size


def reset():
    harness.clean_l2()  # what the norm bench and the tune now do before each variant
    return "clean_l2"


rows = []
for step, what in enumerate(SEQUENCE):
    if what == "reset":
        rows.append({"step": step, "what": "reset", "status": reset()})
        continue
    fn = (lambda: norm(case.x, case.res_work, case.weight, tune.EPS)) if what == "baseline" else \
        (lambda k=int(what): op(case.x, case.res_work, case.weight, case.out, tune.EPS, k))
    case.reset()
    us = float(harness.time_cuda_graph(fn, calls=20, replays=15, before_replay=case.reset))
    rows.append({"step": step, "what": what, "us": us})
    print(f"{step:2d} {what:>8}: {us:.2f} us", flush=True)
out_path.write_text(json.dumps({"bench": "norm_l2_carryover", "device_name": torch.cuda.get_device_name(dev),
                                "torch": torch.__version__, "git": os.environ.get("TOKENWEAVE_GIT_SHA", "unknown"),
                                "tokens": tokens, "hidden": hidden, "pdl": pdl, "l2_bytes": l2_bytes,
                                "timing": "CUDA graph of 20 calls, median of 15 replays, us per call",
                                "rows": rows}, indent=1))
print(f"wrote {out_path}; resets: {[r['status'] for r in rows if r['what'] == 'reset'][:1]}")
