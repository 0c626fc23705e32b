"""``hcd pack``: turn any patch source into a few large Parquet shards.

    hcd pack --input /data/kaggle/train --labels /data/kaggle/train_labels.csv --out s3://bucket/pcam-train

Millions of 30 KB objects are slow and costly to list and read on S3 (one request each);
a few hundred shards of ``--rows-per-file`` patches are not. Each patch is decoded once, here:
one that decodes is stored as its 96x96x3 pixels (LZ4), so scoring reads a chunk's pixels
with one reshape instead of decoding every patch again; JPEGs keep their encoded bytes (5x
smaller than pixels) and anything that does not decode keeps its bytes and becomes the same
error row it would be unpacked. Packing loses nothing: pixels are what decoding gives.

The output is committed as ``hcd score`` commits predictions (:mod:`hcdlib.outputs.runfolder`): the
run spec first, each shard atomically under ``parts/``, ``_SUCCESS`` last listing the shards.
Readers of a partial run never take a half-written shard, a rerun skips shards that are
complete, and a folder hcd did not write is refused.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from hcdlib.config import PackConfig
from hcdlib.errors import UserError
from hcdlib.outputs import runfolder as preds
from hcdlib.outputs.runfolder import RunFolder
from hcdlib.sources.chunks import ROW_SCHEMA, PatchChunk
from hcdlib.sources.decode import store_pixels
from hcdlib.sources.factory import open_source
from hcdlib.sources.labels import check_labelled
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)


def _decoded_once(table: pa.Table) -> pa.Table:
    """Store each patch that decodes as its pixels (see :func:`hcdlib.sources.decode.store_pixels`)."""
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


def _write_shard(cfg: PackConfig, chunk: PatchChunk) -> dict:
    """Read, decode once and write one chunk as a shard; its manifest entry."""
    table = chunk.rows()
    bad = [e for e in table["error"].to_pylist() if e]
    if bad:
        # A file we cannot even read is an input problem to fix first, not something to pack.
        raise UserError(f"pack {cfg.input}: {len(bad)} unreadable files, first: {bad[0]}; fix or remove them")
    table = _decoded_once(table.drop_columns(["error"]).cast(ROW_SCHEMA))
    path = f"{preds.PARTS}/{preds.part_name(chunk.key)}"
    size = preds.write_table_atomic(RunFolder(cfg.out).part_uri(chunk.key), table, **shard_options(cfg.row_group_size))
    return {"path": path, "rows": table.num_rows, "bytes": size}


# The patch columns (pixels, encoded images) are LZ4, without a dictionary: raw H&E pixels barely
# compress with any fast codec (3,000 real PCam patches: 0.96 of their size with LZ4, 0.90 with
# zstd level 1), and zstd's decompression made reading a pixel chunk 5x slower (27 against 5.6
# us a patch, one core; the read task is on the scoring pipeline's critical path). A dictionary
# over 27 KB values only costs hashing at write time. The small columns stay zstd.
_PATCH_COLUMNS = ("pixels", "image")


def shard_options(row_group_size: int) -> dict:
    """``pq.write_table`` options for a shard (``hcd pack``, and the benchmark's copies of shards)."""
    return {"row_group_size": row_group_size,
            "compression": {c: "lz4" if c in _PATCH_COLUMNS else "zstd" for c in ROW_SCHEMA.names},
            "use_dictionary": [c for c in ROW_SCHEMA.names if c not in _PATCH_COLUMNS]}


def pack(cfg: PackConfig) -> dict:
    """Pack ``cfg.input`` into Parquet shards under ``cfg.out``; return the manifest."""
    t0 = time.perf_counter()
    urimod.check_folder(cfg.out)
    if urimod.within(cfg.out, cfg.input) or urimod.within(cfg.input, cfg.out):
        raise UserError(f"--out {cfg.out} and --input {cfg.input} overlap: shards would be read as input (or "
                        "input as shards) on the next run; choose an --out outside the input")
    # --labels must label (as for train and evaluate): a CSV without a label column is refused.
    src = open_source(cfg.input, cfg.labels, require_label=True)
    # A labelled archive (class folders, or labels for some patches): every patch 0 or 1, none forgotten.
    if src.has_labels():
        check_labelled(src, "input")
    chunks = src.chunks(cfg.rows_per_file)
    spec = {"job": "pack", "input": cfg.input, "input_fingerprint": src.fingerprint(), "labels": cfg.labels,
            "rows_per_file": cfg.rows_per_file, "row_group_size": cfg.row_group_size}
    folder = RunFolder(cfg.out)
    folder.claim(spec, overwrite=cfg.overwrite)
    expected = {c.key: c.num_rows for c in chunks}
    done = folder.done(expected)  # complete shards of an earlier run of this pack: kept
    todo = [c for c in chunks if c.key not in done]
    if todo:
        urimod.delete(urimod.join(cfg.out, preds.MANIFEST))  # must not list shards about to be rewritten
    with ThreadPoolExecutor(cfg.threads) as pool:
        written = {e["path"]: e for e in pool.map(lambda c: _write_shard(cfg, c), todo)}
    files = []
    for c in chunks:
        path = f"{preds.PARTS}/{preds.part_name(c.key)}"
        files.append(written.get(path) or {"path": path, "rows": c.num_rows, "bytes": done[c.key]})
    manifest = {"input": cfg.input, "layout": src.layout, "files": files, "rows": sum(f["rows"] for f in files),
                "schema": [f.name for f in ROW_SCHEMA], "run": spec}
    folder.commit(manifest)
    log.info("packed %d patches from %s into %d shards at %s in %.1fs (%d kept from an earlier run)",
             manifest["rows"], cfg.input, len(files), cfg.out, time.perf_counter() - t0, len(done))
    return manifest


def read_packed(out: str) -> pa.Table:
    """Read back every row of a finished pack (small data, tests and notebooks)."""
    src = open_source(out)
    return pa.concat_tables(c.rows() for c in src.chunks()).drop_columns(["error"])
