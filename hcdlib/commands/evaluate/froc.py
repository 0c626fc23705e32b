"""Lesion-level FROC as the Camelyon16 challenge computes it, from tile probabilities.

Detections are the local maxima of a slide's tile probability map (one per plateau), each at its
tile's centre in level-0 px. Lesions are the annotated tumour rasterised at about 8 um/px (the
challenge's level 5), dilated by 75/2 um (5 tumour cells, as its evaluation code does), holes
filled and split into 8-connected regions; regions whose major axis is under 275 um are
isolated tumour cells (ITC): a detection in one is neither a hit nor a false positive. A lesion
is found by the highest detection inside it. Sensitivity is taken at 1/4, 1/2, 1, 2, 4 and 8
false positives per slide (over every slide, normal ones included) and averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage.measure import label, regionprops

FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
EVAL_UM_PER_PX = 8.0  # the lesion mask's pixel: Camelyon16's level 5 at 0.243 um/px is 7.8 um
DILATE_UM = 75.0 / 2  # the challenge's code: distance < 75 / (resolution * 2^level * 2)
ITC_UM = 275.0  # longest diameter under which a lesion counts as isolated tumour cells
CURVE_POINTS = 2000  # points of the curve kept in metrics.json (the score uses all of them)


@dataclass(frozen=True)
class Lesions:
    """A slide's lesion labels (0: none) at ``scale`` level-0 px per pixel; ``itc[k]``: label k is an ITC."""

    labels: np.ndarray
    itc: np.ndarray
    scale: float

    @property
    def count(self) -> int:
        """Lesions that count (not ITC)."""
        return int((~self.itc[1:]).sum())


def rasterise(geom: shapely.Geometry, shape: tuple[int, int], scale: float) -> np.ndarray:
    """A boolean (rows, cols) mask of ``geom`` (level-0 px) with ``scale`` level-0 px per pixel."""
    im = Image.new("1", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(im)
    polys = [g for g in shapely.get_parts(geom) if isinstance(g, shapely.Polygon) and not g.is_empty]
    for poly in sorted(polys, key=lambda g: -g.area):  # an island inside a hole is drawn after the hole
        draw.polygon([(x / scale, y / scale) for x, y in poly.exterior.coords], fill=1)
        for hole in poly.interiors:
            draw.polygon([(x / scale, y / scale) for x, y in hole.coords], fill=0)
    return np.asarray(im, dtype=bool)


def lesions(tumour: shapely.Geometry, *, width: int, height: int, mpp: float) -> Lesions:
    """The lesions of a slide whose annotated tumour is ``tumour`` (level-0 px at ``mpp`` um/px)."""
    scale = max(1.0, EVAL_UM_PER_PX / mpp)
    shape = (max(1, int(np.ceil(height / scale))), max(1, int(np.ceil(width / scale))))
    mask = rasterise(tumour, shape, scale) if not tumour.is_empty else np.zeros(shape, bool)
    if not mask.any():
        return Lesions(np.zeros(shape, np.int32), np.zeros(1, bool), scale)
    px_um = scale * mpp
    near = ndimage.distance_transform_edt(~mask) < DILATE_UM / px_um
    labels = label(ndimage.binary_fill_holes(near), connectivity=2).astype(np.int32)
    itc = np.zeros(labels.max() + 1, bool)
    for r in regionprops(labels):
        itc[r.label] = r.axis_major_length < ITC_UM / px_um
    return Lesions(labels, itc, scale)


def detections(x: np.ndarray, y: np.ndarray, tile: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """(confidence, x, y) rows: the local maxima of the tile probability map, at tile centres (level 0)."""
    if not len(prob):
        return np.zeros((0, 3))
    edge = float(tile.max())
    gx, gy = (x // edge).astype(np.int64), (y // edge).astype(np.int64)
    grid = np.full((gy.max() + 1, gx.max() + 1), -np.inf)
    grid[gy, gx] = prob
    peak = (grid == ndimage.maximum_filter(grid, size=3, mode="constant", cval=-np.inf)) & np.isfinite(grid)
    plateaus, _n = ndimage.label(peak, structure=np.ones((3, 3)))
    _, first = np.unique(plateaus.ravel(), return_index=True)  # one cell per plateau (label 0 is the rest)
    rows, cols = np.unravel_index(first[1:], grid.shape)
    return np.column_stack([grid[rows, cols], (cols + 0.5) * edge, (rows + 0.5) * edge])


def hits(found: np.ndarray, les: Lesions) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive confidences, per-lesion best confidence; 0 where missed or ITC) of one slide."""
    r = np.clip((found[:, 2] / les.scale).astype(np.int64), 0, les.labels.shape[0] - 1)
    c = np.clip((found[:, 1] / les.scale).astype(np.int64), 0, les.labels.shape[1] - 1)
    hit = les.labels[r, c]
    best = np.zeros(len(les.itc))
    inside = (hit > 0) & ~les.itc[hit]
    np.maximum.at(best, hit[inside], found[inside, 0])
    return found[hit == 0, 0], best[1:]


def froc(fps: list[np.ndarray], tps: list[np.ndarray], lesion_count: int) -> dict | None:
    """The FROC curve and the sensitivities at :data:`FP_RATES` over slides (one array each).

    Thresholds are every distinct confidence but the lowest, as the challenge's evaluation code
    takes them, plus the point (0 false positives, 0 sensitivity). None without a lesion.
    """
    if lesion_count == 0:
        return None
    fp = np.sort(np.concatenate(fps)) if fps else np.zeros(0)
    tp = np.sort(np.concatenate(tps)) if tps else np.zeros(0)
    thresholds = np.unique(np.concatenate([fp, tp]))[1:]
    fp_rate = np.r_[len(fp) - np.searchsorted(fp, thresholds, "left"), 0] / len(fps)
    sens = np.r_[len(tp) - np.searchsorted(tp, thresholds, "left"), 0] / lesion_count
    at = np.interp(FP_RATES, fp_rate[::-1], sens[::-1])
    shown = np.unique(np.linspace(0, len(fp_rate) - 1, min(len(fp_rate), CURVE_POINTS)).astype(int))
    return {"lesions": lesion_count, "fp_per_slide": fp_rate[shown].tolist(), "sensitivity": sens[shown].tolist(),
            "at_fp_rates": dict(zip([str(r) for r in FP_RATES], at.tolist(), strict=True)),
            "score": float(at.mean())}
