"""Whole-slide images: plan tissue tiles at PCam resolution, read them, map the results.

    hcd score --model runs/pcam/model --input s3://bucket/slides --out s3://bucket/slide-preds --slides

Slides are read with OpenSlide (Aperio .svs, generic tiled TIFF, Hamamatsu .ndpi, MIRAX .mrxs,
...). PCam patches are 96x96 px at about 0.97 um/px (10x); from the slide's microns per pixel we
pick the pyramid level and read size that give that resolution and resample to 96x96. Tissue is
found with Otsu's threshold on the saturation of a thumbnail, and only tiles with enough tissue
are scored. Planning and reading run in Ray tasks; a slide on S3 is staged to local disk by the
task that reads it and removed after. Tiles never travel as files: a task reads many tiles of one
slide with one open handle and hands decoded pixels to the model actors.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hcdlib import uri as urimod
from hcdlib.decode import PATCH_SIZE
from hcdlib.transforms import PCAM_MPP

log = logging.getLogger(__name__)

# Formats only OpenSlide reads; .tif/.tiff slides need --slides (a .tif is also a patch).
SLIDE_ONLY_EXTS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
SLIDE_EXTS = (*SLIDE_ONLY_EXTS, ".tif", ".tiff")
THUMB_SIDE = 1024


@dataclass(frozen=True)
class TilePlan:
    """How one slide is cut: tile edge in level-0 px, the level to read and the read size there."""

    mpp: float
    tile_size: int
    level: int
    read_size: int
    patch: int = PATCH_SIZE  # the model's input edge: each tile is resized to it


def plan_level(mpp: float, downsamples: list[float], *, target_mpp: float = PCAM_MPP,
               patch: int = PATCH_SIZE) -> TilePlan:
    """Pick the pyramid level and read size that give ``patch`` px at ``target_mpp``.

    The coarsest level that is still at least as fine as the target is read (never upsample),
    e.g. a 0.25 um/px scan with levels 1/4/16: 384 px at level 0, or 96 px at level 1 (4x).
    """
    tile0 = max(1, round(patch * target_mpp / mpp))
    want = tile0 / patch
    level = max((i for i, d in enumerate(downsamples) if d <= want * 1.01), default=0)
    return TilePlan(mpp=mpp, tile_size=tile0, level=level, read_size=max(1, round(tile0 / downsamples[level])),
                    patch=patch)


def slide_id_of(path: str, root: str) -> str:
    """The slide's id: its path below the input root without the extension.

    ``a/s1.svs`` and ``b/s1.svs`` are two slides with two ids; a single-slide input is its stem.
    """
    rel = posixpath.relpath(path, root) if path != root else os.path.basename(path)
    return os.path.splitext(rel.replace(os.sep, "/"))[0]


def slide_inputs(listing) -> tuple[list[dict], list[dict]]:
    """The slides of a listing, each with its unique id, and refused slide entries as planned errors."""
    slides = [{"slide": urimod.to_uri(listing.fs, p), "slide_id": slide_id_of(p, listing.root)}
              for p in listing.files if p.lower().endswith(SLIDE_EXTS)]
    refused = []
    for p, why in listing.refused:
        if p.lower().endswith(SLIDE_EXTS):
            sid = slide_id_of(p, listing.root)
            refused.append({"slide": p, "slide_id": sid, "key": slide_key(p), "error": f"slide {p}: {why}"})
    return slides, refused


def is_slide_source(paths: list[str]) -> bool:
    """Whether a listing holds slide-only formats (then scoring tiles slides without ``--slides``)."""
    return any(p.lower().endswith(SLIDE_ONLY_EXTS) for p in paths)


@contextlib.contextmanager
def local_copy(slide_uri: str) -> Iterator[str]:
    """A local path for the slide: itself on local disk; a temporary copy (removed after) from S3."""
    if not urimod.is_s3(slide_uri):
        yield urimod.resolve(slide_uri)[1]
        return
    fs, path = urimod.resolve(slide_uri)
    fd, tmp = tempfile.mkstemp(suffix=os.path.splitext(path)[1], prefix="hcd-slide-")
    try:
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as src:
            while chunk := src.read(64 * 2**20):
                out.write(chunk)
        yield tmp
    finally:
        os.unlink(tmp)


def slide_key(slide_uri: str) -> str:
    """A stable, file-name-safe key for a slide (its stem plus a hash of the full URI)."""
    stem = os.path.splitext(os.path.basename(slide_uri))[0]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    return f"{safe}-{hashlib.sha1(slide_uri.encode()).hexdigest()[:8]}"


def tissue_mask(thumb: np.ndarray, *, min_saturation: float = 0.07, max_saturation: float = 0.15) -> np.ndarray:
    """Tissue pixels of an RGB thumbnail: Otsu on HSV saturation (glass is grey/white: unsaturated).

    Otsu splits glass from tissue when a slide has both. On a slide that is nearly all tissue it
    splits the tissue itself (pale eosin from dark haematoxylin) and would drop pale tissue; stained
    tissue is above ~0.15 saturation and glass below ~0.05, so the threshold is kept in between.
    """
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    sat = rgb2hsv(thumb)[..., 1]
    t = threshold_otsu(sat) if np.ptp(sat) > 1e-6 else 1.0
    return sat > min(max(t, min_saturation), max_saturation)


def plan_slide(slide_uri: str, *, slide_id: str, out: str, mpp: float | None, tissue_threshold: float,
               target_mpp: float = PCAM_MPP, patch: int = PATCH_SIZE) -> dict:
    """Open one slide and list its tissue tiles; an unreadable slide returns an ``error``.

    The thumbnail goes straight to ``<out>/slides/<key>.thumbnail.png`` (the heatmap's
    background), so thousands of slides do not pile thumbnails up in the driver.
    """
    import openslide

    base = {"slide": slide_uri, "slide_id": slide_id, "key": slide_key(slide_uri)}
    try:
        with local_copy(slide_uri) as path, openslide.OpenSlide(path) as s:
            slide_mpp = mpp or float(s.properties.get(openslide.PROPERTY_NAME_MPP_X) or 0)
            if not slide_mpp:
                return {**base, "error": f"slide {slide_uri}: no microns-per-pixel metadata; pass --mpp"}
            plan = plan_level(slide_mpp, list(s.level_downsamples), target_mpp=target_mpp, patch=patch)
            w, h = s.dimensions
            thumb = np.asarray(s.get_thumbnail((THUMB_SIDE, THUMB_SIDE)).convert("RGB"))
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        return {**base, "error": f"slide {slide_uri}: cannot read: {exc}"}
    mask = tissue_mask(thumb)
    sy, sx = mask.shape[0] / h, mask.shape[1] / w  # thumbnail px per level-0 px
    xs, ys = [], []
    t = plan.tile_size
    for y in range(0, h - t + 1, t):
        for x in range(0, w - t + 1, t):
            window = mask[int(y * sy):max(int((y + t) * sy), int(y * sy) + 1),
                          int(x * sx):max(int((x + t) * sx), int(x * sx) + 1)]
            if window.mean() >= tissue_threshold:
                xs.append(x)
                ys.append(y)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(thumb).save(buf, format="PNG")
    urimod.write_bytes_atomic(urimod.join(out, "slides", f"{base['key']}.thumbnail.png"), buf.getvalue())
    return {**base, "error": None, "plan": plan.__dict__, "width": w, "height": h, "xs": xs, "ys": ys}


def tile_chunks(planned: dict, chunk_size: int) -> list[dict]:
    """Work units for one planned slide: runs of tiles, or one error unit for a bad slide."""
    common = {"slide": planned["slide"], "slide_id": planned["slide_id"]}
    if planned["error"]:
        return [{**common, "key": f"{planned['key']}-error", "kind": "slide_error", "error": planned["error"],
                 "num_rows": 1}]
    xs, ys = planned["xs"], planned["ys"]
    return [{**common, "key": f"{planned['key']}-{i:05d}", "kind": "tiles", **planned["plan"],
             "xs": xs[a:a + chunk_size], "ys": ys[a:a + chunk_size], "num_rows": len(xs[a:a + chunk_size])}
            for i, a in enumerate(range(0, len(xs), chunk_size))]


# Most tiles one read_region call covers (a 32 x 96 px strip is 288 KB of RGBA at a time).
RUN_TILES = 32


def tile_runs(xs: np.ndarray, ys: np.ndarray, step: int, *, max_tiles: int = RUN_TILES) -> list[tuple[int, int]]:
    """``[a, b)`` index ranges of tiles that sit side by side in one row, at most ``max_tiles`` long."""
    runs, start = [], 0
    for i in range(1, len(xs) + 1):
        if i == len(xs) or ys[i] != ys[start] or xs[i] != xs[i - 1] + step or i - start >= max_tiles:
            runs.append((start, i))
            start = i
    return runs


def read_tiles(chunk: dict) -> dict:
    """Decoded tiles of one chunk (the batch format of :func:`hcdlib.decode.decode_batch`)."""
    from PIL import Image

    n = chunk["num_rows"]
    xs, ys = np.asarray(chunk.get("xs", [0] * n), np.int64), np.asarray(chunk.get("ys", [0] * n), np.int64)
    slide_id = chunk["slide_id"]
    out = {
        "id": np.array([f"{slide_id}_{x}_{y}" for x, y in zip(xs, ys, strict=True)], dtype=object),
        "label": np.full(n, None, dtype=object),
        "slide_id": np.full(n, slide_id, dtype=object),
        "source": np.full(n, chunk["slide"], dtype=object),
        "x": xs, "y": ys, "tile_size": np.full(n, chunk.get("tile_size", 0), np.int64),
        "pixels": np.zeros((n, chunk.get("patch", PATCH_SIZE), chunk.get("patch", PATCH_SIZE), 3), np.uint8),
        "status": np.full(n, "ok", dtype=object),
        "error": np.full(n, None, dtype=object), "note": np.full(n, None, dtype=object),
    }
    if chunk["kind"] == "slide_error":
        out["id"][:] = slide_id
        out["x"][:] = -1
        out["y"][:] = -1
        out["status"][:] = "error"
        out["error"][:] = chunk["error"]
        return out
    import openslide

    size, level, patch = chunk["read_size"], chunk["level"], chunk["patch"]
    try:
        with local_copy(chunk["slide"]) as path, openslide.OpenSlide(path) as s:
            # A run of tiles side by side is one read_region call, cut in memory: one call per
            # tile cost more than decoding (2,245 tiles/s on 2 cores). Exact only where a tile is
            # a whole number of pixels at the level; elsewhere each tile is read alone.
            exact = abs(size * s.level_downsamples[level] - chunk["tile_size"]) < 1e-6
            for a, b in tile_runs(xs, ys, chunk["tile_size"], max_tiles=RUN_TILES if exact else 1):
                region = s.read_region((int(xs[a]), int(ys[a])), level, ((b - a) * size, size)).convert("RGB")
                tiles = np.asarray(region).reshape(size, b - a, size, 3).swapaxes(0, 1)
                for i, tile in enumerate(tiles, start=a):
                    out["pixels"][i] = tile if size == patch else np.asarray(
                        Image.fromarray(tile).resize((patch, patch), Image.Resampling.BOX))
    except (openslide.OpenSlideError, OSError) as exc:  # the slide broke after planning
        out["status"][:] = "error"
        out["error"][:] = f"slide {chunk['slide']}: cannot read tiles: {exc}"
    return out


def tumour_area_mm2(tiles: int, tile_size: int, mpp: float) -> float:
    """Area covered by ``tiles`` tiles of ``tile_size`` level-0 px at ``mpp``."""
    return tiles * (tile_size * mpp / 1000.0) ** 2


def _tile_boxes(rows):
    """Each row's tile as a square polygon in level-0 px (vectorised)."""
    import shapely

    t = np.asarray([r["tile_size"] for r in rows], float)
    x0, y0 = np.asarray([r["x"] for r in rows], float), np.asarray([r["y"] for r in rows], float)
    return shapely.box(x0, y0, x0 + t, y0 + t)


def tumour_regions(slide_rows, *, threshold: float):
    """Tiles at or above ``threshold`` merged into polygons (level-0 px): what a pathologist outlines."""
    import shapely

    hot = [r for r in slide_rows if r["status"] == "ok" and r["prob"] >= threshold]
    merged = shapely.unary_union(_tile_boxes(hot)) if hot else shapely.MultiPolygon()
    return list(getattr(merged, "geoms", [merged])) if not merged.is_empty else []


def geojson(slide_rows, *, threshold: float) -> dict:
    """QuPath-ready GeoJSON (level-0 px): tumour regions as annotations, every scored tile as a detection.

    Regions are the tumour tiles merged into polygons (one per connected area, holes kept). Each
    tile carries its probability as a measurement, so QuPath can colour tiles by it (Measure >
    Show measurement maps) and a script can re-threshold without rescoring.
    """
    import shapely

    tumour = {"name": "Tumor", "color": [200, 0, 0]}
    features = [{"type": "Feature", "geometry": shapely.geometry.mapping(poly),
                 "properties": {"objectType": "annotation", "name": f"tumour region {i + 1}",
                                "classification": tumour, "measurements": {"area px^2": float(poly.area)}}}
                for i, poly in enumerate(tumour_regions(slide_rows, threshold=threshold))]
    ok = [r for r in slide_rows if r["status"] == "ok"]
    for r, box in zip(ok, _tile_boxes(ok), strict=True):
        p = float(r["prob"])
        features.append({"type": "Feature", "geometry": shapely.geometry.mapping(box),
                         "properties": {"objectType": "detection",
                                        "classification": tumour if p >= threshold else
                                        {"name": "Normal", "color": [0, 120, 200]},
                                        "measurements": {"P(tumour)": round(p, 4)}}})
    return {"type": "FeatureCollection", "features": features}


def plan_slides(slides: list[dict], *, out: str, mpp: float | None, tissue_threshold: float,
                target_mpp: float = PCAM_MPP, patch: int = PATCH_SIZE) -> list[dict]:
    """Plan every slide (``{"slide": uri, "slide_id": id}``) in parallel Ray tasks.

    Each task opens, thumbnails and grids one slide into tiles of the model's patch at
    ``target_mpp``, ``patch`` px square (the model artifact's resolution and input size).
    """
    import ray

    task = ray.remote(num_cpus=1)(plan_slide)
    return ray.get([task.remote(s["slide"], slide_id=s["slide_id"], out=out, mpp=mpp,
                                tissue_threshold=tissue_threshold, target_mpp=target_mpp, patch=patch)
                    for s in slides])


HEATMAP_CAPTION = ("Left: the slide. Right: every scored tile coloured by the model's probability of tumour "
                   "(colour bar); tiles with too little tissue are not scored and stay uncoloured.")


def heatmap_png(thumbnail_png: bytes, rows, *, width: int, height: int, title: str = "",
                truth: list | None = None) -> bytes:
    """The slide beside P(tumour) per tile over it, with a 0-1 colour bar (and ``truth`` outlined).

    ``truth``: polygons in level-0 px (shapely), drawn dashed where the real tumour is known.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a cluster node
    import matplotlib.pyplot as plt
    from PIL import Image

    thumb = np.asarray(Image.open(io.BytesIO(thumbnail_png)).convert("RGB"))
    th, tw = thumb.shape[:2]
    prob = np.full((th, tw), np.nan, np.float32)  # NaN: not scored, drawn transparent
    for r in rows:
        if r["status"] != "ok":
            continue
        x0, y0 = int(r["x"] * tw / width), int(r["y"] * th / height)
        x1 = max(x0 + 1, int((r["x"] + r["tile_size"]) * tw / width))
        y1 = max(y0 + 1, int((r["y"] + r["tile_size"]) * th / height))
        prob[y0:y1, x0:x1] = r["prob"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.6), dpi=100, constrained_layout=True)
    left.imshow(thumb)
    left.set_title("slide")
    right.imshow(thumb)
    im = right.imshow(prob, cmap="inferno", vmin=0, vmax=1, alpha=0.65, interpolation="nearest")
    right.set_title("P(tumour) per tile")
    for poly in truth or []:
        xs, ys = poly.exterior.xy
        right.plot(np.asarray(xs) * tw / width, np.asarray(ys) * th / height, "--", color="cyan", lw=2,
                   label="known tumour region")
    if truth:
        right.legend(loc="lower right", fontsize=8)
    for ax in (left, right):
        ax.set_axis_off()
    fig.colorbar(im, ax=right, fraction=0.046, pad=0.02, label="P(tumour)")
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_slide_outputs(out: str, planned: list[dict], rows, *, threshold: float, top_k: int = 5) -> list[dict]:
    """Per slide: heatmap PNG, GeoJSON of tumour tiles; returns the summary rows (also written)."""
    import pandas as pd

    by_slide = dict(list(rows.groupby("slide_id"))) if len(rows) else {}
    summary = []
    for p in planned:
        g = by_slide.get(p["slide_id"])
        if p["error"]:
            summary.append({"slide_id": p["slide_id"], "source": p["slide"], "status": "error", "error": p["error"]})
            continue
        recs = g.to_dict("records") if g is not None else []
        ok = [r for r in recs if r["status"] == "ok"]
        probs = np.array([r["prob"] for r in ok], dtype=float)
        tumour = int((probs >= threshold).sum())
        plan = p["plan"]
        summary.append({
            "slide_id": p["slide_id"], "source": p["slide"], "status": "ok", "error": None,
            "mpp": plan["mpp"], "tile_size": plan["tile_size"], "level": plan["level"],
            "tiles_scored": len(ok), "tiles_failed": len(recs) - len(ok), "tumour_tiles": tumour,
            "tumour_area_mm2": tumour_area_mm2(tumour, plan["tile_size"], plan["mpp"]),
            "max_prob": float(probs.max()) if len(probs) else None,
            "topk_mean_prob": float(np.sort(probs)[-top_k:].mean()) if len(probs) else None,
        })
        base = urimod.join(out, "slides", p["key"])
        urimod.write_bytes_atomic(base + ".geojson", json.dumps(geojson(recs, threshold=threshold)).encode())
        thumb = urimod.read_bytes(base + ".thumbnail.png")
        heat = heatmap_png(thumb, ok, width=p["width"], height=p["height"], title=p["slide_id"])
        urimod.write_bytes_atomic(base + ".heatmap.png", heat)
    buf = io.StringIO()
    pd.DataFrame(summary).to_csv(buf, index=False)
    urimod.write_bytes_atomic(urimod.join(out, "slides", "summary.csv"), buf.getvalue().encode())
    return summary
