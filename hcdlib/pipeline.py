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
    memory = _TASK_BASE_BYTES + 4 * chunk_size * 96 * 96 * 3
    return ds.map_batches(read_decode, batch_size=1, fn_kwargs={"resize": resize},
                          num_cpus=READ_TASK_CPUS, memory=memory)


def labelled_ok(batch: dict) -> dict:
    """Training rows: decoded fine and labelled; only what the train loop needs."""
    keep = (batch["status"] == "ok") & np.array([v is not None for v in batch["label"]], dtype=bool)
    return {"pixels": batch["pixels"][keep], "label": batch["label"][keep].astype(np.int64)}
