"""Write the Kaggle submission CSV from committed predictions.

    python jobs/submission.py --predictions s3://b/preds --out submission.csv

Same flags as `hcd submission`; see `--help`.
"""

import sys
from pathlib import Path

# Runs from a checkout (ray job submit --working-dir .) without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hcdlib.cli import main

if __name__ == "__main__":
    sys.exit(main(["submission", *sys.argv[1:]]))
