"""How much of the visible tissue the scored tiles cover, and how much of them is glass, per tissue threshold.

Synthetic slides of tissue with ragged edges and pale stroma on glass (hcdlib.commands.synth_slides),
or the real slides in ``--slides-dir``, are planned as ``hcd score --slides`` plans them; "visible
tissue" is HSV saturation > 0.07 and value < 0.92 at level 0, every 8th pixel. The default
``--tissue-threshold`` is chosen from this table.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import openslide

from benchmarks.config import BenchCoverageConfig
from benchmarks.doc import publish
from hcdlib.commands.synth_slides import coverage_of, synth_tissue_pixels, visible_tissue, write_slide_tiff
from hcdlib.config import TISSUE_THRESHOLD
from hcdlib.errors import UserError
from hcdlib.sources.decode import PCAM_MPP
from hcdlib.sources.slides.plan import plan_slide

log = logging.getLogger(__name__)


def synthetic_slides(cfg: BenchCoverageConfig):
    """(path, visible tissue) of each synthetic slide, written into ``cfg.work``."""
    for seed in range(cfg.slides):
        img = synth_tissue_pixels(cfg.side, cfg.side * 3 // 4, seed=seed)
        path = os.path.join(cfg.work, f"tissue-{cfg.side}-{seed}.tif")
        write_slide_tiff(path, img, mpp=PCAM_MPP)
        yield path, visible_tissue(img)


def visible_in_slide(path: str, *, step: int = 8, strip: int = 1024) -> np.ndarray:
    """:func:`visible_tissue` of a real slide on the grid of every ``step``-th level-0 pixel.

    Read a strip at a time from the finest level at most ``step`` times coarser than level 0
    (level 0 of a slide does not fit in memory); pixels outside the scanned area read as black,
    which is not tissue.
    """
    with openslide.OpenSlide(path) as slide:
        level = max(i for i, d in enumerate(slide.level_downsamples) if d <= step + 1e-6)
        down = slide.level_downsamples[level]
        k = max(1, round(step / down))
        width, height = slide.level_dimensions[level]
        strips = []
        for y in range(0, height, strip * k):
            region = slide.read_region((0, round(y * down)), level, (width, min(strip * k, height - y)))
            strips.append(visible_tissue(np.asarray(region.convert("RGB")), step=k))
    return np.concatenate(strips)


def real_slides(cfg: BenchCoverageConfig):
    """(path, visible tissue) of each slide OpenSlide opens in ``cfg.slides_dir``."""
    if not Path(cfg.slides_dir).is_dir():
        raise UserError(f"--slides-dir {cfg.slides_dir}: not a folder; give a local folder of slides")
    for path in sorted(str(p) for p in Path(cfg.slides_dir).iterdir() if p.is_file()):
        if openslide.OpenSlide.detect_format(path):
            yield path, visible_in_slide(path)


def measure(cfg: BenchCoverageConfig) -> list[dict]:
    """One row per threshold: coverage and glass share (mean, min, max over slides), tiles, planning time."""
    os.makedirs(cfg.work, exist_ok=True)
    thresholds = [float(t) for t in cfg.thresholds.split(",")]
    got: dict[float, list[tuple[float, float, int, float]]] = {t: [] for t in thresholds}
    for path, visible in (real_slides(cfg) if cfg.slides_dir else synthetic_slides(cfg)):
        for t in thresholds:
            start = time.perf_counter()
            plan = plan_slide(path, slide_id=Path(path).stem, out=os.path.join(cfg.work, "out"), mpp=None,
                              tissue_threshold=t)
            if plan.error:
                raise RuntimeError(f"{path}: {plan.error}")
            seconds = time.perf_counter() - start
            got[t].append((*coverage_of(visible, plan.xs, plan.ys, plan.plan.tile_size), len(plan.xs), seconds))
            log.info("%s, threshold %g: coverage %.3f, glass %.3f", path, t, *got[t][-1][:2])
    if not got[thresholds[0]]:
        raise UserError(f"--slides-dir {cfg.slides_dir}: no slide OpenSlide can open there (.svs, .ndpi, .mrxs, ...)")
    return [{"threshold": t, "coverage": np.array([r[0] for r in rows]), "glass": np.array([r[1] for r in rows]),
             "tiles": np.mean([r[2] for r in rows]), "seconds": np.median([r[3] for r in rows])}
            for t, rows in got.items()]


def table(rows: list[dict]) -> str:
    """The Markdown table, the default threshold marked."""
    def span(v: np.ndarray) -> str:
        return f"{v.mean():.3f} ({v.min():.3f}-{v.max():.3f})"

    lines = ["| --tissue-threshold | visible tissue in scored tiles | glass share of scored area | tiles per slide "
             "| planning (s, median) |", "|---|---|---|---:|---:|"]
    for r in rows:
        mark = " (default)" if r["threshold"] == TISSUE_THRESHOLD else ""
        lines.append(f"| {r['threshold']:g}{mark} | {span(r['coverage'])} | {span(r['glass'])} | {r['tiles']:.0f} "
                     f"| {r['seconds']:.2f} |")
    return "\n".join(lines)


def run(cfg: BenchCoverageConfig) -> None:
    """Measure, log the table, and write it into ``cfg.markdown`` if given."""
    text = table(measure(cfg))
    log.info("\n%s", text)
    if cfg.markdown:
        what = (f"slides in {cfg.slides_dir}" if cfg.slides_dir
                else f"{cfg.slides} synthetic slides, {cfg.side} px wide, ragged edges, pale stroma")
        publish(cfg.markdown, "coverage-real" if cfg.slides_dir else "coverage",
                f"Tissue coverage of scored tiles ({what})", text, job="bench_coverage", cfg=cfg)
