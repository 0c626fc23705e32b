"""Reading a pathologist's annotations: QuPath GeoJSON and ASAP XML, and what is refused."""

import json

import pytest
import shapely

from hcdlib.commands.evaluate.annotations import Classes, read_annotations
from hcdlib.config import OTHER_CLASSES, TUMOUR_CLASSES
from hcdlib.errors import UserError

CLASSES = Classes.parse(TUMOUR_CLASSES, OTHER_CLASSES)
SIZES = {"tumor_001": (10000, 8000), "normal_001": (10000, 8000), "a/s1": (5000, 5000)}


def asap(*shapes) -> str:
    """ASAP XML as Camelyon16 ships it: (group, type, [(x, y), ...]) per annotation."""
    anns = "".join(
        f'<Annotation Name="Annotation {i}" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58"><Coordinates>'
        + "".join(f'<Coordinate Order="{j}" X="{x}" Y="{y}" />' for j, (x, y) in enumerate(pts))
        + "</Coordinates></Annotation>" for i, (group, kind, pts) in enumerate(shapes))
    return f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{anns}</Annotations></ASAP_Annotations>'


def qupath(*shapes) -> str:
    """A QuPath GeoJSON export: (class name or None, geometry dict) per feature."""
    feats = [{"type": "Feature", "geometry": g,
              "properties": {"objectType": "annotation", **({"classification": {"name": c}} if c else {})}}
             for c, g in shapes]
    return json.dumps({"type": "FeatureCollection", "features": feats})


def square(x, y, s):
    return [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]


def test_asap_and_geojson_give_the_tumour_less_its_exclusions(tmp_path):
    (tmp_path / "tumor_001.xml").write_text(asap(("_0", "Polygon", square(1000, 1000, 2000)),
                                                 ("_2", "Polygon", square(1500, 1500, 500)),
                                                 ("_1", "Spline", square(6000, 6000, 1000))))
    (tmp_path / "a").mkdir()
    ring = [list(p) for p in square(100, 100, 400)] + [[100, 100]]
    (tmp_path / "a" / "s1.geojson").write_text(qupath(("Tumor", {"type": "Polygon", "coordinates": [ring]}),
                                                      ("Stroma", {"type": "Polygon", "coordinates": [ring]})))
    truths = read_annotations(str(tmp_path), SIZES, CLASSES)
    assert truths["tumor_001"].tumour.area == pytest.approx(2000**2 - 500**2 + 1000**2)
    assert not shapely.contains_xy(truths["tumor_001"].tumour, 1700, 1700)  # inside the _2 exclusion
    assert truths["a/s1"].tumour.is_empty  # stroma drawn over the tumour cuts it out
    assert truths["normal_001"].tumour.is_empty and truths["normal_001"].file is None  # no file: no tumour


@pytest.mark.parametrize("name, body, words", [
    ("tumor_001.geojson", qupath(("Tumor", {"type": "Point", "coordinates": [5, 5]})), "a Point, not a polygon"),
    ("tumor_001.xml", asap(("_0", "Dot", [(5, 5)])), "a Dot, not a polygon"),
    ("tumor_001.xml", asap(("_0", "Polygon", [(5, 5), (6, 6)])), "not a polygon"),
    ("tumor_001.geojson", qupath(("Lymphocyte", {"type": "Polygon", "coordinates": [[*square(1, 1, 9), (1, 1)]]})),
     "class 'Lymphocyte' is neither"),
    ("tumor_001.geojson", qupath((None, {"type": "Polygon", "coordinates": [[*square(1, 1, 9), (1, 1)]]})),
     "class '(none)'"),
    ("tumor_001.xml", asap(("_0", "Polygon", square(9500, 100, 800))), "lie outside slide tumor_001 (10000x8000"),
    ("tumor_999.xml", asap(("_0", "Polygon", square(1, 1, 9))), "names no slide of the predictions"),
    ("tumor_001.xml", "<ASAP_Annotations><Annotations>", "not XML"),
    ("tumor_001.geojson", "{not json", "not JSON"),
])
def test_bad_annotations_are_refused_naming_the_file_and_why(tmp_path, name, body, words):
    (tmp_path / name).write_text(body)
    with pytest.raises(UserError, match=None) as e:
        read_annotations(str(tmp_path), SIZES, CLASSES)
    assert name in str(e.value) and words in str(e.value)


def test_two_files_for_one_slide_and_an_empty_folder_are_refused(tmp_path):
    (tmp_path / "tumor_001.xml").write_text(asap(("_0", "Polygon", square(1, 1, 9))))
    (tmp_path / "tumor_001.geojson").write_text(qupath())
    with pytest.raises(UserError, match="a second annotation file for slide tumor_001"):
        read_annotations(str(tmp_path), SIZES, CLASSES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no annotation files"):
        read_annotations(str(tmp_path / "empty"), SIZES, CLASSES)


def test_class_lists_match_case_insensitively_with_globs():
    c = Classes.parse("Tumor, metastas*", "region*")
    assert c.kind("TUMOR") == "tumour" and c.kind("Metastases") == "tumour"
    assert c.kind("Region 3") == "other" and c.kind("Stroma") is None
