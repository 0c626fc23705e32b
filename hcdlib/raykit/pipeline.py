"""The Ray Data read stage shared by training and scoring: chunk descriptors -> decoded patches."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from hcdlib.raykit.cluster import READ_TASK_CPUS
from hcdlib.sources.chunks import Chunk, largest_chunk
from hcdlib.storage import uri as urimod
from hcdlib.storage.uri import TRANSIENT_ERRORS

# What one read task holds at once besides its chunk: the worker process itself.
_TASK_BASE_BYTES = 256 * 2**20


def read_decode(batch: dict, *, resize: bool = False, block_rows: int | None = None) -> Iterator[dict]:
    """Read and decode the chunks in ``batch["chunk"]`` (:class:`hcdlib.sources.chunks.Chunk` objects).

    Output columns: what :meth:`Chunk.read` returns (``id``, ``pixels``, ``status``, ``error``,
    ``note``, ...), plus ``chunk`` (the chunk key) and ``row`` (the row's index in its chunk,
    which makes retried rows recognisable).

    The rows leave in blocks of ``block_rows`` (scoring: one per model actor, see
    :func:`hcdlib.commands.score.block_rows`), as Arrow tables: Ray Data gives each block to the next free
    model actor, so one chunk is scored by every actor at once. As one block, a 1024-row chunk
    went to one actor, and the first committed part waited for it alone.
    """
    for chunk in batch["chunk"]:
        out = chunk.read(resize=resize)
        n = len(out["id"])
        out["chunk"] = np.full(n, chunk.key, dtype=object)
        out["row"] = np.arange(n, dtype=np.int64)
        block = _as_block(out)
        step = block_rows or n
        for start in range(0, n, step):
            yield (block.slice(start, step) if isinstance(block, pa.Table)
                   else {k: v[start:start + step] for k, v in block.items()})


def _as_block(out: dict) -> pa.Table | dict:
    """A chunk's decoded rows as an Arrow table, built in C++ (the pixels a tensor column, no copy).

    Handed a dict of numpy arrays, Ray Data turns each object column (ids, sources, statuses,
    messages) into Arrow by inspecting every value in Python: 8.5 against 3.8 us a row for four
    such columns and the pixels (one core). A column Arrow cannot type (mixed values) is left to
    Ray Data's own conversion.
    """
    from ray.data.extensions import ArrowTensorArray  # Ray only where a job runs

    try:
        return pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v, from_pandas=False)
                         for k, v in out.items()})
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return out


def decoded_dataset(chunks: list[Chunk], *, resize: bool = False, block_rows: int | None = None,
                    read_tasks: int | None = None):
    """A Ray Dataset of decoded patches, one read task per chunk, blocks of ``block_rows``.

    ``read_tasks``: at most this many read tasks at once (None: as many as their CPU requests allow).
    """
    import ray  # Ray only where a job runs

    # Each chunk travels as the (small, frozen) object itself: the read task calls its read().
    ds = ray.data.from_items([{"chunk": c} for c in chunks], override_num_blocks=len(chunks))
    # Reads declare the memory a decoded chunk needs. Besides being true, it keeps Ray Data
    # from fusing decoding into a downstream model actor, so decoding runs in parallel tasks,
    # never in the (GPU) actor's critical path.
    memory = _TASK_BASE_BYTES + 4 * patch_bytes(largest_chunk(chunks))
    # A read that fails keeps its own exception class (an OSError stays an OSError, not a
    # UserCodeException without a cause), so the driver tells a storage fault from a bug; a
    # transient storage error is retried a few times before it stops the run.
    ds.context.raise_original_map_exception = True
    ds.context.retried_map_errors = TRANSIENT_ERRORS
    ds.context.max_map_retries = 3
    if block_rows:
        # Ray Data would merge a task's output into blocks of up to 128 MiB. It emits a block once
        # its buffer passes this target and slices only what passes it by half, so at 3/4 of
        # block_rows each block read_decode yields leaves as one: a 1,024-row chunk is 2 blocks of
        # 512 for 2 actors. (At a batch + 1 MiB, blocks were 293, 293 and 438 rows, and one of two
        # actors scored 731 of the first chunk's rows.)
        ds.context.target_max_block_size = patch_bytes(block_rows) * 3 // 4
    # Ray Data samples each task's memory with psutil from a thread; at thousands of small tasks
    # a minute that was 6% of a model actor's time (py-spy), for a statistic hcd never reads.
    ds.context.memory_usage_poll_interval_s = None
    return ds.map_batches(read_decode, batch_size=1, fn_kwargs={"resize": resize, "block_rows": block_rows},
                          num_cpus=READ_TASK_CPUS, memory=memory,
                          compute=ray.data.TaskPoolStrategy(size=read_tasks))  # (``concurrency`` is deprecated)


def limit_read_ahead(ds, *, unit_rows: int, consumers: int, per_consumer: int = 4):
    """Cap the decoded patches Ray Data may buffer ahead of ``consumers`` model actors.

    Left alone, reads run ahead into half the object store (3.4 GiB on this 24 GiB machine):
    far more than the actors need, and a memory peak that grows with the archive until it
    hits that ceiling. A few units per actor keep every actor fed; memory then stays flat.
    ``unit_rows`` must cover both the largest chunk and the actors' batch: a cap below one
    model batch stalls the pipeline (the actor waits for rows the cap keeps unread), which
    with 16-row chunks and 256-patch batches cost ~7 s per chunk.
    """
    from ray.data import ExecutionResources  # Ray only where a job runs

    cap = patch_bytes(unit_rows) * max(8, per_consumer * consumers)
    ds.context.execution_options.resource_limits = ExecutionResources.for_limits(object_store_memory=cap)
    return ds


def patch_bytes(rows: int) -> int:
    """Bytes of ``rows`` decoded 96x96 RGB patches."""
    return rows * 96 * 96 * 3


def labelled_ok(batch: dict, *, skipped: str | None = None) -> dict:
    """Training rows: decoded fine and labelled; only what the train loop needs.

    The others are recorded, not dropped without a word: with ``skipped`` (a folder URI), each
    batch that leaves rows out writes their ``chunk, row, id, error`` to ``<skipped>/<chunk>-<row>.csv``
    (named by the batch's first row, so a retried or re-read batch writes the same file again).
    """
    import pandas as pd  # only training's filter needs it: scoring's read tasks start without it (1 s an import)

    keep = (batch["status"] == "ok") & pd.notna(batch["label"])
    if skipped and not keep.all():
        left = ~keep
        error = [e if e else "no label" for e in batch["error"][left]]  # a short list: the bad rows only
        buf = io.BytesIO()
        pacsv.write_csv(pa.table({"chunk": pa.array(batch["chunk"][left], pa.string()),
                                  "row": pa.array(batch["row"][left], pa.int64()),
                                  "id": pa.array(batch["id"][left], pa.string()),
                                  "error": pa.array(error, pa.string())}), buf)
        name = f"{batch['chunk'][0]}-{int(batch['row'][0]):07d}.csv"
        urimod.write_bytes_atomic(urimod.join(skipped, name), buf.getvalue())
    return {"pixels": batch["pixels"][keep], "label": batch["label"][keep].astype(np.int64)}


def skipped_rows(skipped: str) -> pa.Table:
    """``chunk, row, id, error`` of each row :func:`labelled_ok` recorded under ``skipped``, once (empty: none).

    Once: a row re-read in another epoch, or by a retried task, may have been written twice.
    """
    fs, root = urimod.resolve(skipped)
    names = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                   if i.base_name.endswith(".csv"))
    schema = pa.schema([("chunk", pa.string()), ("row", pa.int64()), ("id", pa.string()), ("error", pa.string())])
    tables = [pacsv.read_csv(io.BytesIO(urimod.read_bytes(urimod.to_uri(fs, n))),
                             convert_options=pacsv.ConvertOptions(column_types=schema)) for n in names]
    if not tables:
        return schema.empty_table()
    once = pa.concat_tables(tables).group_by(["chunk", "row"], use_threads=False).aggregate(
        [("id", "first"), ("error", "first")])
    once = pa.table({"chunk": once["chunk"], "row": once["row"], "id": once["id_first"], "error": once["error_first"]})
    return once.sort_by([("chunk", "ascending"), ("row", "ascending")])
