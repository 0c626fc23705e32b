"""Run the whole product end to end on the real PatchCamelyon sample that ships with hcd.

    python jobs/demo.py --out hcd-demo

Same flags as `hcd demo`; see `--help`.
"""

import sys
from pathlib import Path

# Runs from a checkout (ray job submit --working-dir .) without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hcdlib.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
