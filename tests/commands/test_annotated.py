"""hcd evaluate --annotations on tile predictions written by hand: tiles, slides, lesions, Camelyon files."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from hcdlib.commands.evaluate.metrics import EvalConfig, evaluate
from hcdlib.errors import UserError
from hcdlib.outputs import runfolder

T, MPP = 96, 0.972  # tile edge (level-0 px) and resolution: PCam's
SIDE = 20  # each slide is 20 x 20 tiles
LESION = (4 * T, 4 * T, 10 * T, 9 * T)  # tumour on tiles 4..9 x 4..8 of the tumour slides


def _predictions(out, slides: dict[str, bool], rng) -> pd.DataFrame:
    """Tile predictions of slides (tumour or not), probability high inside LESION, and their manifest."""
    rows = []
    for sid, tumour in slides.items():
        for r in range(SIDE):
            for c in range(SIDE):
                inside = tumour and LESION[0] <= c * T < LESION[2] and LESION[1] <= r * T < LESION[3]
                p = float(np.clip(rng.uniform(0, 0.5) + 0.45 * inside, 0, 1))
                rows.append({"id": f"{sid}_{c * T}_{r * T}", "prob": p, "status": "ok", "source": f"/s/{sid}.tif",
                             "slide_id": sid, "x": c * T, "y": r * T, "tile_size": T, "inside": inside})
    df = pd.DataFrame(rows)
    t = pa.Table.from_pandas(df.drop(columns="inside").assign(error=None, note=None, model="m"), preserve_index=False)
    runfolder.write_part(str(out / "parts" / "part-0.parquet"), t)
    per = [{"slide_id": s, "source": f"/s/{s}.tif", "status": "ok", "width": SIDE * T, "height": SIDE * T,
            "mpp": MPP, "tile_size": T} for s in slides]
    (out / runfolder.MANIFEST).write_text(json.dumps({"files": [{"path": "parts/part-0.parquet", "rows": len(df)}],
                                                      "rows": len(df), "config": {"model": "/nope"},
                                                      "slides": {"per_slide": per}}))
    return df


def _geojson(box) -> str:
    x0, y0, x1, y1 = box
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"classification": {"name": "Tumor"}}}]})


def _asap(box) -> str:
    x0, y0, x1, y1 = box
    pts = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in
                  enumerate([(x0, y0), (x1, y0), (x1, y1), (x0, y1)]))
    return (f'<ASAP_Annotations><Annotations><Annotation Name="A" Type="Polygon" PartOfGroup="_0">'
            f"<Coordinates>{pts}</Coordinates></Annotation></Annotations></ASAP_Annotations>")


@pytest.fixture()
def annotated(tmp_path):
    rng = np.random.default_rng(0)
    slides = {"tumor_001": True, "tumor_002": True, "normal_001": False, "normal_002": False}
    df = _predictions(tmp_path / "preds", slides, rng)
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "tumor_001.geojson").write_text(_geojson(LESION))
    (ann / "tumor_002.xml").write_text(_asap(LESION))
    return df, tmp_path


def test_tiles_slides_and_lesions_against_annotations(annotated):
    df, tmp = annotated
    cfg = EvalConfig(predictions=str(tmp / "preds"), annotations=str(tmp / "ann"), out=str(tmp / "r"), bootstrap=50)
    m = evaluate(cfg)
    assert m["unit"] == "tile" and m["patch"]["n"] == len(df) and m["patch"]["positives"] == df.inside.sum() == 60
    assert m["patch"]["roc_auc"] == pytest.approx(roc_auc_score(df.inside, df.prob))
    assert m["patch"]["bootstrap"] == "slides" and m["patch"]["pr_auc_ci95"] is not None
    best = df.groupby("slide_id").prob.max()
    assert m["slide"]["auc_max"] == pytest.approx(roc_auc_score(best.index.str.startswith("tumor"), best))
    per = {s["slide_id"]: s for s in m["slide"]["per_slide"]}
    assert per["tumor_001"]["label"] == 1 and per["normal_001"]["label"] == 0
    assert per["tumor_001"]["tile_roc_auc"] > 0.9 and per["normal_001"]["tile_roc_auc"] is None
    curve = m["lesion"]["froc"]
    assert curve["lesions"] == 2 and curve["at_fp_rates"]["8.0"] == 1.0 and 0 < curve["score"] <= 1
    # The challenge's files: detections per slide (confidence,x,y) and one slide,probability line each.
    det = np.loadtxt(tmp / "r" / "camelyon" / "detections" / "tumor_001.csv", delimiter=",", ndmin=2)
    assert det.shape[1] == 3 and det[:, 0].max() == pytest.approx(best["tumor_001"], abs=1e-6)
    assert ((det[:, 1:] - T / 2) % T == 0).all()  # tile centres, level 0
    lines = (tmp / "r" / "camelyon" / "slides.csv").read_text().splitlines()
    assert sorted(line.split(",")[0] for line in lines) == sorted(best.index)
    html = (tmp / "r" / "report.html").read_text()
    assert "Lesion level: FROC as Camelyon16 computes it" in html and "Tile level" in html
    assert (tmp / "r" / "froc.png").exists() and "tumor_002" in html


def test_a_bad_annotation_is_refused_before_anything_is_written(annotated):
    _, tmp = annotated
    (tmp / "ann" / "normal_001.geojson").write_text(_geojson((0, 0, SIDE * T + 500, 100)))  # past the edge
    cfg = EvalConfig(predictions=str(tmp / "preds"), annotations=str(tmp / "ann"), out=str(tmp / "r"))
    with pytest.raises(UserError, match=r"normal_001.geojson: feature 1: coordinates .* lie outside slide normal_001"):
        evaluate(cfg)
    assert not (tmp / "r").exists() or not any((tmp / "r").iterdir())
    with pytest.raises(UserError, match=r"needs --labels .* or --annotations"):
        evaluate(EvalConfig(predictions=str(tmp / "preds"), out=str(tmp / "r")))


def test_slide_labels_from_a_csv_override_the_annotations(annotated):
    _, tmp = annotated
    labels = tmp / "slides.csv"
    pd.DataFrame({"id": ["tumor_001", "tumor_002", "normal_001"], "label": [1, 0, 0]}).to_csv(labels, index=False)
    cfg = EvalConfig(predictions=str(tmp / "preds"), annotations=str(tmp / "ann"), labels=str(labels),
                     out=str(tmp / "r"), bootstrap=10)
    with pytest.raises(UserError, match="no label for slides \\['normal_002'\\]"):
        evaluate(cfg)
    m = evaluate(EvalConfig(**{**cfg.__dict__, "allow_missing": True}))
    assert m["slide"]["slides"] == 3 and m["slide"]["positive_slides"] == 1
