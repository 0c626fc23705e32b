"""Readers of a committed run: the predictions its manifest lists, one row per id, the Kaggle submission."""

from __future__ import annotations

import io
import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from hcdlib.errors import UserError
from hcdlib.outputs.runfolder import PARTS, SCHEMA, part_name, read_manifest, read_part
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)


def read_predictions(out: str, columns: list[str] | None = None) -> pa.Table:
    """All committed prediction rows of ``out`` (only the files the manifest lists, as it lists them)."""
    manifest = read_manifest(out)
    tables = [read_part(urimod.join(out, f["path"]), columns, expect_rows=f.get("rows"),
                        expect_bytes=f.get("bytes")) for f in manifest["files"]]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def read_parts(out: str, keys: list[str], columns: list[str]) -> pa.Table:
    """The named parts of ``out`` (before the manifest exists: the run's own post-processing)."""
    return pa.concat_tables(read_part(urimod.join(out, PARTS, part_name(k)), columns) for k in keys)


def once_per_id(t: pa.Table, predictions: str, *, then: str) -> pa.Table:
    """``t`` (prediction rows) with one row per id, or a refusal naming ids whose rows differ.

    Rows of one id with the same ``prob`` and ``status`` are the same patch listed twice (in two
    folders): the first is kept, with a warning that ends with ``then``. Rows that differ are two
    images under one name: no label (evaluate) or submission row can be right for both, so they
    are refused.
    """
    if pc.count_distinct(t["id"]).as_py() == t.num_rows:
        return t
    distinct = t.select(["id", "prob", "status"]).group_by(["id", "prob", "status"], use_threads=False).aggregate([])
    per_id = distinct.group_by("id", use_threads=False).aggregate([([], "count_all")])
    clash = pc.filter(per_id["id"], pc.greater(per_id["count_all"], 1))
    if len(clash):
        raise UserError(f"{predictions}: {len(clash)} ids have rows with different predictions (different images "
                        f"under one name), e.g. {', '.join(clash.to_pylist()[:5])}; rename or remove them and "
                        "score again")
    rows = pa.table({"id": t["id"], "row": pa.array(range(t.num_rows), pa.int64())})
    first = rows.group_by("id", use_threads=False).aggregate([("row", "min"), ([], "count_all")])
    log.warning("%d ids appear more than once with the same prediction (the same patch twice); %s",
                pc.sum(pc.greater(first["count_all"], 1)).as_py(), then)
    keep = first["row_min"]
    return t.take(pc.take(keep, pc.sort_indices(keep)))  # in the order they came


def write_submission(predictions: str, out_csv: str, *, overwrite: bool = False) -> int:
    """Write the Kaggle submission CSV (``id,label`` = P(tumour), ids sorted); return rows.

    An existing ``out_csv`` is replaced only with ``overwrite``: hcd cannot tell its own
    submission from the user's file of the same name (a labels CSV is ``id,label`` too).

    Kaggle needs a value for every id, so rows that failed to decode get 0.5 (no evidence
    either way); the count is logged by the caller from the manifest's error total. Kaggle
    rejects a file with an id twice: rows of one id that agree (the same patch listed twice)
    become one row; rows that disagree are refused, naming the ids.
    """
    if urimod.exists(out_csv) and not urimod.is_file(out_csv):  # with --overwrite it ended in a traceback
        raise UserError(f"--out {out_csv} is a folder; give the CSV's file name, e.g. "
                        f"{urimod.join(out_csv, 'submission.csv')}")
    if not overwrite and urimod.exists(out_csv):
        raise UserError(f"--out {out_csv} exists: hcd does not replace a file it may not have written; "
                        "choose another --out, or pass --overwrite to replace it")
    if "slides" in read_manifest(predictions):  # tile ids (<slide>_<x>_<y>) are no patch ids of a submission
        raise UserError(f"{predictions}: predictions of whole-slide tiles, and a Kaggle submission lists the patch "
                        f"ids of its test set; pass predictions of patches (the slides' results are in "
                        f"{urimod.join(predictions, 'slides')})")
    t = once_per_id(read_predictions(predictions, ["id", "prob", "status"]), predictions, then="written once each")
    t = pa.table({"id": t["id"], "label": pc.fill_null(t["prob"], pa.scalar(0.5, pa.float32()))})
    t = t.sort_by("id")
    buf = io.BytesIO()
    pacsv.write_csv(t, buf)
    urimod.write_bytes_atomic(out_csv, buf.getvalue())
    return t.num_rows
