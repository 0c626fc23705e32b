import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from hcdlib.decode import decode_batch, decode_patch


def _encode(arr_or_img, fmt="TIFF", **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression-bomb shaped file)."""
    data = bytearray(_encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    ihdr = 8 + 8  # signature, then length+type of IHDR
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:12 + 4 + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


RGB = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["TIFF", "PNG"])
def test_lossless_roundtrip(fmt):
    res = decode_patch(_encode(RGB, fmt))
    assert res.error is None and res.note is None
    np.testing.assert_array_equal(res.pixels, RGB)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty file"),
    (None, "empty file"),
    (b"this is not an image at all" * 10, "not an image"),
    (_encode(RGB, "TIFF")[:400], "cannot decode"),  # truncated
    (_encode(RGB, "JPEG")[:300], "cannot decode"),  # truncated JPEG
    (_encode(np.zeros((64, 80, 3), np.uint8), "PNG"), "image is 80x64, expected 96x96"),
    (_encode(np.zeros((96, 96, 3), np.uint8), "BMP"), "unsupported image format BMP"),
])
def test_bad_input_is_an_error_value(data, message):
    res = decode_patch(data)
    assert res.pixels is None
    assert message in res.error


@pytest.mark.parametrize("side", [5000, 20000])
def test_huge_header_is_refused_before_decoding(side):
    res = decode_patch(_png_with_header_size(side, side))
    assert res.pixels is None
    assert "too large to be a patch, not decoded" in res.error


@pytest.mark.parametrize(("img", "mode"), [
    (Image.fromarray(RGB[..., 0]), "L"),
    (Image.fromarray(np.dstack([RGB, np.full((96, 96), 255, np.uint8)])), "RGBA"),
    (Image.fromarray(RGB).convert("P"), "P"),
])
def test_non_rgb_converted_with_note(img, mode):
    res = decode_patch(_encode(img, "PNG"))
    assert res.error is None
    assert res.pixels.shape == (96, 96, 3) and res.pixels.dtype == np.uint8
    assert res.note == f"converted {mode} to RGB"


def test_resize_only_when_asked():
    data = _encode(np.zeros((192, 192, 3), np.uint8), "PNG")
    assert decode_patch(data).error == "image is 192x192, expected 96x96"
    res = decode_patch(data, resize=True)
    assert res.pixels.shape == (96, 96, 3) and "resized 192x192" in res.note


def test_decode_batch_never_raises_and_names_the_patch():
    batch = {
        "id": np.array(["good", "empty", "junk", "unreadable"], dtype=object),
        "image": np.array([_encode(RGB), b"", b"junk", None], dtype=object),
        "error": np.array([None, None, None, "cannot read /x/unreadable.tif: denied"], dtype=object),
    }
    out = decode_batch(batch)
    assert list(out["status"]) == ["ok", "error", "error", "error"]
    assert out["error"][0] is None
    assert out["error"][1].startswith("patch empty: empty file")
    assert out["error"][2].startswith("patch junk: cannot decode")
    assert out["error"][3] == "patch unreadable: cannot read /x/unreadable.tif: denied"
    np.testing.assert_array_equal(out["pixels"][0], RGB)
    assert not out["pixels"][1:].any()
    assert "image" not in out
