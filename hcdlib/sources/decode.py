"""Decode and validate patches; shared by training and scoring.

Every patch goes through :func:`decode_patch`. The header is checked before any pixel is
decoded, so a 20000x20000 "patch" or a decompression bomb costs a few bytes of reading, not
gigabytes of memory. Bad input never raises out of a batch: it becomes an error value that
names the patch and the problem, so one corrupt file in a million is a recorded row.
"""

from __future__ import annotations

import io
import struct
import warnings
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

# A PatchCamelyon patch: 96x96 px at 10x, about 0.97 um/px (93 um of tissue).
PATCH_SIZE, PCAM_MPP = 96, 0.972
# A decoded patch as stored by ``hcd pack``: 96 x 96 x 3 uint8 pixels, row-major RGB.
PIXEL_BYTES = PATCH_SIZE * PATCH_SIZE * 3
ALLOWED_FORMATS = frozenset({"TIFF", "PNG", "JPEG"})
# Pixel formats PIL converts to 8-bit RGB without losing what they mean. 16-bit grayscale is
# scaled (below); 32-bit integer ("I") and float ("F") pixels have no known range: error rows.
CONVERTIBLE_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "1", "P", "PA", "CMYK", "YCbCr"})
SIXTEEN_BIT_GRAY = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Largest image we agree to decode when resizing is allowed (a 4096x4096 tile).
MAX_PIXELS = 4096 * 4096
# An image this wide or tall is no patch: its error names --slides.
SLIDE_EDGE = 1000
# Modes with transparency. Where a patch is transparent there is no tissue: glass, which is white.
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class Decoded(NamedTuple):
    """Result of decoding one patch: pixels (HxWx3 uint8) or an error, plus an optional note."""

    pixels: np.ndarray | None
    error: str | None
    note: str | None


# TIFF tags read by the fast path (TIFF 6.0): anything unusual falls back to PIL.
_TIFF_TYPES = {3: ("H", 2), 4: ("I", 4)}  # SHORT, LONG
_WIDTH, _HEIGHT, _BITS, _COMPRESSION, _PHOTOMETRIC = 256, 257, 258, 259, 262
_STRIP_OFFSETS, _SAMPLES, _STRIP_BYTES, _PLANAR, _SAMPLE_FORMAT = 273, 277, 279, 284, 339


def raw_tiff_pixels(data: bytes, size: int = PATCH_SIZE) -> np.ndarray | None:
    """The pixels of an uncompressed 8-bit RGB ``size x size`` TIFF (Kaggle's patches), or None.

    Such a file is its pixels behind a small header, so reading them is a copy: about 20x less
    work than PIL's decoder, with identical output. Any other TIFF (compressed, 16-bit, gray,
    planar, strips out of order, a header that lies) returns None and goes through PIL.
    """
    if len(data) < 8 or data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    expected = size * size * 3
    end = "<" if data[:2] == b"II" else ">"
    view = memoryview(data)  # tag values are read in place: a hostile header costs no copies
    try:
        (ifd,) = struct.unpack_from(end + "I", data, 4)
        (count,) = struct.unpack_from(end + "H", data, ifd)
        tags: dict[int, list[int]] = {}
        for i in range(count):
            tag, typ, n, value = struct.unpack_from(end + "HHI4s", data, ifd + 2 + 12 * i)
            if typ not in _TIFF_TYPES:
                continue
            code, width = _TIFF_TYPES[typ]
            if n > 4 * expected:  # no tag of a patch holds more values than it has bytes
                return None
            where = value if n * width <= 4 else view[struct.unpack(end + "I", value)[0]:][:n * width]
            tags[tag] = list(struct.unpack_from(f"{end}{n}{code}", where))
    except struct.error:
        return None
    simple = (tags.get(_WIDTH) == [size] and tags.get(_HEIGHT) == [size] and tags.get(_BITS) == [8, 8, 8]
              and tags.get(_COMPRESSION) == [1] and tags.get(_PHOTOMETRIC) == [2] and tags.get(_SAMPLES) == [3]
              and tags.get(_PLANAR, [1]) == [1] and tags.get(_SAMPLE_FORMAT, [1, 1, 1]) == [1, 1, 1])
    offsets, counts = tags.get(_STRIP_OFFSETS, []), tags.get(_STRIP_BYTES, [])
    if not simple or not offsets or len(offsets) != len(counts) or sum(counts) != expected:
        return None
    start = pos = offsets[0]
    for offset, n in zip(offsets, counts, strict=True):
        if offset != pos:
            return None  # strips not back to back: let PIL assemble them
        pos += n
    if pos > len(data):
        return None
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=start).reshape(size, size, 3)


def _on_glass(im: Image.Image) -> tuple[Image.Image, str]:
    """An image with transparency as RGB over white, and the note that says what was done.

    Dropping the alpha channel (PIL's ``convert("RGB")``) leaves whatever colour the transparent
    pixels hold, often black: dark pixels scored as if they were tissue.
    """
    rgba = im.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"))
    if alpha.min() == 255:
        return rgba.convert("RGB"), f"converted {im.mode} to RGB"
    # One wording for every such patch (no share of pixels): the manifest counts notes alike.
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return (Image.alpha_composite(white, rgba).convert("RGB"),
            f"converted {im.mode} to RGB; transparent pixels shown over white (glass)")


def slide_hint(fmt: str) -> str:
    """What to do with an image too large to be a patch: OpenSlide tiles TIFFs, not PNG or JPEG."""
    if fmt == "TIFF":
        return "a whole-slide image? hcd score --slides tiles it"
    return "a slide region? saved as a tiled TIFF, hcd score --slides tiles it"


def decode_patch(data: bytes | None, *, size: int = PATCH_SIZE, resize: bool = False) -> Decoded:
    """Decode encoded image bytes to a ``size x size x 3`` uint8 RGB array.

    Grayscale, RGBA and palette images are converted to RGB with a note. A patch of another
    size is an error unless ``resize`` is true.
    """
    if not data:
        return Decoded(None, "empty file (0 bytes)", None)
    raw = raw_tiff_pixels(data, size)
    if raw is not None:
        return Decoded(raw, None, None)
    try:
        with warnings.catch_warnings():
            # PIL warns (rather than raises) on mildly oversized images; we check ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # lazy: only the header is parsed here
                if im.format not in ALLOWED_FORMATS:
                    return Decoded(None, f"unsupported image format {im.format}", None)
                w, h = im.size
                if w * h > MAX_PIXELS:
                    return Decoded(None, f"image is {w}x{h}: too large to be a patch, not decoded "
                                         f"({slide_hint(im.format)})", None)
                if (w, h) != (size, size) and not resize:
                    # --resize changes the tissue's scale as well as the size: named, never assumed
                    hint = (slide_hint(im.format) if max(w, h) >= SLIDE_EDGE
                            else f"hcd score --resize scales it to {size}x{size}")
                    return Decoded(None, f"image is {w}x{h}, expected {size}x{size} ({hint})", None)
                if im.mode not in CONVERTIBLE_MODES and im.mode not in SIXTEEN_BIT_GRAY:
                    return Decoded(None, f"pixel format {im.mode} cannot be converted to 8-bit RGB faithfully "
                                         "(convert the patch to 8-bit RGB)", None)
                # PIL reads 16-bit RGB as RGB, keeping each value's high byte: say so, as for gray.
                wide_rgb = im.mode == "RGB" and any(";16" in str(t.args[0]) for t in im.tile if t.args)
                im.load()
                notes = ["scaled 16-bit RGB to 8 bits"] if wide_rgb else []
                if im.mode in SIXTEEN_BIT_GRAY:
                    # PIL's convert() clips 16-bit values at 255 (a white patch); scale the full range.
                    wide = np.asarray(im).astype(np.uint32)
                    im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
                    notes.append("scaled 16-bit grayscale to 8 bits")
                if im.mode in ALPHA_MODES or "transparency" in im.info:  # (a palette or RGB PNG with a tRNS key)
                    im, note = _on_glass(im)
                    notes.append(note)
                elif im.mode != "RGB":
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


def _objects(col: pa.ChunkedArray) -> np.ndarray:
    """An Arrow column as a numpy object array (None for nulls), the batch format Ray Data carries."""
    return np.array(col.to_pylist(), dtype=object) if col.null_count else col.to_numpy(zero_copy_only=False)


def stored_pixels(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """``(present, pixels)`` of a ``pixels`` column (fixed-size binary): a reshape, no copy, no decode."""
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()  # combine_chunks copies even one chunk
    n = len(arr)
    present = np.ones(n, dtype=bool) if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
    flat = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=(arr.offset + n) * PIXEL_BYTES)
    return present, flat[arr.offset * PIXEL_BYTES:].reshape(n, PATCH_SIZE, PATCH_SIZE, 3)


def decode_table(t: pa.Table, *, resize: bool = False) -> dict:
    """Decode a chunk as :meth:`~hcdlib.sources.chunks.PatchChunk.rows` returns it (:func:`decode_batch` format).

    Rows ``hcd pack`` stored as pixels cost a reshape, for the whole chunk at once; only rows
    that hold encoded images (JPEG, or anything not packed) are decoded one by one.
    """
    n = t.num_rows
    names = t.column_names
    out = {c: _objects(t[c]) for c in names if c not in ("image", "pixels", "error", "note")}
    if "pixels" in names and t["pixels"].null_count < n:
        present, stored = stored_pixels(t["pixels"])
        pixels = stored.copy() if present.all() else np.where(present[:, None, None, None], stored, 0)
    else:  # (allocated only here: zeros for a packed chunk cost as much as its copy)
        present = np.zeros(n, dtype=bool)
        pixels = np.zeros((n, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
    status = np.full(n, "ok", dtype=object)
    errors = np.full(n, None, dtype=object)
    notes = _objects(t["note"]) if "note" in names else np.full(n, None, dtype=object)
    rest = np.flatnonzero(~present)
    if len(rest):
        idx = pa.array(rest)
        read_errors = _objects(t["error"].take(idx)) if "error" in names else np.full(len(rest), None, object)
        decoded = decode_batch({"id": out["id"][rest], "image": _objects(t["image"].take(idx)),
                                "error": read_errors}, resize=resize)
        for name, dst in (("pixels", pixels), ("status", status), ("error", errors), ("note", notes)):
            dst[rest] = decoded[name]
    out.update(pixels=pixels, status=status, error=errors, note=notes)
    return out


def store_pixels(images: list[bytes | None]) -> tuple[list[bytes | None], list[bytes | None], list[str | None]]:
    """What ``hcd pack`` keeps of each encoded image: ``(image, pixels, note)``.

    A patch that decodes is stored as its pixels (scoring then costs a reshape, and the pixels
    are exactly what decoding gives). JPEGs stay encoded (their bytes are 5x smaller than the
    pixels), and so does anything that does not decode, so that scoring reports its error row.
    """
    kept, raw, notes = [], [], []
    for data in images:
        res = decode_patch(data) if data and not data.startswith(b"\xff\xd8") else None
        if res is None or res.pixels is None:
            kept.append(data), raw.append(None), notes.append(None)
        else:
            kept.append(None), raw.append(res.pixels.tobytes()), notes.append(res.note)
    return kept, raw, notes
