"""``hcd evaluate``: metrics a pathologist can trust and pictures they can read.

    hcd evaluate --predictions runs/demo/preds --labels runs/demo/data/labels.csv --out runs/demo/report

Joins *committed* predictions with labels by id, refuses to report over a partial join unless
asked (``--allow-missing``), and writes ``metrics.json`` (stable keys), PNG figures and one
self-contained ``report.html`` (figures embedded) that opens offline.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score, roc_curve

from hcdlib.commands.evaluate import ranking
from hcdlib.commands.evaluate.annotated import CAMELYON_DIR, annotated_tiles
from hcdlib.commands.evaluate.lesion_report import FROC_PNG, froc_png, lesion_html
from hcdlib.commands.evaluate.report import FIGURES, PLURAL, REPORT, write_figures, write_html
from hcdlib.config import EvalConfig
from hcdlib.errors import UserError
from hcdlib.outputs.readers import once_per_id, read_predictions
from hcdlib.outputs.runfolder import read_manifest
from hcdlib.sources.factory import open_source
from hcdlib.sources.labels import check_labelled, read_labels
from hcdlib.sources.slides.plan import slide_key
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)

METRICS = "metrics.json"
METRICS_SCHEMA = "hcd-metrics/1"


def load_labels(uri: str) -> pd.DataFrame:
    """Labels by id from a CSV (``id,label[,slide_id]``) or from any patch source (class folders)."""
    if uri.lower().endswith(".csv"):
        t = read_labels(uri)  # the same rules as training: labels exactly 0/1, one row per id
        cols = [c for c in ("id", "label", "slide_id") if c in t.column_names]
        return t.select(cols).to_pandas()
    return check_labelled(open_source(uri), "labelled").to_pandas()  # Parquet: the label columns alone


def join(preds: pd.DataFrame, labels: pd.DataFrame, *, allow_missing: bool) -> tuple[pd.DataFrame, dict]:
    """Inner join on id, with counts of what did not match; refuses a partial join unless allowed."""
    labels = labels.dropna(subset=["label"]).drop_duplicates("id")
    pred_ids, label_ids = set(preds["id"]), set(labels["id"])
    no_label = sorted(pred_ids - label_ids)
    no_pred = sorted(label_ids - pred_ids)
    counts = {"predictions": len(preds), "labels": len(labels), "missing_labels": len(no_label),
              "missing_predictions": len(no_pred), "missing_examples": (no_label + no_pred)[:10]}
    if (no_label or no_pred) and not allow_missing:
        raise UserError(f"partial join: {len(no_label)} predicted ids have no label and {len(no_pred)} labelled ids "
                         f"have no prediction (e.g. {counts['missing_examples'][:3]}); refusing to compute metrics "
                         "over a partial set. Fix the inputs or pass --allow-missing")
    right = labels[["id", "label"] + (["slide_id"] if "slide_id" in labels and "slide_id" not in preds else [])]
    df = preds.merge(right, on="id", how="inner")
    errors = df["status"] != "ok"
    counts["error_rows"] = int(errors.sum())
    df = df[~errors].copy()
    df["label"] = df["label"].astype(int)
    counts["evaluated"] = len(df)
    return df, counts


def _at_threshold(y: np.ndarray, p: np.ndarray, t: float) -> dict:

    tn, fp, fn, tp = confusion_matrix(y, (p >= t).astype(int), labels=[0, 1]).ravel()
    return {"threshold": float(t), "sensitivity": tp / max(tp + fn, 1), "specificity": tn / max(tn + fp, 1),
            "accuracy": (tp + tn) / max(len(y), 1), "confusion_matrix": {"tn": int(tn), "fp": int(fp),
                                                                           "fn": int(fn), "tp": int(tp)}}


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """ECE over equal-width bins: the count-weighted gap between confidence and observed frequency."""
    frac_pos, mean_pred = calibration_curve(y, p, n_bins=bins, strategy="uniform")
    counts = np.histogram(p, bins=np.linspace(0, 1, bins + 1))[0]
    counts = counts[counts > 0]  # calibration_curve drops empty bins too
    return float(np.sum(np.abs(frac_pos - mean_pred) * counts) / len(p))


def patch_metrics(y: np.ndarray, p: np.ndarray, *, threshold: float, target_sensitivity: float,
                  bootstrap: int, seed: int, groups: np.ndarray | None = None) -> dict:
    """Patch-level metrics: AUCs with bootstrap intervals, operating points, calibration.

    ``groups`` (e.g. each tile's slide): the bootstrap redraws whole groups, as tiles of one slide
    are not independent draws.
    """
    _, tpr, thr = roc_curve(y, p)
    reach = np.nonzero(tpr >= target_sensitivity)[0]
    t_sens = float(thr[reach[0]]) if len(reach) else 0.0
    return {
        "n": len(y), "positives": int(y.sum()),
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        **ranking.bootstrap(y, p, reps=bootstrap, seed=seed, groups=groups),
        "bootstrap": "slides" if groups is not None else "rows",
        "brier": float(brier_score_loss(y, p)),
        "ece": expected_calibration_error(y, p),
        "at_model_threshold": _at_threshold(y, p, threshold),
        "at_target_sensitivity": dict(_at_threshold(y, p, min(t_sens, 1.0)), target=target_sensitivity),
    }


def slide_metrics(df: pd.DataFrame, *, top_k: int) -> dict | None:
    """Slide level: a slide is positive if any patch is; scored by max and top-k mean probability."""
    if "slide_id" not in df or df["slide_id"].isna().all():
        return None
    g = df.dropna(subset=["slide_id"]).groupby("slide_id")
    slides = pd.DataFrame({
        "label": g["label"].max(), "n": g.size(),
        "max_prob": g["prob"].max(),
        "topk_mean_prob": g["prob"].apply(lambda s: s.nlargest(top_k).mean()),
    })
    both = slides["label"].nunique() == 2
    note = "" if both else (f"not computable: all {len(slides)} slides are "
                            f"{'tumour' if slides['label'].iloc[0] else 'normal'} slides; a slide-level AUC needs both")
    return {
        "slides": len(slides), "positive_slides": int(slides["label"].sum()), "top_k": top_k,
        "auc_max": float(roc_auc_score(slides["label"], slides["max_prob"])) if both else None,
        "auc_topk_mean": float(roc_auc_score(slides["label"], slides["topk_mean_prob"])) if both else None,
        "auc_note": note,
        "per_slide": slides.reset_index().to_dict(orient="records"),
    }


def labels_name_slides(preds: pd.DataFrame, labels: pd.DataFrame) -> bool:
    """Whether the labels are per slide (their ids are the slide ids of tile predictions), not per tile.

    A slide archive's labels are the pathologist's call per slide (CAMELYON16's reference table);
    against tile ids they joined nothing, and the refusal spoke of a partial join.
    """
    if "x" not in preds or preds["x"].isna().all() or preds["slide_id"].isna().all():
        return False
    ids = set(labels["id"])
    return not ids & set(preds["id"]) and bool(ids & set(preds["slide_id"].dropna()))


def per_slide(tiles: pd.DataFrame) -> pd.DataFrame:
    """Tile predictions as one row per slide, scored by its highest tile probability.

    The maximum is CAMELYON16's slide score: one tumour focus makes a slide positive. A slide
    none of whose tiles was scored (unreadable) is an error row, as a patch that did not decode.
    """
    best = tiles[tiles["status"] == "ok"].groupby("slide_id")["prob"].max()
    slides = tiles.groupby("slide_id", as_index=False).agg(source=("source", "first"), model=("model", "first"))
    slides["prob"] = slides["slide_id"].map(best)
    slides["status"] = np.where(slides["prob"].notna(), "ok", "error")
    return slides.rename(columns={"slide_id": "id"})[["id", "prob", "status", "source", "model"]]


def _model_threshold(preds_uri: str) -> float:
    """The threshold stored in the scoring run's model artifact, when it can be read."""
    try:
        model_uri = read_manifest(preds_uri)["config"]["model"]
        return float(json.loads(urimod.read_bytes(urimod.join(model_uri, "model.json"))).get("threshold", 0.5))
    except (OSError, KeyError, ValueError):
        return 0.5


# Heatmaps embedded in report.html, the slides of highest tile probability first: each is about
# 1 MB (1.3 MB as base64), so all of a 130-slide archive's would make a report of about 165 MB.
REPORT_HEATMAPS = 24


def _slide_heatmaps(preds_uri: str) -> list[tuple[dict, bytes | None]]:
    """(summary row, heatmap PNG) per slide when the predictions were made on whole-slide images.

    Slides in order of their highest tile probability; past :data:`REPORT_HEATMAPS`, the PNG is
    None (listed, not embedded); b"" where a slide has no heatmap (it could not be read).
    """
    per = (read_manifest(preds_uri).get("slides") or {}).get("per_slide", [])
    out = []
    for n, s in enumerate(sorted(per, key=lambda s: -(s.get("max_prob") or -1.0))):
        png = urimod.join(preds_uri, "slides", f"{slide_key(s['source'])}.heatmap.png")
        if n >= REPORT_HEATMAPS:
            out.append((dict(s, heatmap=png), None))
        else:
            out.append((s, urimod.read_bytes(png) if s.get("status") == "ok" and urimod.exists(png) else b""))
    return out


def check_report_folder(out: str) -> None:
    """Refuse an ``out`` that holds a report file ``hcd evaluate`` did not write: it would be replaced.

    Its own earlier report (a ``metrics.json`` of hcd's schema beside it) is replaced, so a rerun
    updates the report. ``--out .`` in a project with its own ``report.html`` must not lose it.
    """
    there = [n for n in (METRICS, REPORT, *FIGURES, FROC_PNG, CAMELYON_DIR) if urimod.exists(urimod.join(out, n))]
    if not there:
        return
    try:
        ours = json.loads(urimod.read_bytes(urimod.join(out, METRICS))).get("schema") == METRICS_SCHEMA
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise UserError(f"--out {out} holds {there[0]}, which hcd evaluate did not write and would replace; "
                        "choose a new or empty folder")


def _labelled(cfg: EvalConfig, preds: pd.DataFrame) -> dict:
    """Predictions joined with labels: per patch, or per slide when the labels name the slides of tiles."""
    labels = load_labels(cfg.labels)
    unit, tiles = "patch", None
    if labels_name_slides(preds, labels):  # labels per slide, predictions per tile: evaluated per slide
        unit, tiles = "slide", preds
        preds = per_slide(tiles)
    df, counts = join(preds, labels, allow_missing=cfg.allow_missing)
    if df["label"].nunique() < 2:
        raise UserError(f"{cfg.labels}: the evaluated {PLURAL[unit]} hold one class only; AUC is undefined")
    if tiles is not None:  # each scored tile with its slide's label: the slide table's max and top-k mean
        tiles = tiles[tiles["status"] == "ok"].merge(df[["id", "label"]].rename(columns={"id": "slide_id"}),
                                                     on="slide_id")
    return {"unit": unit, "df": df, "join": counts, "slide": slide_metrics(df if tiles is None else tiles,
                                                                           top_k=cfg.top_k)}


def _annotated(cfg: EvalConfig, preds: pd.DataFrame) -> dict:
    """Tiles against the annotated tumour, slides and lesions (``--annotations``)."""
    labels = load_labels(cfg.labels) if cfg.labels else None
    a = annotated_tiles(cfg, preds, labels)
    df = a["tiles"].drop(columns=["label"], errors="ignore").rename(columns={"truth": "label"})
    if df["label"].nunique() < 2:
        raise UserError(f"--annotations {cfg.annotations}: the scored tiles are all "
                        f"{'tumour' if df['label'].any() else 'normal'}; a tile AUC needs both (check "
                        "--tumour-classes and that the annotations are in level-0 pixels)")
    counts = {"predictions": len(preds), "error_rows": int((preds["status"] != "ok").sum()), "evaluated": len(df),
              "slides": a["slide"]["slides"], "annotation_files": sum(t.file is not None for t in a["truths"].values())}
    return {"unit": "tile", "df": df, "join": counts, "slide": a["slide"], "lesion": a["lesion"],
            "files": a["files"], "groups": df["slide_id"].to_numpy()}


def evaluate(cfg: EvalConfig, *, slides: list[tuple[dict, bytes]] | None = None) -> dict:
    """Compute metrics and write ``metrics.json``, the figures and ``report.html`` to ``cfg.out``.

    ``slides``: (summary row, heatmap PNG) of slides scored elsewhere, shown in the report's slide
    section beside those of ``cfg.predictions`` (the demo's slide, beside its patches).
    """
    if not cfg.labels and not cfg.annotations:
        raise UserError("hcd evaluate needs --labels (a labels CSV or labelled patches) or --annotations (a folder "
                        "of slide annotations)")
    urimod.check_folder(cfg.out)
    check_report_folder(cfg.out)
    preds = once_per_id(read_predictions(cfg.predictions), cfg.predictions, then="each is evaluated once").to_pandas()
    e = _annotated(cfg, preds) if cfg.annotations else _labelled(cfg, preds)
    unit, df = e["unit"], e["df"]
    threshold = cfg.threshold if cfg.threshold is not None else _model_threshold(cfg.predictions)
    y, p = df["label"].to_numpy(), df["prob"].to_numpy(dtype=float)
    metrics = {
        "schema": METRICS_SCHEMA,
        "unit": unit,  # a patch, a tile against annotations, or a slide scored by its highest tile
        "inputs": {"predictions": cfg.predictions, "labels": cfg.labels, "annotations": cfg.annotations,
                   "model": str(preds["model"].iloc[0])},
        "join": e["join"],
        "patch": patch_metrics(y, p, threshold=threshold, target_sensitivity=cfg.target_sensitivity,
                               bootstrap=cfg.bootstrap, seed=cfg.seed, groups=e.get("groups")),
        "slide": e["slide"],
        "lesion": e.get("lesion"),
        "config": asdict(cfg),
    }
    figures = write_figures(df, metrics, cfg)
    extra = ""
    if metrics["lesion"]:
        extra = lesion_html(metrics["slide"], metrics["lesion"])
        if metrics["lesion"]["froc"]:
            figures[FROC_PNG] = froc_png(metrics["lesion"]["froc"])
        for name, data in {FROC_PNG: figures.get(FROC_PNG), **e["files"]}.items():
            if data is not None:
                urimod.write_bytes_atomic(urimod.join(cfg.out, name), data)
    body = json.dumps(metrics, indent=1, default=float).encode()
    urimod.write_bytes_atomic(urimod.join(cfg.out, METRICS), body)
    write_html(metrics, figures, cfg.out, slides=(slides or []) + (_slide_heatmaps(cfg.predictions) or []),
               extra_html=extra)
    _log_result(metrics, cfg)
    return metrics


def _log_result(metrics: dict, cfg: EvalConfig) -> None:
    unit, pm = metrics["unit"], metrics["patch"]
    if pm["roc_auc"] < 0.5:  # a classifier worse than chance is most often a label mix-up
        log.warning("ROC AUC %.3f is below chance: the model ranks normal %s above tumour ones; check that 1 "
                    "means tumour in %s and in the labels the model was trained on", pm["roc_auc"],
                    PLURAL[unit], cfg.labels or cfg.annotations)
    ci = pm["roc_auc_ci95"] or (float("nan"), float("nan"))
    log.info("ROC AUC %.3f (95%% CI %.3f-%.3f) on %d %s; report at %s", pm["roc_auc"], *ci,
             pm["n"], PLURAL[unit], urimod.join(cfg.out, REPORT))
