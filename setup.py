"""Build for tokenweave.

The CUDA extension ``tokenweave._C`` is built when torch has CUDA and nvcc is found; otherwise the
package installs without it and the torch transport (torch.distributed + a torch norm) serves every op.
The extension builds against the torch it will run with, so build without isolation
(``pip install --no-build-isolation -e .``, after ``pip install "setuptools>=64" wheel torch numpy``);
an isolated build sees no torch and installs the package without the extension.
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
    # torch guesses CUDA_HOME from nvcc's folder; a lone nvcc (e.g. /usr/local/bin) gives a toolkit without
    # headers and a build that fails late. Both are needed: nvcc for the kernels, the headers for torch_ops.cpp.
    toolkit = CUDA_HOME or os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    missing = [f for f in ("bin/nvcc", "include/cuda_runtime_api.h") if not os.path.exists(os.path.join(toolkit, f))]
    if missing:
        return [], {}, (f"the CUDA toolkit at {toolkit} lacks {' and '.join(missing)}: "
                        "set CUDA_HOME to the toolkit's folder (e.g. /usr/local/cuda)")
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
    package_data={"tokenweave": ["configs/*.json"]},  # measured dispatch decisions (tokenweave/tuning.py)
    python_requires=">=3.10",
    # Unpinned: pip keeps an installed torch (e.g. a CUDA build) and its triton; it installs one only when missing.
    install_requires=["torch", "numpy"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["tokenweave-bench = tokenweave.bench.cli:main",
                                      "tokenweave-tune = tokenweave.tune:main"]},
)
