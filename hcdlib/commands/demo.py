"""``hcd demo``: the whole product end to end on real tissue that ships with hcd, no downloads.

    hcd demo --out hcd-demo

1. train the default CNN with Ray Train for a couple of minutes on the embedded PatchCamelyon
   sample (:mod:`hcdlib.sources.sample`);
2. score its held-out test patches (from other slides) with Ray Data, and evaluate them:
   metrics with 95% intervals, figures and ``report.html``;
3. assemble a whole-slide image from other held-out patches: a tumour region of known shape
   (label-1 patches) inside normal tissue (label-0 patches), with glass around it, written as a
   pyramidal TIFF at PCam's resolution, so each tile the slide path cuts is one known patch;
4. score that slide through the normal slide path and report the tile-level AUC against the
   known region, with the heatmap and the region's outline.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from hcdlib.commands.evaluate.metrics import EvalConfig, evaluate
from hcdlib.commands.score.run import ScoreConfig, score
from hcdlib.commands.synth_slides import write_slide_tiff
from hcdlib.config import DemoConfig
from hcdlib.errors import UserError
from hcdlib.outputs.readers import read_predictions
from hcdlib.outputs.runfolder import read_manifest
from hcdlib.raykit.cluster import init_ray
from hcdlib.sources.decode import decode_patch
from hcdlib.sources.sample import sample_uri
from hcdlib.sources.slides.maps import heatmap_png, tumour_regions
from hcdlib.sources.slides.plan import slide_key
from hcdlib.sources.slides.source import PCAM_MPP
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)

TILE = 96
SLIDE_COLS = 14  # tissue columns of the demo slide; one tile of glass is added all round


def layout_slide(labels: list[int], *, cols: int = SLIDE_COLS, tumour=None) -> list[tuple[int, int, int]]:
    """Grid cells ``(col, row, patch index)`` for a mosaic with a glass border of one tile.

    Label-1 patches fill the cells ``tumour(col, row)`` ranks first (default: an ellipse left of
    centre, so a swapped x/y or a shifted grid would not match it); label-0 patches fill the rest.
    """
    rows = -(-len(labels) // cols)
    cells = [(c + 1, r + 1) for r in range(rows) for c in range(cols)]
    if tumour is None:
        cx, cy = 0.4 * cols + 1, 0.5 * rows + 1

        def tumour(c, r):  # normalised elliptical distance from the region's centre
            return ((c - cx) / cols) ** 2 + ((r - cy) / (0.7 * rows)) ** 2
    cells.sort(key=lambda cr: tumour(*cr))
    ones = [i for i, v in enumerate(labels) if v == 1]
    zeros = [i for i, v in enumerate(labels) if v == 0]
    return [(c, r, i) for (c, r), i in zip(cells, ones + zeros, strict=False)]


def write_demo_slide(patches, path: str, *, cols: int = SLIDE_COLS, tumour=None, seed: int = 0) -> dict:
    """Write the mosaic slide of ``patches`` (table: image, label) to ``path``; return its ground truth."""
    labels = patches["label"].to_pylist()
    images = patches["image"].to_pylist()
    cells = layout_slide(labels, cols=cols, tumour=tumour)
    rows = max(r for _, r, _ in cells)
    rng = np.random.default_rng(seed)
    img = rng.normal(236, 3, ((rows + 2) * TILE, (cols + 2) * TILE, 3)).clip(0, 255).astype(np.uint8)  # glass
    truth = []
    for c, r, i in cells:
        img[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = decode_patch(images[i]).pixels
        truth.append({"x": c * TILE, "y": r * TILE, "label": labels[i]})
    write_slide_tiff(path, img, mpp=PCAM_MPP)
    return {"tiles": truth, "width": img.shape[1], "height": img.shape[0]}


def tile_auc(rows, truth: dict) -> tuple[float, int]:
    """ROC AUC of scored tiles against the known labels of the mosaic; and how many tiles count."""
    label = {(t["x"], t["y"]): t["label"] for t in truth["tiles"]}
    pairs = [(label[(r["x"], r["y"])], r["prob"]) for r in rows if r["status"] == "ok" and (r["x"], r["y"]) in label]
    y, p = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    return (float(roc_auc_score(y, p)) if len(set(y)) == 2 else float("nan")), len(pairs)


# What the demo writes in its --out: an earlier demo's output is written again, nothing else is touched.
STAGES = ("run", "predictions", "report", "slide", "slide_predictions")
HEATMAP, SLIDE_FILE = "slide_heatmap.png", "demo_slide.tif"


def check_demo_folder(out: str) -> None:
    """Refuse an --out that holds anything but an earlier demo's output.

    The demo scores every slide in ``<out>/slide/`` and writes ``<out>/slide_heatmap.png``: in a
    user's folder it would have scored their slides as part of the demo and replaced that file.
    """
    urimod.check_folder(out)
    fs, root = urimod.resolve(out)
    slide = f"{root}/slide"
    found = [i.path for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))]
    found += [i.path for i in fs.get_file_info(pafs.FileSelector(slide, allow_not_found=True))]
    ours = {f"{root}/{n}" for n in (*STAGES, HEATMAP)} | {f"{slide}/{SLIDE_FILE}"}
    theirs = sorted(p for p in found if p not in ours)
    if theirs:
        raise UserError(f"--out {out} holds {urimod.to_uri(fs, theirs[0])}, which the demo did not write (it scores "
                        "every slide in <out>/slide and writes its own files there): choose a new or empty folder")


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; return where each output went and the headline numbers."""
    from hcdlib.commands.train.folder import clear_run
    from hcdlib.commands.train.run import TrainConfig, train

    check_demo_folder(cfg.out)
    paths = {k: urimod.join(cfg.out, k) for k in STAGES}
    init_ray(dashboard=True)  # the demo trains (Ray Train needs the dashboard), then scores
    log.info("[1/4] training hcdnet for up to %.1f minutes on %d real PCam patches", cfg.minutes, 900)
    # Each demo trains afresh: a rerun (another --minutes, a newer hcd) shows what it says it does.
    clear_run(paths["run"])
    meta = train(TrainConfig(data=sample_uri("train"), val_data=sample_uri("val"), out=paths["run"],
                             batch_size=64, time_budget_min=cfg.minutes))
    model_uri = urimod.join(paths["run"], "model")
    log.info("[2/4] scoring 300 held-out patches from other slides")
    scored = score(ScoreConfig(model=model_uri, input=sample_uri("test"), out=paths["predictions"], overwrite=True))
    log.info("[3/4] assembling a slide from 140 held-out patches and scoring it tile by tile")
    slide_path = urimod.join(paths["slide"], SLIDE_FILE)
    urimod.resolve(paths["slide"])[0].create_dir(urimod.resolve(paths["slide"])[1], recursive=True)
    truth = write_demo_slide(pq.read_table(urimod.join(sample_uri("slide"), "part-00000.parquet")), slide_path)
    score(ScoreConfig(model=model_uri, input=paths["slide"], out=paths["slide_predictions"], slides=True,
                      overwrite=True, chunk_size=64))
    log.info("[4/4] the slide heatmap with the known tumour region, and the evaluation report")
    rows = read_predictions(paths["slide_predictions"]).to_pylist()
    auc, n_tiles = tile_auc(rows, truth)
    known = tumour_regions([dict(t, tile_size=TILE, prob=1.0, status="ok") for t in truth["tiles"] if t["label"]],
                           threshold=0.5)
    key = slide_key(rows[0]["source"])  # the slide as hcd score listed it (an absolute URI), not as written here
    thumb = urimod.read_bytes(urimod.join(paths["slide_predictions"], "slides", f"{key}.thumbnail.png"))
    heatmap = urimod.join(cfg.out, HEATMAP)
    png = heatmap_png(thumb, [r for r in rows if r["status"] == "ok"], width=truth["width"], height=truth["height"],
                      title=f"demo slide: tile AUC {auc:.3f} against the known tumour region (dashed)", truth=known)
    urimod.write_bytes_atomic(heatmap, png)
    slide_row = read_manifest(paths["slide_predictions"])["slides"]["per_slide"][0]
    metrics = evaluate(EvalConfig(predictions=paths["predictions"], labels=sample_uri("test"), out=paths["report"]),
                       slides=[(slide_row, png)])
    p = metrics["patch"]
    lo, hi = p["roc_auc_ci95"] or (float("nan"), float("nan"))
    result = {**paths, "model": model_uri, "report_html": urimod.join(paths["report"], "report.html"),
              "heatmap": heatmap, "test_auc": p["roc_auc"], "test_auc_ci95": (lo, hi), "tile_auc": auc,
              "tiles": n_tiles, "val_auc": meta["metrics"].get("val_auc", float("nan"))}
    log.info("\n== hcd demo done ==\n model        %s (validation AUC %.3f)\n predictions  %s (%d patches)\n"
             " test AUC     %.3f (95%% CI %.3f-%.3f) on %d held-out patches from other slides\n"
             " slide        tile AUC %.3f over %d tissue tiles against the known tumour region\n"
             " report       %s\n heatmap      %s",
             model_uri, result["val_auc"], paths["predictions"], scored["rows"], p["roc_auc"], lo, hi, p["n"],
             auc, n_tiles, result["report_html"], heatmap)
    return result

