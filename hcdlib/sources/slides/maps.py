"""What a pathologist looks at after a slide is scored: heatmap, tumour regions, a summary.

Made from the committed tile rows (``slide_id, x, y, tile_size, prob, status``) of
:mod:`hcdlib.sources.slides.source`: a heatmap PNG over the slide's thumbnail, the tiles at or above the
model's threshold merged into GeoJSON polygons QuPath opens, and one summary row per slide.
A slide has up to a million tiles, so everything here works on columns, never row by row;
:func:`slide_outputs` makes one slide's outputs and runs in a Ray task per slide.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import shapely
from PIL import Image

from hcdlib.outputs import readers
from hcdlib.sources.slides.plan import PlannedSlide
from hcdlib.storage import uri as urimod

# What the maps read of each committed tile row.
TILE_COLUMNS = ["x", "y", "tile_size", "prob", "status"]


def tumour_area_mm2(tiles: int, tile_size: int, mpp: float) -> float:
    """Area covered by ``tiles`` tiles of ``tile_size`` level-0 px at ``mpp`` (tumour tiles, or all scored)."""
    return tiles * (tile_size * mpp / 1000.0) ** 2


def _columns(rows) -> dict[str, np.ndarray]:
    """The tile columns of ``rows``: an Arrow table, a DataFrame or (small inputs) a list of dicts."""
    if hasattr(rows, "schema") and hasattr(rows, "column"):  # pyarrow.Table
        return {k: rows.column(k).to_numpy(zero_copy_only=False) for k in TILE_COLUMNS}
    if hasattr(rows, "columns"):  # pandas.DataFrame
        return {k: rows[k].to_numpy() for k in TILE_COLUMNS}
    kinds = {"status": object, "prob": float}
    return {k: np.asarray([r[k] for r in rows], dtype=kinds.get(k, np.int64)) for k in TILE_COLUMNS}


def _scored(rows) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``x, y, tile_size, prob`` of the tiles scored ok, as float arrays."""
    c = _columns(rows)
    ok = c["status"] == "ok"
    return tuple(c[k][ok].astype(float) for k in ("x", "y", "tile_size", "prob"))


def tumour_regions(slide_rows, *, threshold: float):
    """Tiles at or above ``threshold`` merged into polygons (level-0 px): what a pathologist outlines."""
    x, y, t, p = _scored(slide_rows)
    hot = p >= threshold
    if not hot.any():
        return []
    x0, y0, x1, y1 = _row_runs(x[hot], y[hot], t[hot])
    merged = shapely.unary_union(shapely.box(x0, y0, x1, y1))
    return list(getattr(merged, "geoms", [merged])) if not merged.is_empty else []


def _row_runs(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, ...]:
    """``x0, y0, x1, y1`` of the rectangles that tiles side by side in a row make: the same area, fewer shapes.

    The union's cost grows with the shapes it merges: the 4,900 tiles of a 70 x 70 slide took it
    0.10 s, its 70 rows of tiles 0.002 s.
    """
    order = np.lexsort((x, y, t))
    x, y, t = x[order], y[order], t[order]
    starts = np.ones(len(x), bool)
    starts[1:] = (y[1:] != y[:-1]) | (t[1:] != t[:-1]) | (x[1:] != x[:-1] + t[:-1])
    first = np.flatnonzero(starts)
    last = np.append(first[1:], len(x)) - 1
    return x[first], y[first], x[last] + t[last], y[first] + t[first]


_TUMOUR = {"name": "Tumor", "color": [200, 0, 0]}
_NORMAL = {"name": "Normal", "color": [0, 120, 200]}


def geojson(slide_rows, *, threshold: float) -> dict:
    """QuPath-ready GeoJSON (level-0 px): tumour regions as annotations, every scored tile as a detection.

    Regions are the tumour tiles merged into polygons (one per connected area, holes kept). Each
    tile carries its probability as a measurement, so QuPath can colour tiles by it (Measure >
    Show measurement maps) and a script can re-threshold without rescoring.
    """
    features = [{"type": "Feature", "geometry": shapely.geometry.mapping(poly),
                 "properties": {"objectType": "annotation", "name": f"tumour region {i + 1}",
                                "classification": _TUMOUR, "measurements": {"area px^2": float(poly.area)}}}
                for i, poly in enumerate(tumour_regions(slide_rows, threshold=threshold))]
    x, y, t, p = _scored(slide_rows)
    # Each tile's square, counter-clockwise from its top-right corner (as shapely.box writes it).
    rings = np.stack([np.stack(c, axis=-1) for c in ((x + t, y), (x + t, y + t), (x, y + t), (x, y), (x + t, y))],
                     axis=1).tolist()
    features += [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                  "properties": {"objectType": "detection", "classification": _TUMOUR if hot else _NORMAL,
                                 "measurements": {"P(tumour)": prob}}}
                 for ring, prob, hot in zip(rings, np.round(p, 4).tolist(), (p >= threshold).tolist(), strict=True)]
    return {"type": "FeatureCollection", "features": features}


HEATMAP_CAPTION = ("Left: the slide. Right: every scored tile coloured by the model's probability of tumour "
                   "(colour bar); tiles with too little tissue are not scored and stay uncoloured, and tissue left "
                   "unscored is outlined in green.")


def prob_raster(rows, *, width: int, height: int, shape: tuple[int, int]) -> np.ndarray:
    """P(tumour) at each pixel of a ``shape`` (rows, cols) image of the slide; NaN where nothing was scored.

    Each pixel takes the tile under its centre: tiles lie on a grid of their edge from (0, 0).
    """
    x, y, t, p = _scored(rows)
    out = np.full(shape, np.nan, np.float32)
    if not len(p):
        return out
    edge = float(t.max())
    gx, gy = (x // edge).astype(np.int64), (y // edge).astype(np.int64)
    grid = np.full((gy.max() + 2, gx.max() + 2), np.nan, np.float32)  # the extra row/col stays NaN
    grid[gy, gx] = p
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * width / shape[1] // edge).astype(np.int64), grid.shape[1] - 1)
    rws = np.minimum(((np.arange(shape[0]) + 0.5) * height / shape[0] // edge).astype(np.int64), grid.shape[0] - 1)
    return grid[rws[:, None], cols[None, :]]


# Heatmap figure geometry, inches: the widest it may be, the tallest a panel may be, the margin
# above the panels (title and panel titles), around them, between them, and the colour bar's width
# and the room its ticks and label take. Panels take the slide's aspect ratio; the figure fits them.
_FIG_MAX_W, _PANEL_MAX_H, _TOP, _EDGE, _GAP, _BAR_W, _BAR_ROOM = 12.0, 4.8, 0.75, 0.1, 0.25, 0.15, 0.75
_DPI = 100


def _heatmap_axes(plt, aspect: float):
    """A figure with two image panels of width/height ``aspect`` and a colour bar, placed by hand.

    Matplotlib's constrained layout placed them as well, but it measured every artist and drew the
    figure twice: 0.14 of the 0.39 s a slide's heatmap took (py-spy, one 4,900-tile slide).
    """
    room = _FIG_MAX_W - 2 * _EDGE - _GAP - _BAR_W - _BAR_ROOM  # for the two panels side by side
    h = min(_PANEL_MAX_H, room / (2 * aspect))
    w = h * aspect
    fw, fh = 2 * _EDGE + 2 * w + _GAP + _BAR_W + _BAR_ROOM, _TOP + h + _EDGE
    fig = plt.figure(figsize=(fw, fh), dpi=_DPI)
    bottom = _EDGE / fh
    left = fig.add_axes((_EDGE / fw, bottom, w / fw, h / fh))
    right = fig.add_axes(((_EDGE + w + _GAP) / fw, bottom, w / fw, h / fh))
    bar = fig.add_axes(((_EDGE + 2 * w + _GAP + _BAR_W) / fw, bottom + 0.1 * h / fh, _BAR_W / fw, 0.8 * h / fh))
    return fig, left, right, bar


def heatmap_png(thumbnail_png: bytes, rows, *, width: int, height: int, title: str = "",
                truth: list | None = None, tissue: np.ndarray | None = None) -> bytes:
    """The slide beside P(tumour) per tile over it, with a 0-1 colour bar (and ``truth`` outlined).

    ``truth``: polygons in level-0 px (shapely), drawn dashed where the real tumour is known.
    ``tissue``: the slide's tissue mask (any size); tissue no scored tile covers is outlined.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a cluster node
    import matplotlib.pyplot as plt

    thumb_im = Image.open(io.BytesIO(thumbnail_png)).convert("RGB")
    fig, left, right, bar = _heatmap_axes(plt, thumb_im.width / thumb_im.height)
    # Both images are made at the panel's own pixel size, so matplotlib draws them without resampling.
    tw, th = (max(1, round(v * _DPI)) for v in left.get_position().size * fig.get_size_inches())
    thumb = np.asarray(thumb_im.resize((tw, th), Image.Resampling.LANCZOS))
    prob = prob_raster(rows, width=width, height=height, shape=(th, tw))
    left.imshow(thumb, interpolation="none")
    left.set_title("slide")
    right.imshow(thumb, interpolation="none")
    im = right.imshow(prob, cmap="inferno", vmin=0, vmax=1, alpha=0.65, interpolation="none")
    right.set_title("P(tumour) per tile")
    if tissue is not None:
        shown = np.asarray(Image.fromarray(tissue).resize((tw, th), Image.Resampling.NEAREST), bool)
        missed = shown & np.isnan(prob)
        if missed.any():
            right.contour(missed, levels=[0.5], colors="lime", linewidths=1)
    for poly in truth or []:
        xs, ys = poly.exterior.xy
        right.plot(np.asarray(xs) * tw / width, np.asarray(ys) * th / height, "--", color="cyan", lw=2,
                   label="known tumour region")
    if truth:
        right.legend(loc="lower right", fontsize=8)
    for ax in (left, right):
        ax.set_axis_off()
    fig.colorbar(im, cax=bar, label="P(tumour)")
    fig.suptitle(title, y=1 - 0.1 / fig.get_figheight())
    buf = io.BytesIO()
    fig.savefig(buf, format="png", pil_kwargs={"compress_level": 1})  # the default level took 0.2 s a slide
    plt.close(fig)
    return buf.getvalue()


def tissue_coverage(tissue: np.ndarray, rows, *, width: int, height: int) -> float | None:
    """The share of the tissue mask's pixels whose centre lies in a scored tile; None without tissue."""
    if not tissue.any():
        return None
    scored = ~np.isnan(prob_raster(rows, width=width, height=height, shape=tissue.shape))
    return float((tissue & scored).sum() / tissue.sum())


def slide_outputs(out: str, planned: PlannedSlide, keys: list[str], *, threshold: float, top_k: int = 5) -> dict:
    """One slide's heatmap PNG and GeoJSON from its committed parts ``keys``; returns its summary row."""
    if planned.error:
        return {"slide_id": planned.slide_id, "source": planned.slide, "status": "error", "error": planned.error}
    rows = readers.read_parts(out, keys, TILE_COLUMNS) if keys else []  # no keys: no tissue found
    c = _columns(rows)
    probs = c["prob"][c["status"] == "ok"].astype(float)
    tumour = int((probs >= threshold).sum())
    plan, w, h = planned.plan, planned.width, planned.height
    base = urimod.join(out, "slides", planned.key)
    tissue = np.asarray(Image.open(io.BytesIO(urimod.read_bytes(base + ".tissue.png"))), bool)
    urimod.write_bytes_atomic(base + ".geojson", json.dumps(geojson(rows, threshold=threshold)).encode())
    heat = heatmap_png(urimod.read_bytes(base + ".thumbnail.png"), rows, width=w, height=h, title=planned.slide_id,
                       tissue=tissue)
    urimod.write_bytes_atomic(base + ".heatmap.png", heat)
    return {
        "slide_id": planned.slide_id, "source": planned.slide, "status": "ok", "error": None,
        "width": w, "height": h, "mpp": plan.mpp, "tile_size": plan.tile_size, "level": plan.level,
        "tiles_scored": len(probs), "tiles_failed": len(c["status"]) - len(probs), "tumour_tiles": tumour,
        "tumour_area_mm2": tumour_area_mm2(tumour, plan.tile_size, plan.mpp),
        "tissue_area_mm2": float(tissue.sum() * (w / tissue.shape[1]) * (h / tissue.shape[0]) * plan.mpp ** 2 / 1e6),
        "scored_area_mm2": tumour_area_mm2(len(probs), plan.tile_size, plan.mpp),
        "tissue_coverage": tissue_coverage(tissue, rows, width=w, height=h),
        "max_prob": float(probs.max()) if len(probs) else None,
        "topk_mean_prob": float(np.sort(probs)[-top_k:].mean()) if len(probs) else None,
    }


def write_summary(out: str, summary: list[dict]) -> None:
    """``slides/summary.csv``: one row per slide."""
    buf = io.StringIO()
    pd.DataFrame(summary).to_csv(buf, index=False)
    urimod.write_bytes_atomic(urimod.join(out, "slides", "summary.csv"), buf.getvalue().encode())
