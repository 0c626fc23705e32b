"""Write synthetic H&E patches in the Kaggle layout.

    python jobs/synth.py --out /tmp/synth --n 2000

Same flags as `hcd synth`; see `--help`.
"""

import sys
from pathlib import Path

# Runs from a checkout (ray job submit --working-dir .) without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hcdlib.cli import main

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))
