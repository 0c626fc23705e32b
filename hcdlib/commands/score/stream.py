"""The scoring stream: Ray Data reads and decodes chunks, the model actors score them, parts are written."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from hcdlib.commands.score.actor import Scorer, string_column
from hcdlib.config import ScoreConfig
from hcdlib.console import progress
from hcdlib.outputs import assembly
from hcdlib.outputs import runfolder as preds
from hcdlib.outputs.runfolder import RunFolder
from hcdlib.raykit.pipeline import decoded_dataset, limit_read_ahead
from hcdlib.sources.chunks import Chunk, PatchChunk, largest_chunk
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)


def to_part(rows: pa.Table) -> pa.Table:
    """A chunk's rows (one per input, in input order) in the output schema."""
    ok = pc.equal(rows["status"], "ok")
    cols = {
        "id": rows["id"], "prob": pc.if_else(ok, rows["prob"], pa.scalar(None, pa.float32())),
        "status": rows["status"], "error": string_column(rows["error"]), "note": string_column(rows["note"]),
        "source": rows["source"], "slide_id": string_column(rows["slide_id"]),
        **{c: rows[c] if c in rows.column_names else pa.nulls(rows.num_rows, pa.int64())
           for c in ("x", "y", "tile_size")},
        "model": rows["model"],
    }
    return pa.table(cols).cast(preds.SCHEMA)


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
    import ray  # Ray only where a job runs

    cfg = cfg.replace(batch_size=cfg.batch_size or default_batch(plan))
    ds = decoded_dataset(todo, resize=cfg.resize, block_rows=block_rows(cfg, todo, plan),
                         read_tasks=read_tasks(cfg, todo, plan))
    ds = ds.map_batches(
        actor,
        fn_constructor_kwargs={"model_uri": cfg.model, "sha256": sha256, "tta": cfg.tta,
                               "threads": plan.torch_threads, "batch_size": cfg.batch_size, "compile": cfg.compile,
                               "precision": cfg.precision, "backend": cfg.backend},
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


def run_pipeline(cfg: ScoreConfig, todo: list[Chunk], plan, sha256: str, *, total: int, written: set[str],
                  actor: type) -> None:
    """Stream ``todo`` through the model actors.

    Each chunk's part is written once all its rows are in, and its key added to ``written``.
    """
    expected = {c.key: c.num_rows for c in todo}
    ds = scoring_dataset(cfg, todo, plan, sha256, actor=actor)
    assembler = assembly.ChunkAssembler(expected)
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
    table = to_part(rows)
    preds.write_part(RunFolder(out).part_uri(key), table)
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
