"""Why tokenweave-tune and bench/add_rmsnorm.py timed some norm shapes apart: the same shapes in both harnesses.

    python bench/debug/norm_harness_probe.py OUT.json [TOKENS:HIDDEN ...]   # default 1024:8192 4096:8192 2048:4096 4096:4096

At each size, each shape of NORM_HARNESS_SHAPES (default "12 15 16 18 22 24 25") is timed, twice in turn, by:
``tune_fresh`` (tokenweave.tune.NormBench: tensors of its own per size), ``tune_views`` (NormBench with views of
buffers sized for the largest batch, the tune's layout before 1ed6e1f) and ``bench`` (bench/add_rmsnorm.py's Case and
timer); and per size ``bench_dispatch``: ``tokenweave.add_rmsnorm`` on the bench's tensors, in the shape the card's
config picks (``shape`` of its rows). CUDA-graph replays of 20 calls, median of 15 replays, us per call.
Programmatic dependent launch: NORM_HARNESS_PDL=0|1 (default: the card's config, as the tune and the bench run;
recorded as ``pdl``). Needs a CUDA GPU.
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

CALLS, REPLAYS = 20, 15
out_path = Path(sys.argv[1] if len(sys.argv) > 1 else "norm_harness_probe.json")
sizes = [tuple(int(v) for v in s.split(":")) for s in sys.argv[2:]] or [(1024, 8192), (4096, 8192), (2048, 4096),
                                                                        (4096, 4096)]
shapes = [int(k) for k in os.environ.get("NORM_HARNESS_SHAPES", "12 15 16 18 22 24 25").split()]
dev = torch.device("cuda", torch.cuda.current_device())
pdl_env = os.environ.get("NORM_HARNESS_PDL")
pdl = pdl_env == "1" if pdl_env in ("0", "1") else tuning.programmatic_launch(tuning.device_slug())[0]
tw.set_programmatic_launch(pdl)  # before any capture: the graphs' kernel nodes keep it
hiddens = sorted({h for _, h in sizes})
max_tokens = max(t for t, _ in sizes)
fresh = tune.NormBench(dev, hiddens, max_tokens, torch.bfloat16, CALLS, REPLAYS)
views = tune.NormBench(dev, hiddens, max_tokens, torch.bfloat16, CALLS, REPLAYS, fresh_per_size=False)
op = torch.ops.tokenweave.add_rmsnorm.default
rows = []
for tokens, hidden in sizes:
    case = bench_norm.Case(tokens, hidden, dev, seed=tokens + hidden)
    usable = [k for k in shapes if fresh.row_group(k, hidden) > 0]
    for repeat in range(2):
        for k in usable:
            timed = {
                "tune_fresh": lambda: fresh.time(k, tokens, hidden),
                "tune_views": lambda: views.time(k, tokens, hidden),
                "bench": lambda: harness.time_cuda_graph(
                    lambda: op(case.x, case.res_work, case.weight, case.out, tune.EPS, k), calls=CALLS,
                    replays=REPLAYS, before_replay=case.reset),
            }
            for harness_name, fn in timed.items():
                rows.append({"tokens": tokens, "hidden": hidden, "shape": k, "harness": harness_name,
                             "repeat": repeat, "us": float(fn())})
    for repeat in range(2):
        rows.append({"tokens": tokens, "hidden": hidden, "harness": "bench_dispatch", "repeat": repeat,
                     "shape": tuning.norm_shape(tuning.device_slug(), tokens, hidden, 2),
                     "us": float(harness.time_cuda_graph(
                         lambda: tw.add_rmsnorm(case.x, case.res_work, case.weight, tune.EPS, out=case.out),
                         calls=CALLS, replays=REPLAYS, before_replay=case.reset))})
    dispatch = [r for r in rows if (r["tokens"], r["hidden"], r["harness"]) == (tokens, hidden, "bench_dispatch")]
    print(f"{tokens}x{hidden} bench_dispatch (shape {dispatch[0]['shape']}): "
          + "/".join("%.2f" % r["us"] for r in dispatch), flush=True)
    for k in usable:
        times = {h: "/".join("%.2f" % r["us"] for r in rows if (r["tokens"], r["hidden"], r["shape"], r["harness"])
                             == (tokens, hidden, k, h)) for h in ("tune_fresh", "tune_views", "bench")}
        print(f"{tokens}x{hidden} shape {k}: " + " ".join(f"{h}={t}" for h, t in times.items()), flush=True)
    del case
out_path.write_text(json.dumps({"bench": "norm_harness_probe", "device_name": torch.cuda.get_device_name(dev),
                                "torch": torch.__version__, "git": os.environ.get("TOKENWEAVE_GIT_SHA", "unknown"), "pdl": pdl,
                                "timing": f"CUDA graph of {CALLS} calls, median of {REPLAYS} replays, us per call",
                                "rows": rows}, indent=1))
print(f"wrote {out_path}")
