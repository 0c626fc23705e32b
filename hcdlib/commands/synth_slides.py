"""Synthetic whole-slide images: patches on a grid, or ragged tissue with pale stroma on glass.

Written as pyramidal tiled TIFFs OpenSlide reads, for the demo, the tests and the benchmarks.
:func:`visible_tissue` is the reference the tissue coverage of scored tiles is measured against.
"""

from __future__ import annotations

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from hcdlib.commands.synth import generate
from hcdlib.sources.decode import PATCH_SIZE


def synth_slide_pixels(cols: int, rows: int, *, seed: int = 0, blank_cols: int = 0,
                       tumour: set[tuple[int, int]] = frozenset()) -> np.ndarray:
    """A slide image at PCam resolution made of ``rows x cols`` synthetic patches.

    Glass fills the first ``blank_cols`` columns, tumour patches the (row, col) cells in
    ``tumour``, normal tissue the rest.
    """
    need = {1: len(tumour), 0: rows * (cols - blank_cols) - len(tumour)}
    pools: dict[int, list[np.ndarray]] = {0: [], 1: []}
    for _, label, _, pixels in generate(10 * (need[0] + need[1]) + 100, seed=seed, slides=1):
        if len(pools[label]) < need[label]:
            pools[label].append(pixels)
        if all(len(pools[k]) >= need[k] for k in pools):
            break
    rng = np.random.default_rng(seed)
    s = PATCH_SIZE
    img = np.clip(rng.normal(238, 2, (rows * s, cols * s, 3)), 0, 255).astype(np.uint8)
    for r in range(rows):
        for c in range(blank_cols, cols):
            img[r * s:(r + 1) * s, c * s:(c + 1) * s] = pools[1 if (r, c) in tumour else 0].pop()
    return img


def write_slide_tiff(path: str, img: np.ndarray, *, mpp: float | None, levels: int = 3) -> None:
    """Write a pyramidal tiled TIFF that OpenSlide reads as generic-tiff (MPP in the resolution tags)."""
    with tifffile.TiffWriter(path, bigtiff=img.nbytes > 2**31) as tif:
        level = img
        for i in range(levels):
            kw = {"resolution": (1e4 / (mpp * 2**i),) * 2, "resolutionunit": "CENTIMETER"} if mpp else {}
            tif.write(level, tile=(256, 256), photometric="rgb", compression="zlib",
                      subfiletype=1 if i else 0, **kw)
            level = level[::2, ::2]

# Colours (RGB) of the tissue slide: dense H&E, pale stroma (HSV saturation ~0.09, value ~0.91,
# the palest tissue still visible) and glass.
_DENSE = np.array([[214, 120, 170], [150, 90, 170], [230, 160, 190]], float)
_PALE = np.array([232, 211, 221], float)
_GLASS = np.array([238, 237, 240], float)


def _field(rng, shape: tuple[int, int], scale: int) -> np.ndarray:
    """Smooth random values over ``shape``: features about ``scale`` px across."""
    small = ndimage.gaussian_filter(rng.normal(size=(shape[0] // scale + 3, shape[1] // scale + 3)), 1.0)
    big = np.asarray(Image.fromarray(small.astype(np.float32)).resize(
        ((shape[1] // scale + 3) * scale, (shape[0] // scale + 3) * scale), Image.Resampling.BICUBIC))
    return big[scale:scale + shape[0], scale:scale + shape[1]]


def synth_tissue_pixels(width: int, height: int, *, seed: int = 0, pale: float = 0.35) -> np.ndarray:
    """A slide of tissue fragments with ragged edges on glass; about ``pale`` of the tissue is pale stroma.

    The edges follow noise at two scales (lobes of ~500 px and ragged bits of ~40 px), so they
    never align with a tile grid; dust specks lie on the glass.
    """
    rng = np.random.default_rng(seed)
    shape = (height, width)
    edge = _field(rng, shape, 500) + 0.2 * _field(rng, shape, 40)
    tissue = edge > np.quantile(edge, 0.5)
    stroma = _field(rng, shape, 200)
    is_pale = tissue & (stroma > np.quantile(stroma[tissue], 1 - pale))
    mix = rng.integers(0, len(_DENSE), shape)
    img = np.where(tissue[..., None], _DENSE[mix], _GLASS)
    img = np.where(is_pale[..., None], _PALE, img)
    noise = rng.normal(0, 1.0, (*shape, 1)) * np.where(is_pale | ~tissue, 1.5, 12.0)[..., None]
    img = img + noise
    dust = rng.random(shape) < 2e-5  # single dark specks on the glass, a few px across once dilated
    img[ndimage.binary_dilation(dust & ~tissue, iterations=2)] = (90, 90, 90)
    return np.clip(img, 0, 255).astype(np.uint8)


def visible_tissue(img: np.ndarray, *, step: int = 8) -> np.ndarray:
    """Pixels (every ``step``-th) a person sees as tissue: HSV saturation > 0.07 and value < 0.92."""
    px = img[::step, ::step].astype(np.float64)
    top = px.max(-1)
    sat = np.divide(top - px.min(-1), top, out=np.zeros_like(top), where=top > 0)
    return (sat > 0.07) & (top / 255 < 0.92)


def coverage_of(visible: np.ndarray, xs, ys, tile: int, *, step: int = 8) -> tuple[float, float]:
    """(share of visible tissue in the tiles at ``xs, ys``, share of those tiles' area that is not tissue)."""
    scored = np.zeros(visible.shape, bool)
    for x, y in zip(xs, ys, strict=True):
        scored[y // step:(y + tile) // step, x // step:(x + tile) // step] = True
    covered = float((visible & scored).sum() / max(visible.sum(), 1))
    glass = float((scored & ~visible).sum() / max(scored.sum(), 1))
    return covered, glass
