"""Planning a slide: its resolution, pyramid level, tissue mask and the grid of tissue tiles (a Ray task each)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import openslide
from PIL import Image, TiffImagePlugin
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

from hcdlib.config import MPP_RANGE, TISSUE_THRESHOLD
from hcdlib.sources.chunks import MAX_PATCH_BYTES
from hcdlib.sources.decode import MAX_PIXELS, PATCH_SIZE, PCAM_MPP
from hcdlib.storage import uri as urimod
from hcdlib.storage.staging import local_slide

log = logging.getLogger(__name__)

# Formats only OpenSlide reads; .tif/.tiff slides need --slides (a .tif is also a patch).
SLIDE_ONLY_EXTS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


SLIDE_EXTS = (*SLIDE_ONLY_EXTS, ".tif", ".tiff")


THUMB_SIDE = 1024


# A slide this much coarser than the model's resolution is scored with a warning (tiles enlarged).
COARSE_FACTOR = 1.25


@dataclass(frozen=True)
class TilePlan:
    """How one slide is cut: tile edge in level-0 px, the level to read and the read size there."""

    mpp: float
    tile_size: int
    level: int
    read_size: int
    patch: int = PATCH_SIZE  # the model's input edge: each tile is resized to it


@dataclass(frozen=True)
class PlannedSlide:
    """One slide as planned: its tiles (level-0 ``xs, ys``) and how they are cut, or why it cannot be scored."""

    slide: str
    slide_id: str
    key: str
    error: str | None = None
    plan: TilePlan | None = None
    width: int = 0
    height: int = 0
    xs: list[int] = field(default_factory=list)
    ys: list[int] = field(default_factory=list)


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


def slide_inputs(listing) -> tuple[list[dict], list[PlannedSlide]]:
    """The slides of a listing, each with its unique id, and refused slide entries as planned errors."""
    slides = [{"slide": urimod.to_uri(listing.fs, p), "slide_id": slide_id_of(p, listing.root)}
              for p in listing.files if p.lower().endswith(SLIDE_EXTS)]
    refused = []
    for p, why in listing.refused:
        if p.lower().endswith(SLIDE_EXTS):
            sid = slide_id_of(p, listing.root)
            refused.append(PlannedSlide(p, sid, slide_key(p), error=f"slide {p}: {why}"))
    return slides, refused


def is_slide_source(paths: list[str]) -> bool:
    """Whether a listing holds slide-only formats (then scoring tiles slides without ``--slides``)."""
    return any(p.lower().endswith(SLIDE_ONLY_EXTS) for p in paths)


def slide_like(fs, path: str) -> str | None:
    """What shows that the image at ``path`` is a whole-slide image, not a patch, or None.

    Its size ("1,290 MiB"), else its width and height from the header alone ("6720x6720 px"):
    more pixels than a patch may have even with ``--resize`` (which a user may give for tiles of
    1,000-4,096 px).
    """
    try:
        size = fs.get_file_info(path).size
        if size is not None and size > MAX_PATCH_BYTES:
            return f"{size / 2**20:,.0f} MiB"
        with fs.open_input_file(path) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as im:  # lazy: the header only
                w, h = im.size
    except Image.DecompressionBombError:  # more pixels than PIL opens at all
        return "too many pixels for a patch"
    except Exception:  # not an image PIL reads (any of its errors): the read makes it an error row
        return None
    return f"{w}x{h} px" if w * h > MAX_PIXELS else None


def slide_key(slide_uri: str) -> str:
    """A stable, file-name-safe key for a slide (its stem plus a hash of the full URI)."""
    stem = os.path.splitext(os.path.basename(slide_uri))[0]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    return f"{safe}-{hashlib.sha1(slide_uri.encode()).hexdigest()[:8]}"


# Saturation (HSV) between glass and tissue: Otsu's threshold on the thumbnail, kept inside these.
# Glass is grey (below ~0.05); pale stroma and fat edges reach down to ~0.08, and visible tissue
# starts at 0.07 (benchmarks/coverage.py measures the share of it that scored tiles cover).
SATURATION_RANGE = (0.05, 0.07)


def tissue_mask(thumb: np.ndarray, *, tile_px: float = 1.0) -> np.ndarray:
    """Tissue pixels of an RGB thumbnail: Otsu on HSV saturation (glass is grey/white: unsaturated), cleaned.

    Otsu splits glass from tissue when a slide has both; on a slide that is nearly all tissue it
    splits the tissue itself (pale eosin from dark haematoxylin), so the threshold is kept within
    :data:`SATURATION_RANGE`. Specks under a quarter of a tile (``tile_px`` thumbnail px across)
    are dropped, and holes under one tile are filled: lumens and tears inside tissue are scored.
    """
    # Channel max and min as element-wise uint8 operations, then one float division: the same
    # values as in float64 throughout, 7x faster on a 1024 px thumbnail.
    r, g, b = thumb[..., 0], thumb[..., 1], thumb[..., 2]
    high = np.maximum(np.maximum(r, g), b)
    top = high.astype(np.float64)
    spread = (high - np.minimum(np.minimum(r, g), b)).astype(np.float64)
    sat = np.divide(spread, top, out=np.zeros_like(top), where=top > 0)  # HSV saturation
    t = threshold_otsu(sat) if np.ptp(sat) > 1e-6 else 1.0
    mask = sat > min(max(t, SATURATION_RANGE[0]), SATURATION_RANGE[1])
    area = tile_px * tile_px
    if area >= 4:  # a tile of a few thumbnail px or more: specks and holes are smaller than it
        mask = remove_small_objects(mask, max_size=int(area / 4))
        mask = remove_small_holes(mask, max_size=int(area))
    return mask


def tissue_tiles(mask: np.ndarray, *, width: int, height: int, tile: int, threshold: float) -> tuple[list, list]:
    """Level-0 ``xs, ys`` of the grid tiles of edge ``tile`` whose share of tissue in ``mask`` is >= ``threshold``.

    ``mask`` is the tissue mask of a thumbnail of the ``width x height`` slide. Each tile's share
    is the mean of the mask pixels under it (at least one), from a summed-area table: a slide
    at 40x has ~10^6 grid cells. Tiles come row by row, left to right.
    """
    sy, sx = mask.shape[0] / height, mask.shape[1] / width  # thumbnail px per level-0 px
    y0, x0 = np.arange(0, height - tile + 1, tile), np.arange(0, width - tile + 1, tile)
    r0, c0 = (y0 * sy).astype(np.int64), (x0 * sx).astype(np.int64)
    r1 = np.maximum(((y0 + tile) * sy).astype(np.int64), r0 + 1)
    c1 = np.maximum(((x0 + tile) * sx).astype(np.int64), c0 + 1)
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    table[1:, 1:] = mask.cumsum(0).cumsum(1)
    inside = table[r1][:, c1] - table[r0][:, c1] - table[r1][:, c0] + table[r0][:, c0]
    rows, cols = np.nonzero(inside / ((r1 - r0)[:, None] * (c1 - c0)[None, :]) >= threshold)
    return x0[cols].tolist(), y0[rows].tolist()


def plan_slide(slide_uri: str, *, slide_id: str, out: str, mpp: float | None,
               tissue_threshold: float = TISSUE_THRESHOLD, target_mpp: float = PCAM_MPP, patch: int = PATCH_SIZE,
               stage: str | None = None) -> PlannedSlide:
    """Open one slide and list its tissue tiles; an unreadable slide is planned with its ``error``.

    The thumbnail and the tissue mask go straight to ``<out>/slides/<key>.thumbnail.png`` and
    ``.tissue.png`` (the heatmap's background, and what coverage is measured against), so
    thousands of slides do not pile them up in the driver.
    """
    base = PlannedSlide(slide_uri, slide_id, slide_key(slide_uri))
    path = None
    try:
        with local_slide(slide_uri, stage=stage) as path, openslide.OpenSlide(path) as s:
            slide_mpp = mpp or float(s.properties.get(openslide.PROPERTY_NAME_MPP_X) or 0)
            if not slide_mpp:
                return replace(base, error=f"slide {slide_uri}: no microns-per-pixel metadata; pass --mpp")
            if not MPP_RANGE[0] <= slide_mpp <= MPP_RANGE[1]:  # e.g. a TIFF saved at a default 72 dpi: 352.8
                # Cut at it, a tile would be a pixel: up to 1.3 million for a 1,152 px slide, each scored.
                return replace(base, error=f"slide {slide_uri}: its metadata says {slide_mpp:.4g} microns per pixel, "
                                           f"outside the {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} of a scan (often a "
                                           "default dpi, not the scanner's); pass --mpp with the scan's resolution")
            plan = plan_level(slide_mpp, list(s.level_downsamples), target_mpp=target_mpp, patch=patch)
            w, h = s.dimensions
            thumb = np.asarray(s.get_thumbnail((THUMB_SIDE, THUMB_SIDE)).convert("RGB"))
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        hint = _untiled_hint(path) if isinstance(exc, openslide.OpenSlideUnsupportedFormatError) else ""
        return replace(base, error=f"slide {slide_uri}: cannot read: {exc}{hint}")
    mask = tissue_mask(thumb, tile_px=plan.tile_size * thumb.shape[1] / w)
    xs, ys = tissue_tiles(mask, width=w, height=h, tile=plan.tile_size, threshold=tissue_threshold)
    for name, im in (("thumbnail", Image.fromarray(thumb)), ("tissue", Image.fromarray(mask))):
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=1)  # 3x faster than the default, 15% larger
        urimod.write_bytes_atomic(urimod.join(out, "slides", f"{base.key}.{name}.png"), buf.getvalue())
    return replace(base, plan=plan, width=w, height=h, xs=xs, ys=ys)


def _untiled_hint(path: str | None) -> str:
    """Why OpenSlide refused a TIFF that is not tiled (an image exported in strips), with the fix; else ''.

    OpenSlide reads a generic TIFF only when it is tiled; a TIFF in strips was refused as an
    "Unsupported or missing image file", which says nothing about what to do.
    """
    try:
        with open(path, "rb") as f:  # the header only: no pixels are decoded
            tags = TiffImagePlugin.TiffImageFile(f).tag_v2
    except (OSError, SyntaxError, ValueError, TypeError):  # not a TIFF (PIL says SyntaxError), or none
        return ""
    if TiffImagePlugin.TILEWIDTH in tags:
        return ""
    return ("; it is a TIFF stored in strips, and OpenSlide reads tiled TIFFs only: convert it to a tiled "
            "pyramidal TIFF (e.g. vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg), or cut it "
            "into 96x96 patches")


def plan_slides(slides: list[dict], *, out: str, mpp: float | None, tissue_threshold: float = TISSUE_THRESHOLD,
                target_mpp: float = PCAM_MPP, patch: int = PATCH_SIZE, stage: str | None = None) -> list[PlannedSlide]:
    """Plan every slide (``{"slide": uri, "slide_id": id}``) in parallel Ray tasks.

    Each task opens, thumbnails and grids one slide into tiles of the model's patch at
    ``target_mpp``, ``patch`` px square (the model artifact's resolution and input size).
    """
    import ray  # Ray only where a job runs

    task = ray.remote(num_cpus=1)(plan_slide)
    planned = ray.get([task.remote(s["slide"], slide_id=s["slide_id"], out=out, mpp=mpp,
                                   tissue_threshold=tissue_threshold, target_mpp=target_mpp, patch=patch,
                                   stage=stage)
                       for s in slides])
    # Coarser than the model's resolution, a tile is enlarged to the patch: scored, but said.
    coarse = [p for p in planned if not p.error and p.plan.mpp > COARSE_FACTOR * target_mpp]
    if coarse:
        worst = max(coarse, key=lambda p: p.plan.mpp)
        log.warning("%d slides are scanned coarser than the model's %.3g um/px (e.g. %s at %.3g um/px): their "
                    "tiles are enlarged up to %.1fx to the model's patch, so their scores are less reliable",
                    len(coarse), target_mpp, worst.slide, worst.plan.mpp, worst.plan.mpp / target_mpp)
    return planned
