"""The commit protocol of every job that writes an output folder (``hcd score``, ``hcd pack``).

1. :func:`claim_output` writes the run spec (``_RUN.json``) first: a rerun with the same spec
   resumes, another is refused, and ``--overwrite`` clears only files hcd wrote.
2. Parts are written atomically under ``<out>/parts/`` (:func:`write_table_atomic`), one per
   chunk; :func:`done_parts` tells a rerun which chunks are complete.
3. ``<out>/_SUCCESS`` (JSON) is written last and lists the parts (:func:`write_manifest`).
   Readers take only what it lists, so a crashed or running job is never read half-done.

With pandas: ``hcdlib.read_predictions(out).to_pandas()``.
"""

from __future__ import annotations

import io
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hcdlib import uri as urimod
from hcdlib.errors import UserError

log = logging.getLogger(__name__)

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


class NotCommittedError(UserError, FileNotFoundError):
    """The output has no manifest: the job did not finish (or is still running)."""


class CorruptOutputError(UserError):
    """A committed file is not what the manifest promises (replaced, truncated, damaged)."""


def read_manifest(out: str) -> dict:
    """The committed manifest of ``out``; :class:`NotCommittedError` if absent, named if corrupt."""
    target = urimod.join(out, MANIFEST)
    try:
        data = urimod.read_bytes(target)
    except FileNotFoundError:
        if not urimod.exists(urimod.join(out, RUN_SPEC)):  # no run ever started there: the wrong folder
            raise NotCommittedError(f"{out}: not the output of an hcd run (no {MANIFEST} or {RUN_SPEC}); pass the "
                                    "--out of hcd score") from None
        raise NotCommittedError(f"{out}: no {MANIFEST} manifest; the run did not finish "
                                "(rerun the same command to resume it)") from None
    try:
        manifest = json.loads(data)
        if not isinstance(manifest.get("files"), list):
            raise ValueError("no 'files' list")
    except (ValueError, AttributeError) as exc:
        raise CorruptOutputError(f"{target}: corrupt manifest ({len(data)} bytes: {exc}); rerun the same "
                                 "hcd score command to rewrite it") from exc
    return manifest


def read_predictions(out: str, columns: list[str] | None = None) -> pa.Table:
    """All committed prediction rows of ``out`` (only the files the manifest lists, as it lists them)."""
    manifest = read_manifest(out)
    tables = [read_part(urimod.join(out, f["path"]), columns, expect_rows=f.get("rows"),
                        expect_bytes=f.get("bytes")) for f in manifest["files"]]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def read_part(part_uri: str, columns: list[str] | None = None, *, expect_rows: int | None = None,
              expect_bytes: int | None = None) -> pa.Table:
    """Read one part file, refusing one that differs from what the manifest recorded."""
    fs, path = urimod.resolve(part_uri)
    fix = "the output was changed after it was committed; rerun hcd score with --overwrite"
    try:
        with fs.open_input_file(path) as f:
            if expect_bytes is not None and f.size() != expect_bytes:
                raise CorruptOutputError(f"{part_uri}: {f.size()} bytes, the manifest recorded {expect_bytes}; {fix}")
            table = pq.read_table(f, columns=columns)
    except FileNotFoundError:
        raise CorruptOutputError(f"{part_uri}: listed in the manifest but missing; {fix}") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise CorruptOutputError(f"{part_uri}: unreadable ({exc}); {fix}") from exc
    if expect_rows is not None and table.num_rows != expect_rows:
        raise CorruptOutputError(f"{part_uri}: {table.num_rows} rows, the manifest recorded {expect_rows}; {fix}")
    return table


# Everything hcd score and hcd pack write in --out, and how to recognise its files there: --overwrite
# deletes these and nothing else (--out may hold the user's own files, even their input).
OWNED = (MANIFEST, RUN_SPEC, PARTS, "slides")
_PART_RE = re.compile(r"^part-.+\.parquet(\.tmp-[0-9a-f]{32})?$")
_SLIDE_FILE_RE = re.compile(r"^(.+-[0-9a-f]{8}\.(thumbnail\.png|heatmap\.png|geojson)|summary\.csv)"
                            r"(\.tmp-[0-9a-f]{32})?$")


def part_name(key: str) -> str:
    """The file name of the part that holds chunk ``key``."""
    return f"part-{key}.parquet"


def _files(uri: str) -> list[pafs.FileInfo]:
    fs, root = urimod.resolve(uri)
    return [i for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
            if i.type == pafs.FileType.File]


def check_run_spec(out: str, spec: dict, *, fix: str, name: str = RUN_SPEC) -> bool:
    """Whether ``out`` holds a run spec (``name``); refuse it when it differs from ``spec``.

    A rerun continues only the run it is: another input, model or setting in the same folder
    would mix two runs into one result that claims to be the second. ``fix``: what to do instead.
    """
    target = urimod.join(out, name)
    if not urimod.exists(target):
        return False
    try:
        old = json.loads(urimod.read_bytes(target))
    except ValueError as exc:
        raise CorruptOutputError(f"{target}: corrupt run spec ({exc}); {fix}") from exc
    diff = spec_differences(old, spec)
    if diff:
        said = ", ".join(f"{k} ({old.get(k)!r} there, {spec[k]!r} now{_SPEC_MEANS.get(k, '')})" for k in diff)
        raise UserError(f"{out} holds a run with a different {said}; {fix}")
    return True


def spec_differences(old: object, spec: dict) -> list[str]:
    """The keys of ``spec`` whose value the run spec ``old`` (as read from its file) does not share."""
    return [k for k in spec if not isinstance(old, dict) or old.get(k) != spec[k]]


def still_ours(out: str, spec: dict) -> bool:
    """Whether ``out``'s run spec is still ``spec``: not removed or replaced by another run since it was claimed."""
    try:
        return not spec_differences(json.loads(urimod.read_bytes(urimod.join(out, RUN_SPEC))), spec)
    except (OSError, ValueError):  # removed, or half-written by another run
        return False


# What a run spec's less plain keys mean, in a refusal: a hash alone did not say what changed.
_SPEC_MEANS = {f"{k}_fingerprint": f": files of {flag} were added, removed or changed in size since"
               for k, flag in (("input", "--input"), ("train", "--data"), ("val", "the validation data"))}


def claim_output(out: str, spec: dict, *, overwrite: bool) -> None:
    """Make ``out`` this run's: resume the same run, refuse another, or (``overwrite``) clear hcd's old one.

    ``_RUN.json`` (the spec) is written before any part, so its presence says hcd owns the parts
    and slide files beside it. Without it, a ``parts/`` folder or manifest is somebody else's
    and is never touched.
    """
    if not overwrite and check_run_spec(out, spec, fix="use another --out or pass --overwrite"):
        return
    if urimod.exists(urimod.join(out, RUN_SPEC)):
        _clear_run(out)
    else:
        foreign = [n for n in (MANIFEST, PARTS) if urimod.exists(urimod.join(out, n))]
        if foreign:
            raise UserError(f"{out} holds {' and '.join(foreign)} that hcd did not write (no {RUN_SPEC}); "
                            "choose another --out")
    urimod.write_bytes_atomic(urimod.join(out, RUN_SPEC), json.dumps(spec, indent=1).encode())


def _clear_run(out: str) -> None:
    """Delete the files an earlier run wrote in ``out`` (by hcd's own names), the run spec last."""
    urimod.delete(urimod.join(out, MANIFEST))
    for folder, pattern in ((PARTS, _PART_RE), ("slides", _SLIDE_FILE_RE)):
        for info in _files(urimod.join(out, folder)):
            if pattern.match(info.base_name):
                urimod.delete(urimod.join(out, folder, info.base_name))
    urimod.delete(urimod.join(out, RUN_SPEC))


def done_parts(out: str, expected: dict[str, int], *, verify: bool = True) -> dict[str, int]:
    """Chunks of ``expected`` (key -> rows) whose part is complete in ``out``, with the part's bytes.

    With ``verify`` each part's footer is read: a zero-byte, unreadable or short part (a crash,
    a disk that filled up) is named in a warning and not counted, so its chunk is scored again.
    """
    sizes = {i.base_name: i.size for i in _files(urimod.join(out, PARTS))}
    found = {k: sizes[part_name(k)] for k in expected if part_name(k) in sizes}
    if not verify:
        return found

    def problem(key: str) -> str | None:
        if not found[key]:
            return "empty (0 bytes)"
        fs, path = urimod.resolve(urimod.join(out, PARTS, part_name(key)))
        try:
            with fs.open_input_file(path) as f:
                rows = pq.ParquetFile(f).metadata.num_rows
        except (OSError, pa.ArrowInvalid) as exc:
            return f"unreadable ({exc})"
        return None if rows == expected[key] else f"{rows} rows, expected {expected[key]}"

    with ThreadPoolExecutor(16 if urimod.is_s3(out) else 2) as pool:
        problems = dict(zip(found, pool.map(problem, found), strict=True))
    for key, why in problems.items():
        if why:
            log.warning("%s: %s; its chunk is scored again", urimod.join(out, PARTS, part_name(key)), why)
            del found[key]
    return found


def read_parts(out: str, keys: list[str], columns: list[str]) -> pa.Table:
    """The named parts of ``out`` (before the manifest exists: the run's own post-processing)."""
    return pa.concat_tables(read_part(urimod.join(out, PARTS, part_name(k)), columns) for k in keys)


class ChunkAssembler:
    """Gathers each chunk's rows from batches that arrive in any order, in pieces, maybe repeated.

    Ray retries a failed task or a lost actor's batch, so a row can arrive twice, and batches of
    one chunk interleave with others. Rows carry ``chunk`` (key) and ``row`` (index in the
    chunk); :meth:`add` returns each chunk once, when every row is in: one row per input, in
    input order. That is what makes the committed output exactly once.
    """

    def __init__(self, expected: dict[str, int]):
        self.expected = expected
        self._pending: dict[str, list[pa.Table]] = {}
        self._seen: dict[str, set[int]] = {}
        self.done: set[str] = set()

    def add(self, batch: pa.Table) -> list[tuple[str, pa.Table]]:
        """Take one batch; return ``(key, rows)`` for every chunk it completed."""
        import numpy as np
        import pyarrow.compute as pc

        complete = []
        for key in pc.unique(batch["chunk"]).to_pylist():
            if key in self.done:  # a retry repeated rows of a chunk already handed back
                continue
            part = batch.filter(pc.equal(batch["chunk"], key))
            self._pending.setdefault(key, []).append(part)
            seen = self._seen.setdefault(key, set())
            seen.update(part["row"].to_pylist())
            if len(seen) == self.expected[key]:
                rows = pa.concat_tables(self._pending.pop(key)).sort_by("row")
                _, first = np.unique(rows["row"].to_numpy(), return_index=True)
                complete.append((key, rows.take(pa.array(first))))
                self.done.add(key)
                del self._seen[key]
        return complete


def write_part(part_uri: str, table: pa.Table) -> None:
    """Write one prediction part atomically (columns in :data:`SCHEMA` order; absent ones null)."""
    cols = [table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in SCHEMA]
    write_table_atomic(part_uri, pa.table(cols, names=SCHEMA.names).cast(SCHEMA), compression="zstd")


def write_table_atomic(uri: str, table: pa.Table, **parquet_options) -> int:
    """Write a Parquet file in one piece (temp + rename locally, one PUT on S3); return its bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, **parquet_options)
    urimod.write_bytes_atomic(uri, buf.getvalue())
    return buf.tell()


def write_manifest(out: str, manifest: dict) -> str:
    """Write ``_SUCCESS`` last, atomically: from then on readers see exactly the parts it lists."""
    target = urimod.join(out, MANIFEST)
    urimod.write_bytes_atomic(target, json.dumps(manifest, indent=1).encode())
    return target


def once_per_id(t: pa.Table, predictions: str, *, then: str) -> pa.Table:
    """``t`` (prediction rows) with one row per id, or a refusal naming ids whose rows differ.

    Rows of one id with the same ``prob`` and ``status`` are the same patch listed twice (in two
    folders): the first is kept, with a warning that ends with ``then``. Rows that differ are two
    images under one name: no label (evaluate) or submission row can be right for both, so they
    are refused.
    """
    import pyarrow.compute as pc

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
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

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
