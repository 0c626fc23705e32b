"""The model actor of ``hcd score``: one model on its device, Arrow batches in, probabilities out."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hcdlib.model.artifact import load_model, model_id
from hcdlib.model.device import pick
from hcdlib.model.transforms import Preprocess

log = logging.getLogger(__name__)


class Scorer:
    """Ray Data actor: loads the model once, then scores batches with a :class:`~hcdlib.model.infer.Predictor`.

    The device is what Ray assigned (:mod:`hcdlib.model.device`): CPU for an actor that asked for no
    GPU, even on a GPU node; an error for one given a GPU that torch cannot use.
    """

    def __init__(self, model_uri: str, *, sha256: str, tta: int, threads: int, batch_size: int,
                 compile: bool = False, precision: str = "auto", backend: str = "torch"):
        import torch  # torch only where a model runs

        from hcdlib.model.infer import Predictor, compiled, for_inference

        torch.set_num_threads(threads)
        self.plan = pick(precision)
        self.device = torch.device(self.plan.device)
        model, meta = load_model(model_uri, device=self.device)
        if meta["sha256"] != sha256:
            raise RuntimeError(f"{model_uri} changed while the job ran (hash {meta['sha256'][:12]})")
        pre = Preprocess.from_dict(meta["preprocess"])
        if backend == "openvino":  # CPU actors only: the driver plans no GPU for them
            from hcdlib.model.openvino import OpenVinoPredictor  # only where it was asked for

            self.predict = OpenVinoPredictor(model, pre, tta=tta, threads=threads, precision=precision)
        else:
            model = for_inference(model)
            if compile:
                model = compiled(model)
            self.predict = Predictor(model, pre, device=self.device, tta=tta, autocast=self.plan.autocast,
                                     fixed_batch=batch_size if compile else None)
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
    error = pc.if_else(mask, pa.scalar(NON_FINITE), string_column(batch["error"]))
    batch = batch.set_column(batch.column_names.index("status"), "status", status)
    return batch.set_column(batch.column_names.index("error"), "error", error)


def string_column(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A string column back from Ray Data: an all-None object column may arrive as null or NaN floats."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    return pa.chunked_array([pa.nulls(len(col), pa.string())])
