r"""Train a patch classifier with Ray Train.

    ray job submit --working-dir . -- python jobs/train.py \
        --data s3://b/train-shards --val-data s3://b/valid-shards --out s3://b/run --workers 4 --gpus-per-worker 1

Same flags as `hcd train`; see `--help`.
"""

import sys
from pathlib import Path

# Runs from a checkout (ray job submit --working-dir .) without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hcdlib.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
