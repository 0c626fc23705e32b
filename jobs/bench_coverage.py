"""Tissue coverage benchmark job; see benchmarks/coverage.py for what it measures.

Run as ``python jobs/bench_coverage.py --markdown docs/performance.md``.
"""

import argparse
import sys
from pathlib import Path

# Runs from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.config import BenchCoverageConfig
from benchmarks.coverage import run
from hcdlib.cli import add_flags
from hcdlib.console import setup_logging

if __name__ == "__main__":
    args = add_flags(argparse.ArgumentParser(description=BenchCoverageConfig.__doc__), BenchCoverageConfig).parse_args()
    setup_logging(verbose=False)
    run(BenchCoverageConfig(**vars(args)))
