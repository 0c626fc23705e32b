"""Whole-slide images: plan tissue tiles at PCam resolution, read them, map the results.

    hcd score --model runs/pcam/model --input s3://bucket/slides --out s3://bucket/slide-preds --slides

Slides are read with OpenSlide (Aperio .svs, generic tiled TIFF, Hamamatsu .ndpi, MIRAX .mrxs,
...). PCam patches are 96x96 px at about 0.97 um/px (10x); from the slide's microns per pixel we
pick the pyramid level and read size that give that resolution and resample to 96x96. Tissue is
found with Otsu's threshold on the saturation of a thumbnail, and only tiles with enough tissue
are scored. Planning and reading run in Ray tasks; a slide on S3 is staged to local disk once per
node and run (:mod:`hcdlib.staging`), not once per task. Tiles never travel as files: a task reads
many tiles of one slide with one open handle and hands decoded pixels to the model actors.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
from dataclasses import dataclass

import numpy as np

from hcdlib import uri as urimod
from hcdlib.chunks import Chunk
from hcdlib.config import MPP_RANGE
from hcdlib.decode import PATCH_SIZE
from hcdlib.staging import local_slide, remove_stage, stage_key
from hcdlib.transforms import PCAM_MPP

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


def slide_like(fs, path: str) -> str | None:
    """What shows that the image at ``path`` is a whole-slide image, not a patch, or None.

    Its size ("1,290 MiB"), else its width and height from the header alone ("6720x6720 px"):
    more pixels than a patch may have even with ``--resize`` (which a user may give for tiles of
    1,000-4,096 px).
    """
    import warnings

    from PIL import Image

    from hcdlib.chunks import MAX_PATCH_BYTES
    from hcdlib.decode import MAX_PIXELS

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


def tissue_mask(thumb: np.ndarray, *, min_saturation: float = 0.07, max_saturation: float = 0.15) -> np.ndarray:
    """Tissue pixels of an RGB thumbnail: Otsu on HSV saturation (glass is grey/white: unsaturated).

    Otsu splits glass from tissue when a slide has both. On a slide that is nearly all tissue it
    splits the tissue itself (pale eosin from dark haematoxylin) and would drop pale tissue; stained
    tissue is above ~0.15 saturation and glass below ~0.05, so the threshold is kept in between.
    """
    from skimage.filters import threshold_otsu

    # Channel max and min as element-wise uint8 operations, then one float division: the same
    # values as in float64 throughout. In float64, with max and min reduced over the 3-long last
    # axis, the mask of a 1024 px thumbnail took 0.10 of the 0.42 s its planning took; now 0.015.
    r, g, b = thumb[..., 0], thumb[..., 1], thumb[..., 2]
    high = np.maximum(np.maximum(r, g), b)
    top = high.astype(np.float64)
    spread = (high - np.minimum(np.minimum(r, g), b)).astype(np.float64)
    sat = np.divide(spread, top, out=np.zeros_like(top), where=top > 0)  # HSV saturation
    t = threshold_otsu(sat) if np.ptp(sat) > 1e-6 else 1.0
    return sat > min(max(t, min_saturation), max_saturation)


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


def plan_slide(slide_uri: str, *, slide_id: str, out: str, mpp: float | None, tissue_threshold: float,
               target_mpp: float = PCAM_MPP, patch: int = PATCH_SIZE, stage: str | None = None) -> dict:
    """Open one slide and list its tissue tiles; an unreadable slide returns an ``error``.

    The thumbnail goes straight to ``<out>/slides/<key>.thumbnail.png`` (the heatmap's
    background), so thousands of slides do not pile thumbnails up in the driver.
    """
    import openslide

    base = {"slide": slide_uri, "slide_id": slide_id, "key": slide_key(slide_uri)}
    path = None
    try:
        with local_slide(slide_uri, stage=stage) as path, openslide.OpenSlide(path) as s:
            slide_mpp = mpp or float(s.properties.get(openslide.PROPERTY_NAME_MPP_X) or 0)
            if not slide_mpp:
                return {**base, "error": f"slide {slide_uri}: no microns-per-pixel metadata; pass --mpp"}
            if not MPP_RANGE[0] <= slide_mpp <= MPP_RANGE[1]:  # e.g. a TIFF saved at a default 72 dpi: 352.8
                # Cut at it, a tile would be a pixel: up to 1.3 million for a 1,152 px slide, each scored.
                return {**base, "error": f"slide {slide_uri}: its metadata says {slide_mpp:.4g} microns per pixel, "
                                         f"outside the {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} of a scan (often a default "
                                         "dpi, not the scanner's); pass --mpp with the scan's resolution"}
            plan = plan_level(slide_mpp, list(s.level_downsamples), target_mpp=target_mpp, patch=patch)
            w, h = s.dimensions
            thumb = np.asarray(s.get_thumbnail((THUMB_SIDE, THUMB_SIDE)).convert("RGB"))
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        hint = _untiled_hint(path) if isinstance(exc, openslide.OpenSlideUnsupportedFormatError) else ""
        return {**base, "error": f"slide {slide_uri}: cannot read: {exc}{hint}"}
    xs, ys = tissue_tiles(tissue_mask(thumb), width=w, height=h, tile=plan.tile_size, threshold=tissue_threshold)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(thumb).save(buf, format="PNG", compress_level=1)  # 3x faster than the default, 15% larger
    urimod.write_bytes_atomic(urimod.join(out, "slides", f"{base['key']}.thumbnail.png"), buf.getvalue())
    return {**base, "error": None, "plan": plan.__dict__, "width": w, "height": h, "xs": xs, "ys": ys}


def _untiled_hint(path: str | None) -> str:
    """Why OpenSlide refused a TIFF that is not tiled (an image exported in strips), with the fix; else ''.

    OpenSlide reads a generic TIFF only when it is tiled; a TIFF in strips was refused as an
    "Unsupported or missing image file", which says nothing about what to do.
    """
    from PIL import TiffImagePlugin

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


@dataclass(frozen=True)
class TilesChunk(Chunk):
    """Tissue tiles of one slide, cut as ``plan`` says, at level-0 positions ``xs, ys``."""

    slide: str
    slide_id: str
    plan: TilePlan
    xs: tuple[int, ...]
    ys: tuple[int, ...]
    stage: str | None = None  # the run's staging folder for a slide on S3 (hcdlib.staging)

    def read(self, *, resize: bool = False) -> dict[str, np.ndarray]:
        """The tiles, read in runs and resized to the model's patch (``resize`` has no say here)."""
        return read_tiles(self)


@dataclass(frozen=True)
class SlideErrorChunk(Chunk):
    """A slide that could not be planned (unreadable, no resolution, refused): one error row."""

    slide: str
    slide_id: str
    error: str

    def read(self, *, resize: bool = False) -> dict[str, np.ndarray]:
        """One row with the slide's id, status error and the reason."""
        out = _tile_rows(self.slide, self.slide_id, np.full(1, -1, np.int64), np.full(1, -1, np.int64), 0, PATCH_SIZE)
        out["id"][:] = self.slide_id
        out["status"][:] = "error"
        out["error"][:] = self.error
        return out


def tile_chunks(planned: dict, chunk_size: int, *, stage: str | None = None) -> list[Chunk]:
    """Work units for one planned slide: runs of tiles, or one error unit for a bad slide."""
    if planned["error"]:
        return [SlideErrorChunk(f"{planned['key']}-error", 1, planned["slide"], planned["slide_id"], planned["error"])]
    xs, ys, plan = planned["xs"], planned["ys"], TilePlan(**planned["plan"])
    return [TilesChunk(f"{planned['key']}-{i:05d}", len(xs[a:a + chunk_size]), planned["slide"], planned["slide_id"],
                       plan, tuple(xs[a:a + chunk_size]), tuple(ys[a:a + chunk_size]), stage)
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


def _tile_rows(slide: str, slide_id: str, xs: np.ndarray, ys: np.ndarray, tile_size: int, patch: int) -> dict:
    """Rows for tiles at ``xs, ys`` (the batch format of :func:`hcdlib.decode.decode_batch`), pixels zero."""
    n = len(xs)
    return {
        "id": np.array([f"{slide_id}_{x}_{y}" for x, y in zip(xs, ys, strict=True)], dtype=object),
        "label": np.full(n, None, dtype=object),
        "slide_id": np.full(n, slide_id, dtype=object),
        "source": np.full(n, slide, dtype=object),
        "x": xs, "y": ys, "tile_size": np.full(n, tile_size, np.int64),
        "pixels": np.zeros((n, patch, patch, 3), np.uint8),
        "status": np.full(n, "ok", dtype=object),
        "error": np.full(n, None, dtype=object), "note": np.full(n, None, dtype=object),
    }


def read_tiles(chunk: TilesChunk) -> dict:
    """Decoded tiles of one chunk (the batch format of :func:`hcdlib.decode.decode_batch`).

    A tile OpenSlide cannot read (a corrupt or truncated tile in the file) is an error row of its
    own; the chunk's other tiles are still scored. Pixels outside the scanned area (missing tiles of
    a sparse TIFF, the gaps between a MIRAX slide's fields) are the slide's background colour, as
    in its thumbnail, and the tile's ``note`` says how much of it they cover: dropping the alpha
    channel made them black, and the model scored the black.
    """
    import openslide

    xs, ys = np.asarray(chunk.xs, np.int64), np.asarray(chunk.ys, np.int64)
    plan = chunk.plan
    out = _tile_rows(chunk.slide, chunk.slide_id, xs, ys, plan.tile_size, plan.patch)
    size, level = plan.read_size, plan.level
    read = np.zeros(len(xs), bool)  # tiles in hand: kept if the slide fails later
    try:
        with local_slide(chunk.slide, stage=chunk.stage) as path, _SlideReader(path) as slide:
            # A run of tiles side by side is one read_region call, cut in memory: one call per
            # tile cost more than decoding (2,245 tiles/s on 2 cores). Exact only where a tile is
            # a whole number of pixels at the level; elsewhere each tile is read alone.
            exact = abs(size * slide.downsample(level) - plan.tile_size) < 1e-6
            for a, b in tile_runs(xs, ys, plan.tile_size, max_tiles=RUN_TILES if exact else 1):
                try:
                    pieces = [(a, slide.read(xs[a], ys[a], level, (b - a) * size, size))]
                except openslide.OpenSlideError as exc:
                    if b - a == 1:
                        out["status"][a], out["error"][a] = "error", _tile_error(chunk, xs[a], ys[a], exc)
                        continue
                    pieces = []  # again tile by tile, so that only the tiles that fail are error rows
                    for i in range(a, b):
                        try:
                            pieces.append((i, slide.read(xs[i], ys[i], level, size, size)))
                        except openslide.OpenSlideError as one:
                            out["status"][i], out["error"][i] = "error", _tile_error(chunk, xs[i], ys[i], one)
                for start, region in pieces:
                    read[start:start + _cut_tiles(region, start, out, size=size, background=slide.background)] = True
    except (openslide.OpenSlideError, OSError) as exc:  # the slide broke after planning (cannot be opened)
        lost = ~read & (out["status"] == "ok")
        out["status"][lost] = "error"
        out["error"][lost] = f"slide {chunk.slide}: cannot read tiles: {exc}"
    return out


def _tile_error(chunk: TilesChunk, x: int, y: int, exc: Exception) -> str:
    """The error of one tile that could not be read, naming the slide and the tile's level-0 position."""
    return f"slide {chunk.slide}: cannot read the tile at x={x}, y={y}: {exc}"


class _SlideReader:
    """An open slide that is opened again after a failed read.

    OpenSlide refuses every call on a handle once one call failed, so without this one corrupt
    tile would fail every tile read after it.
    """

    def __init__(self, path: str):
        self.path = path
        self._slide = self._open()
        self.background = _background(self._slide)

    def _open(self):
        import openslide

        return openslide.OpenSlide(self.path)

    def downsample(self, level: int) -> float:
        """The level's downsample factor against level 0."""
        return float(self._slide.level_downsamples[level])

    def read(self, x: int, y: int, level: int, width: int, height: int):
        """The region as OpenSlide gives it: an RGBA PIL image, not premultiplied."""
        import openslide

        if self._slide is None:
            self._slide = self._open()
        try:
            return self._slide.read_region((int(x), int(y)), level, (width, height))
        except openslide.OpenSlideError:
            self.close()
            raise

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __enter__(self) -> _SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _background(slide) -> np.ndarray:
    """The slide's background colour (OpenSlide's property; white where it has none), as RGB uint8."""
    import openslide

    try:
        rgb = bytes.fromhex(slide.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR) or "ffffff")
    except ValueError:  # not hex: a format's quirk, not a reason to lose the slide
        rgb = b""
    return np.frombuffer(rgb if len(rgb) == 3 else b"\xff\xff\xff", np.uint8)


def _cut_tiles(region, start: int, out: dict, *, size: int, background: np.ndarray) -> int:
    """Cut a ``size x (n * size)`` RGBA strip (a PIL image) into ``out``'s tiles ``start .. start + n``.

    Transparent pixels (outside the scanned area) are laid over ``background``, as OpenSlide's
    thumbnail lays them, and each tile that has any gets a note with their share. Each tile is
    resized to the model's patch. Returns ``n``.
    """
    from PIL import Image

    n = region.width // size
    if region.getchannel("A").getextrema()[0] == 255:  # opaque, as nearly every region is: PIL drops alpha fastest
        rgb = np.asarray(region.convert("RGB"))
    else:
        rgba = np.asarray(region)
        rgb, alpha = rgba[..., :3], rgba[..., 3]
        a = alpha[..., None].astype(np.uint16)
        rgb = ((rgb * a + background * (255 - a) + 127) // 255).astype(np.uint8)
        clear = (alpha < 255).reshape(size, n, size).mean(axis=(0, 2))
        for i in np.flatnonzero(clear):
            share = f"{clear[i]:.0%}" if clear[i] >= 0.005 else "under 1%"
            out["note"][start + i] = (f"{share} of the tile lies outside the slide's scanned area: "
                                      "filled with its background colour")
    tiles = rgb.reshape(size, n, size, 3).swapaxes(0, 1)
    patch = out["pixels"].shape[1]
    if size == patch:  # the strip's tiles in one copy
        out["pixels"][start:start + n] = tiles
        return n
    for i, tile in enumerate(tiles, start=start):
        out["pixels"][i] = np.asarray(Image.fromarray(tile).resize((patch, patch), Image.Resampling.BOX))
    return n


def plan_slides(slides: list[dict], *, out: str, mpp: float | None, tissue_threshold: float,
                target_mpp: float = PCAM_MPP, patch: int = PATCH_SIZE, stage: str | None = None) -> list[dict]:
    """Plan every slide (``{"slide": uri, "slide_id": id}``) in parallel Ray tasks.

    Each task opens, thumbnails and grids one slide into tiles of the model's patch at
    ``target_mpp``, ``patch`` px square (the model artifact's resolution and input size).
    """
    import ray

    task = ray.remote(num_cpus=1)(plan_slide)
    planned = ray.get([task.remote(s["slide"], slide_id=s["slide_id"], out=out, mpp=mpp,
                                   tissue_threshold=tissue_threshold, target_mpp=target_mpp, patch=patch,
                                   stage=stage)
                       for s in slides])
    # Coarser than the model's resolution, a tile is enlarged to the patch: scored, but said.
    coarse = [p for p in planned if not p["error"] and p["plan"]["mpp"] > COARSE_FACTOR * target_mpp]
    if coarse:
        worst = max(coarse, key=lambda p: p["plan"]["mpp"])
        log.warning("%d slides are scanned coarser than the model's %.3g um/px (e.g. %s at %.3g um/px): their "
                    "tiles are enlarged up to %.1fx to the model's patch, so their scores are less reliable",
                    len(coarse), target_mpp, worst["slide"], worst["plan"]["mpp"], worst["plan"]["mpp"] / target_mpp)
    return planned


@dataclass(frozen=True)
class SlideTiling:
    """How a scoring job cuts slides: the model's resolution and patch, the flags, where thumbnails go."""

    out: str
    target_mpp: float = PCAM_MPP
    patch: int = PATCH_SIZE
    mpp: float | None = None  # --mpp: the slides' resolution where their metadata has none
    tissue_threshold: float = 0.5
    force: bool = False  # --slides: .tif/.tiff files are slides, not patches


class SlideSource:
    """Whole-slide images at a URI, cut into tissue tiles; made by :func:`hcdlib.sources.open_source`.

    Planning (open each slide, find tissue, grid it) runs in Ray tasks when :meth:`chunks` is
    first called; :meth:`finish` turns the committed tile rows into heatmaps, GeoJSON and a summary.
    """

    layout = "slides"

    def __init__(self, uri: str, slides: list[dict], refused: list[dict], tiling: SlideTiling, list_seconds: float):
        self.uri, self.slides, self.refused, self.tiling = uri, slides, refused, tiling
        self.list_seconds = list_seconds
        self.planned: list[dict] | None = None
        self._chunks: list[Chunk] = []

    @classmethod
    def from_listing(cls, uri: str, listing, tiling: SlideTiling, *, list_seconds: float) -> SlideSource:
        """The slides of a listing (refused entries become error rows)."""
        slides, refused = slide_inputs(listing)
        return cls(uri, slides, refused, tiling, list_seconds)

    def fingerprint(self) -> str:
        """A hash of the slides found, so a resumed run can tell the input has not changed."""
        return hashlib.sha256("\n".join(s["slide"] for s in self.slides + self.refused).encode()).hexdigest()[:16]

    def chunks(self, chunk_size: int = 1024) -> list[Chunk]:
        """Plan every slide (once; needs Ray), then cut its tissue tiles into chunks."""
        if self.planned is None:
            t = self.tiling
            self.planned = plan_slides(self.slides, out=t.out, mpp=t.mpp, tissue_threshold=t.tissue_threshold,
                                       target_mpp=t.target_mpp, patch=t.patch, stage=self.stage) + self.refused
            self._chunks = [c for p in self.planned for c in tile_chunks(p, chunk_size, stage=self.stage)]
        return self._chunks

    @property
    def num_patches(self) -> int:
        """Tissue tiles (and one row per bad slide), once planned."""
        return sum(c.num_rows for c in self._chunks)

    def describe(self) -> str:
        """One line for the log."""
        return f"{len(self.planned or [])} slides, {self.num_patches} tissue tiles"

    @property
    def stage(self) -> str | None:
        """The staging folder of this run's slides on S3 (one download per slide and node), if any."""
        if not any(urimod.is_s3(s["slide"]) for s in self.slides):
            return None
        return stage_key(self.tiling.out, self.fingerprint())

    def finish(self, out: str, *, threshold: float) -> dict:
        """Per-slide heatmaps, GeoJSON and ``slides/summary.csv`` from the committed tile rows.

        The staged copies of slides on S3 are removed first, on every node.
        """
        if self.stage:
            _on_every_node(remove_stage, self.stage)

        import ray

        from hcdlib.slide_maps import slide_outputs, write_summary

        # One task per slide, across the cluster: drawn one after another on the driver, a
        # heatmap and GeoJSON cost ~1 s per slide, i.e. a tail of hours at archive scale.
        # A whole CPU each: a fractional request would start 4 processes per core, each with
        # matplotlib loaded, on a 64-core node.
        task = ray.remote(num_cpus=1)(slide_outputs)
        keys: dict[str, list[str]] = {}
        for c in self._chunks:
            keys.setdefault(c.slide, []).append(c.key)
        # A slide that failed planning is only its summary row: no task (and no CPU) for it.
        jobs = [slide_outputs(out, p, [], threshold=threshold) if p["error"] else
                task.remote(out, {k: v for k, v in p.items() if k not in ("xs", "ys")}, keys.get(p["slide"], []),
                            threshold=threshold)
                for p in self.planned or []]
        summary = [ray.get(j) if isinstance(j, ray.ObjectRef) else j for j in jobs]
        write_summary(out, summary)
        return {"summary": "slides/summary.csv", "per_slide": summary}


def _on_every_node(fn, *args) -> None:
    """Run ``fn(*args)`` once on every live node of the cluster (node-local clean-up)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(fn)
    ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
             for n in ray.nodes() if n["Alive"]])
