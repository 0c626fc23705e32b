"""What a pathologist looks at after a slide is scored: heatmap, tumour regions, a summary.

Made from the committed tile rows (``slide_id, x, y, tile_size, prob, status``) of
:mod:`hcdlib.slides`: a heatmap PNG over the slide's thumbnail, the tiles at or above the
model's threshold merged into GeoJSON polygons QuPath opens, and one summary row per slide.
"""

from __future__ import annotations

import io
import json

import numpy as np

from hcdlib import uri as urimod


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
