"""Scoring benchmark job; see hcdlib/benchmark_score.py for what it measures.

    ray job submit --working-dir . -- python jobs/bench_score.py --help

Same flags as `hcd bench-score`.
"""

import sys
from pathlib import Path

# Runs from a checkout (ray job submit --working-dir .) without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hcdlib.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-score", *sys.argv[1:]]))
