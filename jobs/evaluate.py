"""Evaluate committed predictions against labels: metrics.json, figures, report.html.

    python jobs/evaluate.py --predictions s3://b/preds --labels s3://b/valid_labels.csv --out report/

Same flags as `hcd evaluate`; see `--help`.
"""

import sys
from pathlib import Path

# Runs from a checkout (ray job submit --working-dir .) without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hcdlib.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
