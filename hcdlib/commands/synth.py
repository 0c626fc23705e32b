"""Synthetic H&E patches in the Kaggle layout, for the demo, tests and benchmarks.

    hcd synth --out /tmp/synth --n 2000 --slides 8 --seed 0

Patches are rendered in optical-density space with per-slide Hematoxylin/Eosin stain vectors
(Beer-Lambert), so colours, stain variation and texture behave like scanned H&E: pink stroma,
white fat vacuoles, purple nuclei. Label 1 means tumour-like cells (large, crowded, irregular,
hyperchromatic nuclei) lie in the centre 32x32 region, as in PatchCamelyon. Negatives often
carry the same tumour cells *outside* the centre and dense dark lymphocytes inside it, so
a colour histogram cannot solve the task: the model has to look at the centre.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
from PIL import Image

from hcdlib.config import SynthConfig
from hcdlib.errors import UserError
from hcdlib.sources.decode import PATCH_SIZE
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)

# Ruifrok & Johnston optical-density vectors for Hematoxylin and Eosin (R, G, B).
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])
_CENTRE = (32, 64)  # the PCam label region: pixels [32, 64) on both axes


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: random grid upsampled bilinearly."""
    g = max(2, size // scale + 2)
    grid = rng.random((g, g)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img)


def _stamp_nucleus(h_map: np.ndarray, e_map: np.ndarray, chromatin_field: np.ndarray,
                   rng: np.random.Generator,
                   cy: float, cx: float, r: float, *, elong: float, darkness: float,
                   irregular: float, halo: float) -> None:
    """Add one nucleus (an irregular ellipse with chromatin texture) to the stain maps."""
    size = h_map.shape[0]
    rr = int(np.ceil(r * max(1.0, elong) + 2))
    y0, y1 = max(0, int(cy) - rr), min(size, int(cy) + rr + 1)
    x0, x1 = max(0, int(cx) - rr), min(size, int(cx) + rr + 1)
    if y0 >= y1 or x0 >= x1:
        return
    dy, dx = np.ogrid[y0:y1, x0:x1]
    dy, dx = dy - cy, dx - cx
    theta = rng.uniform(0, np.pi)
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / (r * elong)
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / r
    ang = np.arctan2(v, u)
    # Irregular outline: a few random harmonics modulate the radius.
    k = rng.integers(2, 5)
    wobble = 1 + irregular * np.sin(k * ang + rng.uniform(0, 2 * np.pi))
    d = np.sqrt(u * u + v * v) / wobble
    inside = np.clip((1.0 - d) * 3.0, 0, 1)  # soft edge
    chromatin = chromatin_field[y0:y1, x0:x1]
    h_map[y0:y1, x0:x1] = np.maximum(h_map[y0:y1, x0:x1], inside * darkness * chromatin)
    if halo:
        ring = np.clip((1.6 - d) * 2.0, 0, 1) - inside
        e_map[y0:y1, x0:x1] += np.clip(ring, 0, 1) * halo


def _place(rng: np.random.Generator, n: int, region: tuple[int, int, int, int]) -> np.ndarray:
    """``n`` random (y, x) centres in ``region`` = (y0, y1, x0, x1)."""
    y0, y1, x0, x1 = region
    return np.stack([rng.uniform(y0, y1, n), rng.uniform(x0, x1, n)], axis=1)


def _tumour_cluster(h_map, e_map, chromatin, rng, region, count) -> None:
    for cy, cx in _place(rng, count, region):
        _stamp_nucleus(h_map, e_map, chromatin, rng, cy, cx, rng.uniform(4.0, 6.5),
                       elong=rng.uniform(1.0, 1.6),
                       darkness=rng.uniform(1.7, 2.4), irregular=rng.uniform(0.12, 0.3), halo=0.25)


def _outside_centre_region(rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A 30x30 box that does not overlap the centre 32x32 square."""
    side = rng.integers(4)
    lo, hi = _CENTRE
    a = int(rng.integers(0, PATCH_SIZE - 30))
    boxes = [(0, lo - 6, a, a + 30), (hi + 6, PATCH_SIZE, a, a + 30),
             (a, a + 30, 0, lo - 6), (a, a + 30, hi + 6, PATCH_SIZE)]
    return boxes[side]


def render_patch(rng: np.random.Generator, label: int, stain: np.ndarray) -> np.ndarray:
    """Render one 96x96x3 uint8 H&E-like patch with the given label and slide stain."""
    s = PATCH_SIZE
    fibres = _smooth_noise(rng, s, 6)
    e_map = 0.35 + 0.55 * _smooth_noise(rng, s, 24) * (0.6 + 0.4 * fibres)
    h_map = 0.08 * _smooth_noise(rng, s, 12)
    chromatin = 0.75 + 0.5 * rng.random((s, s))  # nuclear texture, shared by all nuclei
    # Fat / background: white round vacuoles with no stain.
    for _ in range(rng.poisson(1.2)):
        cy, cx = rng.uniform(0, s, 2)
        r = rng.uniform(6, 20)
        yy, xx = np.ogrid[:s, :s]
        hole = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        e_map[hole] *= 0.08
    # Normal background cells everywhere: stromal fibroblasts (elongated) and scattered cells.
    for cy, cx in _place(rng, rng.integers(8, 22), (0, s, 0, s)):
        _stamp_nucleus(h_map, e_map, chromatin, rng, cy, cx, rng.uniform(1.5, 2.6),
                       elong=rng.uniform(1.0, 2.8),
                       darkness=rng.uniform(0.9, 1.4), irregular=0.05, halo=0.0)
    lo, hi = _CENTRE
    if label == 1:
        _tumour_cluster(h_map, e_map, chromatin, rng, (lo - 2, hi + 2, lo - 2, hi + 2), rng.integers(5, 10))
        if rng.random() < 0.5:  # tumour often extends beyond the centre
            _tumour_cluster(h_map, e_map, chromatin, rng, _outside_centre_region(rng), rng.integers(3, 9))
    else:
        if rng.random() < 0.6:  # tumour next to, but not in, the centre: still label 0
            _tumour_cluster(h_map, e_map, chromatin, rng, _outside_centre_region(rng), rng.integers(5, 12))
        if rng.random() < 0.5:  # lymphocytes: small, round, very dark, crowded in the centre
            for cy, cx in _place(rng, rng.integers(10, 25), (lo - 4, hi + 4, lo - 4, hi + 4)):
                _stamp_nucleus(h_map, e_map, chromatin, rng, cy, cx, rng.uniform(1.8, 2.6), elong=1.05,
                               darkness=rng.uniform(1.9, 2.5), irregular=0.03, halo=0.0)
    h_vec, e_vec, intensity = stain[:3], stain[3:6], stain[6]
    od = (h_map[..., None] * h_vec + e_map[..., None] * e_vec) * intensity
    rgb = 250.0 * np.exp(-od) + rng.normal(0, 3.0, (s, s, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def slide_stain(rng: np.random.Generator) -> np.ndarray:
    """Per-slide stain: jittered H and E vectors and an overall intensity (7 numbers)."""
    h = np.clip(_H + rng.normal(0, 0.06, 3), 0.05, 1.0)
    e = np.clip(_E + rng.normal(0, 0.06, 3), 0.02, 1.2)
    return np.concatenate([h / np.linalg.norm(h), e / np.linalg.norm(e), [rng.uniform(0.8, 1.2)]])


def patch_id(seed: int, index: int) -> str:
    """A Kaggle-style 40-hex id, deterministic for (seed, index)."""
    return hashlib.sha1(f"hcd-synth:{seed}:{index}".encode()).hexdigest()


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    """Encode a patch as lossless TIFF (like Kaggle) or JPEG q=75 (like the PCam re-encode)."""
    buf = io.BytesIO()
    if fmt == "tif":
        Image.fromarray(pixels).save(buf, format="TIFF")
    elif fmt == "jpg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=75)
    else:
        raise ValueError(f"unknown format {fmt!r}; use tif or jpg")
    return buf.getvalue()


def generate(n: int, *, slides: int = 8, seed: int = 0, positive_fraction: float = 0.4,
             start: int = 0, stop: int | None = None):
    """Yield ``(id, label, slide_id, pixels)`` for patches ``start..stop`` of an ``n``-patch set.

    Every patch depends only on ``(seed, index)``, so ranges can be rendered in parallel and
    the result is deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    stains = [slide_stain(rng) for _ in range(slides)]
    labels = (rng.random(n) < positive_fraction).astype(int)
    slide_of = rng.integers(0, slides, n)
    for i in range(start, n if stop is None else stop):
        prng = np.random.default_rng([seed, i])
        yield (patch_id(seed, i), int(labels[i]), f"slide_{slide_of[i]:03d}",
               render_patch(prng, int(labels[i]), stains[slide_of[i]]))


def _write_range(cfg: SynthConfig, start: int, stop: int) -> list[tuple[str, int, str]]:
    fs, root = urimod.resolve(cfg.out)
    rows = []
    for pid, label, slide, pixels in generate(cfg.n, slides=cfg.slides, seed=cfg.seed,
                                              positive_fraction=cfg.positive_fraction,
                                              start=start, stop=stop):
        with fs.open_output_stream(f"{root}/{pid}.{cfg.format}") as f:
            f.write(encode(pixels, cfg.format))
        rows.append((pid, label, slide))
    return rows


# How hcd synth's labels.csv starts: what tells its earlier output from a user's folder.
_LABELS_HEADER = b'"id","label","slide_id"'


def _check_own_folder(out: str) -> None:
    """Refuse an --out that holds anything but hcd synth's own earlier output.

    Synthetic patches would mix into a real data set, and ``labels.csv`` replace the user's.
    """
    urimod.check_folder(out)
    fs, root = urimod.resolve(out)
    if not fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        return  # new or empty
    labels = urimod.join(out, "labels.csv")
    if urimod.exists(labels):
        with fs.open_input_stream(urimod.resolve(labels)[1]) as f:
            if f.read(len(_LABELS_HEADER)) == _LABELS_HEADER:
                return  # hcd synth's own output: written again
    raise UserError(f"--out {out} holds files hcd synth did not write; synthetic patches would mix into them "
                    "(and replace a labels.csv): choose a new or empty folder")


def write_synth(cfg: SynthConfig, *, processes: int | None = None) -> str:
    """Write ``cfg.n`` patches as ``<out>/<id>.<format>`` plus ``<out>/labels.csv``.

    Rendering is CPU-bound (~3 ms a patch), so large sets are split over processes.
    """
    _check_own_folder(cfg.out)
    fs, root = urimod.resolve(cfg.out)
    fs.create_dir(root, recursive=True)
    processes = processes or os.cpu_count() or 1
    step = 1000
    ranges = [(a, min(a + step, cfg.n)) for a in range(0, cfg.n, step)]
    if processes > 1 and len(ranges) > 1:
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe once Ray/torch threads exist
        with ProcessPoolExecutor(processes, mp_context=ctx) as pool:
            parts = list(pool.map(_write_range, [cfg] * len(ranges), *zip(*ranges, strict=True)))
    else:
        parts = [_write_range(cfg, a, b) for a, b in ranges]
    rows = [r for part in parts for r in part]
    table = pa.table({"id": [r[0] for r in rows], "label": [r[1] for r in rows],
                      "slide_id": [r[2] for r in rows]})
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    urimod.write_bytes_atomic(urimod.join(cfg.out, "labels.csv"), buf.getvalue())
    log.info("wrote %d synthetic patches (%d positive) and labels.csv to %s",
             cfg.n, sum(r[1] for r in rows), cfg.out)
    return cfg.out
