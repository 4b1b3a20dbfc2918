"""Fused all-reduce + RMSNorm benchmark (see tokenweave/bench/fused.py for the variants and options),
then the performance targets (bench/targets.py) evaluated on its results and stored in its JSON.

    python bench/fused_allreduce_rmsnorm.py --quick             # one process per visible GPU (1 GPU: TP1)
    torchrun --nproc-per-node 4 bench/fused_allreduce_rmsnorm.py
    python bench/fused_allreduce_rmsnorm.py --out-dir bench/results   # replace the committed results

Results go to ./tokenweave-results unless --out-dir says otherwise.
"""
import os
import sys
from pathlib import Path

try:
    import tokenweave  # noqa: F401
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/targets.py, whatever the working directory
from targets import evaluate_file  # noqa: E402

from tokenweave.bench import harness  # noqa: E402
from tokenweave.bench.fused import BENCH, main as run_bench  # noqa: E402


def main(argv=None) -> None:
    args, world_size = run_bench(argv)
    if harness.launched_by_torchrun() and int(os.environ["RANK"]) != 0:
        return  # rank 0 wrote the results
    evaluate_file(Path(args.out_dir) / f"{harness.result_stem(BENCH, world_size)}.json", write=True)


if __name__ == "__main__":  # spawned ranks re-import this file; only the launcher runs main
    main()
