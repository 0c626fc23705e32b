"""The GPU check runs end to end on the CPU (its dry run), so it works the day a GPU is there."""

import json

import pytest

from benchmarks.config import GpuCheckConfig
from benchmarks.gpu_report import markdown, table


def test_report_tables_take_every_key_in_order():
    assert table([{"a": 1, "b": 0.123456}, {"a": 2, "c": None}]).splitlines() == [
        "| a | b | c |", "|---|---|---|", "| 1 | 0.1235 |  |", "| 2 |  |  |"]
    md = markdown({"dry_run": True, "started": "now", "environment": {"torch": "x"}, "models": [{"arch": "hcdnet"}],
                   "models_seconds": 1.5, "score": {"failed": "boom"}, "failed_sections": ["score"]})
    assert "## Model only (patches in memory) (1.5 s)" in md and "| failed | boom |" in md
    assert md.rstrip().endswith("Failed sections: score (see gpu_check.json and the log).")


@pytest.mark.slow
def test_the_dry_run_runs_every_section(ray_session, tmp_path):
    from benchmarks.gpu_check import run

    report = run(GpuCheckConfig(out=str(tmp_path), dry_run=True))
    assert report["failed_sections"] == []
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["environment"]["cuda_available"] is False and saved["environment"]["ray"]
    assert saved["probes"][0] == {**saved["probes"][0], "asked_gpus": 0.0, "device": "cpu"}
    assert all(r["finite"] for r in saved["models"]) and {r["tta"] for r in saved["models"]} == {1, 8}
    (first,) = saved["train"]
    assert (first["run"], first["epochs_run"], first["exported"]) == ("first", 1, True)
    assert [r["run"] for r in saved["score"]] == ["defaults", "batch 4096", "tta 8"]
    assert all(r["errors"] == 0 and r["rows"] == 128 for r in saved["score"])
    md = (tmp_path / "gpu_check.md").read_text()
    for title in ("Environment", "Device of Ray tasks", "Model only", "hcd train", "hcd score"):
        assert f"## {title}" in md
