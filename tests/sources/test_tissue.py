"""Tissue found on slides: every piece of it in a scored tile, glass kept out, coverage reported."""

import io

import numpy as np
import pytest
from PIL import Image

from hcdlib.commands.synth_slides import coverage_of, synth_tissue_pixels, visible_tissue, write_slide_tiff
from hcdlib.config import TISSUE_THRESHOLD
from hcdlib.sources.decode import PCAM_MPP
from hcdlib.sources.slides.maps import heatmap_png, tissue_coverage
from hcdlib.sources.slides.plan import plan_slide, tissue_mask


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """A 2048 x 1536 px slide of ragged tissue, a third of it pale stroma, at PCam resolution."""
    img = synth_tissue_pixels(2048, 1536, seed=5)
    path = tmp_path_factory.mktemp("tissue") / "ragged.tif"
    write_slide_tiff(str(path), img, mpp=PCAM_MPP)
    return str(path), img


def test_scored_tiles_cover_the_visible_tissue_and_little_glass(ragged, tmp_path):
    path, img = ragged
    plan = plan_slide(path, slide_id="r", out=str(tmp_path), mpp=None)
    covered, glass = coverage_of(visible_tissue(img), plan.xs, plan.ys, plan.plan.tile_size)
    assert covered >= 0.95 and glass <= 0.25
    # Half a tile of tissue, as before, leaves the ragged edges unscored.
    strict = plan_slide(path, slide_id="r", out=str(tmp_path), mpp=None, tissue_threshold=0.5)
    assert coverage_of(visible_tissue(img), strict.xs, strict.ys, 96)[0] < covered and TISSUE_THRESHOLD < 0.5
    saved = np.asarray(Image.open(tmp_path / "slides" / f"{plan.key}.tissue.png"), bool)
    assert saved.shape[1] == 1024 and 0.3 < saved.mean() < 0.7  # the mask the summary measures against


def test_pale_stroma_is_tissue_and_specks_and_small_holes_are_cleaned():
    thumb = np.full((200, 200, 3), (238, 237, 240), np.uint8)
    thumb[20:120, 20:120] = (214, 120, 170)  # dense H&E
    thumb[120:180, 20:120] = (232, 211, 221)  # pale stroma (saturation 0.09)
    thumb[60:62, 60:62] = (238, 237, 240)  # a 2x2 hole in the tissue
    thumb[150:152, 170:172] = (90, 60, 90)  # a speck of dust on the glass
    mask = tissue_mask(thumb, tile_px=8)
    assert mask[125:175, 25:115].all() and mask[60:62, 60:62].all()  # pale kept, hole filled
    assert not mask[150:152, 170:172].any() and not mask[:, 130:].any()  # speck gone, glass out
    assert tissue_mask(thumb)[60:62, 60:62].sum() == 0  # tiles a pixel across: nothing to clean


def test_coverage_counts_tissue_under_scored_tiles_and_the_heatmap_outlines_the_rest():
    tissue = np.zeros((40, 40), bool)
    tissue[:, :20] = True  # the left half of a 400 x 400 px slide; tiles of 100 px
    rows = [{"x": 0, "y": y, "tile_size": 100, "prob": 0.2, "status": "ok"} for y in (0, 100, 200)]
    rows.append({"x": 0, "y": 300, "tile_size": 100, "prob": 0.0, "status": "error"})  # not scored
    assert tissue_coverage(tissue, rows, width=400, height=400) == pytest.approx(0.375)
    assert tissue_coverage(np.zeros((4, 4), bool), rows, width=400, height=400) is None
    thumb = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 230, np.uint8)).save(thumb, format="PNG")
    png = lambda t: np.asarray(Image.open(io.BytesIO(heatmap_png(thumb.getvalue(), rows, width=400,  # noqa: E731
                                                                  height=400, tissue=t))).convert("RGB"))
    lime = lambda im: ((im[..., 1] > 200) & (im[..., 0] < 100) & (im[..., 2] < 100)).sum()  # noqa: E731
    assert lime(png(tissue)) > 50 and lime(png(None)) == 0
