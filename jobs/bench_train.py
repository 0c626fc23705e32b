"""Training benchmark job; see benchmarks/training.py for what it measures.

Run as ``python jobs/bench_train.py --help``, or ``ray job submit --working-dir . -- python jobs/bench_train.py ...``.
"""

import argparse
import sys
from pathlib import Path

# Runs from a checkout without installing the package: the benchmarks are not part of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.config import BenchTrainConfig
from benchmarks.training import run
from hcdlib.cli import add_flags
from hcdlib.console import setup_logging

if __name__ == "__main__":
    args = add_flags(argparse.ArgumentParser(description=BenchTrainConfig.__doc__), BenchTrainConfig).parse_args()
    setup_logging(verbose=False)
    run(BenchTrainConfig(**vars(args)))
