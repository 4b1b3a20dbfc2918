"""The Triton source torch.compile generates for the baseline add + RMSNorm (what the norm is measured against).

    python bench/debug/norm_inductor_code.py OUT_DIR [TOKENS:HIDDEN ...]     # default 16:4096 1024:4096 16:8192 1024:8192

Compiles :func:`tokenweave.bench.fused.baseline_add_rmsnorm` per static shape, as bench/add_rmsnorm.py does, with a
fresh inductor cache, and copies every generated kernel file (``triton_*`` kernels: block sizes, warps, eviction
hints) to ``OUT_DIR/<tokens>x<hidden>/``, with what Triton built of them: the autotuner's pick (``*.best_config``),
and per compiled candidate its PTX, metadata and SASS with register count (``cuobjdump``, on PATH or under
CUDA_HOME). Needs a CUDA GPU.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "norm_inductor_code")
shapes = [tuple(int(v) for v in s.split(":")) for s in sys.argv[2:]] or [(16, 4096), (1024, 4096), (16, 8192),
                                                                        (1024, 8192)]
for tokens, hidden in shapes:
    cache = tempfile.mkdtemp(prefix="inductor-")
    # a fresh cache per shape, set before torch reads it, so that each folder holds exactly that shape's kernels
    code = ("import os, sys, torch\n"
            "from tokenweave.bench.fused import EPS, baseline_add_rmsnorm\n"
            "f = torch.compile(baseline_add_rmsnorm, fullgraph=True, dynamic=False)\n"
            f"x = torch.randn({tokens}, {hidden}, device='cuda', dtype=torch.bfloat16)\n"
            "r = torch.randn_like(x); w = torch.randn(x.shape[1], device='cuda').to(x.dtype)\n"
            "f(x, r, w, EPS); torch.cuda.synchronize()\n")
    # the child's environment is a copy of os.environ (the multicast settings stay) plus the fresh cache
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache), check=True)
    dest = out_dir / f"{tokens}x{hidden}"
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for p in Path(cache).rglob("*.py"):
        text = p.read_text(errors="replace")
        if "@triton.jit" in text:
            shutil.copy(p, dest / p.name)
            n += 1
    for p in Path(cache).rglob("*.best_config"):
        shutil.copy(p, dest / p.name)
    # Autotuning compiles every candidate config under the same kernel name, one cache folder each: the files keep
    # their folder's name in front, and the register count (cuobjdump -res-usage, first line of each .sass) tells
    # which candidate Nsight Compute saw run.
    cuobjdump = shutil.which("cuobjdump") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                          "cuobjdump")
    for p in Path(cache).rglob("*.cubin"):
        tag = f"{p.parent.name[:12]}-{p.stem}"
        for extra in (p.with_suffix(".ptx"), p.with_suffix(".json")):  # the PTX and Triton's metadata (num_warps)
            if extra.exists():
                shutil.copy(extra, dest / f"{tag}{extra.suffix}")
        usage = subprocess.run([cuobjdump, "-res-usage", str(p)], capture_output=True, text=True)
        sass = subprocess.run([cuobjdump, "-sass", str(p)], capture_output=True, text=True)
        (dest / f"{tag}.sass").write_text(usage.stdout + sass.stdout + sass.stderr)
    print(f"{tokens}x{hidden}: {n} kernel files -> {dest}")
    shutil.rmtree(cache, ignore_errors=True)
