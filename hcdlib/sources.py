"""Patch sources: one factory picks the layout from what is at the URI.

Layouts (docs/inputs.md):
- ``kaggle``: a folder of ``<id>.tif`` (or .png/.jpg), labels from an optional CSV
  (``id,label[,slide_id]``; ``labels.csv`` inside the folder is used when present);
- ``class_folders``: ``<root>/[split/]<label>/*.{tif,png,jpg}``, label = folder name;
- ``parquet``: shards written by ``hcd pack`` (columns id, image, label, slide_id, source);
- ``pcam_h5``: PatchCamelyon's HDF5 files (:mod:`hcdlib.h5source`).

- whole-slide images (``.svs``, ``.ndpi``, ..., or ``.tif`` with ``--slides``): scored as
  tissue tiles, see :class:`hcdlib.slides.SlideSource`.

A source is *listed* once on the driver (one recursive listing through the filesystem's own
listing call, never a stat per file) and then cut into chunks (:mod:`hcdlib.chunks`): the
units of reading, scoring and resuming, each of which reads itself.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hcdlib import uri as urimod
from hcdlib.chunks import ROW_SCHEMA, Chunk, FilesChunk, ShardChunk, footer_bytes
from hcdlib.listing import Listing, SourceError, list_files
from hcdlib.predictions import MANIFEST, PARTS, RUN_SPEC

if TYPE_CHECKING:
    from hcdlib.slides import SlideSource, SlideTiling

log = logging.getLogger(__name__)

IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
# A patch file's extension at the end of an id in a labels CSV (read_labels takes it off).
ID_EXTENSION = r"(?i)\.(?:" + "|".join(e[1:] for e in IMAGE_EXTS) + ")$"
# Archives hcd does not read inside: named in the refusal, so the fix is plain.
ARCHIVE_EXTS = (".zip", ".tar", ".tar.gz", ".tgz", ".7z", ".rar")
KAGGLE, CLASS_FOLDERS, PARQUET = "kaggle", "class_folders", "parquet"
# hcd pack commits its shards as hcd score commits its parts: a manifest written last.
PACK_MANIFEST = MANIFEST


@dataclass(frozen=True)
class PatchSource:
    """A listed source of patches; :func:`open_source` picks the subclass from what is at the URI.

    Every source answers the same questions (how many patches, a fingerprint for resume, its
    chunks, its labels), so a job handles each layout, slides included, the same way.
    """

    uri: str
    items: pa.Table  # one row per listed file (FileSource) or per Parquet row group (ShardSource)
    list_seconds: float

    @property
    def layout(self) -> str:
        """The layout's name, for messages and the pack manifest."""
        raise NotImplementedError

    @property
    def num_patches(self) -> int:
        """Number of patches in the source."""
        return self.items.num_rows

    def fingerprint(self) -> str:
        """A hash of what was listed, so a resumed run can tell the input has not changed."""
        h = hashlib.sha256(self.layout.encode())
        for col in self.items.columns[:2]:
            for v in col.to_pylist():
                h.update(str(v).encode())
                h.update(b"\0")
        return h.hexdigest()[:16]

    def chunks(self, chunk_size: int = 1024) -> list[Chunk]:
        """Cut the source into chunks, the units of reading, scoring and resume (keys stable per listing)."""
        raise NotImplementedError

    def label_table(self) -> pa.Table:
        """``id, label, slide_id`` of every patch."""
        raise NotImplementedError

    def has_labels(self) -> bool:
        """Whether any patch carries a label (then every one must: see :func:`check_labelled`)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the log: what was found."""
        return f"{self.num_patches} patches ({self.layout.replace('_', ' ')})"

    def finish(self, out: str, *, threshold: float) -> dict | None:
        """Outputs made from the committed rows after scoring (none for patches; see slides)."""
        return None


@dataclass(frozen=True)
class FileSource(PatchSource):
    """A folder of patch files: Kaggle-style (labels from a CSV) or class folders (``<label>/``).

    ``items``: id, source, label, slide_id, group, error (set: listed, never read).
    """

    kind: str = KAGGLE  # KAGGLE or CLASS_FOLDERS

    @property
    def layout(self) -> str:
        """``kaggle`` or ``class_folders``."""
        return self.kind

    def chunks(self, chunk_size: int = 1024) -> list[Chunk]:
        """Slices of ``chunk_size`` files in listing order."""
        cols = [self.items[c].to_pylist() for c in ("id", "source", "label", "slide_id", "error")]
        return [FilesChunk(f"files-{i:06d}", min(chunk_size, self.items.num_rows - a),
                           *(tuple(v[a:a + chunk_size]) for v in cols))
                for i, a in enumerate(range(0, self.items.num_rows, chunk_size))]

    def label_table(self) -> pa.Table:
        """From the listing: no file is read."""
        return self.items.select(LABEL_COLUMNS.names)

    def has_labels(self) -> bool:
        """Class folders always; a Kaggle folder where its labels CSV labels any patch."""
        return self.kind == CLASS_FOLDERS or self.items["label"].null_count < self.items.num_rows

    def with_items(self, items: pa.Table) -> FileSource:
        """The same source over other rows of its listing (a split, a shuffled order)."""
        return dataclasses.replace(self, items=items)


@dataclass(frozen=True)
class ShardSource(PatchSource):
    """Parquet shards (``hcd pack``'s output). ``items``: shard, row_group, num_rows.

    ``footers``: per shard, its footer (None when larger than :data:`FOOTER_CARRIED_BYTES`) and
    its size, as listed; each chunk carries them so that its read does not fetch the footer again.
    """

    footers: dict[str, tuple[bytes | None, int]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def layout(self) -> str:
        """``parquet``."""
        return PARQUET

    @property
    def num_patches(self) -> int:
        """The row groups' rows, from the shards' footers."""
        return int(pc.sum(self.items["num_rows"]).as_py() or 0)

    def chunks(self, chunk_size: int = 1024) -> list[Chunk]:
        """One chunk per row group (written at the packing's row-group size; ``chunk_size`` is not used)."""
        return [ShardChunk(f"rg-{i:06d}", n, s, rg, *self.footers.get(s, (None, None))) for i, (s, rg, n) in enumerate(
            zip(*(self.items[c].to_pylist() for c in ("shard", "row_group", "num_rows")), strict=True))]

    def label_table(self) -> pa.Table:
        """Those columns alone, read from every row group."""
        out = []
        for shard, rg in zip(self.items["shard"].to_pylist(), self.items["row_group"].to_pylist(), strict=True):
            fs, path = urimod.resolve(shard)
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                if "label" not in pf.schema_arrow.names:
                    raise SourceError(f"{shard}: Parquet shard has no 'label' column; pack it with --labels")
                cols = [c for c in LABEL_COLUMNS.names if c in pf.schema_arrow.names]
                t = pf.read_row_group(rg, columns=cols)
            out.append(pa.table([t[c] if c in cols else pa.nulls(t.num_rows, f.type) for c, f in
                                 zip(LABEL_COLUMNS.names, LABEL_COLUMNS, strict=True)], schema=LABEL_COLUMNS))
        return pa.concat_tables(out) if out else LABEL_COLUMNS.empty_table()

    def has_labels(self) -> bool:
        """Not known without reading the shards; a repack copies whatever labels they hold."""
        return False


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
        raise SourceError(f"{labels_uri}: row {_first(blank) + 2}: empty id")
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
            i = _first(bad)
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


def _first(mask: pa.ChunkedArray | pa.Array) -> int:
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
        i = _first(label.is_null())
        # Shards carry the labels their pack gave them, and refuse --labels: the fix is a repack.
        fixes = {PARQUET: "they were packed without labels: pack the patches again with hcd pack --labels <CSV>",
                 "pcam_h5": "put each split's camelyonpatch_level_2_split_<split>_y.h5 beside its _x.h5"}
        fix = fixes.get(src.layout, "give a labels CSV (--labels) that lists every patch, or put the patches in "
                                    "class folders 0/ and 1/ (or normal/ and tumor/)")
        raise SourceError(f"{src.uri}: {label.null_count} of {len(label)} {what} patches have no label "
                          f"(e.g. {t['id'][i].as_py()}); {fix}")
    bad = pc.invert(pc.is_in(label, value_set=pa.array([0, 1], pa.int64())))
    if pc.any(bad).as_py():
        i = _first(bad)
        raise SourceError(f"{src.uri}: label {label[i].as_py()} (patch {t['id'][i].as_py()}) is not 0 or 1; "
                          "labels are exactly 0 (normal) or 1 (tumour)")
    counts = pc.value_counts(t["id"])
    twice = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(twice):  # a labels CSV has one row per id: two images of one name share its label
        log.warning("%s: %d ids name more than one %s patch (e.g. %s), and each takes its id's one label; rename the "
                    "files if they are different images", src.uri, len(twice), what, twice[0].as_py())
    return t


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


# Files beside patches that are not patches and go without a word: labels and notes of a data
# set, hidden files, hcd's own markers, what Windows leaves in a folder of images.
_NOT_PATCHES = (".csv", ".txt", ".md", ".json", ".db", ".ini")


def _warn_unread(uri: str, files: list[str]) -> None:
    """Say which files of a patch folder are not read: a .bmp or .webp patch was skipped without a word."""
    def quiet(p: str) -> bool:
        name = p.rsplit("/", 1)[-1]
        return name.startswith((".", "_")) or name.lower().endswith(_NOT_PATCHES)

    other = [p for p in files if not p.lower().endswith(IMAGE_EXTS) and not quiet(p)]
    if other:
        log.warning("%s: %d files are not patches and are not read (e.g. %s); hcd reads %s patches: convert the "
                    "others to one of these", uri, len(other), other[0], "/".join(e[1:] for e in IMAGE_EXTS))


def _file_items(listing: Listing, images: list[str], refused: list[tuple[str, str]],
                labels: pa.Table | None, labels_uri: str | None) -> tuple[str, pa.Table]:
    """One row per image file; refused entries (links outside the root, pipes) come as error rows."""
    entries = sorted([(p, None) for p in images] + refused)
    paths = [p for p, _ in entries]
    parents = [os.path.basename(os.path.dirname(p)) for p in paths]
    is_class = (all(p.isdigit() or p.lower() in CLASS_NAMES for p in parents)
                and os.path.dirname(paths[0]) != listing.root)
    if is_class:
        _warn_splits(listing.root, paths)
    table = pa.table({
        "id": pa.array([_stem(p) for p in paths], pa.string()),
        "source": pa.array([urimod.to_uri(listing.fs, p) for p in paths], pa.string()),
        "folder_label": pa.array([int(p) if p.isdigit() else CLASS_NAMES[p.lower()] for p in parents] if is_class
                                 else [None] * len(paths), pa.int64()),
        "error": pa.array([e for _, e in entries], pa.string()),
        "pos": pa.array(range(len(paths)), pa.int64()),
    })
    if labels is not None:
        if labels.num_rows and not pc.any(pc.is_in(table["id"], value_set=labels["id"])).as_py():
            # every patch unlabelled: training refused "no label" without saying why, and scoring lost the slide ids
            raise SourceError(f"{labels_uri}: none of its {labels.num_rows} ids names a patch of the input (e.g. "
                              f"{labels['id'][0].as_py()!r} in the CSV, {table['id'][0].as_py()!r} from "
                              f"{table['source'][0].as_py()}); an id is the patch's file name without its extension")
        keep = [c for c in ("id", "label", "slide_id", "dup_group") if c in labels.column_names]
        table = table.join(labels.select(keep), "id", join_type="left outer")
        # join() does not keep order; restore the listing order so chunks are stable.
        table = table.sort_by("pos")
    names = table.column_names
    null_str = pa.nulls(table.num_rows, pa.string())
    if is_class and "label" in names:
        _check_folder_labels(table, labels_uri)
    label = table["folder_label"] if is_class or "label" not in names else table["label"]
    slide = table["slide_id"] if "slide_id" in names else null_str
    dup = table["dup_group"] if "dup_group" in names else null_str
    # The group that a train/validation split must keep on one side: slide, else duplicate
    # group, else the patch itself.
    group = pc.coalesce(slide, dup, table["id"])
    items = pa.table({"id": table["id"], "source": table["source"], "label": label,
                      "slide_id": slide, "group": group, "error": table["error"]})
    return (CLASS_FOLDERS if is_class else KAGGLE), items


def _warn_splits(root: str, paths: list[str]) -> None:
    """Say when class folders lie under several folders (``train/0``, ``valid/0``): all are one source.

    Pointing ``hcd train --data`` at a data set's root (PCam's ``train/`` and ``valid/``) trained
    on its validation split too, without a word.
    """
    splits = sorted({os.path.dirname(os.path.dirname(p)) for p in paths})
    if len(splits) > 1:
        names = ", ".join(posixpath.relpath(s, root) + "/" for s in splits[:4])
        log.warning("%s: class folders under %d folders (%s) are read as one source; pass one of them to use one "
                    "split alone", root, len(splits), names)


def _parent(path: str) -> str:
    return posixpath.basename(posixpath.dirname(path))


def _check_folder_labels(table: pa.Table, labels_uri: str | None) -> None:
    """Refuse class folders that a labels CSV contradicts (``1/abc.jpg``, and ``abc,0`` in the CSV).

    The folder name is the label; the CSV's label was dropped without a word, so whichever of
    the two the user meant, some patches could be trained or evaluated under the other.
    """
    clash = pc.fill_null(pc.not_equal(table["folder_label"], table["label"]), False)
    n = pc.sum(clash).as_py() or 0
    if n:
        i = _first(clash)
        source = table["source"][i].as_py()
        raise SourceError(f"{labels_uri}: {n} patches have a label other than their class folder's, e.g. {source} is "
                          f"in folder {_parent(source)}/ (label {table['folder_label'][i].as_py()}) and the CSV says "
                          f"{table['label'][i].as_py()}; move the files to the right folder, or drop the CSV's label "
                          "column")


def _parquet_items(listing: Listing, root_uri: str) -> tuple[pa.Table, dict[str, tuple[bytes | None, int]]]:
    """One row per row group of every shard (shard, row_group, num_rows), and each shard's footer and size."""
    fs, root, files = listing.fs, listing.root, listing.files
    shards = [p for p in files if p.endswith(".parquet")]
    manifest_uri = urimod.to_uri(fs, f"{root}/{PACK_MANIFEST}")
    raw = urimod.read_bytes(manifest_uri) if f"{root}/{PACK_MANIFEST}" in files else None
    if raw and raw.strip():  # hcd pack's manifest: exactly the shards it committed
        try:
            listed = json.loads(raw)["files"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"{manifest_uri}: corrupt pack manifest ({exc}); rerun hcd pack to rewrite it") from exc
        shards = [f"{root}/{f['path']}" for f in listed]
        gone = sorted(set(shards) - set(files))
        if gone:  # removed or moved since the pack: read, they failed as "not a readable Parquet shard"
            raise SourceError(f"{root_uri}: {len(gone)} of the {len(shards)} shards its {PACK_MANIFEST} lists are "
                              f"missing (e.g. {urimod.to_uri(fs, gone[0])}); run the same hcd pack command again to "
                              "write them again (it keeps the shards that are there)")
    elif raw is None and files != [root]:  # a folder of shards without a manifest (one file given needs none)
        _check_finished(listing, root_uri)
        log.warning("%s: no %s manifest; reading every .parquet file found", root_uri, PACK_MANIFEST)
    # (An empty _SUCCESS is Spark's and Hadoop's marker beside their part files: every file is read.)
    rows: dict[str, list] = {"shard": [], "row_group": [], "num_rows": []}
    footers = {}
    # Footers are read concurrently: each is two round trips on S3, and an archive has thousands.
    with ThreadPoolExecutor(16, thread_name_prefix="hcd-footers") as pool:
        for shard, (md, size) in zip(shards, pool.map(lambda shard: _footer(fs, shard), shards), strict=True):
            uri = urimod.to_uri(fs, shard)
            _check_shard_schema(uri, md.schema.to_arrow_schema())
            rows["shard"] += [uri] * md.num_row_groups
            rows["row_group"] += list(range(md.num_row_groups))
            rows["num_rows"] += [md.row_group(rg).num_rows for rg in range(md.num_row_groups)]
            footers[uri] = (footer_bytes(md) if md.serialized_size <= FOOTER_CARRIED_BYTES else None, size)
    items = pa.table(rows, schema=pa.schema([("shard", pa.string()), ("row_group", pa.int64()),
                                             ("num_rows", pa.int64())]))
    return items, footers


def _check_finished(listing: Listing, root_uri: str) -> None:
    """Refuse the output of an hcd pack that never committed: its shards are only part of the input.

    ``hcd pack`` writes its run spec first and ``_SUCCESS`` last. Without ``_SUCCESS`` (the pack
    stopped, or is still running) the shards found are some of the patches, not all: read as they
    were, an interrupted pack was scored or trained on with one warning line. The same holds
    for ``--input <pack-out>/parts``.
    """
    fs, root = listing.fs, listing.root
    for folder in (root, root.rsplit("/", 1)[0] if root.rsplit("/", 1)[-1] == PARTS else None):
        spec = urimod.to_uri(fs, f"{folder}/{RUN_SPEC}") if folder else None
        if spec is None or not urimod.exists(spec) or _run_job(spec) != "pack":  # predictions: the schema says
            continue
        if folder != root and urimod.exists(urimod.to_uri(fs, f"{folder}/{PACK_MANIFEST}")):
            return  # the parts of a committed pack
        raise SourceError(f"{root_uri}: the output of an hcd pack that has not finished ({urimod.to_uri(fs, folder)} "
                          f"has {RUN_SPEC} but no {PACK_MANIFEST}), so its shards hold only some of the patches; "
                          "run the same hcd pack command again to finish it (it keeps the shards already written)")


def _run_job(spec_uri: str) -> str | None:
    """The ``job`` an hcd run spec names (``pack``), or None for one that names none or cannot be read."""
    try:
        spec = json.loads(urimod.read_bytes(spec_uri))
    except (OSError, ValueError):
        return None
    return spec.get("job") if isinstance(spec, dict) else None


def _check_shard_schema(uri: str, schema: pa.Schema) -> None:
    """Refuse a Parquet file whose columns are not a patch shard's (``hcd pack``'s :data:`ROW_SCHEMA`).

    Checked on the driver from the footer: a file without ids would be scored under null ids (the
    predictions could not be told apart), and a column of another type (a dataset's image struct)
    failed the read tasks mid-run with a traceback.
    """
    fix = "hcd reads the Parquet shards hcd pack writes: pack the patches with hcd pack"
    missing = [c for c in ("id",) if c not in schema.names]
    if "image" not in schema.names and "pixels" not in schema.names:
        missing.append("image (or pixels)")
    if missing:
        raise SourceError(f"{uri}: not a patch shard: no {' or '.join(missing)} column (it has "
                          f"{', '.join(schema.names[:8])}); {fix}")
    for want in ROW_SCHEMA:
        if want.name in schema.names:
            have = schema.field(want.name).type
            try:
                pa.array([], have).cast(want.type)
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
                raise SourceError(f"{uri}: column {want.name!r} is {have}, which hcd cannot read as {want.type}; "
                                  f"{fix}") from None


# Each chunk of a shard carries the shard's footer; beyond this size (a shard of very many row
# groups) the copies would add up, so each read fetches the footer itself instead.
FOOTER_CARRIED_BYTES = 64 * 1024


def _footer(fs: pafs.FileSystem, shard: str) -> tuple[pq.FileMetaData, int]:
    """One shard's Parquet footer and its size in bytes."""
    try:
        with fs.open_input_file(shard) as f:
            return pq.ParquetFile(f).metadata, f.size()
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"{urimod.to_uri(fs, shard)}: not a readable Parquet shard ({exc})") from exc


# A folder of at most this many .tif files is looked at for whole-slide images given as patches.
SLIDE_CHECK_FILES = 1024


def _refuse_tif_slides(uri: str, listing: Listing, images: list[str], *, tiles: bool) -> None:
    """Refuse .tif whole-slide images given as patches (``tiles``: the job scores slides with ``--slides``).

    A .tif is a patch unless ``--slides`` says otherwise (Kaggle's patches are .tif), and
    CAMELYON16's slides are .tif too: each became an error row ("larger than 64 MiB"), so
    `hcd score` ended with exit code 0 and nothing scored, and `hcd train` read them all before it
    refused. Looked at only when the first file is a slide (one header read for an archive of
    patches), and refused only when every file is one.
    """
    from hcdlib.slides import slide_like

    if not images or len(images) > SLIDE_CHECK_FILES or not all(p.lower().endswith((".tif", ".tiff")) for p in images):
        return
    images = sorted(images)
    first = slide_like(listing.fs, images[0])
    if first is None or any(slide_like(listing.fs, p) is None for p in images[1:]):
        return
    example = urimod.to_uri(listing.fs, images[0])
    what = (f"its {len(images)} .tif files are whole-slide images, not patches (e.g. {example}: {first})"
            if len(images) > 1 else f"a whole-slide image, not a patch ({first})")
    if tiles:
        raise SourceError(f"{uri}: {what}; pass --slides to tile and score {'them' if len(images) > 1 else 'it'}")
    raise SourceError(f"{uri}: {what}; hcd score --slides tiles and scores slides, but this command takes patches "
                      "(96x96 files or Parquet shards)")


def open_source(uri: str, labels: str | None = None, *, listing: Listing | None = None,
                require_label: bool = False, tiling: SlideTiling | None = None) -> PatchSource | SlideSource:
    """List the source at ``uri`` (or take ``listing``, already made) and pick its layout.

    ``require_label``: a ``--labels`` CSV must have a label column (training), not only slide ids.
    ``tiling``: how to cut whole-slide images (scoring); without it, slides are refused (patches
    only: training, packing). Slide-only formats (.svs, .ndpi, ...) make a slide source, and so
    does any .tif with ``tiling.force`` (``--slides``).
    """
    from hcdlib.slides import SLIDE_EXTS, SlideSource, is_slide_source

    t0 = time.perf_counter()
    listing = listing or list_files(uri)
    files = listing.files
    parquet = [p for p in files if p.endswith(".parquet")]
    if is_slide_source(files) or (tiling is not None and tiling.force):
        if tiling is None:
            raise SourceError(f"{uri}: holds whole-slide images; hcd score tiles and scores them, but this "
                              "command takes patches (96x96 files or Parquet shards)")
        if labels:
            raise SourceError(f"{labels}: a labels CSV for {uri}, which holds whole-slide images; a slide's tiles "
                              "take its path below the input as slide id: drop --labels")
        # Slide folders often keep label and macro images beside the scans: not scored, but said.
        other = [p for p in files if p.lower().endswith(IMAGE_EXTS) and not p.lower().endswith(SLIDE_EXTS)] + parquet
        if not any(p.lower().endswith(SLIDE_EXTS) for p in files + [p for p, _ in listing.refused]):
            # a run over nothing used to start Ray and commit an empty result
            raise SourceError(f"{uri}: no whole-slide images ({', '.join(SLIDE_EXTS)}) to tile"
                              + (f"; it holds {len(other)} other images (e.g. {other[0]}): patches are scored "
                                 "without --slides, and a large image is tiled once saved as a tiled TIFF"
                                 if other else ""))
        if other:
            log.warning("%s: %d files that are not slides are not scored (e.g. %s); patches go in their own --input",
                        uri, len(other), other[0])
        return SlideSource.from_listing(uri, listing, tiling, list_seconds=time.perf_counter() - t0)
    images = [p for p in files if p.lower().endswith(IMAGE_EXTS)]
    refused = [(p, why) for p, why in listing.refused if p.lower().endswith(IMAGE_EXTS)]
    from hcdlib import h5source  # imports this module (PatchSource): here, not at the top

    if h5source.is_h5_source(files):
        if labels:
            raise SourceError(f"{labels}: a labels CSV for {uri}, which holds PatchCamelyon's HDF5 files; their "
                              "labels are the _y.h5 files beside them: drop --labels")
        if parquet or images:
            other = (parquet or images)[0]
            raise SourceError(f"{uri}: holds PatchCamelyon's HDF5 files and other patches (e.g. {other}); give "
                              "each kind its own --input")
        src = h5source.H5Source(uri, h5source.h5_items(uri, files, listing.fs), 0.0)
        return dataclasses.replace(src, list_seconds=time.perf_counter() - t0)
    if parquet and (images or refused):  # either kind alone would leave the other unscored without a word
        raise SourceError(f"{uri}: holds both Parquet shards ({len(parquet)}, e.g. {parquet[0]}) and patch images "
                          f"({len(images) + len(refused)}); give each kind its own --input")
    # a pack whose shards are all gone is a pack still: its manifest names what is missing
    emptied = (not parquet and not images and f"{listing.root}/{RUN_SPEC}" in files
               and _run_job(urimod.to_uri(listing.fs, f"{listing.root}/{RUN_SPEC}")) == "pack")
    if parquet or emptied:
        if labels:  # it was ignored: training then said the patches had no label, scoring kept the packed slide ids
            raise SourceError(f"{labels}: a labels CSV for {uri}, which holds Parquet shards; shards carry the labels "
                              "and slide ids hcd pack gave them: pack the patches again with --labels")
        items, footers = _parquet_items(listing, uri)
        src: PatchSource = ShardSource(uri, items, 0.0, footers=footers)
    elif images or refused:
        _warn_unread(uri, files)
        if labels is None and f"{listing.root}/labels.csv" in files:
            labels = urimod.to_uri(listing.fs, f"{listing.root}/labels.csv")
        table = read_labels(labels, require_label=require_label) if labels else None
        _refuse_tif_slides(uri, listing, images, tiles=tiling is not None)
        kind, items = _file_items(listing, images, refused, table, labels)
        src = FileSource(uri, items, 0.0, kind=kind)
    elif any(p.lower().endswith(ARCHIVE_EXTS) for p in files):  # Kaggle's download is train.zip
        raise SourceError(f"{uri}: holds archives ({next(p for p in files if p.lower().endswith(ARCHIVE_EXTS))}), "
                          "not patches; unpack them and pass the folder")
    else:
        if any(p.endswith((".h5.gz", ".h5")) for p in files):
            gz = next(p for p in files if p.endswith((".h5.gz", ".h5")))
            raise SourceError(f"{uri}: holds {gz}; hcd reads PatchCamelyon's HDF5 files unpacked and under their "
                              "release names (camelyonpatch_level_2_split_<split>_x.h5, gunzip the .gz files)")
        there = f"; it holds {len(files)} other files, e.g. {files[0]}" if files else ""
        raise SourceError(f"{uri}: no patch images ({', '.join(IMAGE_EXTS)}) or Parquet shards found{there}")
    src = dataclasses.replace(src, list_seconds=time.perf_counter() - t0)
    log.debug("listed %s: layout %s, %d entries in %.2fs", uri, src.layout, src.items.num_rows, src.list_seconds)
    return src
