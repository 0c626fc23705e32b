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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hcdlib import uri as urimod

log = logging.getLogger(__name__)

IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
KAGGLE, CLASS_FOLDERS, PARQUET = "kaggle", "class_folders", "parquet"
PACK_MANIFEST = "_SUCCESS"
# Schema of the rows every source yields (and of pack shards).
ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("label", pa.int64()),
    ("slide_id", pa.string()),
    ("source", pa.string()),
])


class SourceError(ValueError):
    """The input cannot be used as a patch source; the message names the URI and the problem."""


@dataclass(frozen=True)
class PatchSource:
    """A listed source: its layout and one row per patch file (or per Parquet row group)."""

    uri: str
    layout: str
    # kaggle / class_folders: id, source, label, slide_id, group
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


def list_files(root_uri: str) -> tuple[pafs.FileSystem, str, list[str]]:
    """All file paths below ``root_uri`` with one listing pass (no stat per file)."""
    fs, root = urimod.resolve(root_uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{root_uri}: no such file or directory")
    if info.type == pafs.FileType.File:
        return fs, root, [root]
    if isinstance(fs, pafs.LocalFileSystem):
        # os.walk uses scandir's d_type, so no stat call per file (pyarrow's selector stats).
        paths = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
    else:
        # S3: ListObjectsV2 pages of 1000 keys; sizes come with the listing.
        sel = pafs.FileSelector(root, recursive=True)
        paths = [i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File]
    paths.sort()
    return fs, root, paths


def read_labels(labels_uri: str) -> pa.Table:
    """Read a labels CSV (``id,label`` plus optional ``slide_id`` / ``dup_group``)."""
    try:
        table = pacsv.read_csv(
            io.BytesIO(urimod.read_bytes(labels_uri)),
            convert_options=pacsv.ConvertOptions(
                column_types={"id": pa.string(), "label": pa.int64(),
                              "slide_id": pa.string(), "dup_group": pa.string()}),
        )
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"{labels_uri}: cannot read labels CSV: {exc}") from exc
    if "id" not in table.column_names:
        raise SourceError(f"{labels_uri}: labels CSV needs an 'id' column, has {table.column_names}")
    return table


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _file_items(fs, root: str, images: list[str], labels: pa.Table | None) -> tuple[str, pa.Table]:
    parents = [os.path.basename(os.path.dirname(p)) for p in images]
    is_class = all(p.isdigit() for p in parents) and os.path.dirname(images[0]) != root
    ids = [_stem(p) for p in images]
    folder_labels = [int(p) for p in parents] if is_class else [None] * len(ids)
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "source": pa.array([urimod.to_uri(fs, p) for p in images], pa.string()),
        "folder_label": pa.array(folder_labels, pa.int64()),
    })
    if labels is not None:
        keep = [c for c in ("id", "label", "slide_id", "dup_group") if c in labels.column_names]
        table = table.join(labels.select(keep), "id", join_type="left outer")
        # join() does not keep order; restore the listing order so chunks are stable.
        table = table.sort_by("source")
    names = table.column_names
    null_str = pa.nulls(table.num_rows, pa.string())
    label = table["folder_label"] if is_class or "label" not in names else table["label"]
    slide = table["slide_id"] if "slide_id" in names else null_str
    dup = table["dup_group"] if "dup_group" in names else null_str
    # The group that a train/validation split must keep on one side: slide, else duplicate
    # group, else the patch itself.
    group = pc.coalesce(slide, dup, table["id"])
    items = pa.table({"id": table["id"], "source": table["source"], "label": label,
                      "slide_id": slide, "group": group})
    return (CLASS_FOLDERS if is_class else KAGGLE), items


def _parquet_items(fs, root: str, files: list[str], root_uri: str) -> pa.Table:
    manifest = f"{root}/{PACK_MANIFEST}" if len(files) > 1 or files[0] != root else None
    shards = [p for p in files if p.endswith(".parquet")]
    if manifest and manifest in files:
        listed = json.loads(urimod.read_bytes(urimod.to_uri(fs, manifest)))["files"]
        shards = [f"{root}/{f['path']}" for f in listed]
    elif manifest:
        log.warning("%s: no %s manifest; reading every .parquet file found", root_uri, PACK_MANIFEST)
    rows = {"shard": [], "row_group": [], "num_rows": []}
    for shard in shards:
        with fs.open_input_file(shard) as f:
            md = pq.ParquetFile(f).metadata
        for rg in range(md.num_row_groups):
            rows["shard"].append(urimod.to_uri(fs, shard))
            rows["row_group"].append(rg)
            rows["num_rows"].append(md.row_group(rg).num_rows)
    return pa.table(rows, schema=pa.schema([("shard", pa.string()), ("row_group", pa.int64()),
                                            ("num_rows", pa.int64())]))


def open_source(uri: str, labels: str | None = None) -> PatchSource:
    """List the patch source at ``uri`` and detect its layout."""
    t0 = time.perf_counter()
    fs, root, files = list_files(uri)
    images = [p for p in files if p.lower().endswith(IMAGE_EXTS)]
    parquet = [p for p in files if p.endswith(".parquet")]
    if parquet and not images:
        items = _parquet_items(fs, root, files, uri)
        layout = PARQUET
    elif images:
        if labels is None and f"{root}/labels.csv" in files:
            labels = urimod.to_uri(fs, f"{root}/labels.csv")
        table = read_labels(labels) if labels else None
        layout, items = _file_items(fs, root, images, table)
    else:
        raise SourceError(f"{uri}: no patch images ({', '.join(IMAGE_EXTS)}) or Parquet shards found")
    secs = time.perf_counter() - t0
    log.info("listed %s: layout %s, %d entries in %.2fs", uri, layout, items.num_rows, secs)
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
    cols = {c: src.items[c].to_pylist() for c in ("id", "source", "label", "slide_id")}
    for i, start in enumerate(range(0, src.items.num_rows, chunk_size)):
        part = {c: v[start:start + chunk_size] for c, v in cols.items()}
        chunks.append({"key": f"files-{i:06d}", "kind": "files", "num_rows": len(part["id"]), **part})
    return chunks


def _read_one(fs: pafs.FileSystem, path: str) -> tuple[bytes | None, str | None]:
    try:
        with fs.open_input_stream(path) as f:
            return f.read(), None
    except OSError as exc:
        return None, f"cannot read {path}: {exc}"


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
    fs, _ = urimod.resolve(sources[0])
    paths = [urimod.resolve(s)[1] for s in sources]
    # Object stores answer small GETs with high latency: overlap them. Local disks need none.
    threads = 16 if isinstance(fs, pafs.S3FileSystem) else 1
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(lambda p: _read_one(fs, p), paths))
    else:
        results = [_read_one(fs, p) for p in paths]
    return pa.table({
        "id": pa.array(chunk["id"], pa.string()),
        "image": pa.array([r[0] for r in results], pa.binary()),
        "label": pa.array(chunk["label"], pa.int64()),
        "slide_id": pa.array(chunk["slide_id"], pa.string()),
        "source": pa.array(sources, pa.string()),
        "error": pa.array([r[1] for r in results], pa.string()),
    })
