"""``hcd pack``: turn any patch source into a few large Parquet shards.

    hcd pack --input /data/kaggle/train --labels /data/kaggle/train_labels.csv --out s3://bucket/pcam-train

Millions of 30 KB objects are slow and costly to list and read on S3 (one request each);
a few hundred shards of ``--rows-per-file`` patches are not. Each patch is decoded once, here:
one that decodes is stored as its 96x96x3 pixels (zstd), so scoring reads a chunk's pixels
with one reshape instead of decoding every patch again; JPEGs keep their encoded bytes (5x
smaller than pixels) and anything that does not decode keeps its bytes and becomes the same
error row it would be unpacked. Packing loses nothing: pixels are what decoding gives.

Each shard is written atomically (temp + rename locally, one PUT on S3) and ``_SUCCESS`` is
written last, listing the shards: readers of a partial run never take a half-written shard,
and a rerun skips shards that are already complete.
"""

from __future__ import annotations

import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from hcdlib import uri as urimod
from hcdlib.config import PackConfig
from hcdlib.decode import store_pixels
from hcdlib.errors import UserError
from hcdlib.sources import (
    CLASS_FOLDERS,
    PACK_MANIFEST,
    ROW_SCHEMA,
    check_labelled,
    open_source,
    plan_chunks,
    read_chunk,
)

log = logging.getLogger(__name__)


def _shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def _existing_shard(cfg: PackConfig, name: str, chunk: dict) -> dict | None:
    """A shard an earlier run of this pack wrote (atomic, so complete): kept. Anything else is refused."""
    target = urimod.join(cfg.out, name)
    fs, path = urimod.resolve(target)
    try:
        with fs.open_input_file(path) as f:
            ids = pq.ParquetFile(f).read(columns=["id"])["id"].to_pylist()
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise UserError(f"{target} exists and is not a readable shard ({exc}); hcd pack does not overwrite "
                        "files it did not write: choose another --out") from exc
    # A chunk of files knows its ids; a row group of shards being repacked, only its size.
    if ids != chunk["id"] if "id" in chunk else len(ids) != chunk["num_rows"]:
        raise UserError(f"{target} exists and holds other patches than this input's shard {name} "
                        "(another input, labels or --rows-per-file); choose another --out")
    return {"path": name, "rows": len(ids)}


def _decoded_once(table: pa.Table) -> pa.Table:
    """Store each patch that decodes as its pixels (see :func:`hcdlib.decode.store_pixels`)."""
    todo = table["image"].to_pylist()  # rows repacked from shards may hold pixels already (image null)
    image, pixels, note = store_pixels(todo)
    had = table["pixels"].to_pylist()
    old_note = table["note"].to_pylist()
    pixels = [p if p is not None else h for p, h in zip(pixels, had, strict=True)]
    note = [n if i is not None else o for n, i, o in zip(note, todo, old_note, strict=True)]
    for name, values in (("image", image), ("pixels", pixels), ("note", note)):
        field = ROW_SCHEMA.field(name)
        table = table.set_column(table.column_names.index(name), field, pa.array(values, field.type))
    return table


def _write_shard(cfg: PackConfig, index: int, chunk: dict) -> dict:
    name = _shard_name(index)
    kept = _existing_shard(cfg, name, chunk)  # a rerun keeps what the first run finished
    if kept:
        return kept
    target = urimod.join(cfg.out, name)
    table = read_chunk(chunk)
    bad = [e for e in table["error"].to_pylist() if e]
    if bad:
        # A file we cannot even read is an input problem to fix first, not something to pack.
        raise UserError(f"pack {cfg.input}: {len(bad)} unreadable files, first: {bad[0]}; fix or remove them")
    table = _decoded_once(table.drop_columns(["error"]).cast(ROW_SCHEMA))
    buf = io.BytesIO()
    # zstd level 1: cheap to decompress at read time; what it saves depends on the tissue (the
    # synthetic benchmark patches barely shrink: 881 MB of shards for 886 MB of .tif files).
    pq.write_table(table, buf, row_group_size=cfg.row_group_size, compression="zstd", compression_level=1)
    urimod.write_bytes_atomic(target, buf.getvalue())
    return {"path": name, "rows": table.num_rows}


def pack(cfg: PackConfig) -> dict:
    """Pack ``cfg.input`` into Parquet shards under ``cfg.out``; return the manifest."""
    t0 = time.perf_counter()
    if urimod.within(cfg.out, cfg.input) or urimod.within(cfg.input, cfg.out):
        raise UserError(f"--out {cfg.out} and --input {cfg.input} overlap: shards would be read as input (or "
                        "input as shards) on the next run; choose an --out outside the input")
    src = open_source(cfg.input, cfg.labels)
    # A labelled archive (class folders, or labels for some patches): every patch 0 or 1, none forgotten.
    # A labels CSV with slide ids only (a test set) packs unlabelled.
    labelled = src.layout == CLASS_FOLDERS or (
        "label" in src.items.column_names and src.items["label"].null_count < src.items.num_rows)
    if labelled:
        check_labelled(src, "input")
    chunks = plan_chunks(src, cfg.rows_per_file)
    with ThreadPoolExecutor(cfg.threads) as pool:
        files = list(pool.map(lambda ic: _write_shard(cfg, *ic), enumerate(chunks)))
    manifest = {
        "input": cfg.input,
        "layout": src.layout,
        "files": files,
        "rows": sum(f["rows"] for f in files),
        "schema": [f.name for f in ROW_SCHEMA],
    }
    urimod.write_bytes_atomic(urimod.join(cfg.out, PACK_MANIFEST),
                              json.dumps(manifest, indent=1).encode())
    log.info("packed %d patches from %s into %d shards at %s in %.1fs",
             manifest["rows"], cfg.input, len(files), cfg.out, time.perf_counter() - t0)
    return manifest


def read_packed(out: str) -> pa.Table:
    """Read back every row of a finished pack (small data, tests and notebooks)."""
    src = open_source(out)
    return pa.concat_tables(read_chunk(c) for c in plan_chunks(src)).drop_columns(["error"])
