"""``tokenweave-bench`` / ``python -m tokenweave.bench``: launch a benchmark on every visible GPU.

Usage::

    tokenweave-bench [BENCH] [options]      # BENCH defaults to "fused_allreduce_rmsnorm"; --help lists the options
    torchrun --nproc-per-node 4 -m tokenweave.bench --quick

Without torchrun one process per GPU (or ``--tp``) is spawned on this host; without GPUs the
benchmark runs its CPU reference path on gloo processes.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

from tokenweave.bench import harness

# benchmark name (also its results-file stem) -> module under tokenweave.bench
BENCHES = {"fused_allreduce_rmsnorm": "fused"}
DEFAULT_BENCH = "fused_allreduce_rmsnorm"


def run(bench: str, argv=None) -> None:
    """Parse ``argv`` for benchmark ``bench`` (a key of BENCHES) and run it on every rank."""
    if bench not in BENCHES:
        raise SystemExit(f"tokenweave-bench: unknown benchmark {bench!r}; choose from {', '.join(BENCHES)}")
    module = importlib.import_module(f"tokenweave.bench.{BENCHES[bench]}")
    parser = argparse.ArgumentParser(prog=f"tokenweave-bench {bench}", description=module.__doc__.split("\n\n")[0])
    module.add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    world_size = module.default_world_size(args, on_gpu)
    harness.spawn(module.worker, world_size, "nccl" if on_gpu else "gloo", args)


def main(argv=None) -> None:
    """Console-script entry point: ``tokenweave-bench [BENCH] [options]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    bench = DEFAULT_BENCH
    if argv and not argv[0].startswith("-"):
        bench = argv.pop(0)
    run(bench, argv)
