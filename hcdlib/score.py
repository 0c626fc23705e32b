"""Batch scoring with Ray Data: read -> decode -> model actors -> committed Parquet.

    hcd score --model runs/demo/model --input /data/test --out /data/preds
    ray job submit --working-dir . -- python jobs/score.py --model s3://b/model --input s3://b/test --out s3://b/preds

The input is listed once (:func:`hcdlib.sources.open_source`, slides included) and cut into
chunks (a slice of files, a Parquet row group, a run of slide tiles), each of which reads itself.
Ray Data reads and decodes chunks in parallel tasks and streams the uint8 patches to a pool
of model actors; the driver gathers each chunk's predictions and writes the chunk as one
part file once all its rows are in. A part is written atomically and only once, so:
- a rerun after a crash skips chunks that have a part (resume), and
- the committed output holds each input row once, whatever retries Ray made.
``_SUCCESS`` is written last and lists every part (see :mod:`hcdlib.predictions`).
"""

from __future__ import annotations

import gc
import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hcdlib import predictions as preds
from hcdlib import uri as urimod
from hcdlib.chunks import Chunk, PatchChunk, largest_chunk
from hcdlib.config import ScoreConfig
from hcdlib.console import progress
from hcdlib.errors import Interrupted, RunStopped, UserError, outside_cause, release_frames
from hcdlib.pipeline import decoded_dataset, limit_read_ahead
from hcdlib.sources import open_source
from hcdlib.transforms import Preprocess

log = logging.getLogger(__name__)


class Scorer:
    """Ray Data actor: loads the model once, then scores batches with a :class:`~hcdlib.infer.Predictor`.

    The device is what Ray assigned (:mod:`hcdlib.device`): CPU for an actor that asked for no
    GPU, even on a GPU node; an error for one given a GPU that torch cannot use.
    """

    def __init__(self, model_uri: str, *, sha256: str, tta: int, threads: int, batch_size: int,
                 compile: bool = False, precision: str = "auto"):
        import torch

        from hcdlib.artifact import load_model, model_id
        from hcdlib.device import pick
        from hcdlib.infer import Predictor, compiled, for_inference
        from hcdlib.transforms import Preprocess

        torch.set_num_threads(threads)
        self.plan = pick(precision)
        self.device = torch.device(self.plan.device)
        model, meta = load_model(model_uri, device=self.device)
        if meta["sha256"] != sha256:
            raise RuntimeError(f"{model_uri} changed while the job ran (hash {meta['sha256'][:12]})")
        model = for_inference(model)
        if compile:
            model = compiled(model)
        self.predict = Predictor(model, Preprocess.from_dict(meta["preprocess"]), device=self.device, tta=tta,
                                 autocast=self.plan.autocast, fixed_batch=batch_size if compile else None)
        self.model_id = model_id(meta)
        self.batch_size = batch_size

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        """P(tumour) of decoded patches (N x 96 x 96 x 3 uint8)."""
        return self.predict(pixels)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Add ``prob`` and ``model`` to a decoded batch; drop the pixels.

        The batch stays Arrow (``batch_format="pyarrow"``): only the pixels become numpy, with no
        copy; ids, sources and messages pass through untouched. As numpy dicts, every string
        column was turned into Python objects and back, which cost the actor 40 us a patch.
        """
        n = batch.num_rows
        ok = pc.equal(batch["status"], "ok").to_numpy(zero_copy_only=False)
        prob = np.full(n, np.nan, dtype=np.float32)
        if ok.any():
            chunks = batch["pixels"].chunks  # one, as blocks arrive: a view of the object store, no copy
            pixels = chunks[0].to_numpy() if len(chunks) == 1 else np.concatenate([c.to_numpy() for c in chunks])
            todo = pixels if ok.all() else pixels[ok]
            prob[ok] = np.concatenate([self.forward(todo[i:i + self.batch_size])
                                       for i in range(0, len(todo), self.batch_size)])
        out = batch.drop_columns([c for c in ("pixels", "label") if c in batch.column_names])
        out = _mark_non_finite(out, ok & ~np.isfinite(prob))
        return out.append_column("prob", pa.array(prob)).append_column(
            "model", pa.array([self.model_id]).take(pa.array(np.zeros(n, dtype=np.int64))))


NON_FINITE = "the model gave a non-finite probability (in its autocast arithmetic and again in fp32)"


def _mark_non_finite(batch: pa.Table, bad: np.ndarray) -> pa.Table:
    """Rows whose probability is not finite become error rows: never a NaN written with status ok."""
    if not bad.any():
        return batch
    mask = pa.array(bad)
    status = pc.if_else(mask, pa.scalar("error"), batch["status"])
    error = pc.if_else(mask, pa.scalar(NON_FINITE), _as_str(batch["error"]))
    batch = batch.set_column(batch.column_names.index("status"), "status", status)
    return batch.set_column(batch.column_names.index("error"), "error", error)


def _as_str(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A string column back from Ray Data: an all-None object column may arrive as null or NaN floats."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    return pa.chunked_array([pa.nulls(len(col), pa.string())])


def _to_part(rows: pa.Table) -> pa.Table:
    """A chunk's rows (one per input, in input order) in the output schema."""
    ok = pc.equal(rows["status"], "ok")
    cols = {
        "id": rows["id"], "prob": pc.if_else(ok, rows["prob"], pa.scalar(None, pa.float32())),
        "status": rows["status"], "error": _as_str(rows["error"]), "note": _as_str(rows["note"]),
        "source": rows["source"], "slide_id": _as_str(rows["slide_id"]),
        **{c: rows[c] if c in rows.column_names else pa.nulls(rows.num_rows, pa.int64())
           for c in ("x", "y", "tile_size")},
        "model": rows["model"],
    }
    return pa.table(cols).cast(preds.SCHEMA)


def _check_locations(cfg: ScoreConfig) -> None:
    """Refuse an --out that overlaps --input (outputs would be read as input, or input deleted), or a file."""
    urimod.check_folder(cfg.out)
    urimod.check_outside(cfg.out, [("--input", cfg.input)])
    if urimod.within(cfg.out, cfg.model):  # the artifact's folder is the model: nothing else belongs there
        raise UserError(f"--out {cfg.out} is inside --model {cfg.model}: the predictions would be written into the "
                        "model artifact's folder; choose an --out outside it")
    for name in preds.OWNED:
        if urimod.within(cfg.input, urimod.join(cfg.out, name)):
            raise UserError(f"--input {cfg.input} is inside {urimod.join(cfg.out, name)}, where hcd score writes "
                            "its outputs; choose another --out")


# Below this validation AUC a model tells tumour from normal too poorly for its probabilities to
# be read as evidence (a run of a few steps; a label column that meant something else).
WEAK_AUC = 0.75


def _warn_weak(uri: str, meta: dict) -> None:
    """Say so when the model's own validation AUC (recorded at export) is weak: it scores like any other."""
    m = meta.get("metrics") or {}
    auc = m.get("val_auc")
    if auc is None or auc >= WEAK_AUC:
        return
    how = "worse than chance: its probabilities point the wrong way" if auc < 0.5 else "its probabilities are weak"
    log.warning("%s: this model's validation AUC is %.3f (epoch %s, %s patches), %s; scored anyway, but train it "
                "longer or on more data before reading them as evidence", uri, auc, m.get("epoch", "?"),
                m.get("val_n", "?"), how)


def score(cfg: ScoreConfig, *, actor: type = Scorer) -> dict:
    """Run one scoring job to completion (resuming if ``cfg.out`` holds a partial run).

    Everything the user gave is checked here, on the driver, before Ray starts: the model
    artifact (metadata, hash, the model its weights declare), --out against --input, and the
    input, which is listed once. The driver imports no torch: on 2 cores that import, beside
    Ray's start, delayed the first part by 1-3 s. Only weights exported before they declared
    their model are built into it here, to show they fit. ``actor`` is the model actor's class;
    only benchmarks pass another (one whose forward pass is a constant, to time the pipeline alone).
    """
    import ray

    from hcdlib.artifact import check_artifact, declares_arch, load_model
    from hcdlib.rayutil import (
        autoscaler_limits,
        check_gpus,
        gpus_to_plan,
        init_ray,
        is_fixed,
        is_local,
        plan_actors,
    )
    from hcdlib.slides import SlideSource, SlideTiling

    t0 = time.perf_counter()
    cfg = cfg.located("model", "input", "out", "labels")  # Ray's processes do not share our working directory
    checked = check_artifact(cfg.model)
    meta = checked[0]
    if not declares_arch(checked[1]):
        load_model(cfg.model, checked=checked)  # raises ArtifactError if the weights do not fit
    _warn_weak(cfg.model, meta)
    _check_locations(cfg)
    pre = Preprocess.from_dict(meta["preprocess"])  # slides are cut at the model's resolution and patch
    tiling = SlideTiling(out=cfg.out, target_mpp=pre.mpp, patch=pre.size, mpp=cfg.mpp,
                         tissue_threshold=cfg.tissue_threshold, force=cfg.slides)
    src = open_source(cfg.input, cfg.labels, tiling=tiling)  # the one listing of the input
    if cfg.mpp is not None and src.layout != SlideSource.layout:
        raise UserError(f"--mpp {cfg.mpp:g} sets the resolution of whole-slide images, and {cfg.input} holds patches "
                        "(scored as they are, at the model's resolution); drop --mpp, or pass --slides if the "
                        ".tif files are slides")
    spec = _run_spec(cfg, meta, src.fingerprint())
    preds.claim_output(cfg.out, spec, overwrite=cfg.overwrite)
    init_ray(cfg.address)  # slides are planned in Ray tasks; patch runs need it next anyway
    chunks = src.chunks(cfg.chunk_size)
    total = src.num_patches
    log.info("%s: %s", cfg.input, src.describe())
    done = preds.done_parts(cfg.out, {c.key: c.num_rows for c in chunks})
    todo = [c for c in chunks if c.key not in done]
    if len(todo) < len(chunks):
        log.info("resuming: %d of %d chunks were already committed", len(chunks) - len(todo), len(chunks))
    if todo:
        # A manifest from an earlier commit must not list parts this run is about to rewrite.
        urimod.delete(urimod.join(cfg.out, preds.MANIFEST))
        resources = ray.cluster_resources()
        gpus = gpus_to_plan(resources, None if is_fixed(cfg.address) else autoscaler_limits(),
                            fixed=is_fixed(cfg.address), per=cfg.gpus_per_actor, count=cfg.actors,
                            flags="--actors and --gpus-per-actor")
        plan = plan_actors(resources, actors=cfg.actors, cpus_per_actor=cfg.cpus_per_actor,
                           gpus_per_actor=cfg.gpus_per_actor, gpus=gpus)
        cfg = cfg.replace(batch_size=cfg.batch_size or default_batch(plan))
        check_gpus(resources, plan.actors * plan.gpus_per_actor, local=is_local(cfg.address),
                   asked=f"model actors: {plan.actors} x {plan.gpus_per_actor:g} GPU (--actors, --gpus-per-actor)")
        log.debug("model actors: %s", plan)
        written: set[str] = set()
        stopped = None
        stop = RunStopped
        try:
            _run_pipeline(cfg, todo, plan, meta["sha256"], total=total, written=written, actor=actor)
        except KeyboardInterrupt as exc:  # Ctrl-C: the parts in flight were finished (_run_pipeline)
            log.debug("scoring interrupted", exc_info=exc)
            stopped, stop = "interrupted", Interrupted
            release_frames(exc)
        except Exception as exc:
            cause = outside_cause(exc)
            if cause is None:  # a bug: its own traceback
                raise
            log.debug("scoring stopped", exc_info=exc)
            stopped = _stop_reason(cause)
            release_frames(exc)
        if stopped:
            # Raised here, not from the except block, and after release_frames: the failed
            # pipeline's model actors (which Ray Data only un-references on failure) are freed
            # first, so a notebook or a retry loop does not find every CPU held by the dead run.
            gc.collect()
            kept = len(chunks) - len(todo) + len(written)
            raise stop(f"scoring stopped: {stopped}; {kept} of {len(chunks)} chunks are committed and kept: "
                       "rerun the same command to finish the rest")
    extra = src.finish(cfg.out, threshold=float(meta.get("threshold", 0.5)))  # slides: heatmaps, GeoJSON
    return _commit(cfg, chunks, spec, time.perf_counter() - t0, slides=extra)


def _stop_reason(cause: BaseException) -> str:
    """The fault that stopped a run, in one line (Ray's texts carry colour codes and tracebacks).

    A model actor whose ``__init__`` raised (the model unreadable, changed, or too big for the
    device) reaches the driver as an ``ActorDiedError`` that keeps only the text of that
    traceback, whose last line is the error itself.
    """
    import ray.exceptions as rex

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause))
    if isinstance(cause, rex.RayActorError) and cause.actor_init_failed:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return f"a model actor could not start: {lines[-1][:300]}"
    return f"{type(cause).__name__}: {' '.join(text.split())[:300]}"


def _run_spec(cfg: ScoreConfig, meta: dict, fingerprint: str) -> dict:
    """What must match for a rerun to continue the run already in ``cfg.out``."""
    from hcdlib.artifact import model_id

    spec = {"input": cfg.input, "input_fingerprint": fingerprint, "model": model_id(meta),
            "tta": cfg.tta, "precision": cfg.precision, "chunk_size": cfg.chunk_size}
    if cfg.slides or cfg.mpp is not None:
        spec.update(mpp=cfg.mpp, tissue_threshold=cfg.tissue_threshold)
    return spec


# Patches per model call where --batch-size is not given: a GPU needs larger batches to stay busy.
CPU_BATCH, GPU_BATCH = 256, 1024


def default_batch(plan) -> int:
    """The model batch for ``plan``'s actors: :data:`GPU_BATCH` on GPU actors, else :data:`CPU_BATCH`."""
    return GPU_BATCH if plan.gpus_per_actor else CPU_BATCH


def read_tasks(cfg: ScoreConfig, todo: list[Chunk], plan) -> int | None:
    """How many read tasks may run at once: one per CPU left to them, for patches on local disk.

    Their reads are bound by the CPU, so more tasks than CPUs only start more processes, each
    importing Ray, pyarrow and the decoders beside the model actors' start: on 2 cores, alone,
    start-up to the first committed part took 15.05 s with one task against 17.35 s with Ray
    Data's four, and steady state was no slower (shards, Ray already up: 11,732 and 13,292
    rows/s against 10,812 and 11,612). Reads from S3 wait on the network, and a slide's tile
    reads ran at 1,849 tiles/s with one task against 2,953 (with Ray's start inside both
    measurements, which inflates each: the order holds, not the sizes): both stay uncapped.
    """
    if urimod.is_s3(cfg.input) or not all(isinstance(c, PatchChunk) for c in todo):
        return None
    return max(1, int(plan.read_cpus))


def block_rows(cfg: ScoreConfig, todo: list[Chunk], plan) -> int:
    """Rows per block the read tasks emit: a chunk shared once over the model actors, at least a model batch.

    Each block costs Ray the same whatever its size (a task output, an actor call, a step of the
    driver's loop): on 2 cores, the pipeline alone ran at 11,268-12,064 rows/s in blocks of one
    batch (256 rows), 16,549-17,088 in blocks of 512 (a 1,024-row chunk shared by the 2 actors)
    and 18,547-19,550 in whole chunks (three alternating runs each, Ray up). A whole chunk would be
    scored by one actor while the others wait, and the first committed part with it; one block per
    actor keeps every actor on the first chunk. The actor still calls the model a batch at a time.
    """
    return max(cfg.batch_size or default_batch(plan), -(-largest_chunk(todo) // plan.actors))


def scoring_dataset(cfg: ScoreConfig, todo: list[Chunk], plan, sha256: str, *, actor: type = Scorer):
    """The Ray Dataset that reads and decodes ``todo`` and scores it on ``plan``'s model actors (lazy)."""
    import ray

    cfg = cfg.replace(batch_size=cfg.batch_size or default_batch(plan))
    ds = decoded_dataset(todo, resize=cfg.resize, block_rows=block_rows(cfg, todo, plan),
                         read_tasks=read_tasks(cfg, todo, plan))
    ds = ds.map_batches(
        actor,
        fn_constructor_kwargs={"model_uri": cfg.model, "sha256": sha256, "tta": cfg.tta,
                               "threads": plan.torch_threads, "batch_size": cfg.batch_size, "compile": cfg.compile,
                               "precision": cfg.precision},
        compute=ray.data.ActorPoolStrategy(size=plan.actors), batch_format="pyarrow",
        # On CPU each block (an actor's share of a chunk, cut by the read task) is one call, scored
        # a model batch at a time: re-batching to an exact size would concatenate, i.e. copy, the
        # pixels of neighbouring blocks. Ray Data refuses GPU actors without a batch size (a
        # ValueError that stopped every GPU run); it slices the blocks into batches there.
        batch_size=cfg.batch_size if plan.gpus_per_actor else None,
        num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
    )
    if not plan.gpus_per_actor:
        # Ray Data gives a ready actor up to 2 blocks at once. CPU actors come up a few tenths of
        # a second apart, so the first one took both halves of the first chunk and the first part
        # waited for it to score them one after the other (2 x ~2.8 s, hcdnet, 2 cores). Started
        # together, each scores one half: fresh `hcd score` to first part, alternating runs,
        # 15.6-16.9 s -> 14.2-14.3 s. (One block in flight per actor does the same but leaves each
        # actor idle 0.17 s between blocks, 6% of hcdnet's time.) GPU actors take batches, not
        # chunk halves, and their reads overlap the minutes a GPU node may take to come up.
        # In later pipelines of one process (3 score calls) the second half reaches the actors ~1 s
        # after the first, not 0.2 s (cause not found): hcdnet's halves (~3 s each) still split.
        ds.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    # A GPU actor drains a chunk in a fraction of a second: a deeper buffer rides out slow reads (S3).
    return limit_read_ahead(ds, unit_rows=max(largest_chunk(todo), cfg.batch_size), consumers=plan.actors,
                            per_consumer=16 if plan.gpus_per_actor else 4)


# How long scoring waits for its CPU model actors to start before it gives up: they load in
# seconds; ten minutes means the cluster lacks the CPUs (another job holds them).
ACTOR_START_TIMEOUT_S = 600


def _run_pipeline(cfg: ScoreConfig, todo: list[Chunk], plan, sha256: str, *, total: int, written: set[str],
                  actor: type) -> None:
    """Stream ``todo`` through the model actors.

    Each chunk's part is written once all its rows are in, and its key added to ``written``.
    """
    expected = {c.key: c.num_rows for c in todo}
    ds = scoring_dataset(cfg, todo, plan, sha256, actor=actor)
    assembler = preds.ChunkAssembler(expected)
    todo_rows = sum(expected.values())
    bar = progress(todo_rows, desc="scoring", unit="patch")
    rows_done, t0 = 0, time.perf_counter()
    last_log = t0  # the first line after 10 s, not at 0 rows
    pending: dict[str, Future] = {}

    def collect(block: bool) -> None:
        """Account for the part writes that have finished (all of them with ``block``); raise a failed one."""
        nonlocal rows_done
        for key, job in list(pending.items()):
            if block or job.done():
                rows_done += job.result()  # a failed write raises here, on the driver
                written.add(key)
                bar.update(expected[key])
                del pending[key]

    # Part files are written (and fsynced) by a few threads, off the loop that drains Ray Data: a
    # write is mostly waiting on the disk or S3, and one at a time it held the pipeline up.
    with ThreadPoolExecutor(PART_WRITERS, thread_name_prefix="hcd-part-writer") as writers:
        try:
            # No prefetch: with Ray Data's default of one batch, each block reached this loop only
            # when the next one was ready, 0.5-1.7 s after its actor returned it (0.1-0.2 s now),
            # and the first part waited for a block of the second chunk.
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                for key, rows in assembler.add(batch):
                    pending[key] = writers.submit(_write_part, cfg.out, key, rows)
                collect(block=len(pending) > 2 * PART_WRITERS)
                last_log = _log_progress(bar, rows_done, todo_rows, total, t0, last_log)
        finally:  # what finished is counted even when the run stops (the message says what is kept)
            for key, job in list(pending.items()):
                if job.exception() is None:
                    written.add(key)
        collect(block=True)
    bar.close()


# Threads writing part files (each a small Parquet file, atomic, fsynced).
PART_WRITERS = 4


def _write_part(out: str, key: str, rows: pa.Table) -> int:
    table = _to_part(rows)
    preds.write_part(urimod.join(out, preds.PARTS, preds.part_name(key)), table)
    return table.num_rows


def _log_progress(bar, rows_done: int, todo_rows: int, total: int, t0: float, last: float) -> float:
    """A line every 10 s where there is no terminal for the progress bar (a log file, CI); returns its time."""
    now = time.perf_counter()
    if not bar.disable or now - last <= 10:
        return last
    rate = rows_done / max(now - t0, 1e-9)
    eta = f"ETA {(todo_rows - rows_done) / rate:.0f}s" if rate else "first rows not committed yet"
    log.info("scored %d/%d rows this run (%d total), %.0f rows/s, %s", rows_done, todo_rows, total, rate, eta)
    return now


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


def _commit(cfg: ScoreConfig, chunks: list[Chunk], spec: dict, wall: float, *, slides: dict | None = None) -> dict:
    """Check every chunk has its part, then write the manifest that makes them visible."""
    expected = {c.key: c.num_rows for c in chunks}
    done = preds.done_parts(cfg.out, expected, verify=False)  # read_part below checks every part's rows
    missing = [k for k in expected if k not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} chunks were not scored (first: {missing[0]}); "
                           "rerun the same command to finish them")
    if not preds.still_ours(cfg.out, spec):  # two commands into one --out, the second with --overwrite
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
    manifest["manifest_uri"] = preds.write_manifest(cfg.out, manifest)
    return manifest
