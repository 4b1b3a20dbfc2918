"""Benchmarks for tokenweave, shipped inside the package so ``tokenweave-bench`` works after ``pip install``.

``harness`` holds the reusable pieces (timing, process launch, results files, tables); each runner
module (e.g. ``fused``) exposes ``add_arguments(parser)``, ``default_world_size(args)`` and
``worker(args)``, and :mod:`tokenweave.bench.cli` launches it.
"""
