"""Build for tokenweave.

The CUDA extension ``tokenweave._C`` is built when torch has CUDA and nvcc is found; otherwise the
package installs without it and the torch transport (torch.distributed + a torch norm) serves every op.
TORCH_CUDA_ARCH_LIST defaults to "9.0a" (Hopper: multimem and sm_90a instructions); MAX_JOBS is honoured.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        return [], {}, f"torch is not importable at build time ({e})"
    if os.environ.get("TOKENWEAVE_NO_EXTENSION") == "1":
        return [], {}, "TOKENWEAVE_NO_EXTENSION=1"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} has no CUDA"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return [], {}, "nvcc was not found"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    sources = ["csrc/torch_ops.cpp"] + sorted(glob.glob("csrc/kernels/*.cu"))
    ext = CUDAExtension(
        name="tokenweave._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
    summary = (f"building tokenweave._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
               f"with torch {torch.__version__} (CUDA {torch.version.cuda}), MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}, "
               f"{len(sources)} sources")
    return [ext], {"build_ext": BuildExtension}, summary


ext_modules, cmdclass, summary = _extension()
print(f"[tokenweave] {summary if ext_modules else 'no CUDA extension: ' + summary + ' (the torch transport will be used)'}",
      file=sys.stderr)
if not ext_modules and os.environ.get("TOKENWEAVE_REQUIRE_EXTENSION") == "1":
    raise SystemExit(f"[tokenweave] TOKENWEAVE_REQUIRE_EXTENSION=1 but the CUDA extension cannot be built: {summary}")

setup(
    name="tokenweave",
    version="0.1.0",
    description="Fused AllReduce + residual + RMSNorm and token-splitting overlap for tensor-parallel inference on Hopper",
    packages=find_packages(include=["tokenweave", "tokenweave.*"]),
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["tokenweave-bench = tokenweave.bench.cli:main"]},
)
