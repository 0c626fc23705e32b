"""Patch sources: one factory picks the layout from what is at the URI.

Layouts (see README):
- ``kaggle``: a folder of ``<id>.tif`` (or .png/.jpg), labels from an optional CSV
  (``id,label[,slide_id]``; ``labels.csv`` inside the folder is used when present);
- ``class_folders``: ``<root>/[split/]<label>/*.{tif,png,jpg}``, label = folder name;
- ``parquet``: shards written by ``hcd pack`` (columns id, image, label, slide_id, source).

A source is *listed* once on the driver (one recursive listing through the filesystem's own
listing call, never a stat per file) and then cut into chunks. A chunk is the unit of work
for reading, scoring and resuming: a slice of the file list or one Parquet row group.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hcdlib import uri as urimod
from hcdlib.decode import PIXEL_BYTES
from hcdlib.listing import Listing, SourceError, list_files

log = logging.getLogger(__name__)

IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
KAGGLE, CLASS_FOLDERS, PARQUET = "kaggle", "class_folders", "parquet"
PACK_MANIFEST = "_SUCCESS"
# Schema of the rows every source yields (and of pack shards). A row holds its patch either
# encoded (``image``: the file's bytes) or decoded (``pixels``: 96x96x3 uint8, as hcd pack
# stores lossless patches, with decoding's ``note``); shards from before pixels read as image-only.
ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("pixels", pa.binary(PIXEL_BYTES)),
    ("note", pa.string()),
    ("label", pa.int64()),
    ("slide_id", pa.string()),
    ("source", pa.string()),
])


@dataclass(frozen=True)
class PatchSource:
    """A listed source: its layout and one row per patch file (or per Parquet row group)."""

    uri: str
    layout: str
    # kaggle / class_folders: id, source, label, slide_id, group, error (set: listed, never read)
    # parquet: shard, row_group, num_rows
    items: pa.Table
    list_seconds: float

    @property
    def num_patches(self) -> int:
        """Number of patches in the source."""
        if self.layout == PARQUET:
            return int(pc.sum(self.items["num_rows"]).as_py() or 0)
        return self.items.num_rows

    def fingerprint(self) -> str:
        """A hash of what was listed, so a resumed run can tell the input has not changed."""
        h = hashlib.sha256(self.layout.encode())
        for col in self.items.columns[:2]:
            for v in col.to_pylist():
                h.update(str(v).encode())
                h.update(b"\0")
        return h.hexdigest()[:16]


LABEL_VALUES = ("0", "1")


def read_labels(labels_uri: str, *, require_label: bool = True) -> pa.Table:
    """Read and check a labels CSV (``id,label`` plus optional ``slide_id`` / ``dup_group``).

    Labels are exactly 0 or 1 and every id appears once; anything else is refused before any
    work starts, naming the file, the row (1 = the header) and the value. Without
    ``require_label`` a CSV may carry only ids and slide ids (scoring).
    """
    try:
        raw = urimod.read_bytes(labels_uri)
    except OSError as exc:
        raise SourceError(f"{labels_uri}: cannot read labels CSV: {exc}") from exc
    try:
        table = pacsv.read_csv(io.BytesIO(raw), convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in ("id", "label", "slide_id", "dup_group")},
            strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        raise SourceError(f"{labels_uri}: not a readable CSV: {str(exc).splitlines()[0]}") from exc
    names = table.column_names
    if "id" not in names:
        raise SourceError(f"{labels_uri}: labels CSV needs an 'id' column, has {names}")
    ids = pc.utf8_trim_whitespace(table["id"])
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
        label = pc.utf8_trim_whitespace(table["label"])
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


def _first(mask: pa.ChunkedArray | pa.Array) -> int:
    return pc.indices_nonzero(mask)[0].as_py()


LABEL_COLUMNS = pa.schema([("id", pa.string()), ("label", pa.int64()), ("slide_id", pa.string())])


def check_labelled(src: PatchSource, what: str) -> pa.Table:
    """Refuse a source whose patches are not all labelled 0 or 1; return its ``id, label, slide_id``.

    A patch without a label would be dropped from training without a word, and a label of 2
    would train a wrong model; both are stopped here, before any work starts.
    """
    t = label_table(src)
    label = t["label"]
    if label.null_count:
        i = _first(label.is_null())
        raise SourceError(f"{src.uri}: {label.null_count} of {len(label)} {what} patches have no label "
                          f"(e.g. {t['id'][i].as_py()}); give a labels CSV (--labels) that lists every patch")
    bad = pc.invert(pc.is_in(label, value_set=pa.array([0, 1], pa.int64())))
    if pc.any(bad).as_py():
        i = _first(bad)
        raise SourceError(f"{src.uri}: label {label[i].as_py()} (patch {t['id'][i].as_py()}) is not 0 or 1; "
                          "labels are exactly 0 (normal) or 1 (tumour)")
    return t


def label_table(src: PatchSource) -> pa.Table:
    """``id, label, slide_id`` of every patch: from the listing, or (Parquet) those columns alone."""
    if src.layout != PARQUET:
        return src.items.select(LABEL_COLUMNS.names)
    out = []
    for shard, rg in zip(src.items["shard"].to_pylist(), src.items["row_group"].to_pylist(), strict=True):
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


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _file_items(listing: Listing, images: list[str], refused: list[tuple[str, str]],
                labels: pa.Table | None) -> tuple[str, pa.Table]:
    """One row per image file; refused entries (links outside the root, pipes) come as error rows."""
    entries = sorted([(p, None) for p in images] + refused)
    paths = [p for p, _ in entries]
    parents = [os.path.basename(os.path.dirname(p)) for p in paths]
    is_class = all(p.isdigit() for p in parents) and os.path.dirname(paths[0]) != listing.root
    table = pa.table({
        "id": pa.array([_stem(p) for p in paths], pa.string()),
        "source": pa.array([urimod.to_uri(listing.fs, p) for p in paths], pa.string()),
        "folder_label": pa.array([int(p) for p in parents] if is_class else [None] * len(paths), pa.int64()),
        "error": pa.array([e for _, e in entries], pa.string()),
        "pos": pa.array(range(len(paths)), pa.int64()),
    })
    if labels is not None:
        keep = [c for c in ("id", "label", "slide_id", "dup_group") if c in labels.column_names]
        table = table.join(labels.select(keep), "id", join_type="left outer")
        # join() does not keep order; restore the listing order so chunks are stable.
        table = table.sort_by("pos")
    names = table.column_names
    null_str = pa.nulls(table.num_rows, pa.string())
    label = table["folder_label"] if is_class or "label" not in names else table["label"]
    slide = table["slide_id"] if "slide_id" in names else null_str
    dup = table["dup_group"] if "dup_group" in names else null_str
    # The group that a train/validation split must keep on one side: slide, else duplicate
    # group, else the patch itself.
    group = pc.coalesce(slide, dup, table["id"])
    items = pa.table({"id": table["id"], "source": table["source"], "label": label,
                      "slide_id": slide, "group": group, "error": table["error"]})
    return (CLASS_FOLDERS if is_class else KAGGLE), items


def _parquet_items(listing: Listing, root_uri: str) -> pa.Table:
    fs, root, files = listing.fs, listing.root, listing.files
    manifest = f"{root}/{PACK_MANIFEST}" if len(files) > 1 or files[0] != root else None
    shards = [p for p in files if p.endswith(".parquet")]
    if manifest and manifest in files:
        manifest_uri = urimod.to_uri(fs, manifest)
        try:
            listed = json.loads(urimod.read_bytes(manifest_uri))["files"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"{manifest_uri}: corrupt pack manifest ({exc}); rerun hcd pack to rewrite it") from exc
        shards = [f"{root}/{f['path']}" for f in listed]
    elif manifest:
        log.warning("%s: no %s manifest; reading every .parquet file found", root_uri, PACK_MANIFEST)
    rows = {"shard": [], "row_group": [], "num_rows": []}
    for shard in shards:
        try:
            with fs.open_input_file(shard) as f:
                md = pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowInvalid) as exc:
            raise SourceError(f"{urimod.to_uri(fs, shard)}: not a readable Parquet shard ({exc})") from exc
        for rg in range(md.num_row_groups):
            rows["shard"].append(urimod.to_uri(fs, shard))
            rows["row_group"].append(rg)
            rows["num_rows"].append(md.row_group(rg).num_rows)
    return pa.table(rows, schema=pa.schema([("shard", pa.string()), ("row_group", pa.int64()),
                                            ("num_rows", pa.int64())]))


def open_source(uri: str, labels: str | None = None, *, listing: Listing | None = None,
                require_label: bool = False) -> PatchSource:
    """List the patch source at ``uri`` (or take ``listing``, already made) and detect its layout.

    ``require_label``: a ``--labels`` CSV must have a label column (training), not only slide ids.
    """
    t0 = time.perf_counter()
    listing = listing or list_files(uri)
    files = listing.files
    images = [p for p in files if p.lower().endswith(IMAGE_EXTS)]
    refused = [(p, why) for p, why in listing.refused if p.lower().endswith(IMAGE_EXTS)]
    parquet = [p for p in files if p.endswith(".parquet")]
    if parquet and not images and not refused:
        items = _parquet_items(listing, uri)
        layout = PARQUET
    elif images or refused:
        if labels is None and f"{listing.root}/labels.csv" in files:
            labels = urimod.to_uri(listing.fs, f"{listing.root}/labels.csv")
        table = read_labels(labels, require_label=require_label) if labels else None
        layout, items = _file_items(listing, images, refused, table)
    else:
        raise SourceError(f"{uri}: no patch images ({', '.join(IMAGE_EXTS)}) or Parquet shards found")
    secs = time.perf_counter() - t0
    log.debug("listed %s: layout %s, %d entries in %.2fs", uri, layout, items.num_rows, secs)
    return PatchSource(uri=uri, layout=layout, items=items, list_seconds=secs)


def plan_chunks(src: PatchSource, chunk_size: int = 1024) -> list[dict]:
    """Cut a source into chunks: the units of reading, scoring and resume.

    Chunk keys are stable for the same listing, so a rerun finds the chunks already done.
    """
    if src.layout == PARQUET:
        return [{"key": f"rg-{i:06d}", "kind": PARQUET, "shard": s, "row_group": rg, "num_rows": n}
                for i, (s, rg, n) in enumerate(zip(*(src.items[c].to_pylist()
                                                     for c in ("shard", "row_group", "num_rows")),
                                                   strict=True))]
    chunks = []
    cols = {c: src.items[c].to_pylist() for c in ("id", "source", "label", "slide_id", "error")}
    for i, start in enumerate(range(0, src.items.num_rows, chunk_size)):
        part = {c: v[start:start + chunk_size] for c, v in cols.items()}
        chunks.append({"key": f"files-{i:06d}", "kind": "files", "num_rows": len(part["id"]), **part})
    return chunks


# A patch file is read whole into memory; nothing a patch can be (even a 4096x4096 tile that
# --resize accepts, uncompressed) is larger than this, and /dev/zero-like inputs stop here.
MAX_PATCH_BYTES = 64 * 2**20


def _read_one(fs: pafs.FileSystem, path: str) -> tuple[bytes | None, str | None]:
    too_big = f"file is larger than {MAX_PATCH_BYTES // 2**20} MiB: not a patch, not read"
    if isinstance(fs, pafs.LocalFileSystem):
        # Checked on the open descriptor: a file swapped for a pipe after listing is not read,
        # and O_NONBLOCK keeps open() itself from waiting on one.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            return None, f"cannot read {path}: {exc.strerror or exc}"
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None, f"{path} is not a regular file; not read"
            if st.st_size > MAX_PATCH_BYTES:
                return None, too_big
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read(), None
        except OSError as exc:
            return None, f"cannot read {path}: {exc.strerror or exc}"
        finally:
            os.close(fd)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read(MAX_PATCH_BYTES + 1)
    except OSError as exc:
        return None, f"cannot read {path}: {exc}"
    return (None, too_big) if len(data) > MAX_PATCH_BYTES else (data, None)


def read_chunk(chunk: dict) -> pa.Table:
    """Read one chunk into rows ``id, image, label, slide_id, source`` (+ ``error``).

    ``error`` is set where a file could not be read at all; decoding fills it in later for
    bytes that are not a valid patch.
    """
    if chunk["kind"] == PARQUET:
        fs, path = urimod.resolve(chunk["shard"])
        with fs.open_input_file(path) as f:
            t = pq.ParquetFile(f).read_row_group(chunk["row_group"])
        t = t.select([c for c in ROW_SCHEMA.names if c in t.column_names])
        for field in ROW_SCHEMA:
            if field.name not in t.column_names:
                t = t.append_column(field, pa.nulls(t.num_rows, field.type))
        t = t.select(ROW_SCHEMA.names).cast(ROW_SCHEMA)
        return t.append_column("error", pa.nulls(t.num_rows, pa.string()))
    sources = chunk["source"]
    refused = chunk.get("error") or [None] * len(sources)
    fs, _ = urimod.resolve(sources[0])
    todo = [(i, urimod.resolve(s)[1]) for i, s in enumerate(sources) if refused[i] is None]
    results: list[tuple[bytes | None, str | None]] = [(None, why) for why in refused]
    # Object stores answer small GETs with high latency: overlap them. Local disks need none.
    if isinstance(fs, pafs.S3FileSystem):
        with ThreadPoolExecutor(16) as pool:
            read = list(pool.map(lambda ip: _read_one(fs, ip[1]), todo))
    else:
        read = [_read_one(fs, p) for _, p in todo]
    for (i, _), r in zip(todo, read, strict=True):
        results[i] = r
    n = len(sources)
    return pa.table({
        "id": pa.array(chunk["id"], pa.string()),
        "image": pa.array([r[0] for r in results], pa.binary()),
        "pixels": pa.nulls(n, pa.binary(PIXEL_BYTES)),
        "note": pa.nulls(n, pa.string()),
        "label": pa.array(chunk["label"], pa.int64()),
        "slide_id": pa.array(chunk["slide_id"], pa.string()),
        "source": pa.array(sources, pa.string()),
        "error": pa.array([r[1] for r in results], pa.string()),
    })
