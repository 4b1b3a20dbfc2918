"""``tokenweave-bench`` / ``python -m tokenweave.bench``: launch a benchmark on every visible GPU.

Usage::

    tokenweave-bench [BENCH] [options]      # BENCH defaults to "fused_allreduce_rmsnorm"; --help lists the options
    torchrun --nproc-per-node 4 -m tokenweave.bench --quick

Without torchrun one process per GPU (or ``--tp``) is spawned on this host (one GPU: world size 1);
without GPUs the benchmark runs its CPU reference path on gloo processes. Results go to
``./tokenweave-results`` unless ``--out-dir`` says otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

from tokenweave.bench import harness

# benchmark name (also its results-file stem) -> module under tokenweave.bench
BENCHES = {"fused_allreduce_rmsnorm": "fused"}
DEFAULT_BENCH = "fused_allreduce_rmsnorm"


def run(bench: str, argv=None) -> tuple[argparse.Namespace, int]:
    """Parse ``argv`` for benchmark ``bench`` (a key of BENCHES) and run it on every rank.

    Returns
    -------
    (argparse.Namespace, int)
        The parsed options and the world size, so a script can find the results file afterwards
        (``<args.out_dir>/<bench>-<card>-tp<world>.json``, written by rank 0).
    """
    if bench not in BENCHES:
        raise SystemExit(f"tokenweave-bench: unknown benchmark {bench!r}; choose from {', '.join(BENCHES)}")
    module = importlib.import_module(f"tokenweave.bench.{BENCHES[bench]}")
    parser = argparse.ArgumentParser(prog=f"tokenweave-bench {bench}", description=module.__doc__.split("\n\n")[0])
    module.add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    world_size = module.default_world_size(args, on_gpu)
    if harness.launched_by_torchrun():
        world_size = int(os.environ["WORLD_SIZE"])
    harness.spawn(module.worker, world_size, "nccl" if on_gpu else "gloo", args)
    return args, world_size


def main(argv=None) -> None:
    """Console-script entry point: ``tokenweave-bench [BENCH] [options]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    bench = DEFAULT_BENCH
    if argv and not argv[0].startswith("-"):
        bench = argv.pop(0)
    run(bench, argv)
