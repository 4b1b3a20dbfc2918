"""Fused all-reduce + RMSNorm benchmark (see tokenweave/bench/fused.py for the variants and options).

    python bench/fused_allreduce_rmsnorm.py --quick             # one process per visible GPU
    torchrun --nproc-per-node 4 bench/fused_allreduce_rmsnorm.py
"""
import sys
from pathlib import Path

try:
    import tokenweave  # noqa: F401
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenweave.bench.fused import main

if __name__ == "__main__":  # spawned ranks re-import this file; only the launcher runs main
    main()
