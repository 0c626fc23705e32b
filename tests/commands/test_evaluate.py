import io
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score

from hcdlib.commands.evaluate.metrics import EvalConfig, evaluate, expected_calibration_error
from hcdlib.commands.evaluate.report import FIG_SIZE_PX, FIGURES, errors_size_px
from hcdlib.errors import UserError
from hcdlib.outputs import runfolder as preds


def _write_predictions(out: Path, df: pd.DataFrame) -> None:
    """A committed scoring output (parts + manifest), written directly: no Ray needed here."""
    n = len(df)
    table = pa.table({
        "id": df["id"], "prob": pa.array(df["prob"], pa.float32()), "status": df.get("status", ["ok"] * n),
        "error": pa.nulls(n, pa.string()), "note": pa.nulls(n, pa.string()), "source": df["source"],
        "slide_id": df.get("slide_id", pa.nulls(n, pa.string())), "x": pa.nulls(n, pa.int64()),
        "y": pa.nulls(n, pa.int64()), "model": ["test-model"] * n,
    })
    preds.write_part(str(out / "parts" / "part-0.parquet"), table)
    manifest = {"files": [{"path": "parts/part-0.parquet", "rows": n}], "rows": n, "config": {"model": "/nope"}}
    (out / preds.MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture()
def case(synth_small, tmp_path):
    labels = pd.read_csv(synth_small / "labels.csv", dtype={"id": str})
    rng = np.random.default_rng(0)
    # a model that is right more often than not, with noise: AUC well inside (0.5, 1)
    prob = np.clip(0.5 * labels["label"] + rng.normal(0.25, 0.22, len(labels)), 0, 1)
    df = pd.DataFrame({"id": labels["id"], "prob": prob, "slide_id": labels["slide_id"],
                       "source": [str(synth_small / f"{i}.tif") for i in labels["id"]]})
    _write_predictions(tmp_path / "preds", df)
    return df.assign(label=labels["label"]), tmp_path


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_metrics_match_scikit_learn(case, synth_small):
    df, tmp = case
    m = evaluate(EvalConfig(predictions=str(tmp / "preds"), labels=str(synth_small / "labels.csv"),
                            out=str(tmp / "report"), bootstrap=200))
    y, p = df["label"].to_numpy(), df["prob"].to_numpy()
    pm = m["patch"]
    assert pm["n"] == len(df) and pm["positives"] == int(y.sum())
    assert pm["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    assert 0.6 < pm["roc_auc"] < 0.99
    lo, hi = pm["roc_auc_ci95"]
    assert lo < pm["roc_auc"] < hi and hi - lo < 0.2
    assert pm["pr_auc"] == pytest.approx(average_precision_score(y, p), abs=1e-6)
    assert pm["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-6)
    tn, fp, fn, tp = confusion_matrix(y, p >= 0.5).ravel()
    op = pm["at_model_threshold"]
    assert op["threshold"] == 0.5 and op["confusion_matrix"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert op["sensitivity"] == pytest.approx(tp / (tp + fn)) and op["specificity"] == pytest.approx(tn / (tn + fp))
    target = pm["at_target_sensitivity"]
    assert target["sensitivity"] >= 0.95 and target["threshold"] <= op["threshold"]
    assert pm["ece"] == pytest.approx(expected_calibration_error(y, p))
    saved = json.loads((tmp / "report" / "metrics.json").read_text())
    assert saved["patch"]["roc_auc"] == pm["roc_auc"] and saved["schema"] == "hcd-metrics/1"


def test_ece_of_a_perfectly_calibrated_model_is_small():
    rng = np.random.default_rng(1)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.02
    assert expected_calibration_error(y, np.clip(p + 0.3, 0, 1)) > 0.2


def test_per_slide_aggregation(case, synth_small):
    df, tmp = case
    m = evaluate(EvalConfig(predictions=str(tmp / "preds"), labels=str(synth_small / "labels.csv"),
                            out=str(tmp / "report"), bootstrap=10, top_k=3))
    s = m["slide"]
    per = pd.DataFrame(s["per_slide"]).set_index("slide_id")
    expect = df.groupby("slide_id").agg(label=("label", "max"), max_prob=("prob", "max"), n=("id", "size"))
    assert s["slides"] == len(expect) == 4
    pd.testing.assert_series_equal(per["max_prob"], expect["max_prob"], check_names=False, atol=1e-6)
    assert (per["label"] == expect["label"]).all() and (per["n"] == expect["n"]).all()
    top3 = df.groupby("slide_id")["prob"].apply(lambda x: x.nlargest(3).mean())
    np.testing.assert_allclose(per["topk_mean_prob"].to_numpy(), top3.to_numpy(), atol=1e-6)


def test_partial_join_is_refused_unless_allowed(case, synth_small, tmp_path):
    _df, tmp = case
    partial = tmp_path / "partial.csv"
    pd.read_csv(synth_small / "labels.csv").iloc[:250].to_csv(partial, index=False)
    cfg = EvalConfig(predictions=str(tmp / "preds"), labels=str(partial), out=str(tmp / "r"), bootstrap=10)
    with pytest.raises(UserError, match="50 predicted ids have no label"):
        evaluate(cfg)
    m = evaluate(EvalConfig(**{**cfg.__dict__, "allow_missing": True}))
    assert m["join"]["missing_labels"] == 50 and m["patch"]["n"] == 250


def test_an_id_predicted_twice_counts_once_and_two_images_under_one_id_are_refused(case, synth_small, tmp_path):
    """Each row of an id listed twice was evaluated against its one label, without a word."""
    df, _tmp = case
    twice = pd.concat([df, df.iloc[:7]])  # the same 7 patches in a second folder: the same predictions
    _write_predictions(tmp_path / "twice", twice.drop(columns="label"))
    cfg = EvalConfig(predictions=str(tmp_path / "twice"), labels=str(synth_small / "labels.csv"),
                     out=str(tmp_path / "r"), bootstrap=10)
    m = evaluate(cfg)
    assert m["patch"]["n"] == len(df) and m["patch"]["roc_auc"] == pytest.approx(roc_auc_score(df.label, df.prob))
    clash = pd.concat([df, df.iloc[:2].assign(prob=0.99)])  # two other images under the same two ids
    _write_predictions(tmp_path / "clash", clash.drop(columns="label"))
    with pytest.raises(UserError, match=rf"2 ids have rows with different predictions .*e.g. .*{df.id[0]}"):
        evaluate(EvalConfig(**{**cfg.__dict__, "predictions": str(tmp_path / "clash")}))


def test_an_auc_below_chance_says_the_labels_may_be_inverted(case, synth_small, tmp_path, caplog):
    """Labels where 1 means normal gave a report of AUC 0.1 and no word about why."""
    import logging

    df, tmp = case
    flipped = tmp_path / "flipped.csv"
    df.assign(label=1 - df.label)[["id", "label"]].to_csv(flipped, index=False)
    caplog.set_level(logging.WARNING)
    cfg = EvalConfig(predictions=str(tmp / "preds"), labels=str(synth_small / "labels.csv"), out=str(tmp / "r"),
                     bootstrap=10)
    evaluate(cfg)
    assert "below chance" not in caplog.text
    m = evaluate(EvalConfig(**{**cfg.__dict__, "labels": str(flipped), "out": str(tmp / "r2")}))
    assert m["patch"]["roc_auc"] < 0.5
    assert (f"ROC AUC {m['patch']['roc_auc']:.3f} is below chance: the model ranks normal patches above tumour ones; "
            f"check that 1 means tumour in {flipped}") in caplog.text


def test_figures_and_self_contained_html(case, synth_small):
    _df, tmp = case
    evaluate(EvalConfig(predictions=str(tmp / "preds"), labels=str(synth_small / "labels.csv"),
                        out=str(tmp / "report"), bootstrap=10, grid=6))
    out = tmp / "report"
    html = (out / "report.html").read_text()
    for name in FIGURES:
        expected = errors_size_px(6) if name == "errors.png" else FIG_SIZE_PX
        assert _png_size(out / name) == expected, name
        assert (out / name).stat().st_size > 5000, f"{name} looks empty"
        assert f'data-file="{name}"' in html
    assert html.count("data:image/png;base64,") == len(FIGURES)
    assert "src=\"http" not in html and "<script" not in html  # renders offline
    assert "ROC AUC" in html and "Slide level" in html


@pytest.fixture()
def slide_case(tmp_path):
    """Committed predictions of one 6x4-tile slide (tumour on the left half), its heatmap, tile labels."""
    from hcdlib.sources.slides.maps import heatmap_png
    from hcdlib.sources.slides.plan import slide_key

    t = 96
    rows = [{"x": c * t, "y": r * t, "label": int(c < 3)} for r in range(4) for c in range(6)]
    rng = np.random.default_rng(0)
    prob = np.clip([0.75 * x["label"] + rng.uniform(0.05, 0.25) for x in rows], 0, 1)
    source = str(tmp_path / "s1.tif")
    df = pd.DataFrame({"id": [f"s1_{x['x']}_{x['y']}" for x in rows], "prob": prob, "source": source,
                       "slide_id": "s1"})
    out = tmp_path / "preds"
    _write_predictions(out, df)
    manifest = json.loads((out / preds.MANIFEST).read_text())
    manifest["slides"] = {"per_slide": [{"slide_id": "s1", "source": source, "status": "ok", "tiles_scored": 24,
                                         "tumour_tiles": 12, "max_prob": float(prob.max())}]}
    (out / preds.MANIFEST).write_text(json.dumps(manifest))
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((4 * 24, 6 * 24, 3), 220, np.uint8)).save(buf, format="PNG")
    recs = [{"x": x["x"], "y": x["y"], "tile_size": t, "prob": p, "status": "ok"}
            for x, p in zip(rows, prob, strict=True)]
    (out / "slides").mkdir()
    (out / "slides" / f"{slide_key(source)}.heatmap.png").write_bytes(
        heatmap_png(buf.getvalue(), recs, width=6 * t, height=4 * t, title="s1"))
    labels = tmp_path / "tiles.csv"
    df.assign(label=[x["label"] for x in rows])[["id", "label"]].to_csv(labels, index=False)
    return out, labels


def test_report_has_a_slides_section_for_slide_predictions(slide_case, tmp_path):
    out, labels = slide_case
    m = evaluate(EvalConfig(predictions=str(out), labels=str(labels), out=str(tmp_path / "r"), bootstrap=10))
    html = (tmp_path / "r" / "report.html").read_text()
    assert "<h2>Slides</h2>" in html and "<h3>s1</h3>" in html and 'alt="heatmap of s1"' in html
    assert html.count("data:image/png;base64,") == len(FIGURES) + 1  # the figures and the heatmap
    assert "every scored tile coloured by the model" in html  # captioned, not a file name
    # one slide, a tumour slide: the slide-level AUC says why it is missing instead of "None"
    assert m["slide"]["auc_max"] is None and "all 1 slides are tumour slides" in m["slide"]["auc_note"]
    assert ">None<" not in html and "not computable" in html


def _chromium() -> str | None:
    """Debian's chromium: used if present, installed by apt where the test run may (root, CI)."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _screenshot(html: Path, tmp: Path, *, height: int) -> np.ndarray:
    """Render ``html`` in headless chromium (skip the test where there is none); the page as RGB."""
    browser = _chromium()
    if browser is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it with apt where it can); "
                    "report rendering not checked")
    shot = tmp / "screenshot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chrome-profile'}", f"--window-size=1000,{height}",
           f"--screenshot={shot}", html.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    from PIL import Image

    Path("test-output").mkdir(exist_ok=True)
    shutil.copy(shot, Path("test-output") / f"{html.parent.name}-screenshot.png")
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


def test_a_report_embeds_the_heatmaps_of_the_top_slides_only(slide_case, tmp_path, monkeypatch):
    """Each heatmap is about 1 MB: all of a 130-slide archive's would make a report of about 165 MB."""
    import hcdlib.commands.evaluate.metrics

    out, labels = slide_case
    manifest = json.loads((out / preds.MANIFEST).read_text())
    first = manifest["slides"]["per_slide"][0]
    manifest["slides"]["per_slide"] = [dict(first, slide_id="low", source="/s/low.tif", max_prob=0.1), first,
                                       dict(first, slide_id="bad", source="/s/bad.tif", status="error", max_prob=None)]
    (out / preds.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(hcdlib.commands.evaluate.metrics, "REPORT_HEATMAPS", 1)
    evaluate(EvalConfig(predictions=str(out), labels=str(labels), out=str(tmp_path / "r"), bootstrap=10))
    html = (tmp_path / "r" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES) + 1 and 'alt="heatmap of s1"' in html
    assert "<h3>2 more slides, by highest tile probability (their heatmaps are files beside the predictions" in html
    assert html.index("<td>low</td>") < html.index("<td>bad</td>") and "low-" in html  # its heatmap's file


def test_labels_per_slide_evaluate_tile_predictions_per_slide(tmp_path, caplog, capsys):
    """A slide archive's labels name slides; against tile ids they joined nothing ("partial join")."""
    import logging

    rng = np.random.default_rng(1)
    rows, truth = [], {}
    for k in range(8):  # 8 slides of 12 tiles; tumour slides have a focus of 2 tiles
        sid, tumour = f"case_{k:02d}", k % 2
        truth[sid] = tumour
        for i in range(12):
            p = rng.uniform(0.0, 0.4) + (0.5 if tumour and i < 2 else 0.0) + (0.3 if k == 2 and i == 5 else 0.0)
            rows.append({"id": f"{sid}_{i * 96}_0", "prob": p, "slide_id": sid, "source": f"/s/{sid}.svs",
                         "status": "ok"})
    rows += [{"id": "broken_0_0", "prob": None, "slide_id": "broken", "source": "/s/broken.svs", "status": "error"}]
    df = pd.DataFrame(rows)
    out = tmp_path / "preds"
    _write_predictions(out, df)
    t = pa.Table.from_pandas(df.assign(x=0, y=0, error=None, note=None, model="test-model"), preserve_index=False)
    preds.write_part(str(out / "parts" / "part-0.parquet"), t.select(["id", "prob", "status", "error", "note", "source",
                                                                      "slide_id", "x", "y", "model"]))
    labels = tmp_path / "slides.csv"
    pd.DataFrame({"id": [*truth, "broken"], "label": [*truth.values(), 1]}).to_csv(labels, index=False)
    caplog.set_level(logging.INFO)
    m = evaluate(EvalConfig(predictions=str(out), labels=str(labels), out=str(tmp_path / "r"), bootstrap=10))
    best = df[df.status == "ok"].groupby("slide_id")["prob"].max()
    assert m["unit"] == "slide" and m["patch"]["n"] == 8 and m["join"]["error_rows"] == 1
    assert m["patch"]["roc_auc"] == pytest.approx(roc_auc_score([truth[s] for s in best.index], best.to_numpy()))
    assert m["slide"]["slides"] == 8 and m["slide"]["auc_max"] == pytest.approx(m["patch"]["roc_auc"])
    assert m["slide"]["auc_topk_mean"] is not None
    assert "on 8 slides" in caplog.text
    html = (tmp_path / "r" / "report.html").read_text()
    assert "<h2>Slide level: each slide scored by its highest tile probability" in html
    assert "<th>slides evaluated</th><td>8</td>" in html and "normal slides scored" not in html
    assert not (tmp_path / "r" / "errors.png").exists() and (tmp_path / "r" / "roc.png").exists()
    from hcdlib import cli

    capsys.readouterr()
    assert cli.main(["evaluate", "--predictions", str(out), "--labels", str(labels), "--out", str(tmp_path / "r")]) == 0
    assert (" slides   8 (each scored by its highest tile probability)\n errors   1 labelled slides had no tile "
            "scored: not in the metrics\n ROC AUC  ") in capsys.readouterr().err


@pytest.mark.slow  # starts a browser
def test_report_renders_in_headless_chromium(case, synth_small):
    _df, tmp = case
    evaluate(EvalConfig(predictions=str(tmp / "preds"), labels=str(synth_small / "labels.csv"),
                        out=str(tmp / "report"), bootstrap=10))
    img = _screenshot(tmp / "report" / "report.html", tmp, height=3000)
    assert img.shape[:2] == (3000, 1000)
    # the page is not blank and the embedded figures were drawn: text, and matplotlib's blue curve
    assert (img.min(axis=2) < 128).mean() > 0.005
    blue = np.abs(img - [31, 119, 180]).sum(axis=2) < 40
    assert blue.sum() > 300


@pytest.mark.slow
def test_slide_report_renders_in_headless_chromium(slide_case, tmp_path):
    out, labels = slide_case
    evaluate(EvalConfig(predictions=str(out), labels=str(labels), out=str(tmp_path / "slide-report"), bootstrap=10))
    img = _screenshot(tmp_path / "slide-report" / "report.html", tmp_path, height=6000)
    # the slides section comes last: the heatmap's inferno colours, yellow (tumour half) and purple
    # (normal half), drawn below every figure of the patch-level report
    bottom = img[3850:]
    r, g, b = bottom[..., 0], bottom[..., 1], bottom[..., 2]
    yellow = (r > 200) & (g > 150) & (b < 120)
    purple = (r > g + 20) & (b > g + 20) & (g < 120)
    assert yellow.sum() > 2000 and purple.sum() > 2000


def test_a_report_folder_holding_files_evaluate_did_not_write_is_refused(case, synth_small, tmp_path):
    """--out . in a project with its own report.html replaced it; hcd's own earlier report is replaced."""
    _df, tmp = case
    cfg = EvalConfig(predictions=str(tmp / "preds"), labels=str(synth_small / "labels.csv"), out=str(tmp_path / "proj"),
                     bootstrap=10)
    for name, text in (("report.html", "<p>my notes</p>"), ("roc.png", "mine"), ("metrics.json", '{"auc": 1}')):
        (tmp_path / "proj").mkdir(exist_ok=True)
        (tmp_path / "proj" / name).write_text(text)
        with pytest.raises(UserError, match=rf"--out .*proj holds {name}, which hcd evaluate did not write"):
            evaluate(cfg)
        assert (tmp_path / "proj" / name).read_text() == text
        (tmp_path / "proj" / name).unlink()
    evaluate(cfg)  # an empty folder, then a rerun over its own report
    (tmp_path / "proj" / "roc.png").write_bytes(b"stale")
    evaluate(cfg)
    assert (tmp_path / "proj" / "roc.png").read_bytes().startswith(b"\x89PNG")


def test_the_report_names_hcds_sample_and_the_users_folders_without_machine_paths(tmp_path, monkeypatch):
    from hcdlib.commands.evaluate.report import shown_path
    from hcdlib.sources.sample import sample_uri

    monkeypatch.chdir(tmp_path)
    assert shown_path(sample_uri("test")) == "hcdlib/data/pcam_sample/test"
    assert shown_path(str(tmp_path / "preds")) == "./preds"
    assert shown_path("/data/elsewhere") == "/data/elsewhere" and shown_path("s3://b/p") == "s3://b/p"
