"""The demo's real sample and its slide: what a first run shows must be real and correctly placed."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hcdlib.commands.demo import DemoConfig, check_demo_folder, layout_slide, run_demo, tile_auc, write_demo_slide
from hcdlib.commands.score.run import ScoreConfig, score
from hcdlib.errors import UserError
from hcdlib.outputs.readers import read_predictions
from hcdlib.outputs.runfolder import read_manifest
from hcdlib.sources.decode import decode_patch
from hcdlib.sources.sample import MAX_BYTES, SAMPLE_DIR, SPLITS, sample_uri


def test_embedded_sample_is_small_real_and_balanced():
    size = sum(p.stat().st_size for p in SAMPLE_DIR.rglob("*") if p.is_file())
    assert size <= MAX_BYTES
    assert (SAMPLE_DIR / "README.md").read_text().count("CC0") >= 1
    seen = set()
    for split, (origin, n) in SPLITS.items():
        t = pq.read_table(Path(sample_uri(split)) / "part-00000.parquet")
        assert t.num_rows == n and t["label"].to_pylist().count(1) == n // 2  # 50/50
        assert all(s.startswith(f"pcam-real/{origin}/") for s in t["source"].to_pylist())
        ids = set(t["id"].to_pylist())
        assert not ids & seen  # no patch in two splits
        seen |= ids
        for img in t["image"].to_pylist()[:20]:
            assert img[:3] == b"\xff\xd8\xff"  # the release's own JPEG bytes
            assert decode_patch(img).pixels.shape == (96, 96, 3)
    # test and slide patches come from PCam's valid split: other slides than the training patches
    assert {SPLITS["test"][0], SPLITS["slide"][0]} == {"valid"} and SPLITS["train"][0] == "train"


def test_slide_layout_puts_each_patch_in_its_cell():
    labels = [1] * 6 + [0] * 10
    cells = layout_slide(labels, cols=4)
    assert sorted(i for _, _, i in cells) == list(range(16))
    assert all(1 <= c <= 4 and 1 <= r <= 4 for c, r, _ in cells)  # one tile of glass all round
    assert len({(c, r) for c, r, _ in cells}) == 16


def test_the_demo_refuses_a_folder_it_did_not_write(tmp_path):
    """It scored every slide in <out>/slide (a user's slides too) and replaced <out>/slide_heatmap.png."""
    check_demo_folder(str(tmp_path / "new"))
    (tmp_path / "mine" / "slide").mkdir(parents=True)
    (tmp_path / "mine" / "slide" / "case1.svs").write_bytes(b"a user's slide")
    with pytest.raises(UserError, match=r"--out .*mine holds .*slide/case1.svs, which the demo did not write"):
        check_demo_folder(str(tmp_path / "mine"))
    (tmp_path / "mine" / "slide" / "case1.svs").unlink()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"notes\.txt, which the demo did not write"):
        check_demo_folder(str(tmp_path / "mine"))


@pytest.mark.slow
def test_slide_coordinates_map_tiles_to_their_patches(ray_session, model_dir, synth_small, tmp_path):
    """Striped tumour columns: a swapped x/y or a grid shifted by one tile would not score this well."""
    import pyarrow.csv as pacsv

    labels = pacsv.read_csv(synth_small / "labels.csv").to_pydict()
    by_label = {0: [], 1: []}
    for pid, lab in zip(labels["id"], labels["label"], strict=True):
        by_label[lab].append((synth_small / f"{pid}.tif").read_bytes())
    table = pa.table({"image": by_label[1][:24] + by_label[0][:24], "label": [1] * 24 + [0] * 24})
    (tmp_path / "slide").mkdir()
    truth = write_demo_slide(table, str(tmp_path / "slide" / "mosaic.tif"), cols=8,
                             tumour=lambda c, r: c % 2)  # even columns rank first: tumour in every other column
    score(ScoreConfig(model=str(model_dir), input=str(tmp_path / "slide"), out=str(tmp_path / "o"), slides=True,
                      chunk_size=16))
    rows = read_predictions(str(tmp_path / "o")).to_pylist()
    auc, n = tile_auc(rows, truth)
    assert n >= 40 and auc > 0.9
    swapped = [dict(r, x=r["y"], y=r["x"]) for r in rows]
    shifted = [dict(r, x=r["x"] + 96) for r in rows]
    assert tile_auc(shifted, truth)[0] < 0.3  # tumour and normal columns trade places
    assert tile_auc(swapped, truth)[0] < auc - 0.3  # rows and columns mixed up: no better than chance


@pytest.mark.slow
def test_demo_runs_every_stage_end_to_end(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # README command (1): `hcd demo` with its default, relative --out
    out = run_demo(DemoConfig(out="demo", minutes=0.6))  # the budget includes ~10 s of start-up
    assert (tmp_path / "demo" / "run" / "model" / "model.safetensors").exists()
    m = read_manifest(out["predictions"])
    assert m["rows"] == 300 and m["errors"] == 0
    metrics = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    assert metrics["join"]["evaluated"] == 300 and 0.5 < metrics["patch"]["roc_auc"] <= 1.0
    lo, hi = out["test_auc_ci95"]
    assert lo < out["test_auc"] < hi
    html = (tmp_path / "demo" / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "closer to the top-left" in html  # captions, not file names
    assert "<h2>Slides</h2><h3>demo_slide</h3>" in html and 'alt="heatmap of demo_slide"' in html  # the slide too
    assert out["tiles"] >= 100 and out["tile_auc"] > 0.6  # the known region lights up, even after 36 s
    assert Path(out["heatmap"]).read_bytes()[:4] == b"\x89PNG"
    slide = read_manifest(out["slide_predictions"])
    assert slide["errors"] == 0 and slide["slides"]["per_slide"][0]["slide_id"] == "demo_slide"
    check_demo_folder("demo")  # everything it wrote is its own: a rerun writes it again
