"""A pathologist's annotations of whole slides: QuPath GeoJSON and ASAP XML polygons in level-0 px.

    hcd evaluate --predictions runs/slides --annotations annotations/ --out runs/slides-report

One file per slide, named as the slide (``tumor_001.xml`` for ``tumor_001.tif``; a slide below
a sub-folder of the input, ``a/s1``, by ``a/s1.geojson`` or, when unique, ``s1.geojson``). A
polygon's class says what it outlines: tumour classes make the slide's tumour, the other known
classes (Camelyon16's ``_2``: normal tissue inside a tumour outline) are cut out of it. A slide
without a file is a slide without tumour, as Camelyon16 ships its normal slides. Every file is
read and checked before anything is computed; a bad one is refused naming the file and why.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import shapely

from hcdlib.errors import UserError
from hcdlib.storage.listing import list_files, printable

ANNOTATION_EXTS = (".geojson", ".json", ".xml")
# An annotation file is text a person drew: far below this. A larger one is not read into memory.
MAX_ANNOTATION_BYTES = 256 * 2**20
# Vertices may sit this many level-0 px outside the slide (tools round to the pixel grid).
EDGE_SLACK_PX = 1.0
# ASAP's shapes that outline an area; its Dot and PointSet mark points.
ASAP_AREAS = ("polygon", "spline", "rectangle")


@dataclass(frozen=True)
class SlideTruth:
    """One slide's annotated tumour (level-0 px; empty for a slide without tumour) and its file."""

    slide_id: str
    tumour: shapely.Geometry
    file: str | None


@dataclass(frozen=True)
class Classes:
    """Which annotation class names outline tumour and which other areas; case-insensitive, ``*`` globs."""

    tumour: tuple[str, ...]
    other: tuple[str, ...]

    @classmethod
    def parse(cls, tumour: str, other: str) -> Classes:
        """From the comma-separated ``--tumour-classes`` and ``--other-classes``."""
        split = lambda s: tuple(c.strip().lower() for c in s.split(",") if c.strip())  # noqa: E731
        return cls(split(tumour), split(other))

    def kind(self, name: str) -> str | None:
        """``tumour``, ``other`` or None for a class in neither list."""
        low = name.lower()
        for kind, pats in (("tumour", self.tumour), ("other", self.other)):
            if any(fnmatch.fnmatchcase(low, p) for p in pats):
                return kind
        return None


def _polygon(rings: list, where: str) -> shapely.Geometry:
    """A valid polygon from GeoJSON-style rings (outer first, then holes)."""
    try:
        poly = shapely.Polygon(rings[0], rings[1:])
    except (ValueError, TypeError, IndexError, shapely.errors.GEOSException) as exc:
        raise UserError(f"{where}: not a polygon ({exc}); annotations must outline areas") from None
    if poly.is_empty or poly.area <= 0:
        raise UserError(f"{where}: not a polygon (fewer than 3 distinct vertices or no area); annotations must "
                        "outline areas")
    return poly if poly.is_valid else shapely.make_valid(poly)  # a hand-drawn outline may cross itself


def _class_name(props: dict) -> str:
    c = props.get("classification")
    if isinstance(c, dict):
        return str(c.get("name") or "")
    return str(c or props.get("class") or "")


def read_geojson(data: bytes, where: str) -> list[tuple[str, shapely.Geometry, str]]:
    """(class, polygon, where) of each feature of a QuPath export (a FeatureCollection or list of features)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: not JSON ({exc}); export annotations from QuPath as GeoJSON") from None
    features = doc.get("features") if isinstance(doc, dict) and doc.get("type") == "FeatureCollection" else \
        [doc] if isinstance(doc, dict) else doc
    if not isinstance(features, list):
        raise UserError(f"{where}: not GeoJSON features; export annotations from QuPath as GeoJSON")
    out = []
    for i, f in enumerate(features):
        at = f"{where}: feature {i + 1}"
        geom = (f or {}).get("geometry") if isinstance(f, dict) else None
        kind = (geom or {}).get("type")
        if kind == "Polygon":
            polys = [_polygon(geom["coordinates"], at)]
        elif kind == "MultiPolygon":
            polys = [_polygon(rings, at) for rings in geom["coordinates"]]
        else:
            raise UserError(f"{at}: a {kind or 'feature without geometry'}, not a polygon; annotations must outline "
                            "areas")
        name = _class_name(f.get("properties") or {})
        out += [(name, p, at) for p in polys]
    return out


def read_asap(data: bytes, where: str) -> list[tuple[str, shapely.Geometry, str]]:
    """(group, polygon, where) of each annotation of an ASAP XML file (Camelyon16/17's format)."""
    try:
        root = ET.fromstring(data)  # expat: no external entities, entity expansion bounded
    except ET.ParseError as exc:
        raise UserError(f"{where}: not XML ({exc}); annotations are ASAP XML or QuPath GeoJSON") from None
    out = []
    for i, a in enumerate(root.iter("Annotation")):
        at = f"{where}: annotation {a.get('Name') or i + 1}"
        kind = (a.get("Type") or "").lower()
        if kind not in ASAP_AREAS:
            raise UserError(f"{at}: a {a.get('Type') or 'shape without a type'}, not a polygon; annotations must "
                            "outline areas")
        pts = sorted(a.iter("Coordinate"), key=lambda c: float(c.get("Order") or 0))
        try:
            ring = [(float(c.get("X")), float(c.get("Y"))) for c in pts]
        except (TypeError, ValueError):
            raise UserError(f"{at}: a coordinate without numeric X and Y") from None
        out.append((a.get("PartOfGroup") or "", _polygon([ring], at), at))
    return out


def slide_truth(file: str, shapes: list, slide_id: str, size: tuple[int, int], classes: Classes) -> SlideTruth:
    """The tumour of one slide: its tumour polygons less its other areas, checked against the slide's size."""
    width, height = size
    tumour, other = [], []
    for name, poly, at in shapes:
        kind = classes.kind(name)
        if kind is None:
            raise UserError(f"{at}: class {name or '(none)'!r} is neither a tumour class ({', '.join(classes.tumour)})"
                            f" nor another known class ({', '.join(classes.other)}); add it to --tumour-classes or "
                            "--other-classes")
        x0, y0, x1, y1 = poly.bounds
        if x0 < -EDGE_SLACK_PX or y0 < -EDGE_SLACK_PX or x1 > width + EDGE_SLACK_PX or y1 > height + EDGE_SLACK_PX:
            raise UserError(f"{at}: coordinates {x0:.0f},{y0:.0f} to {x1:.0f},{y1:.0f} lie outside slide {slide_id} "
                            f"({width}x{height} px at level 0); annotations must be in level-0 pixels of this slide")
        (tumour if kind == "tumour" else other).append(poly)
    geom = shapely.difference(shapely.union_all(tumour), shapely.union_all(other)) if tumour else shapely.Polygon()
    return SlideTruth(slide_id, geom, file)


def _match(rel: str, slide_ids: set[str], by_stem: dict[str, list[str]]) -> str | None:
    """The slide an annotation file at ``rel`` (below the folder, extension dropped) names."""
    for name in (rel, posixpath.splitext(rel)[0]):  # also "s1.svs.geojson"
        if name in slide_ids:
            return name
        hits = by_stem.get(posixpath.basename(name), [])
        if len(hits) == 1:
            return hits[0]
    return None


def read_annotations(folder: str, sizes: dict[str, tuple[int, int]], classes: Classes) -> dict[str, SlideTruth]:
    """Every slide's truth: from its file in ``folder``, else no tumour. ``sizes``: level-0 size per slide id."""
    listing = list_files(folder)
    files = [p for p in listing.files if p.lower().endswith(ANNOTATION_EXTS)]
    if not files:
        raise UserError(f"--annotations {folder}: no annotation files ({', '.join(ANNOTATION_EXTS)})")
    by_stem: dict[str, list[str]] = {}
    for s in sizes:
        by_stem.setdefault(posixpath.basename(s), []).append(s)
    found: dict[str, SlideTruth] = {}
    for path in files:
        where = printable(path)
        rel = posixpath.relpath(path, listing.root) if path != listing.root else os.path.basename(path)
        slide = _match(os.path.splitext(rel)[0], set(sizes), by_stem)
        if slide is None:
            raise UserError(f"{where}: names no slide of the predictions (slide ids e.g. {sorted(sizes)[:3]}); name "
                            "each annotation file as its slide, or drop it")
        if slide in found:
            raise UserError(f"{where}: a second annotation file for slide {slide} (the first: {found[slide].file})")
        if listing.fs.get_file_info(path).size > MAX_ANNOTATION_BYTES:
            raise UserError(f"{where}: over {MAX_ANNOTATION_BYTES >> 20} MiB, larger than annotations are")
        with listing.fs.open_input_stream(path) as f:
            data = f.read()
        shapes = read_asap(data, where) if path.lower().endswith(".xml") else read_geojson(data, where)
        found[slide] = slide_truth(where, shapes, slide, sizes[slide], classes)
    return {s: found.get(s, SlideTruth(s, shapely.Polygon(), None)) for s in sizes}
