"""How fast can this card copy? The bench's copy yardstick (harness.CopyBandwidth) against other copies.

    python bench/debug/copy_probe.py OUT.json

Per size (bytes copied; traffic = read + written = twice that): cudaMemcpy (``copy_``), tokenweave's 16-byte SM copy
(``_C.stream_copy``), and torch's elementwise kernel (``bitwise_not`` on int64 views: one read, one write, as a
copy), each timed as the bench times (CUDA graph of 10 calls, median of 5 replays), next to the card's nominal
memory bandwidth (``_C.nominal_memory_gbps``). Needs a CUDA GPU and the extension.
"""
import json
import os
import sys
from pathlib import Path

import torch

from tokenweave._ext import _C
from tokenweave.bench import harness

out_path = Path(sys.argv[1] if len(sys.argv) > 1 else "copy_probe.json")
dev = torch.device("cuda", torch.cuda.current_device())
methods = {"copy_": lambda d, s: d.copy_(s), "stream_copy": _C.stream_copy,
           "torch_elementwise": lambda d, s: torch.bitwise_not(s.view(torch.int64), out=d.view(torch.int64))}
rows = []
for mib in (16, 64, 256, 1024):
    src = torch.empty(mib << 20, dtype=torch.uint8, device=dev).random_(0, 256)
    dst = torch.empty_like(src)
    for name, copy in methods.items():
        us = float(harness.time_cuda_graph(lambda: copy(dst, src), calls=10, replays=5))
        rows.append({"bytes": mib << 20, "method": name, "us": us, "GBps": round(2 * (mib << 20) / (us * 1e3), 1)})
        print(f"{mib:5d} MiB {name:>18}: {us:8.1f} us {rows[-1]['GBps']:7.0f} GB/s", flush=True)
    del src, dst
nominal = _C.nominal_memory_gbps()
print(f"nominal memory bandwidth: {nominal:.0f} GB/s")
out_path.write_text(json.dumps({"bench": "copy_probe", "device_name": torch.cuda.get_device_name(dev),
                                "torch": torch.__version__, "git": os.environ.get("TOKENWEAVE_GIT_SHA", "unknown"),
                                "nominal_GBps": round(nominal, 1),
                                "timing": "CUDA graph of 10 calls, median of 5 replays, us per call; GBps = read + "
                                          "written bytes / time", "rows": rows}, indent=1))
print(f"wrote {out_path}")
