import json

from hcdlib.demo import DemoConfig, run_demo
from hcdlib.predictions import read_manifest


def test_demo_runs_every_stage_end_to_end(ray_session, tmp_path):
    out = run_demo(DemoConfig(out=str(tmp_path / "demo"), n=600, minutes=0.6))  # the budget includes ~10 s of start-up
    assert (tmp_path / "demo" / "run" / "model" / "model.safetensors").exists()
    m = read_manifest(out["predictions"])
    assert m["rows"] == 200 and m["errors"] == 0
    metrics = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    assert metrics["join"]["evaluated"] == 200 and metrics["patch"]["roc_auc"] > 0.6
    assert "data:image/png;base64," in (tmp_path / "demo" / "report" / "report.html").read_text()
