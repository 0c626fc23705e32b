"""Pixel formats scaled or refused, never clipped; slide ids unique per input."""

import io

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from hcdlib.model.artifact import load_model
from hcdlib.model.infer import infer_batch
from hcdlib.model.transforms import Preprocess
from hcdlib.sources.decode import decode_patch
from hcdlib.sources.slides.plan import slide_id_of


def _tif(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def test_16_bit_and_float_patches_are_scaled_or_refused_never_clipped(synth_small, any_model):
    rgb = decode_patch(sorted(synth_small.glob("*.tif"))[0].read_bytes()).pixels
    gray8 = np.asarray(Image.fromarray(rgb).convert("L"))
    as16 = decode_patch(_tif(gray8.astype(np.uint16) * 257))
    as8 = decode_patch(_tif(gray8))
    assert as16.error is None and "scaled 16-bit grayscale" in as16.note
    np.testing.assert_array_equal(as16.pixels, as8.pixels)
    rgb16 = decode_patch(_tif(rgb.astype(np.uint16) * 257))  # 16 bits per channel: PIL scales it itself
    np.testing.assert_array_equal(rgb16.pixels, rgb)
    assert rgb16.note == "scaled 16-bit RGB to 8 bits" and decode_patch(_tif(rgb)).note is None
    for arr, mode in ((gray8.astype(np.float32) / 255, "F"), (gray8.astype(np.int32) * 1000, "I")):
        res = decode_patch(_tif(arr))
        assert res.pixels is None and f"pixel format {mode} cannot be converted" in res.error
    model, meta = load_model(str(any_model))
    pre = Preprocess.from_dict(meta["preprocess"])
    p = infer_batch(model, np.stack([as8.pixels, as16.pixels, rgb16.pixels, rgb]), device=torch.device("cpu"),
                    preprocess=pre)
    assert p[0] == pytest.approx(p[1], abs=1e-6) and p[2] == pytest.approx(p[3], abs=1e-6)


def test_slide_ids_are_unique_per_input():
    assert slide_id_of("/d/a/s1.svs", "/d") == "a/s1"
    assert slide_id_of("/d/b/s1.svs", "/d") == "b/s1"
    assert slide_id_of("/d/s2.tif", "/d") == "s2"
    assert slide_id_of("/d/only.svs", "/d/only.svs") == "only"
    assert slide_id_of("bucket/x/a/s1.svs", "bucket/x") == "a/s1"
