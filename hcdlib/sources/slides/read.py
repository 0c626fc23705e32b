"""Reading tiles: a run of tiles of one slide through one open OpenSlide handle, as decoded rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import openslide
from PIL import Image

from hcdlib.sources.chunks import Chunk
from hcdlib.sources.decode import PATCH_SIZE
from hcdlib.sources.slides.plan import PlannedSlide, TilePlan
from hcdlib.storage.staging import local_slide

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TilesChunk(Chunk):
    """Tissue tiles of one slide, cut as ``plan`` says, at level-0 positions ``xs, ys``."""

    slide: str
    slide_id: str
    plan: TilePlan
    xs: tuple[int, ...]
    ys: tuple[int, ...]
    stage: str | None = None  # the run's staging folder for a slide on S3 (hcdlib.storage.staging)

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


def tile_chunks(planned: PlannedSlide, chunk_size: int, *, stage: str | None = None) -> list[Chunk]:
    """Work units for one planned slide: runs of tiles, or one error unit for a bad slide."""
    p = planned
    if p.error:
        return [SlideErrorChunk(f"{p.key}-error", 1, p.slide, p.slide_id, p.error)]
    return [TilesChunk(f"{p.key}-{i:05d}", len(p.xs[a:a + chunk_size]), p.slide, p.slide_id, p.plan,
                       tuple(p.xs[a:a + chunk_size]), tuple(p.ys[a:a + chunk_size]), stage)
            for i, a in enumerate(range(0, len(p.xs), chunk_size))]


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
    """Rows for tiles at ``xs, ys`` (the batch format of :func:`hcdlib.sources.decode.decode_batch`), pixels zero."""
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
    """Decoded tiles of one chunk (the batch format of :func:`hcdlib.sources.decode.decode_batch`).

    A tile OpenSlide cannot read (a corrupt or truncated tile in the file) is an error row of its
    own; the chunk's other tiles are still scored. Pixels outside the scanned area (missing tiles of
    a sparse TIFF, the gaps between a MIRAX slide's fields) are the slide's background colour, as
    in its thumbnail, and the tile's ``note`` says how much of it they cover: dropping the alpha
    channel made them black, and the model scored the black.
    """
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

        return openslide.OpenSlide(self.path)

    def downsample(self, level: int) -> float:
        """The level's downsample factor against level 0."""
        return float(self._slide.level_downsamples[level])

    def read(self, x: int, y: int, level: int, width: int, height: int):
        """The region as OpenSlide gives it: an RGBA PIL image, not premultiplied."""
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
