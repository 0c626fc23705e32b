"""Tile predictions of whole slides against a pathologist's annotations: tile, slide and lesion metrics.

Each scored tile is tumour when its centre lies in the slide's annotated tumour. The slide's
label is whether it has annotated tumour (or its row in a labels CSV), its score the highest
tile probability (Camelyon16's) and the mean of its top-k tiles. Lesions are found as
:mod:`hcdlib.commands.evaluate.froc` computes them. Everything is computed before anything is written.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import shapely

from hcdlib.commands.evaluate import froc, ranking
from hcdlib.commands.evaluate.annotations import Classes, SlideTruth, read_annotations
from hcdlib.errors import UserError
from hcdlib.outputs.runfolder import read_manifest

log = logging.getLogger(__name__)

CAMELYON_DIR = "camelyon"  # detections/<slide>.csv (confidence,x,y) and slides.csv (slide,probability)


def slide_facts(predictions: str) -> dict[str, dict]:
    """The summary row of each slide scored without error (size, resolution), by slide id."""
    per = (read_manifest(predictions).get("slides") or {}).get("per_slide", [])
    if not per:
        raise UserError(f"--annotations: {predictions} holds predictions of patches, not of whole slides; "
                        "annotations are evaluated against hcd score --slides output")
    ok = {s["slide_id"]: s for s in per if s.get("status") == "ok"}
    unsized = [s for s, f in ok.items() if not {"width", "height", "mpp"} <= set(f)]
    if unsized:
        raise UserError(f"--annotations: {predictions} does not record the size of slide {unsized[0]} (scored by an "
                        "older hcd); score the slides again with this hcd")
    return ok


def tile_truth(tiles: pd.DataFrame, truths: dict[str, SlideTruth]) -> np.ndarray:
    """1 where a tile's centre lies in its slide's annotated tumour, else 0 (in ``tiles``' order)."""
    y = np.zeros(len(tiles), np.int64)
    for sid, idx in tiles.groupby("slide_id").indices.items():
        geom = truths[sid].tumour
        if geom.is_empty:
            continue
        t = tiles.iloc[idx]
        half = t["tile_size"].to_numpy(float) / 2
        y[idx] = shapely.contains_xy(geom, t["x"].to_numpy(float) + half, t["y"].to_numpy(float) + half)
    return y


def per_slide_scores(tiles: pd.DataFrame, labels: pd.Series, *, top_k: int, bootstrap: int, seed: int) -> pd.DataFrame:
    """One row per slide: label, tiles, its max and top-k mean probability, tile AUCs with intervals."""
    rows = []
    for sid, t in tiles.groupby("slide_id"):
        y, p = t["truth"].to_numpy(), t["prob"].to_numpy(float)
        roc, ap = ranking.Ranking(y, p).scores()
        ci = ranking.bootstrap(y, p, reps=bootstrap, seed=seed) if 0 < y.sum() < len(y) else {}
        rows.append({"slide_id": sid, "label": int(labels[sid]), "tiles": len(t), "tumour_tiles": int(y.sum()),
                     "max_prob": float(p.max()), "topk_mean_prob": float(np.sort(p)[-top_k:].mean()),
                     "tile_roc_auc": None if np.isnan(roc) else roc, "tile_pr_auc": None if np.isnan(ap) else ap,
                     "tile_roc_auc_ci95": ci.get("roc_auc_ci95"), "tile_pr_auc_ci95": ci.get("pr_auc_ci95")})
    return pd.DataFrame(rows)


def slide_level(slides: pd.DataFrame, *, top_k: int) -> dict:
    """Slide AUC of both slide scores against the slide labels."""
    both = slides["label"].nunique() == 2
    auc = lambda col: float(ranking.Ranking(slides["label"], slides[col]).scores()[0]) if both else None  # noqa: E731
    return {"slides": len(slides), "positive_slides": int(slides["label"].sum()), "top_k": top_k,
            "auc_max": auc("max_prob"), "auc_topk_mean": auc("topk_mean_prob"),
            "auc_note": "" if both else "not computable: a slide-level AUC needs tumour and normal slides",
            "per_slide": slides.astype(object).where(slides.notna(), None).to_dict(orient="records")}


def lesion_level(tiles: pd.DataFrame, truths: dict[str, SlideTruth], facts: dict[str, dict]) -> tuple[dict, dict]:
    """(FROC metrics, detections per slide): every slide of ``facts`` counts, scored tiles or not."""
    fps, tps, count, found, per = [], [], 0, {}, {}
    groups = tiles.groupby("slide_id").indices
    for sid, fact in facts.items():
        t = tiles.iloc[groups.get(sid, [])]
        dets = froc.detections(*(t[k].to_numpy(float) for k in ("x", "y", "tile_size", "prob")))
        les = froc.lesions(truths[sid].tumour, width=int(fact["width"]), height=int(fact["height"]),
                           mpp=float(fact["mpp"]))
        fp, tp = froc.hits(dets, les)
        fps.append(fp)
        tps.append(tp)
        count += les.count
        found[sid] = dets
        per[sid] = {"lesions": les.count, "itc": int(les.itc[1:].sum()), "detections": len(dets)}
    curve = froc.froc(fps, tps, count)
    return {"froc": curve, "note": "" if curve else "no lesion (other than ITC) is annotated: FROC undefined",
            "per_slide": per}, found


def camelyon_files(found: dict[str, np.ndarray], slides: pd.DataFrame) -> dict[str, bytes]:
    """The challenge's files, no header: per slide ``confidence,x,y`` (level 0), and ``slide,probability``."""
    files = {}
    for sid, d in found.items():
        buf = io.StringIO()
        np.savetxt(buf, np.column_stack([d[:, 0], np.round(d[:, 1:])]), fmt=["%.6f", "%d", "%d"], delimiter=",")
        files[f"{CAMELYON_DIR}/detections/{sid}.csv"] = buf.getvalue().encode()
    lines = [f"{s},{p:.6f}" for s, p in zip(slides["slide_id"], slides["max_prob"], strict=True)]
    files[f"{CAMELYON_DIR}/slides.csv"] = ("\n".join(lines) + "\n").encode()
    return files


def annotated_tiles(cfg, preds: pd.DataFrame, slide_labels: pd.DataFrame | None) -> dict:
    """Everything ``hcd evaluate --annotations`` reports, in memory: tiles, slides, lesions, files."""
    if "x" not in preds or preds["x"].isna().all():
        raise UserError(f"--annotations: {cfg.predictions} holds predictions of patches, not of whole-slide tiles; "
                        "annotations are evaluated against hcd score --slides output")
    facts = slide_facts(cfg.predictions)
    truths = read_annotations(cfg.annotations, {s: (int(f["width"]), int(f["height"])) for s, f in facts.items()},
                              Classes.parse(cfg.tumour_classes, cfg.other_classes))
    labels = pd.Series({s: int(not t.tumour.is_empty) for s, t in truths.items()})
    if slide_labels is not None:
        given = slide_labels.set_index("id")["label"]
        missing = sorted(set(labels.index) - set(given.index))
        if missing and not cfg.allow_missing:
            raise UserError(f"{cfg.labels}: no label for slides {missing[:3]} ({len(missing)} in all); label every "
                            "slide, drop --labels to take labels from the annotations, or pass --allow-missing")
        disagree = [s for s in given.index.intersection(labels.index) if labels[s] and not given[s]]
        if disagree:
            log.warning("%d slides labelled normal in %s have tumour annotated (e.g. %s)", len(disagree),
                        cfg.labels, disagree[0])
        labels = given[given.index.intersection(labels.index)].astype(int)
    tiles = preds[(preds["status"] == "ok") & preds["slide_id"].isin(labels.index)].reset_index(drop=True)
    tiles["truth"] = tile_truth(tiles, truths)
    slides = per_slide_scores(tiles, labels, top_k=cfg.top_k, bootstrap=cfg.bootstrap, seed=cfg.seed)
    lesion, found = lesion_level(tiles, truths, {s: facts[s] for s in labels.index})
    return {"tiles": tiles, "slide": slide_level(slides, top_k=cfg.top_k), "lesion": lesion,
            "files": camelyon_files(found, slides), "truths": truths}
