"""Decode and validate patches; shared by training and scoring.

Every patch goes through :func:`decode_patch`. The header is checked before any pixel is
decoded, so a 20000x20000 "patch" or a decompression bomb costs a few bytes of reading, not
gigabytes of memory. Bad input never raises out of a batch: it becomes an error value that
names the patch and the problem, so one corrupt file in a million is a recorded row.
"""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

PATCH_SIZE = 96
ALLOWED_FORMATS = frozenset({"TIFF", "PNG", "JPEG"})
# Pixel formats PIL converts to 8-bit RGB without losing what they mean. 16-bit grayscale is
# scaled (below); 32-bit integer ("I") and float ("F") pixels have no known range: error rows.
CONVERTIBLE_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "1", "P", "PA", "CMYK", "YCbCr"})
SIXTEEN_BIT_GRAY = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Largest image we agree to decode when resizing is allowed (a 4096x4096 tile).
MAX_PIXELS = 4096 * 4096


class Decoded(NamedTuple):
    """Result of decoding one patch: pixels (HxWx3 uint8) or an error, plus an optional note."""

    pixels: np.ndarray | None
    error: str | None
    note: str | None


def decode_patch(data: bytes | None, *, size: int = PATCH_SIZE, resize: bool = False) -> Decoded:
    """Decode encoded image bytes to a ``size x size x 3`` uint8 RGB array.

    Grayscale, RGBA and palette images are converted to RGB with a note. A patch of another
    size is an error unless ``resize`` is true.
    """
    if not data:
        return Decoded(None, "empty file (0 bytes)", None)
    try:
        with warnings.catch_warnings():
            # PIL warns (rather than raises) on mildly oversized images; we check ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # lazy: only the header is parsed here
                if im.format not in ALLOWED_FORMATS:
                    return Decoded(None, f"unsupported image format {im.format}", None)
                w, h = im.size
                if w * h > MAX_PIXELS:
                    return Decoded(None, f"image is {w}x{h}: too large to be a patch, not decoded", None)
                if (w, h) != (size, size) and not resize:
                    return Decoded(None, f"image is {w}x{h}, expected {size}x{size}", None)
                if im.mode not in CONVERTIBLE_MODES and im.mode not in SIXTEEN_BIT_GRAY:
                    return Decoded(None, f"pixel format {im.mode} cannot be converted to 8-bit RGB faithfully "
                                         "(convert the patch to 8-bit RGB)", None)
                im.load()
                notes = []
                if im.mode in SIXTEEN_BIT_GRAY:
                    # PIL's convert() clips 16-bit values at 255 (a white patch); scale the full range.
                    wide = np.asarray(im).astype(np.uint32)
                    im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
                    notes.append("scaled 16-bit grayscale to 8 bits")
                if im.mode != "RGB":
                    notes.append(f"converted {im.mode} to RGB")
                    im = im.convert("RGB")
                if (w, h) != (size, size):
                    notes.append(f"resized {w}x{h} to {size}x{size}")
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                pixels = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as exc:  # PIL's own guard fires at open() for huge headers
        return Decoded(None, f"image header too large to be a patch, not decoded ({exc})", None)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        msg = str(exc) or type(exc).__name__
        if isinstance(exc, UnidentifiedImageError):
            msg = "not an image (unrecognised format)"
        return Decoded(None, f"cannot decode: {msg}", None)
    return Decoded(pixels, None, "; ".join(notes) or None)


def decode_batch(batch: dict, *, size: int = PATCH_SIZE, resize: bool = False) -> dict:
    """Decode the ``image`` bytes column of a batch (dict of numpy arrays).

    Returns the batch without ``image`` and with ``pixels`` (N x size x size x 3 uint8; zeros
    for bad rows), ``status`` (``ok``/``error``), ``error`` and ``note``. The error names the
    patch id so it stands alone in logs and output rows.
    """
    images = batch["image"]
    ids = batch["id"]
    read_errors = batch.get("error")  # set by the reader when a file could not be read at all
    n = len(ids)
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    status = np.full(n, "ok", dtype=object)
    errors = np.full(n, None, dtype=object)
    notes = np.full(n, None, dtype=object)
    for i in range(n):
        if read_errors is not None and read_errors[i] is not None:
            status[i], errors[i] = "error", f"patch {ids[i]}: {read_errors[i]}"
            continue
        res = decode_patch(images[i], size=size, resize=resize)
        if res.error is not None:
            status[i] = "error"
            errors[i] = f"patch {ids[i]}: {res.error}"
        else:
            pixels[i] = res.pixels
        notes[i] = res.note
    out = {k: v for k, v in batch.items() if k not in ("image", "error")}
    out.update(pixels=pixels, status=status, error=errors, note=notes)
    return out
