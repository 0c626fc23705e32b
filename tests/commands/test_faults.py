"""Faults under load and misuse end to end: S3 going away, damaged run files, same-named slides."""

import dataclasses
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest
from conftest import upload_dir

from hcdlib.commands.pack import PackConfig, pack
from hcdlib.commands.score.run import ScoreConfig, score
from hcdlib.commands.synth_slides import synth_slide_pixels, write_slide_tiff
from hcdlib.errors import UserError
from hcdlib.outputs import readers
from hcdlib.outputs import runfolder as preds
from hcdlib.sources.shards import ShardSource
from hcdlib.sources.slides.source import PCAM_MPP

pytestmark = pytest.mark.slow


def _parts_on_s3(s3_server: str, bucket: str, prefix: str) -> int:
    # Straight to the server's own port would bypass the relay; the relay is up when this is called.
    client = boto3.client("s3", endpoint_url=s3_server)
    resp = client.list_objects_v2(Bucket=bucket[len("s3://"):], Prefix=f"{prefix}/{preds.PARTS}/")
    return sum(k["Key"].endswith(".parquet") for k in resp.get("Contents", []))


def test_s3_outage_mid_run_then_rerun_commits_every_id_once(ray_session, model_dir, synth_small, bucket,
                                                            s3_server, s3_relay):
    upload_dir(synth_small, f"{bucket}/patches")
    pack(PackConfig(input=f"{bucket}/patches", out=f"{bucket}/shards", rows_per_file=100, row_group_size=16))
    cfg = ScoreConfig(model=str(model_dir), input=f"{bucket}/shards", out=f"{bucket}/preds", chunk_size=16,
                      tta=8, batch_size=16)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["manifest"] = score(cfg)
        except Exception as exc:  # what the user would see
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline and worker.is_alive() and _parts_on_s3(s3_server, bucket, "preds") < 2:
        time.sleep(0.2)
    assert worker.is_alive(), f"the run ended before the outage: {outcome}"
    s3_relay.stop()  # S3 goes away mid-run ...
    time.sleep(8)
    s3_relay.start()  # ... and comes back
    worker.join(300)
    assert not worker.is_alive()
    if "error" in outcome:  # the run stopped: it says why, what was kept, and what to do
        msg = str(outcome["error"])
        assert "scoring stopped" in msg and "rerun the same command" in msg, msg
    rerun = score(cfg)
    assert rerun["rows"] == 300 and rerun["errors"] == 0
    ids = readers.read_predictions(cfg.out)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 300


def test_zero_byte_part_left_by_a_crash_is_scored_again(ray_session, model_dir, synth_small, tmp_path):
    cfg = ScoreConfig(model=str(model_dir), input=str(synth_small), out=str(tmp_path / "out"), chunk_size=64)
    first = readers.read_predictions(score(cfg)["manifest_uri"][: -len("/_SUCCESS")]).to_pandas()
    parts = sorted((tmp_path / "out" / preds.PARTS).glob("*.parquet"))
    parts[1].write_bytes(b"")  # a crash between create and write, as a non-fsynced disk leaves it
    manifest = tmp_path / "out" / preds.MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:100])  # and a truncated manifest
    with pytest.raises(preds.CorruptOutputError, match="_SUCCESS: corrupt manifest"):
        readers.read_predictions(str(tmp_path / "out"))
    kept = parts[0].stat().st_mtime_ns
    again = score(cfg)
    assert again["rows"] == 300 and parts[1].stat().st_size > 0 and parts[0].stat().st_mtime_ns == kept
    second = readers.read_predictions(str(tmp_path / "out")).to_pandas()
    pd.testing.assert_frame_equal(first.sort_values("id").reset_index(drop=True),
                                  second.sort_values("id").reset_index(drop=True))
    manifest.write_bytes(manifest.read_bytes()[:100])  # every part fine, only the manifest damaged
    assert score(cfg)["rows"] == 300 and readers.read_predictions(str(tmp_path / "out")).num_rows == 300


def test_corrupt_run_spec_is_named(ray_session, model_dir, synth_small, tmp_path):
    cfg = ScoreConfig(model=str(model_dir), input=str(synth_small), out=str(tmp_path / "out"), chunk_size=128)
    score(cfg)
    (tmp_path / "out" / preds.RUN_SPEC).write_text('{"inp')
    with pytest.raises(preds.CorruptOutputError, match=r"_RUN.json: corrupt run spec .*--overwrite"):
        score(cfg)
    assert score(ScoreConfig(**{**cfg.__dict__, "overwrite": True}))["rows"] == 300


T, COLS, ROWS, BLANK = 96, 8, 4, 2  # two columns of glass on the left, so Otsu finds the tissue


def test_same_named_slides_in_two_folders_stay_apart(ray_session, model_dir, tmp_path):
    root = tmp_path / "slides"
    tumour = {(r, c) for r in range(ROWS) for c in range(BLANK, COLS)}
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for sub, seed, region in (("a", 1, tumour), ("b", 2, set())):
        img = synth_slide_pixels(COLS, ROWS, seed=seed, blank_cols=BLANK, tumour=region)
        write_slide_tiff(str(root / sub / "case.tif"), img, mpp=PCAM_MPP)
    out = tmp_path / "out"
    m = score(ScoreConfig(model=str(model_dir), input=str(root), out=str(out), slides=True))
    t = readers.read_predictions(str(out)).to_pandas()
    assert set(t.slide_id) == {"a/case", "b/case"}
    per = {s["slide_id"]: s for s in m["slides"]["per_slide"]}
    for sid in ("a/case", "b/case"):
        rows = t[t.slide_id == sid]
        tiles = (COLS - BLANK) * ROWS
        assert len(rows) == len(set(zip(rows.x, rows.y, strict=True))) == tiles == per[sid]["tiles_scored"]
        assert (rows.source.str.endswith(f"{sid}.tif")).all()
    assert t[t.slide_id == "a/case"].prob.mean() > t[t.slide_id == "b/case"].prob.mean() + 0.3
    summary = pd.read_csv(out / "slides" / "summary.csv")
    assert sorted(summary.slide_id) == ["a/case", "b/case"]
    assert len(list((out / "slides").glob("*.geojson"))) == 2


def test_overwrite_keeps_the_users_files_end_to_end(ray_session, model_dir, synth_small, tmp_path):
    out = tmp_path / "proj"
    score(ScoreConfig(model=str(model_dir), input=str(synth_small), out=str(out), chunk_size=128))
    mine = [out / "notes.md", out / preds.PARTS / "keep-me.txt"]
    for p in mine:
        p.write_text("mine")
    with pytest.raises(UserError, match="different tta"):
        score(ScoreConfig(model=str(model_dir), input=str(synth_small), out=str(out), chunk_size=128, tta=4))
    m = score(ScoreConfig(model=str(model_dir), input=str(synth_small), out=str(out), chunk_size=128, tta=4,
                          overwrite=True))
    assert m["rows"] == 300 and all(p.read_text() == "mine" for p in mine)
    assert np.isfinite(readers.read_predictions(str(out))["prob"].to_numpy()).all()
    assert Path(out / preds.RUN_SPEC).exists()


def test_a_stopped_run_frees_its_actors_for_the_next(ray_session, model_dir, synth_small, tmp_path, monkeypatch,
                                                     caplog):
    """A shard that vanishes mid-run stops it (exit 3, naming the file); its model actors are freed.

    caplog keeps every record's traceback, as a notebook keeps the last exception: the dead
    run's actors must not stay alive through those frames and hold the CPUs the rerun needs
    (in CI that hung the rerun of the S3 outage test for 30 minutes).
    """
    import logging

    from hcdlib.errors import RunStopped

    caplog.set_level(logging.DEBUG)
    shards = tmp_path / "shards"
    pack(PackConfig(input=str(synth_small), out=str(shards), rows_per_file=100, row_group_size=50))
    planned = ShardSource.chunks

    def one_chunk_gone(src, chunk_size):
        chunks = planned(src, chunk_size)
        return [*chunks, dataclasses.replace(chunks[-1], key="rg-gone", shard=str(tmp_path / "gone.parquet"))]

    monkeypatch.setattr(ShardSource, "chunks", one_chunk_gone)
    cfg = ScoreConfig(model=str(model_dir), input=str(shards), out=str(tmp_path / "out"), chunk_size=50)
    with pytest.raises(RunStopped) as stopped:
        score(cfg)
    msg = str(stopped.value)
    assert "FileNotFoundError" in msg and "gone.parquet" in msg and "\n" not in msg and "pid=" not in msg, msg
    cpus = ray_session.cluster_resources()["CPU"]
    deadline = time.time() + 20
    while ray_session.available_resources().get("CPU", 0) < cpus and time.time() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0) == cpus, "the stopped run's actors still hold CPUs"
    monkeypatch.undo()
    assert score(cfg)["rows"] == 300
