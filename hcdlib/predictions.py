"""The committed-output protocol shared by every job that writes predictions.

Parts are written atomically under ``<out>/parts/``; ``<out>/_SUCCESS`` (JSON) is written
last and lists them. Readers take only what the manifest lists, so a crashed or running job
is never read half-done. With pandas: ``hcdlib.read_predictions(out).to_pandas()``.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from hcdlib import uri as urimod

MANIFEST = "_SUCCESS"
RUN_SPEC = "_RUN.json"
PARTS = "parts"

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prob", pa.float32()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("note", pa.string()),
    ("source", pa.string()),
    ("slide_id", pa.string()),
    ("x", pa.int64()),
    ("y", pa.int64()),
    ("tile_size", pa.int64()),  # slides: tile edge in level-0 px; null for plain patches
    ("model", pa.string()),
])


class NotCommittedError(FileNotFoundError):
    """The output has no manifest: the job did not finish (or is still running)."""


def read_manifest(out: str) -> dict:
    """The committed manifest of ``out``; raises :class:`NotCommittedError` if absent."""
    target = urimod.join(out, MANIFEST)
    if not urimod.exists(target):
        raise NotCommittedError(f"{out}: no {MANIFEST} manifest; the run did not finish "
                                "(rerun the same command to resume it)")
    return json.loads(urimod.read_bytes(target))


def read_predictions(out: str, columns: list[str] | None = None) -> pa.Table:
    """All committed prediction rows of ``out`` (only the files the manifest lists)."""
    manifest = read_manifest(out)
    tables = [read_part(urimod.join(out, f["path"]), columns) for f in manifest["files"]]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def read_part(part_uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read one part file."""
    fs, path = urimod.resolve(part_uri)
    with fs.open_input_file(path) as f:
        return pq.read_table(f, columns=columns)


def write_part(part_uri: str, table: pa.Table) -> None:
    """Write one part file atomically (columns in :data:`SCHEMA` order; absent ones null)."""
    cols = [table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in SCHEMA]
    buf = io.BytesIO()
    pq.write_table(pa.table(cols, names=SCHEMA.names).cast(SCHEMA), buf, compression="zstd")
    urimod.write_bytes_atomic(part_uri, buf.getvalue())


def write_submission(predictions: str, out_csv: str) -> int:
    """Write the Kaggle submission CSV (``id,label`` = P(tumour), ids sorted); return rows.

    Kaggle needs a value for every id, so rows that failed to decode get 0.5 (no evidence
    either way); the count is logged by the caller from the manifest's error total.
    """
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    t = read_predictions(predictions, ["id", "prob", "status"]).sort_by("id")
    label = pc.fill_null(t["prob"], pa.scalar(0.5, pa.float32()))
    buf = io.BytesIO()
    pacsv.write_csv(pa.table({"id": t["id"], "label": label}), buf)
    urimod.write_bytes_atomic(out_csv, buf.getvalue())
    return t.num_rows
