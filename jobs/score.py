r"""Batch-score patches with Ray Data.

    ray job submit --working-dir . -- python jobs/score.py \
        --model s3://b/run/model --input s3://b/test-shards --out s3://b/preds --tta 8

Same flags as `hcd score`; see `--help`.
"""

import sys
from pathlib import Path

# Runs from a checkout (ray job submit --working-dir .) without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hcdlib.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
