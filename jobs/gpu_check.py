"""The GPU check job; see benchmarks/gpu_check.py for what it runs and docs/gpu-check.md for how.

Run as ``python jobs/gpu_check.py --out gpu-check [--dry-run]``.
"""

import argparse
import sys
from pathlib import Path

# Runs from a checkout (or a copy sent to a GPU machine) without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.config import GpuCheckConfig
from benchmarks.gpu_check import run
from hcdlib.cli import add_flags
from hcdlib.console import setup_logging

if __name__ == "__main__":
    args = add_flags(argparse.ArgumentParser(description=GpuCheckConfig.__doc__), GpuCheckConfig).parse_args()
    setup_logging(verbose=False)
    report = run(GpuCheckConfig(**vars(args)))
    sys.exit(1 if report["failed_sections"] else 0)
