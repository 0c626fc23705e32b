import argparse
import dataclasses
import re
import subprocess
import sys

import pytest
from conftest import REPO

from hcdlib.cli import COMMANDS, command_parser, get_args_parser
from hcdlib.config import ScoreConfig, flag_name


def _flags(help_text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z0-9-]*", help_text))


def test_hcd_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        get_args_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_job_script_has_the_same_flags_as_the_console_script(command):
    job = REPO / "jobs" / f"{command.replace('-', '_')}.py"
    assert job.exists(), f"jobs/{command}.py missing"
    via_job = subprocess.run([sys.executable, str(job), "--help"], capture_output=True, text=True, check=True)
    via_hcd = subprocess.run([sys.executable, "-m", "hcdlib.cli", command, "--help"],
                             capture_output=True, text=True, check=True)
    config = COMMANDS[command][0]
    expected = {flag_name(f.name) for f in dataclasses.fields(config)} | {"--help", "--verbose"}
    assert _flags(via_job.stdout) == _flags(via_hcd.stdout) == expected


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_default_comes_from_the_config_dataclass(command):
    """Each setting is defined once: the parser's defaults are the dataclass's, field by field."""
    config = COMMANDS[command][0]
    actions = {a.dest: a for a in command_parser(command)._actions}
    for f in dataclasses.fields(config):
        action = actions[f.name]
        if f.default is dataclasses.MISSING:
            assert action.required and action.default is argparse.SUPPRESS, f.name
        else:
            assert not action.required and action.default == f.default, f.name
            assert type(action.default) is type(f.default), f.name
        assert action.help == f.metadata["help"] and action.help, f.name


def test_flags_build_the_config_with_types_and_checks():
    args = vars(command_parser("score").parse_args(
        ["--model", "m", "--input", "i", "--out", "o", "--tta", "8", "--mpp", "0.5", "--slides"]))
    args.pop("verbose")
    cfg = ScoreConfig(**args)
    assert (cfg.tta, cfg.mpp, cfg.slides, cfg.batch_size, cfg.precision) == (8, 0.5, True, None, "auto")
    args = vars(command_parser("score").parse_args(["--model", "m", "--input", "i", "--out", "o", "--batch-size",
                                                    "512", "--precision", "fp32"]))
    args.pop("verbose")
    assert (ScoreConfig(**args).batch_size, ScoreConfig(**args).precision) == (512, "fp32")
    with pytest.raises(SystemExit):  # argparse refuses what is not a number
        command_parser("score").parse_args(["--model", "m", "--input", "i", "--out", "o", "--batch-size", "x"])


def test_bad_input_gives_a_clear_error_and_exit_code(tmp_path):
    res = subprocess.run([sys.executable, "-m", "hcdlib.cli", "pack", "--input", str(tmp_path / "missing"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert res.returncode == 2
    assert f"{tmp_path}/missing: no such file or directory" in res.stderr
    assert "Traceback" not in res.stderr


def test_s3_that_does_not_answer_is_one_line_and_exit_code_3(tmp_path):
    """An S3 endpoint where nothing listens ended the command in pyarrow's traceback (exit code 1)."""
    import os
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "secret-not-shown", "AWS_REGION": "us-east-1"}
    res = subprocess.run([sys.executable, "-m", "hcdlib.cli", "pack", "--input", "s3://no-bucket/patches",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 3 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "secret-not-shown" not in res.stderr
    assert "no-bucket" in res.stderr and "check the URI, the network and the AWS settings" in res.stderr


def test_help_shows_each_flags_default(capsys):
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["score", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "patches per work unit (the granularity of resume) (default: 1024)" in out
    assert "patches per model call (default 256 on CPU actors, 1024 on GPU actors)" in out  # default by device
    assert "(default: 0.25)" in out and "--verbose" in out  # --tissue-threshold


def test_score_summary_names_the_slide_outputs_a_slow_rate_and_converted_rows(monkeypatch, caplog):
    """A slide run says where its heatmaps are; one patch in 8 s is 0.12 patches/s, not 0; notes are counted."""
    import logging

    import hcdlib.commands.score.run
    from hcdlib.cli import run_score

    manifest = {"rows": 1, "ok": 1, "errors": 0, "duplicate_input_ids": 0, "wall_seconds": 8.0, "model": "m",
                "manifest_uri": "o/_SUCCESS",
                "slides": {"per_slide": [{"status": "ok", "tiles_scored": 5}, {"status": "error"}]}}
    monkeypatch.setattr(hcdlib.commands.score.run, "score", lambda cfg: manifest)
    caplog.set_level(logging.INFO)
    assert run_score(ScoreConfig(model="m", input="i", out="o")) == 0
    assert " rate     0.12 patches/s" in caplog.text
    assert " slides   1 scored, 1 failed: heatmaps, GeoJSON and summary.csv in o/slides" in caplog.text
    manifest["slides"]["per_slide"][0]["tiles_failed"] = 16  # a corrupt tile in the file: its tiles are error rows
    caplog.clear()
    run_score(ScoreConfig(model="m", input="i", out="o"))
    assert " slides   1 scored (16 tiles could not be read), 1 failed: heatmaps" in caplog.text
    # a slide of glass has no tissue tile, so no prediction row: the summary counts it
    manifest["slides"]["per_slide"].append({"status": "ok", "tiles_scored": 0, "tiles_failed": 0})
    caplog.clear()
    run_score(ScoreConfig(model="m", input="i", out="o"))
    assert " slides   2 scored (16 tiles could not be read, 1 with no tissue tile), 1 failed: heatmaps" in caplog.text
    del manifest["slides"]
    caplog.clear()
    run_score(ScoreConfig(model="m", input="i", out="o"))
    assert "rate" in caplog.text and "slides" not in caplog.text and "notes" not in caplog.text
    manifest.update(noted=7, note_examples={"converted L to RGB": 5, "resized 128x128 to 96x96": 2})
    caplog.clear()
    run_score(ScoreConfig(model="m", input="i", out="o"))
    assert " errors   0\n notes    7 rows scored after a conversion, e.g. 5 x 'converted L to RGB'\n" in caplog.text
    manifest.update(errors=3, error_example="patch a1: image is 128x128, expected 96x96")
    caplog.clear()
    run_score(ScoreConfig(model="m", input="i", out="o"))
    assert " errors   3, e.g. patch a1: image is 128x128, expected 96x96\n notes    7 " in caplog.text
    # every row an error (patches of another size, say): committed, but exit code 2 and a line that says so
    manifest.update(rows=20, ok=0, errors=20, noted=0,
                    error_example="patch a1: image is 224x224, expected 96x96 (hcd score --resize scales it to 96x96)")
    caplog.clear()
    assert run_score(ScoreConfig(model="m", input="i", out="o")) == 2
    assert ("nothing was scored: all 20 rows are errors (e.g. patch a1: image is 224x224, expected 96x96 (hcd score "
            "--resize scales it to 96x96)); fix the input or the flag the error names and rerun with --overwrite"
            ) in caplog.text


def test_evaluate_summary_counts_the_patches_left_out(monkeypatch, caplog):
    """Error rows have no probability: the console says the metrics leave them out."""
    import logging

    import hcdlib.commands.evaluate.metrics
    from hcdlib.cli import run_evaluate
    from hcdlib.config import EvalConfig

    m = {"patch": {"n": 59, "roc_auc": 0.97, "roc_auc_ci95": (0.92, 1.0), "pr_auc": 0.9}, "join": {"error_rows": 1}}
    monkeypatch.setattr(hcdlib.commands.evaluate.metrics, "evaluate", lambda cfg: m)
    caplog.set_level(logging.INFO)
    run_evaluate(EvalConfig(predictions="p", labels="l", out="r"))
    assert " patches  59\n errors   1 labelled patches failed to decode: not in the metrics" in caplog.text
    m["join"]["error_rows"] = 0
    caplog.clear()
    run_evaluate(EvalConfig(predictions="p", labels="l", out="r"))
    assert "patches  59" in caplog.text and "errors" not in caplog.text


def test_the_flag_reference_in_docs_is_current():
    """docs/cli.md is generated from the configs: a flag added, removed or reworded makes it stale."""
    from hcdlib.cli_doc import markdown

    doc = (REPO / "docs" / "cli.md").read_text()
    assert doc == markdown(), "docs/cli.md is stale: run python -m hcdlib.cli_doc docs/cli.md"
    for name in COMMANDS:
        parser = command_parser(name)
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag not in ("--help", "--verbose"):
                    assert f"`{flag}`" in doc, f"hcd {name} {flag} is not in docs/cli.md"
