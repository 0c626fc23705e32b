"""``hcd pack``: turn any patch source into a few large Parquet shards.

    hcd pack --input /data/kaggle/train --labels /data/kaggle/train_labels.csv --out s3://bucket/pcam-train

Millions of 30 KB objects are slow and costly to list and read on S3 (one request each);
a few hundred shards of ``--rows-per-file`` patches are not. Images are stored as the
original encoded bytes, so packing is lossless and costs no decode.

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
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from hcdlib import uri as urimod
from hcdlib.sources import PACK_MANIFEST, ROW_SCHEMA, open_source, plan_chunks, read_chunk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackConfig:
    """What ``hcd pack`` does."""

    input: str
    out: str
    labels: str | None = None
    rows_per_file: int = 10_000
    row_group_size: int = 1024  # the unit of scoring work and resume
    threads: int = 4


def _shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def _write_shard(cfg: PackConfig, index: int, chunk: dict) -> dict:
    name = _shard_name(index)
    target = urimod.join(cfg.out, name)
    if urimod.exists(target):  # shards are only ever complete (atomic), so a rerun keeps them
        fs, path = urimod.resolve(target)
        with fs.open_input_file(path) as f:
            return {"path": name, "rows": pq.ParquetFile(f).metadata.num_rows}
    table = read_chunk(chunk)
    bad = [e for e in table["error"].to_pylist() if e]
    if bad:
        # A file we cannot even read is an input problem to fix first, not something to pack.
        raise OSError(f"pack {cfg.input}: {len(bad)} unreadable files, first: {bad[0]}")
    table = table.drop_columns(["error"]).cast(ROW_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=cfg.row_group_size, compression="zstd")
    urimod.write_bytes_atomic(target, buf.getvalue())
    return {"path": name, "rows": table.num_rows}


def pack(cfg: PackConfig) -> dict:
    """Pack ``cfg.input`` into Parquet shards under ``cfg.out``; return the manifest."""
    t0 = time.perf_counter()
    src = open_source(cfg.input, cfg.labels)
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
