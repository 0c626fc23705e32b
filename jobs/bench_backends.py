"""CPU backends benchmark job; see benchmarks/backends.py for what it measures.

Run as ``python jobs/bench_backends.py --model <hcd model> --valid <labelled patches>``.
"""

import argparse
import sys
from pathlib import Path

# Runs from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.backends import run
from benchmarks.config import BenchBackendsConfig
from hcdlib.cli import add_flags
from hcdlib.console import setup_logging

if __name__ == "__main__":
    args = add_flags(argparse.ArgumentParser(description=BenchBackendsConfig.__doc__), BenchBackendsConfig).parse_args()
    setup_logging(verbose=False)
    run(BenchBackendsConfig(**vars(args)))
