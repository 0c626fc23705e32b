"""The commit of a scoring run: every chunk has its part, then the manifest that makes them visible."""

from __future__ import annotations

import logging
from dataclasses import asdict

import pyarrow as pa
import pyarrow.compute as pc

from hcdlib.config import ScoreConfig
from hcdlib.errors import RunStopped
from hcdlib.outputs import runfolder as preds
from hcdlib.outputs.runfolder import RunFolder
from hcdlib.sources.chunks import Chunk
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)


def _note_counts(notes: list[pa.ChunkedArray]) -> dict:
    """How many rows carry a note (a conversion the model's input went through), and the commonest notes.

    A note is said on the console too: a grey or 16-bit archive scored by an H&E model is worth
    a look before its numbers are trusted.
    """
    col = pa.chunked_array([c for n in notes for c in n.chunks], pa.string())
    top = sorted(pc.value_counts(col.drop_null()).to_pylist(), key=lambda c: -c["counts"])[:5]
    return {"noted": len(col) - col.null_count, "note_examples": {c["values"]: c["counts"] for c in top}}


_TAKEN_OVER = ("another hcd run wrote into the same --out while this one ran (a second command with --overwrite?); "
               "nothing was committed: once the other run has finished, rerun one of them with --overwrite")


def commit(cfg: ScoreConfig, chunks: list[Chunk], spec: dict, wall: float, *, slides: dict | None = None) -> dict:
    """Check every chunk has its part, then write the manifest that makes them visible."""
    expected = {c.key: c.num_rows for c in chunks}
    folder = RunFolder(cfg.out)
    done = folder.done(expected, verify=False)  # read_part below checks every part's rows
    missing = [k for k in expected if k not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} chunks were not scored (first: {missing[0]}); "
                           "rerun the same command to finish them")
    if not folder.still_ours(spec):  # two commands into one --out, the second with --overwrite
        raise RunStopped(f"{urimod.join(cfg.out, preds.RUN_SPEC)} is no longer this run's: {_TAKEN_OVER}")
    files, ids, notes, ok, error_example = [], [], [], 0, None
    for key in expected:
        path = f"{preds.PARTS}/{preds.part_name(key)}"
        t = preds.read_part(urimod.join(cfg.out, path), ["id", "status", "error", "note", "model"],
                            expect_rows=expected[key])
        other = pc.filter(t["model"], pc.not_equal(t["model"], spec["model"]))
        if len(other):  # written by a run of another model into the same --out at the same time
            raise RunStopped(f"{urimod.join(cfg.out, path)} holds predictions of model {other[0].as_py()}, not of "
                             f"this run's {spec['model']}: {_TAKEN_OVER}")
        files.append({"path": path, "rows": t.num_rows, "bytes": done[key]})
        ids.append(t["id"])
        notes.append(t["note"])
        part_ok = pc.sum(pc.equal(t["status"], "ok")).as_py() or 0
        reasons = t["error"].drop_null() if error_example is None and part_ok < t.num_rows else []
        if len(reasons):  # the first, for the summary: an error row says why
            error_example = reasons[0].as_py()
        ok += part_ok
    id_col = pa.chunked_array(ids, pa.string()) if ids else pa.chunked_array([], pa.string())
    counts = pc.value_counts(id_col)
    dups = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist()
    if dups:
        log.warning("%d ids appear more than once in the input (kept as separate rows), e.g. %s",
                    len(dups), dups[:5])
    rows = sum(f["rows"] for f in files)
    manifest = {
        "files": files, "rows": rows, "ok": ok, "errors": rows - ok, "error_example": error_example,
        **_note_counts(notes),
        "duplicate_input_ids": len(dups), "duplicate_id_examples": dups[:20],
        "model": spec["model"], "run": spec, "config": asdict(cfg), "wall_seconds": round(wall, 2),
    }
    if slides is not None:
        manifest["slides"] = slides
    manifest["manifest_uri"] = folder.commit(manifest)
    return manifest
