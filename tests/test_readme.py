"""The README is the manual: its commands come first and its patch-folder guide runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

README = (REPO / "README.md").read_text()


def _blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_the_manual_is_short_and_starts_with_the_two_commands():
    assert len(README.splitlines()) <= 300
    first, second = _blocks(README)[:2]
    assert first.strip().endswith(".venv/bin/hcd demo")
    ci = (REPO / ".ci" / "run").read_text()
    assert second.strip() in ci  # CI runs README command (2) exactly


def test_every_linked_doc_exists():
    for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.(?:md|png|cff)|LICENSE)(?:#[\w-]+)?\)", README):
        assert (REPO / target).exists(), target


@pytest.mark.slow
def test_the_patch_folder_guide_runs_as_written(tmp_path):
    """Pasted into a shell in an empty folder, with the installed hcd: trains, scores, evaluates the sample."""
    guide = README.split("### Score a folder of patches")[1]
    script = _blocks(guide)[0]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "model.json").exists() and (tmp_path / "preds" / "_SUCCESS").exists()
    assert (tmp_path / "report" / "report.html").exists()
    assert "prob" in res.stdout and "status" in res.stdout  # the predictions' head
