import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hcdlib.commands.score.run import ScoreConfig, score
from hcdlib.commands.synth_slides import synth_slide_pixels, write_slide_tiff
from hcdlib.errors import UserError
from hcdlib.outputs.readers import read_predictions, write_submission
from hcdlib.outputs.runfolder import read_manifest
from hcdlib.sources.slides.plan import SATURATION_RANGE, plan_level, tissue_mask, tissue_tiles
from hcdlib.sources.slides.source import PCAM_MPP

T = 96  # tile edge at PCam resolution
COLS, ROWS = 8, 6
BLANK_COLS = 2  # glass on the left: no tissue, no tiles
TUMOUR = {(r, c) for r in (1, 2, 3) for c in (4, 5, 6)}


def _canvas(seed: int = 4) -> np.ndarray:
    return synth_slide_pixels(COLS, ROWS, seed=seed, blank_cols=BLANK_COLS, tumour=TUMOUR)


def _write_slide(path: Path, img: np.ndarray, mpp: float | None) -> None:
    write_slide_tiff(str(path), img, mpp=mpp)


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slides")
    img = _canvas()
    _write_slide(d / "s1_pcam_res.tif", img, PCAM_MPP)
    # the same tissue scanned at twice the resolution: tiles are 192 level-0 px, read at level 1
    _write_slide(d / "s2_double_res.tif", img.repeat(2, axis=0).repeat(2, axis=1), PCAM_MPP / 2)
    (d / "s3_corrupt.tif").write_bytes(b"II*\x00" + b"\x00garbage" * 100)
    _write_slide(d / "s4_no_mpp.tif", img, None)
    return d


def test_level_choice_from_mpp():
    p = plan_level(0.243, [1.0, 4.0, 16.0])  # a 40x scan
    assert (p.tile_size, p.level, p.read_size) == (384, 1, 96)
    p = plan_level(0.25, [1.0, 4.0, 16.0])  # 384 px would be 0.96 um: level 1 is slightly too coarse
    assert (p.tile_size, p.level, p.read_size) == (373, 0, 373)
    p = plan_level(PCAM_MPP, [1.0, 2.0])
    assert (p.tile_size, p.level, p.read_size) == (96, 0, 96)
    p = plan_level(0.5, [1.0, 2.0, 4.0])
    assert (p.tile_size, p.level, p.read_size) == (187, 0, 187)


def test_the_model_artifact_sets_the_resolution_tiles_are_cut_at(tmp_path):
    """A model trained at 0.5 um/px (20x) gets 96 px tiles of 48 um, with no code change; a resolution is required."""
    import torch

    from hcdlib.model.artifact import export_model, read_meta
    from hcdlib.model.transforms import Preprocess

    pre20x = Preprocess(mpp=0.5)
    export_model(torch.nn.Linear(1, 1), str(tmp_path / "m"), arch="resnet18", preprocess=pre20x)
    saved = Preprocess.from_dict(read_meta(str(tmp_path / "m"))["preprocess"])
    assert saved == pre20x
    p = plan_level(0.25, [1.0, 2.0, 4.0], target_mpp=saved.mpp)  # a 40x scan: level 1 is exactly 20x
    assert (p.tile_size, p.level, p.read_size) == (192, 1, 96)
    old = {k: v for k, v in pre20x.to_dict().items() if k != "mpp"}  # a model.json without its resolution
    with pytest.raises(KeyError, match="mpp"):
        Preprocess.from_dict(old)


def test_tissue_mask_finds_tissue_not_glass():
    img = _canvas()
    mask = tissue_mask(img)
    assert mask[:, : BLANK_COLS * T].mean() < 0.01
    assert mask[:, BLANK_COLS * T:].mean() > 0.8


def test_tissue_mask_saturation_is_hsv_saturation_in_float64():
    """The uint8 shortcut gives the same mask as HSV saturation computed in float64 throughout."""
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(3)
    two_tone = np.zeros((5, 5, 3), np.uint8)
    two_tone[..., 0], two_tone[..., 2] = 200, 255
    for img in (_canvas(), rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), np.zeros((9, 7, 3), np.uint8), two_tone):
        rgb = img.astype(np.float64)
        top = rgb.max(axis=-1)
        sat = np.divide(top - rgb.min(axis=-1), top, out=np.zeros_like(top), where=top > 0)
        t = threshold_otsu(sat) if np.ptp(sat) > 1e-6 else 1.0
        assert np.array_equal(tissue_mask(img), sat > min(max(t, SATURATION_RANGE[0]), SATURATION_RANGE[1]))


@pytest.mark.parametrize("seed", range(6))
def test_tissue_tiles_are_the_grid_cells_with_enough_tissue(seed):
    """The summed-area table picks exactly the tiles whose mask pixels (at least one) reach the share."""
    rng = np.random.default_rng(seed)
    (w, h), tile = (int(v) for v in rng.integers(400, 9000, 2)), int(rng.integers(40, 400))
    mask = rng.random((int(rng.integers(8, 120)), int(rng.integers(8, 120)))) < rng.random()
    thr = float(rng.choice([0.0, 0.1, 0.5, 0.7, 1.0]))
    xs, ys = tissue_tiles(mask, width=w, height=h, tile=tile, threshold=thr)
    sy, sx = mask.shape[0] / h, mask.shape[1] / w
    want = [(x, y) for y in range(0, h - tile + 1, tile) for x in range(0, w - tile + 1, tile)
            if mask[int(y * sy):max(int((y + tile) * sy), int(y * sy) + 1),
                    int(x * sx):max(int((x + tile) * sx), int(x * sx) + 1)].mean() >= thr]
    assert list(zip(xs, ys, strict=True)) == want  # same tiles, row by row


def test_prob_raster_takes_the_tile_under_each_pixel():
    from hcdlib.sources.slides.maps import prob_raster

    rows = [{"x": c * T, "y": r * T, "tile_size": T, "prob": 0.1 * (r * 3 + c), "status": "ok"}
            for r in range(2) for c in range(3) if (r, c) != (1, 2)]
    rows.append({"x": 2 * T, "y": T, "tile_size": T, "prob": 0.9, "status": "error"})  # failed: not drawn
    img = prob_raster(rows, width=4 * T, height=2 * T, shape=(4, 8))  # 2 px per tile, a 4th column of glass
    for r in range(2):
        for c in range(4):
            block = img[2 * r:2 * r + 2, 2 * c:2 * c + 2]
            if c == 3 or (r, c) == (1, 2):
                assert np.isnan(block).all()
            else:
                assert np.allclose(block, 0.1 * (r * 3 + c))


def _png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])


def _check_geojson(gj: dict, rows: pd.DataFrame, *, tile: int, tumour_tiles: int, size: tuple[int, int]) -> None:
    """QuPath GeoJSON: merged tumour regions (annotations) and one detection per scored tile."""
    import shapely
    from shapely.geometry import shape

    assert gj["type"] == "FeatureCollection"
    kinds = [f["properties"]["objectType"] for f in gj["features"]]
    regions = [shape(f["geometry"]) for f in gj["features"] if f["properties"]["objectType"] == "annotation"]
    tiles = [(shape(f["geometry"]), f["properties"]) for f in gj["features"]
             if f["properties"]["objectType"] == "detection"]
    assert kinds.count("detection") == len(rows) and regions  # every scored tile, and some tumour
    probs = {(int(r.x), int(r.y)): r.prob for r in rows.itertuples()}
    for geom, props in tiles:
        x0, y0, x1, y1 = geom.bounds
        assert (x1 - x0, y1 - y0) == (tile, tile) and geom.area == tile * tile  # level-0 pixels
        assert props["measurements"]["P(tumour)"] == pytest.approx(probs[(int(x0), int(y0))], abs=1e-4)
        assert x0 >= 0 and x1 <= size[0] and y0 >= 0 and y1 <= size[1]
    hot = shapely.unary_union([g for g, p in tiles if p["classification"]["name"] == "Tumor"])
    merged = shapely.unary_union(regions)
    assert merged.area == pytest.approx(tumour_tiles * tile * tile)  # regions = the tumour tiles, merged
    assert merged.symmetric_difference(hot).area == pytest.approx(0)
    assert len(regions) < tumour_tiles  # merged into polygons, not one square per tile


@pytest.mark.parametrize("aspect", [0.3, 1.0, 2.0, 6.0])
def test_heatmap_panels_take_the_slides_shape_and_fit_the_figure(aspect):
    """Placed by hand (constrained layout drew each figure twice): panels of the slide's aspect, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hcdlib.sources.slides.maps import _heatmap_axes

    fig, left, right, bar = _heatmap_axes(plt, aspect)
    try:
        w_in, h_in = fig.get_size_inches()
        boxes = [ax.get_position() for ax in (left, right, bar)]
        assert w_in <= 12.0 + 1e-9 and all(0 <= b.x0 < b.x1 <= 1 and 0 <= b.y0 < b.y1 <= 1 for b in boxes)
        for b in boxes[:2]:
            assert b.width * w_in / (b.height * h_in) == pytest.approx(aspect, rel=1e-6)
        assert boxes[0].x1 < boxes[1].x0 and boxes[1].x1 < boxes[2].x0  # slide, heatmap, colour bar
        assert boxes[1].y1 < 1 - 0.5 / h_in  # room above for the titles
    finally:
        plt.close(fig)


def test_tumour_regions_merge_tiles_into_polygons():
    from hcdlib.sources.slides.maps import geojson, tumour_regions

    def tile(c, r, p):
        return {"x": c * T, "y": r * T, "tile_size": T, "prob": p, "status": "ok"}

    ring = [tile(c, r, 0.9) for r in range(3) for c in range(3) if (c, r) != (1, 1)]  # a ring with a hole
    rows = [*ring, tile(1, 1, 0.1), tile(6, 0, 0.8), tile(8, 0, 0.2)]
    regions = sorted(tumour_regions(rows, threshold=0.5), key=lambda p: p.area)
    assert [p.area for p in regions] == [T * T, 8 * T * T]
    assert len(regions[1].interiors) == 1 and regions[1].interiors[0].envelope.area == T * T
    gj = geojson(rows, threshold=0.5)
    assert sum(f["properties"]["objectType"] == "detection" for f in gj["features"]) == len(rows)


@pytest.mark.parametrize("seed", range(4))
def test_tumour_regions_are_the_union_of_the_hot_tiles(seed):
    """Rows of tiles merged into rectangles first give the same regions as the tiles merged one by one."""
    import shapely

    from hcdlib.sources.slides.maps import tumour_regions

    rng = np.random.default_rng(seed)
    rows = [{"x": int(c) * t, "y": int(r) * t, "tile_size": t, "prob": float(rng.random()),
             "status": "ok" if rng.random() > 0.1 else "error"}
            for t in (T, 2 * T) for c, r in rng.integers(0, 20, (int(rng.integers(1, 300)), 2))]
    ok = [r for r in rows if r["status"] == "ok" and r["prob"] >= 0.4]
    want = shapely.unary_union([shapely.box(r["x"], r["y"], r["x"] + r["tile_size"], r["y"] + r["tile_size"])
                                for r in ok])
    got = tumour_regions(rows, threshold=0.4)
    assert len(got) == len(getattr(want, "geoms", [want]))
    union = shapely.unary_union(got)
    assert union.area == want.area and union.symmetric_difference(want).area == 0
    assert sorted(len(p.interiors) for p in got) == sorted(len(p.interiors) for p in getattr(want, "geoms", [want]))


def test_score_a_slide_archive(ray_session, model_dir, slide_dir, tmp_path):
    out = tmp_path / "out"
    m = score(ScoreConfig(model=str(model_dir), input=str(slide_dir), out=str(out), slides=True, chunk_size=16))
    t = read_predictions(str(out)).to_pandas()
    per = {s["slide_id"]: s for s in m["slides"]["per_slide"]}

    # an unreadable slide, and one without MPP, are one error row each; the rest completes
    for sid, msg in (("s3_corrupt", "cannot read"), ("s4_no_mpp", "no microns-per-pixel")):
        rows = t[t.slide_id == sid]
        assert len(rows) == 1 and rows.status.iloc[0] == "error"
        assert msg in rows.error.iloc[0] and sid in rows.error.iloc[0]
        assert per[sid]["status"] == "error"

    expected = {(c * T, r * T) for r in range(ROWS) for c in range(BLANK_COLS, COLS)}
    for sid, scale, level in (("s1_pcam_res", 1, 0), ("s2_double_res", 2, 1)):
        rows = t[t.slide_id == sid]
        assert (rows.status == "ok").all()
        coords = set(zip(rows.x // scale, rows.y // scale, strict=True))
        assert coords == expected  # every tissue tile once, none on glass
        assert len(rows) == len(set(rows.id)) == len(expected)
        assert (rows.tile_size == T * scale).all()
        assert per[sid]["level"] == level and per[sid]["tiles_scored"] == len(expected)
        tumour = rows.apply(lambda r, s=scale: (r.y // (T * s), r.x // (T * s)) in TUMOUR, axis=1)
        assert rows[tumour].prob.mean() > rows[~tumour].prob.mean() + 0.3
        assert per[sid]["max_prob"] == pytest.approx(rows.prob.max(), abs=1e-6)

        key = next(p.name[: -len(".geojson")] for p in (out / "slides").glob(f"{sid}-*.geojson"))
        gj = json.loads((out / "slides" / f"{key}.geojson").read_text())
        _check_geojson(gj, rows, tile=T * scale, tumour_tiles=per[sid]["tumour_tiles"],
                       size=(COLS * T * scale, ROWS * T * scale))
        heat = (out / "slides" / f"{key}.heatmap.png").read_bytes()
        thumb = (out / "slides" / f"{key}.thumbnail.png").read_bytes()
        assert heat[:4] == b"\x89PNG" and _png_size(heat)[0] > _png_size(thumb)[0]  # slide beside heatmap + bar

    summary = pd.read_csv(out / "slides" / "summary.csv")
    assert set(summary.slide_id) == {"s1_pcam_res", "s2_double_res", "s3_corrupt", "s4_no_mpp"}
    assert read_manifest(str(out))["rows"] == 2 * len(expected) + 2
    with pytest.raises(UserError, match="predictions of whole-slide tiles, and a Kaggle submission"):
        write_submission(str(out), str(tmp_path / "submission.csv"))
    for sid in ("s1_pcam_res", "s2_double_res"):  # every piece of tissue lies in a scored tile
        assert per[sid]["tissue_coverage"] >= 0.95 and per[sid]["width"] == COLS * T * (2 if "double" in sid else 1)
        assert per[sid]["scored_area_mm2"] == pytest.approx(len(expected) * (T * PCAM_MPP / 1000) ** 2, rel=1e-3)
    _evaluate_against_annotations(out, tmp_path)


def _evaluate_against_annotations(out: Path, tmp_path: Path) -> None:
    """The tumour cells of both slides drawn as a pathologist would: QuPath GeoJSON for one, ASAP XML for the other."""
    from hcdlib.commands.evaluate.metrics import EvalConfig, evaluate

    ann = tmp_path / "annotations"
    ann.mkdir()
    rows, cols = sorted({r for r, _ in TUMOUR}), sorted({c for _, c in TUMOUR})
    box = (cols[0] * T, rows[0] * T, (cols[-1] + 1) * T, (rows[-1] + 1) * T)
    ring = [[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]], [box[0], box[1]]]
    (ann / "s1_pcam_res.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}]}))
    coords = "".join(f'<Coordinate Order="{i}" X="{2 * x}" Y="{2 * y}" />' for i, (x, y) in enumerate(ring[:4]))
    (ann / "s2_double_res.xml").write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations><Annotation Name="Annotation 0" Type="Polygon" '
        f'PartOfGroup="_0" Color="#F4FA58"><Coordinates>{coords}</Coordinates></Annotation></Annotations>'
        "<AnnotationGroups/></ASAP_Annotations>")
    m = evaluate(EvalConfig(predictions=str(out), annotations=str(ann), out=str(tmp_path / "r"), bootstrap=20))
    assert m["unit"] == "tile" and m["patch"]["positives"] == 2 * len(TUMOUR) and m["patch"]["roc_auc"] > 0.8
    assert m["join"]["error_rows"] == 2 and m["slide"]["slides"] == 2  # the unreadable slides are not evaluated
    assert m["lesion"]["froc"]["lesions"] == 2 and m["lesion"]["froc"]["at_fp_rates"]["8.0"] == 1.0
    for sid in ("s1_pcam_res", "s2_double_res"):
        assert (tmp_path / "r" / "camelyon" / "detections" / f"{sid}.csv").stat().st_size > 0


def test_mpp_override_reads_a_slide_without_metadata(ray_session, model_dir, slide_dir, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(slide_dir / "s4_no_mpp.tif", one / "s4_no_mpp.tif")  # a link out of the input is refused
    m = score(ScoreConfig(model=str(model_dir), input=str(one), out=str(tmp_path / "o"), slides=True,
                          mpp=PCAM_MPP))
    assert m["errors"] == 0 and m["rows"] == (COLS - BLANK_COLS) * ROWS


def test_slides_on_s3_are_staged_and_scored(ray_session, model_dir, slide_dir, bucket, tmp_path):
    from conftest import upload_dir

    one = tmp_path / "s3slides"
    one.mkdir()
    (one / "s1_pcam_res.tif").write_bytes((slide_dir / "s1_pcam_res.tif").read_bytes())
    upload_dir(one, f"{bucket}/slides")
    m = score(ScoreConfig(model=str(model_dir), input=f"{bucket}/slides", out=f"{bucket}/out", slides=True))
    assert m["errors"] == 0 and m["rows"] == (COLS - BLANK_COLS) * ROWS
    t = read_predictions(f"{bucket}/out")
    assert set(t["source"].to_pylist()) == {f"{bucket}/slides/s1_pcam_res.tif"}
    assert not list(Path("/tmp").glob("hcd-slide-*"))  # staged copies are removed


@pytest.mark.parametrize(("scale", "level"), [(1, 0), (2, 1)])
def test_tiles_read_in_runs_equal_tiles_read_one_by_one(tmp_path, scale, level):
    """Reading a row of tiles with one call and cutting it gives each tile's own read_region, at level 0 and 1."""
    import openslide

    from hcdlib.commands.synth_slides import synth_slide_pixels, write_slide_tiff
    from hcdlib.sources.slides.plan import plan_slide
    from hcdlib.sources.slides.read import read_tiles, tile_chunks

    img = synth_slide_pixels(7, 3, seed=5, blank_cols=2)
    img = img.repeat(scale, axis=0).repeat(scale, axis=1)
    write_slide_tiff(str(tmp_path / "s.tif"), img, mpp=PCAM_MPP / scale)
    planned = plan_slide(str(tmp_path / "s.tif"), slide_id="s", out=str(tmp_path / "out"), mpp=None,
                         tissue_threshold=0.5)
    chunk = tile_chunks(planned, 1000)[0]
    assert chunk.plan.level == level and chunk.num_rows >= 10
    got = read_tiles(chunk)
    assert (got["status"] == "ok").all()
    with openslide.OpenSlide(str(tmp_path / "s.tif")) as s:
        for i, (x, y) in enumerate(zip(got["x"], got["y"], strict=True)):
            one = np.asarray(s.read_region((int(x), int(y)), level, (96, 96)).convert("RGB"))
            np.testing.assert_array_equal(got["pixels"][i], one)


def test_tile_runs_break_at_gaps_rows_and_length():
    from hcdlib.sources.slides.read import tile_runs

    xs = np.array([0, 96, 192, 384, 0, 96, 192, 288, 384])
    ys = np.array([0, 0, 0, 0, 96, 96, 96, 96, 96])
    assert tile_runs(xs, ys, 96) == [(0, 3), (3, 4), (4, 9)]
    assert tile_runs(xs, ys, 96, max_tiles=2) == [(0, 2), (2, 3), (3, 4), (4, 6), (6, 8), (8, 9)]


def test_a_slide_whose_resolution_is_a_default_dpi_is_an_error_row_not_a_million_tiles(tmp_path):
    """72 dpi (352.8 um/px) cut 1-px tiles: up to 1.3 million for this 1,152 px slide, each scored."""
    import tifffile

    from hcdlib.sources.slides.plan import plan_slide

    path = str(tmp_path / "s72.tif")
    with tifffile.TiffWriter(path) as t:
        t.write(synth_slide_pixels(12, 12, seed=1), tile=(256, 256), resolution=(72, 72), resolutionunit="INCH")
    planned = plan_slide(path, slide_id="s72", out=str(tmp_path / "o"), mpp=None, tissue_threshold=0.5)
    assert "its metadata says 352.8 microns per pixel, outside the 0.05-20 of a scan" in planned.error
    assert "pass --mpp" in planned.error and planned.xs == []
    given = plan_slide(path, slide_id="s72", out=str(tmp_path / "o"), mpp=PCAM_MPP, tissue_threshold=0.5)
    assert given.error is None and given.plan.tile_size == 96 and 0 < len(given.xs) <= 144


def test_a_tiff_in_strips_is_an_error_row_that_says_how_to_tile_it(tmp_path):
    """OpenSlide reads tiled TIFFs only; it refused one in strips as an 'Unsupported or missing image file'."""
    import tifffile

    from hcdlib.sources.slides.plan import plan_slide

    pixels = synth_slide_pixels(8, 8, seed=2)
    for name, tile in (("strips.tif", None), ("tiled.tif", (256, 256))):
        tifffile.imwrite(tmp_path / name, pixels, tile=tile, resolution=(1e4 / PCAM_MPP,) * 2,
                         resolutionunit="CENTIMETER")
    planned = plan_slide(str(tmp_path / "strips.tif"), slide_id="s", out=str(tmp_path / "o"), mpp=None,
                         tissue_threshold=0.5)
    assert "cannot read: Unsupported or missing image file; it is a TIFF stored in strips" in planned.error
    assert "vips tiffsave in.tif out.tif --tile --pyramid" in planned.error
    tiled = plan_slide(str(tmp_path / "tiled.tif"), slide_id="s", out=str(tmp_path / "o"), mpp=None,
                       tissue_threshold=0.5)
    assert tiled.error is None and tiled.plan.tile_size == 96 and len(tiled.xs) > 0
    (tmp_path / "not.tif").write_bytes(b"not an image")  # no hint where the file is no TIFF at all
    assert plan_slide(str(tmp_path / "not.tif"), slide_id="n", out=str(tmp_path / "o"), mpp=None,
                      tissue_threshold=0.5).error.endswith("cannot read: Unsupported or missing image file")


def test_slides_coarser_than_the_model_are_scored_with_a_warning(ray_session, tmp_path, caplog):
    import logging

    from hcdlib.sources.slides.plan import plan_slides

    path = str(tmp_path / "s.tif")
    write_slide_tiff(path, synth_slide_pixels(8, 8, seed=2), mpp=PCAM_MPP)
    caplog.set_level(logging.WARNING)
    fine = plan_slides([{"slide": path, "slide_id": "s"}], out=str(tmp_path / "o"), mpp=None, tissue_threshold=0.5)
    assert fine[0].error is None and "coarser" not in caplog.text
    coarse = plan_slides([{"slide": path, "slide_id": "s"}], out=str(tmp_path / "o"), mpp=2.0, tissue_threshold=0.5)
    assert coarse[0].error is None and coarse[0].plan.tile_size == 47  # 96 px at 0.972 um/px
    assert "1 slides are scanned coarser than the model's 0.972 um/px" in caplog.text and "2.1x" in caplog.text


def _tissue_chunk(tmp_path):
    """A clean slide, the chunk of all its tissue tiles, and the tiles it reads to."""
    from hcdlib.sources.slides.plan import plan_slide
    from hcdlib.sources.slides.read import read_tiles, tile_chunks

    path = tmp_path / "clean.tif"
    _write_slide(path, _canvas(), PCAM_MPP)
    planned = plan_slide(str(path), slide_id="s", out=str(tmp_path / "out"), mpp=None, tissue_threshold=0.5)
    chunk = tile_chunks(planned, 1000)[0]
    return path, chunk, read_tiles(chunk)


def _edit_tile(src, dst, tile: int, *, corrupt: bool) -> None:
    """Copy slide ``src`` to ``dst`` with level-0 TIFF tile ``tile`` (256 px, row-major) corrupt or missing."""
    import tifffile

    shutil.copy(src, dst)
    with tifffile.TiffFile(dst, mode="r+b") as f:
        page = f.pages[0]
        if corrupt:  # garbage where the zlib stream was
            offset, count = page.dataoffsets[tile], page.databytecounts[tile]
            f.filehandle.seek(offset)
            f.filehandle.write(b"\x00\xff" * (count // 2))
        else:  # a sparse TIFF: the tile is not stored at all, and OpenSlide reads it as transparent
            for name in ("TileOffsets", "TileByteCounts"):
                values = list(page.tags[name].value)
                values[tile] = 0
                page.tags[name].overwrite(values)


def _overlaps(xs, ys, x0: int, y0: int, side: int = 256) -> np.ndarray:
    return (xs < x0 + side) & (xs + T > x0) & (ys < y0 + side) & (ys + T > y0)


def test_a_corrupt_tile_in_a_slide_fails_only_the_tiles_over_it(tmp_path):
    """OpenSlide refuses every read on a handle after one failed: the whole chunk used to be error rows."""
    from dataclasses import replace

    from hcdlib.sources.slides.read import read_tiles

    clean, chunk, want = _tissue_chunk(tmp_path)
    _edit_tile(clean, tmp_path / "corrupt.tif", 4, corrupt=True)  # level-0 tile x, y = 256-512
    got = read_tiles(replace(chunk, slide=str(tmp_path / "corrupt.tif")))
    bad = _overlaps(got["x"], got["y"], 256, 256)
    assert 0 < bad.sum() < len(bad) - 10
    assert (got["status"][bad] == "error").all() and (got["status"][~bad] == "ok").all()
    x, y = got["x"][bad][0], got["y"][bad][0]
    assert f"corrupt.tif: cannot read the tile at x={x}, y={y}: " in got["error"][bad][0]
    np.testing.assert_array_equal(got["pixels"][~bad], want["pixels"][~bad])


def test_tile_pixels_outside_the_scanned_area_are_background_with_a_note(tmp_path):
    """A sparse slide's missing tile reads transparent: it was scored as black pixels, silently."""
    from dataclasses import replace

    from hcdlib.sources.slides.read import read_tiles

    clean, chunk, want = _tissue_chunk(tmp_path)
    assert (want["note"] == None).all()  # noqa: E711 (elementwise)
    _edit_tile(clean, tmp_path / "sparse.tif", 4, corrupt=False)
    got = read_tiles(replace(chunk, slide=str(tmp_path / "sparse.tif")))
    assert (got["status"] == "ok").all()
    xs, ys = got["x"], got["y"]
    hit = _overlaps(xs, ys, 256, 256)
    inside = (xs >= 256) & (xs + T <= 512) & (ys >= 256) & (ys + T <= 512)
    assert inside.sum() >= 1 and (hit & ~inside).sum() >= 1
    assert (got["pixels"][inside] == 255).all()  # the background (white, as in the thumbnail), not black
    assert all(n.startswith("100% of the tile lies outside the slide's scanned area") for n in got["note"][inside])
    partly = hit & ~inside
    assert all(n and not n.startswith("100%") for n in got["note"][partly])
    for i in np.flatnonzero(partly):  # each pixel: the clean tile's, or white where the TIFF tile is missing
        py, px = np.mgrid[ys[i]:ys[i] + T, xs[i]:xs[i] + T]
        gone = (px >= 256) & (px < 512) & (py >= 256) & (py < 512)
        np.testing.assert_array_equal(got["pixels"][i][gone], 255)
        np.testing.assert_array_equal(got["pixels"][i][~gone], want["pixels"][i][~gone])
    assert (got["note"][~hit] == None).all()  # noqa: E711
    np.testing.assert_array_equal(got["pixels"][~hit], want["pixels"][~hit])


def test_tiles_read_before_a_slide_breaks_are_kept(tmp_path, monkeypatch):
    """A slide that cannot be read any more (its staged copy gone) fails the tiles not yet read, not all."""
    from hcdlib.sources.slides import read as slides

    _clean, chunk, want = _tissue_chunk(tmp_path)
    real, calls = slides._SlideReader.read, []

    def breaks_after_two(self, *args):
        calls.append(args)
        if len(calls) > 2:
            raise OSError("the staged copy went away")
        return real(self, *args)

    monkeypatch.setattr(slides._SlideReader, "read", breaks_after_two)
    got = slides.read_tiles(chunk)
    ok = got["status"] == "ok"
    assert 0 < ok.sum() < len(ok)
    np.testing.assert_array_equal(got["pixels"][ok], want["pixels"][ok])
    assert all(e.endswith("cannot read tiles: the staged copy went away") for e in got["error"][~ok])


def test_the_background_colour_is_the_slides_own_and_white_where_unknown():
    """MIRAX and others name their background colour (hex); a missing or malformed value is white."""
    from types import SimpleNamespace

    from hcdlib.sources.slides.read import _background

    def slide(value):
        return SimpleNamespace(properties={} if value is None else {"openslide.background-color": value})

    assert _background(slide("F0E0D0")).tolist() == [240, 224, 208]
    for odd in (None, "", "xyz", "FFEEDDCC"):
        assert _background(slide(odd)).tolist() == [255, 255, 255]
