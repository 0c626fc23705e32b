r"""Pack a patch source into Parquet shards.

    ray job submit --working-dir . -- python jobs/pack.py \
        --input s3://b/train --labels s3://b/train_labels.csv --out s3://b/train-shards

Same flags as `hcd pack`; see `--help`.
"""

import sys
from pathlib import Path

# Runs from a checkout (ray job submit --working-dir .) without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hcdlib.cli import main

if __name__ == "__main__":
    sys.exit(main(["pack", *sys.argv[1:]]))
