import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from hcdlib.sources.decode import decode_batch, decode_patch


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
    (_encode(np.zeros((64, 80, 3), np.uint8), "PNG"), "image is 80x64, expected 96x96 (hcd score --resize scales"),
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
    # a PNG: OpenSlide tiles TIFFs only (the 20000 px header is PIL's own decompression-bomb refusal)
    assert side > 5000 or res.error.endswith("(a slide region? saved as a tiled TIFF, hcd score --slides tiles it)")


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


def test_transparent_pixels_are_glass_not_their_hidden_colour():
    """Dropping alpha left the colour under transparent pixels (black here): dark 'tissue' no one scanned."""
    rgba = np.dstack([RGB, np.full((96, 96), 255, np.uint8)])
    rgba[:, :48] = 0  # the left half: transparent, black beneath
    res = decode_patch(_encode(Image.fromarray(rgba), "PNG"))
    assert res.error is None and res.note == "converted RGBA to RGB; transparent pixels shown over white (glass)"
    assert (res.pixels[:, :48] == 255).all()
    np.testing.assert_array_equal(res.pixels[:, 48:], RGB[:, 48:])
    # a palette PNG with a transparent entry (tRNS) is the same case
    pal = Image.fromarray(RGB).convert("P")
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])
    res = decode_patch(_encode(pal, "PNG"))
    assert res.note == "converted P to RGB; transparent pixels shown over white (glass)"
    assert (res.pixels[0, 0] == 255).all()


def test_an_image_the_size_of_a_slide_names_slides():
    big = decode_patch(_encode(np.zeros((1200, 1000, 3), np.uint8), "PNG"))
    assert big.error == ("image is 1000x1200, expected 96x96 (a slide region? saved as a tiled TIFF, hcd score "
                         "--slides tiles it)")  # OpenSlide reads tiled TIFFs, not PNG
    tif = decode_patch(_encode(np.zeros((1200, 1000, 3), np.uint8), "TIFF"))
    assert tif.error == "image is 1000x1200, expected 96x96 (a whole-slide image? hcd score --slides tiles it)"
    assert (decode_patch(_encode(np.zeros((128, 128, 3), np.uint8), "PNG")).error
            == "image is 128x128, expected 96x96 (hcd score --resize scales it to 96x96)")


def test_resize_only_when_asked():
    data = _encode(np.zeros((192, 192, 3), np.uint8), "PNG")
    assert decode_patch(data).error == "image is 192x192, expected 96x96 (hcd score --resize scales it to 96x96)"
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


def _mixed_rows() -> dict:
    """Encoded patches of every kind pack meets: lossless, RGBA, JPEG, junk, empty, unreadable."""
    rgba = np.dstack([RGB, np.full((96, 96), 255, np.uint8)])
    return {
        "id": ["tif", "rgba", "jpg", "junk", "empty", "gone"],
        "image": [_encode(RGB), _encode(rgba, "PNG"), _encode(RGB, "JPEG", quality=75), b"junk", b"", None],
        "error": [None, None, None, None, None, "cannot read /x/gone.tif: denied"],
    }


def test_pack_stores_decodable_patches_as_their_pixels_and_keeps_the_rest_encoded():
    from hcdlib.sources.decode import store_pixels

    rows = _mixed_rows()
    image, pixels, note = store_pixels(rows["image"])
    assert [p is not None for p in pixels] == [True, True, False, False, False, False]
    assert image[:2] == [None, None] and image[2:] == rows["image"][2:]  # JPEG, junk, empty, missing stay as they were
    np.testing.assert_array_equal(np.frombuffer(pixels[0], np.uint8).reshape(96, 96, 3), RGB)
    assert note[:2] == [None, "converted RGBA to RGB"]


def test_stored_pixels_decode_exactly_as_the_encoded_patches_did():
    """A chunk read from a pack (pixels for some rows, bytes for others) gives what decoding the files gave."""
    import pyarrow as pa

    from hcdlib.sources.decode import PIXEL_BYTES, decode_table, store_pixels

    rows = _mixed_rows()
    direct = decode_batch({k: np.array(v, dtype=object) for k, v in rows.items()})
    image, pixels, note = store_pixels(rows["image"])
    table = pa.table({"id": rows["id"], "image": pa.array(image, pa.binary()),
                      "pixels": pa.array(pixels, pa.binary(PIXEL_BYTES)), "note": pa.array(note, pa.string()),
                      "label": pa.array([1, 0, None, 1, 0, 1], pa.int64()), "error": rows["error"]})
    for t in (table, table.slice(1), pa.concat_tables([table.slice(0, 2), table.slice(2)])):  # offsets, chunks
        k = 6 - t.num_rows
        out = decode_table(t)
        np.testing.assert_array_equal(out["pixels"], direct["pixels"][k:])
        assert list(out["status"]) == list(direct["status"][k:])
        assert list(out["error"]) == list(direct["error"][k:])
        assert list(out["note"]) == list(direct["note"][k:])
        assert list(out["label"]) == [1, 0, None, 1, 0, 1][k:] and "image" not in out


@pytest.mark.parametrize("writer", ["pil", "pil-strips", "tifffile", "tifffile-bigendian"])
def test_uncompressed_rgb_tiff_is_read_as_its_pixels_exactly_as_pil_decodes_it(writer, tmp_path):
    import tifffile

    from hcdlib.sources.decode import raw_tiff_pixels

    path = tmp_path / "p.tif"
    if writer.startswith("pil"):
        Image.fromarray(RGB).save(path, format="TIFF", **({"rowsperstrip": 7} if writer == "pil-strips" else {}))
    else:
        tifffile.imwrite(path, RGB, byteorder=">" if writer.endswith("bigendian") else "<", photometric="rgb")
    data = path.read_bytes()
    fast = raw_tiff_pixels(data)
    assert fast is not None  # the fast path took it
    with Image.open(io.BytesIO(data)) as im:
        np.testing.assert_array_equal(fast, np.asarray(im.convert("RGB")))
    np.testing.assert_array_equal(decode_patch(data).pixels, RGB)


@pytest.mark.parametrize("variant", ["lzw", "gray", "rgba", "size", "truncated", "planar"])
def test_other_tiffs_go_through_pil(variant, tmp_path):
    import tifffile

    from hcdlib.sources.decode import raw_tiff_pixels

    path = tmp_path / "p.tif"
    if variant == "lzw":
        Image.fromarray(RGB).save(path, format="TIFF", compression="tiff_lzw")
    elif variant == "gray":
        Image.fromarray(RGB[..., 0]).save(path, format="TIFF")
    elif variant == "rgba":
        Image.fromarray(np.dstack([RGB, RGB[..., :1]])).save(path, format="TIFF")
    elif variant == "size":
        Image.fromarray(RGB[:64]).save(path, format="TIFF")
    elif variant == "planar":
        tifffile.imwrite(path, np.moveaxis(RGB, -1, 0), photometric="rgb", planarconfig="separate")
    else:
        Image.fromarray(RGB).save(path, format="TIFF")
        path.write_bytes(path.read_bytes()[:5000])
    data = path.read_bytes()
    assert raw_tiff_pixels(data) is None
    res = decode_patch(data)
    if variant in ("lzw", "planar"):  # PIL decodes them, to the same pixels
        np.testing.assert_array_equal(res.pixels, RGB)
    else:
        assert res.pixels is None or res.note  # an error row, or converted with a note


def test_a_tiff_header_that_lies_is_refused_cheaply():
    """Tag counts of 2**31 or offsets past the end: the fast path says no, PIL gives the error row."""
    import struct
    import time

    from hcdlib.sources.decode import raw_tiff_pixels

    ifd = struct.pack("<H", 3) + b"".join(struct.pack("<HHII", tag, 4, 2**31, 8) for tag in (256, 273, 279))
    data = b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 64
    t0 = time.perf_counter()
    assert raw_tiff_pixels(data) is None and decode_patch(data).pixels is None
    assert time.perf_counter() - t0 < 1
