"""Labels: one reader of labels CSVs for every command, and the check that a source is labelled 0 or 1."""

from __future__ import annotations

import csv
import io
import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from hcdlib.sources.base import ID_EXTENSION, PARQUET, PatchSource
from hcdlib.storage import uri as urimod
from hcdlib.storage.listing import SourceError

log = logging.getLogger(__name__)


LABEL_VALUES = ("0", "1")


# Classes by name, as CAMELYON-derived data sets write them (any case): class folders beside 0/ and
# 1/, and labels beside 0 and 1.
CLASS_NAMES = {"normal": 0, "tumor": 1, "tumour": 1}


def read_labels(labels_uri: str, *, require_label: bool = True) -> pa.Table:
    """Read and check a labels CSV (``id,label`` plus optional ``slide_id`` / ``dup_group``).

    Labels are exactly 0 or 1 and every id appears once; anything else is refused before any
    work starts, naming the file, the row (1 = the header) and the value. An id may carry its
    file's extension (``abc.tif`` is ``abc``). Without
    ``require_label`` a CSV may carry only ids and slide ids (scoring).
    """
    try:
        raw = urimod.read_bytes(labels_uri)
    except OSError as exc:
        raise SourceError(f"{labels_uri}: cannot read labels CSV: {exc}") from exc
    names, delimiter = _csv_header(raw)
    try:
        table = pacsv.read_csv(io.BytesIO(raw), read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
                               parse_options=pacsv.ParseOptions(delimiter=delimiter),
                               convert_options=pacsv.ConvertOptions(
                                   column_types={c: pa.string() for c in LABEL_CSV_COLUMNS},
                                   strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        raise SourceError(f"{labels_uri}: not a readable CSV: {str(exc).splitlines()[0]}") from exc
    names = table.column_names
    if "id" not in names:
        raise SourceError(f"{labels_uri}: labels CSV needs an 'id' column, has {names}; its first line names the "
                          "columns (id,label[,slide_id]): add that line if the file starts with data")
    # An id is a file name without its extension; one written with it (abc.tif, as a listing of
    # the files gives it) names the same patch, and matched none: every patch went unlabelled.
    ids = pc.replace_substring_regex(pc.utf8_trim_whitespace(table["id"]), pattern=ID_EXTENSION, replacement="")
    blank = pc.equal(ids, "")
    if pc.any(blank).as_py():
        raise SourceError(f"{labels_uri}: row {first_true(blank) + 2}: empty id")
    counts = pc.value_counts(ids)
    dup = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(dup):
        first = dup[0]["values"].as_py()
        rows = [i + 2 for i in pc.indices_nonzero(pc.equal(ids, first)).to_pylist()[:3]]
        raise SourceError(f"{labels_uri}: {len(dup)} ids are listed more than once, e.g. {first!r} on rows "
                          f"{', '.join(map(str, rows))}; keep one row per id")
    table = table.set_column(names.index("id"), "id", ids)
    if "label" in names:
        # 0.0 and 1.0 are 0 and 1 (pandas writes a label column with a gap in it as floats); Normal and
        # Tumor are 0 and 1 too (CAMELYON16's reference table names its classes so), as class folders are
        label = pc.replace_substring_regex(pc.utf8_trim_whitespace(table["label"]), pattern=r"^([01])\.0*$",
                                           replacement=r"\1")
        for name, value in CLASS_NAMES.items():
            label = pc.if_else(pc.equal(pc.utf8_lower(label), name), str(value), label)
        bad = pc.invert(pc.is_in(label, value_set=pa.array(LABEL_VALUES)))
        if pc.any(bad).as_py():
            i = first_true(bad)
            raise SourceError(f"{labels_uri}: row {i + 2}: label {label[i].as_py()!r} for id {ids[i].as_py()!r} "
                              "is not 0 or 1; labels are exactly 0 (normal) or 1 (tumour)")
        table = table.set_column(names.index("label"), "label", label.cast(pa.int64()))
    elif require_label:
        raise SourceError(f"{labels_uri}: labels CSV needs a 'label' column (0 or 1), has {names}")
    for col in ("slide_id", "dup_group"):  # empty cells are no value
        if col in names:
            v = table[col]
            table = table.set_column(names.index(col), col, pc.if_else(pc.equal(v, ""), None, v))
    return table


# The columns a labels CSV may have; its header may spell them in capitals (``ID,Label``).
LABEL_CSV_COLUMNS = ("id", "label", "slide_id", "dup_group")


def _csv_header(raw: bytes) -> tuple[list[str], str]:
    """A labels CSV's column names, with hcd's own in lower case, and its delimiter.

    ``ID,Label`` (a spreadsheet's header) was refused for want of an ``id`` column, and so was a
    spreadsheet's semicolon- or tab-separated export: their header is unambiguous, so it is read.
    """
    first = raw.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace").rstrip("\r")
    delimiter = next((d for d in (",", ";", "\t") if d in first), ",")
    names = [n.strip() for n in next(csv.reader([first], delimiter=delimiter), [])]
    return [n.lower() if n.lower() in LABEL_CSV_COLUMNS and n.lower() not in names else n for n in names], delimiter


def first_true(mask: pa.ChunkedArray | pa.Array) -> int:
    """Index of the first true value of ``mask`` (there is one)."""
    return pc.indices_nonzero(mask)[0].as_py()


LABEL_COLUMNS = pa.schema([("id", pa.string()), ("label", pa.int64()), ("slide_id", pa.string())])


def check_labelled(src: PatchSource, what: str) -> pa.Table:
    """Refuse a source whose patches are not all labelled 0 or 1, or none of which can be read.

    A patch without a label would be dropped from training without a word, and a label of 2
    would train a wrong model; both are stopped here, before any work starts. Returns the
    source's ``id, label, slide_id``.
    """
    err = src.items.column("error") if "error" in src.items.column_names else None
    if err is not None and len(err) and err.null_count == 0:
        # Every entry was refused at listing (links out of the folder, pipes, oversized files):
        # training on nothing would export an untrained model that looks like any other.
        raise SourceError(f"{src.uri}: none of its {len(err)} {what} patches can be read, e.g. {err[0].as_py()}; "
                          "copy the patches into the folder (links out of it are not followed) or fix the files")
    t = src.label_table()
    label = t["label"]
    if label.null_count:
        i = first_true(label.is_null())
        # Shards carry the labels their pack gave them, and refuse --labels: the fix is a repack.
        fixes = {PARQUET: "they were packed without labels: pack the patches again with hcd pack --labels <CSV>",
                 "pcam_h5": "put each split's camelyonpatch_level_2_split_<split>_y.h5 beside its _x.h5"}
        fix = fixes.get(src.layout, "give a labels CSV (--labels) that lists every patch, or put the patches in "
                                    "class folders 0/ and 1/ (or normal/ and tumor/)")
        raise SourceError(f"{src.uri}: {label.null_count} of {len(label)} {what} patches have no label "
                          f"(e.g. {t['id'][i].as_py()}); {fix}")
    bad = pc.invert(pc.is_in(label, value_set=pa.array([0, 1], pa.int64())))
    if pc.any(bad).as_py():
        i = first_true(bad)
        raise SourceError(f"{src.uri}: label {label[i].as_py()} (patch {t['id'][i].as_py()}) is not 0 or 1; "
                          "labels are exactly 0 (normal) or 1 (tumour)")
    counts = pc.value_counts(t["id"])
    twice = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(twice):  # a labels CSV has one row per id: two images of one name share its label
        log.warning("%s: %d ids name more than one %s patch (e.g. %s), and each takes its id's one label; rename the "
                    "files if they are different images", src.uri, len(twice), what, twice[0].as_py())
    return t
