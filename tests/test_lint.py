import subprocess
import sys

from conftest import REPO


def test_ruff_clean_with_the_project_configuration():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:]
