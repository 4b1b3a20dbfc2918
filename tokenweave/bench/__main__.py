"""``python -m tokenweave.bench [BENCH] [options]``: same as the ``tokenweave-bench`` console script."""
from tokenweave.bench.cli import main

if __name__ == "__main__":  # spawned ranks re-import this module; only the launcher runs main
    main()
