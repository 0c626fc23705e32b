"""The Ray Data read stage shared by training and scoring: chunk descriptors -> decoded patches."""

from __future__ import annotations

import json

import numpy as np

from hcdlib.decode import decode_batch
from hcdlib.rayutil import READ_TASK_CPUS
from hcdlib.sources import read_chunk

# What one read task holds at once besides its chunk: the worker process itself.
_TASK_BASE_BYTES = 256 * 2**20


def read_decode(batch: dict, *, resize: bool = False) -> dict:
    """Read and decode the chunks named in ``batch["chunk"]`` (JSON descriptors).

    Output columns: those of :func:`hcdlib.sources.read_chunk` without the bytes, plus
    ``pixels``, ``status``, ``error``, ``note``, ``chunk`` (the chunk key) and ``row`` (the
    row's index in its chunk, which makes retried rows recognisable).
    """
    outs = []
    for spec in batch["chunk"]:
        chunk = json.loads(spec)
        if chunk["kind"] in ("tiles", "slide_error"):  # whole-slide tiles arrive decoded
            from hcdlib.slides import read_tiles

            out = read_tiles(chunk)
        else:
            rows = {k: np.array(v, dtype=object) for k, v in read_chunk(chunk).to_pydict().items()}
            out = decode_batch(rows, resize=resize)
        n = len(out["id"])
        out["chunk"] = np.full(n, chunk["key"], dtype=object)
        out["row"] = np.arange(n, dtype=np.int64)
        outs.append(out)
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def decoded_dataset(chunks: list[dict], *, chunk_size: int, resize: bool = False):
    """A Ray Dataset of decoded patches, one read task per chunk."""
    import ray

    ds = ray.data.from_items([{"chunk": json.dumps(c)} for c in chunks], override_num_blocks=len(chunks))
    # Reads declare the memory a decoded chunk needs. Besides being true, it keeps Ray Data
    # from fusing decoding into a downstream model actor, so decoding runs in parallel tasks,
    # never in the (GPU) actor's critical path.
    memory = _TASK_BASE_BYTES + 4 * _chunk_bytes(chunk_size)
    return ds.map_batches(read_decode, batch_size=1, fn_kwargs={"resize": resize},
                          num_cpus=READ_TASK_CPUS, memory=memory)


def limit_read_ahead(ds, *, chunk_size: int, consumers: int, per_consumer: int = 4):
    """Cap the decoded patches Ray Data may buffer ahead of ``consumers`` model actors.

    Left alone, reads run ahead into half the object store (3.4 GiB on this 24 GiB machine):
    far more than the actors need, and a memory peak that grows with the archive until it
    hits that ceiling. A few chunks per actor keep every actor fed; memory then stays flat.
    """
    from ray.data import ExecutionResources

    cap = _chunk_bytes(chunk_size) * max(8, per_consumer * consumers)
    ds.context.execution_options.resource_limits = ExecutionResources.for_limits(object_store_memory=cap)
    return ds


def _chunk_bytes(chunk_size: int) -> int:
    return chunk_size * 96 * 96 * 3


def labelled_ok(batch: dict) -> dict:
    """Training rows: decoded fine and labelled; only what the train loop needs."""
    keep = (batch["status"] == "ok") & np.array([v is not None for v in batch["label"]], dtype=bool)
    return {"pixels": batch["pixels"][keep], "label": batch["label"][keep].astype(np.int64)}
