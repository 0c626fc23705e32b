"""Batch scoring with Ray Data: read -> decode -> model actors -> committed Parquet.

    hcd score --model runs/demo/model --input /data/test --out /data/preds
    ray job submit --working-dir . -- python jobs/score.py --model s3://b/model --input s3://b/test --out s3://b/preds

The input is listed once and cut into chunks (a slice of files or a Parquet row group).
Ray Data reads and decodes chunks in parallel tasks and streams the uint8 patches to a pool
of model actors; the driver gathers each chunk's predictions and writes the chunk as one
part file once all its rows are in. A part is written atomically and only once, so:
- a rerun after a crash skips chunks that have a part (resume), and
- the committed output holds each input row once, whatever retries Ray made.
``_SUCCESS`` is written last and lists every part (see :mod:`hcdlib.predictions`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hcdlib import predictions as preds
from hcdlib import uri as urimod
from hcdlib.pipeline import decoded_dataset, limit_read_ahead
from hcdlib.sources import list_files, open_source, plan_chunks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring job."""

    model: str
    input: str
    out: str
    labels: str | None = None
    tta: int = 1
    batch_size: int = 256
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    chunk_size: int = 1024
    compile: bool = False
    resize: bool = False
    slides: bool = False  # tile whole-slide images (automatic for slide-only formats such as .svs)
    mpp: float | None = None  # override the slides' microns per pixel
    tissue_threshold: float = 0.5  # fraction of a tile that must be tissue for it to be scored
    overwrite: bool = False
    address: str | None = None


class Scorer:
    """Ray Data actor: loads the model once, then scores batches with :func:`infer_batch`."""

    def __init__(self, model_uri: str, *, sha256: str, tta: int, threads: int, compile: bool = False):
        import torch

        from hcdlib.artifact import load_model, model_id
        from hcdlib.infer import pick_device
        from hcdlib.transforms import Preprocess

        torch.set_num_threads(threads)
        self.device = pick_device()
        self.model, meta = load_model(model_uri, device=self.device)
        if meta["sha256"] != sha256:
            raise RuntimeError(f"{model_uri} changed while the job ran (hash {meta['sha256'][:12]})")
        self.model = self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model = torch.compile(self.model)
        self.pre = Preprocess.from_dict(meta["preprocess"])
        self.model_id = model_id(meta)
        self.tta = tta

    def __call__(self, batch: dict) -> dict:
        """Add ``prob`` and ``model`` to a decoded batch; drop the pixels."""
        from hcdlib.infer import infer_batch

        ok = batch["status"] == "ok"
        prob = np.full(len(ok), np.nan, dtype=np.float32)
        if ok.any():
            prob[ok] = infer_batch(self.model, batch["pixels"][ok], device=self.device,
                                   preprocess=self.pre, tta=self.tta)
        out = {k: v for k, v in batch.items() if k not in ("pixels", "label")}
        out["prob"] = prob
        out["model"] = np.full(len(ok), self.model_id, dtype=object)
        return out


def _as_str(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A string column back from Ray Data: an all-None object column may arrive as null or NaN floats."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    return pa.chunked_array([pa.nulls(len(col), pa.string())])


def _to_part(rows: pa.Table) -> pa.Table:
    """Chunk rows (any order, maybe repeated by retries) -> one row per input, in input order."""
    rows = rows.sort_by("row")
    _, first = np.unique(rows["row"].to_numpy(), return_index=True)
    rows = rows.take(pa.array(first))
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


def _check_run_spec(cfg: ScoreConfig, spec: dict) -> None:
    """Refuse to mix outputs of another model or input into ``cfg.out``."""
    target = urimod.join(cfg.out, preds.RUN_SPEC)
    if cfg.overwrite:  # only what a scoring run writes: --out may hold the user's other files
        for name in (preds.MANIFEST, preds.PARTS, preds.RUN_SPEC, "slides"):
            urimod.delete(urimod.join(cfg.out, name))
    elif urimod.exists(target):
        old = json.loads(urimod.read_bytes(target))
        diff = [k for k in spec if old.get(k) != spec[k]]
        if diff:
            raise ValueError(f"{cfg.out} holds a run with a different {', '.join(diff)} "
                             f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); "
                             "use another --out or pass --overwrite")
        return
    urimod.write_bytes_atomic(target, json.dumps(spec, indent=1).encode())


def _done_parts(cfg: ScoreConfig) -> dict[str, str]:
    fs, root = urimod.resolve(urimod.join(cfg.out, preds.PARTS))
    from pyarrow.fs import FileSelector

    infos = fs.get_file_info(FileSelector(root, allow_not_found=True))
    names = [i.base_name for i in infos if i.base_name.endswith(".parquet")]
    return {n[len("part-"):-len(".parquet")]: n for n in names}


def score(cfg: ScoreConfig) -> dict:
    """Run one scoring job to completion (resuming if ``cfg.out`` holds a partial run)."""
    import ray

    from hcdlib.rayutil import init_ray, plan_actors
    from hcdlib.slides import SLIDE_EXTS, is_slide_source, plan_slides, tile_chunks, write_slide_outputs

    t0 = time.perf_counter()
    meta = json.loads(urimod.read_bytes(urimod.join(cfg.model, "model.json")))
    fs, _, files = list_files(cfg.input)
    planned = None
    if cfg.slides or is_slide_source(files):
        slide_uris = [urimod.to_uri(fs, p) for p in files if p.lower().endswith(SLIDE_EXTS)]
        fingerprint = hashlib.sha256("\n".join(slide_uris).encode()).hexdigest()[:16]
        spec = _run_spec(cfg, meta, fingerprint)
        _check_run_spec(cfg, spec)
        init_ray(cfg.address)
        planned = plan_slides(slide_uris, out=cfg.out, mpp=cfg.mpp, tissue_threshold=cfg.tissue_threshold)
        chunks = [c for p in planned for c in tile_chunks(p, cfg.chunk_size)]
        total = sum(c["num_rows"] for c in chunks)
        log.info("%s: %d slides, %d tissue tiles", cfg.input, len(slide_uris), total)
    else:
        src = open_source(cfg.input, cfg.labels)
        chunks = plan_chunks(src, cfg.chunk_size)
        spec = _run_spec(cfg, meta, src.fingerprint())
        _check_run_spec(cfg, spec)
        total = src.num_patches
        log.info("%s: %d patches, listed in %.2fs", cfg.input, total, src.list_seconds)
    done = _done_parts(cfg)
    todo = [c for c in chunks if c["key"] not in done]
    log.info("%d chunks, %d already done", len(chunks), len(chunks) - len(todo))
    if todo:
        # A manifest from an earlier commit must not list parts this run is about to rewrite.
        urimod.delete(urimod.join(cfg.out, preds.MANIFEST))
        init_ray(cfg.address)
        plan = plan_actors(ray.cluster_resources(), actors=cfg.actors,
                           cpus_per_actor=cfg.cpus_per_actor, gpus_per_actor=cfg.gpus_per_actor)
        log.info("model actors: %s", plan)
        _run_pipeline(cfg, todo, plan, meta["sha256"], total=total)
    slides = None
    if planned is not None:
        rows = _read_parts(cfg, chunks, ["slide_id", "x", "y", "tile_size", "prob", "status"]).to_pandas()
        slides = write_slide_outputs(cfg.out, planned, rows, threshold=float(meta.get("threshold", 0.5)))
    return _commit(cfg, chunks, spec, time.perf_counter() - t0, slides=slides)


def _run_spec(cfg: ScoreConfig, meta: dict, fingerprint: str) -> dict:
    """What must match for a rerun to continue the run already in ``cfg.out``."""
    from hcdlib.artifact import model_id

    spec = {"input": cfg.input, "input_fingerprint": fingerprint, "model": model_id(meta),
            "tta": cfg.tta, "chunk_size": cfg.chunk_size}
    if cfg.slides or cfg.mpp is not None:
        spec.update(mpp=cfg.mpp, tissue_threshold=cfg.tissue_threshold)
    return spec


def _read_parts(cfg: ScoreConfig, chunks: list[dict], columns: list[str]) -> pa.Table:
    done = _done_parts(cfg)
    return pa.concat_tables(preds.read_part(urimod.join(cfg.out, preds.PARTS, done[c["key"]]), columns)
                            for c in chunks)


def _run_pipeline(cfg: ScoreConfig, todo: list[dict], plan, sha256: str, *, total: int) -> None:
    import ray

    expected = {c["key"]: c["num_rows"] for c in todo}
    ds = decoded_dataset(todo, chunk_size=cfg.chunk_size, resize=cfg.resize)
    ds = ds.map_batches(
        Scorer,
        fn_constructor_kwargs={"model_uri": cfg.model, "sha256": sha256, "tta": cfg.tta,
                               "threads": plan.torch_threads, "compile": cfg.compile},
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        batch_size=cfg.batch_size, num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
    )
    # A GPU actor drains a chunk in a fraction of a second: a deeper buffer rides out slow reads (S3).
    ds = limit_read_ahead(ds, chunk_size=cfg.chunk_size, consumers=plan.actors,
                          per_consumer=16 if plan.gpus_per_actor else 4)
    pending: dict[str, list[pa.Table]] = defaultdict(list)
    seen: dict[str, set[int]] = defaultdict(set)  # row numbers received, so retries count once
    written: set[str] = set()
    rows_done, t0, last_log = 0, time.perf_counter(), 0.0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for key in pc.unique(batch["chunk"]).to_pylist():
            if key in written:  # a retried task repeated rows of a chunk already committed
                continue
            part = batch.filter(pc.equal(batch["chunk"], key))
            pending[key].append(part)
            seen[key].update(part["row"].to_pylist())
            if len(seen[key]) == expected[key]:
                table = _to_part(pa.concat_tables(pending.pop(key)))
                preds.write_part(urimod.join(cfg.out, preds.PARTS, f"part-{key}.parquet"), table)
                rows_done += table.num_rows
                written.add(key)
                del seen[key]
        now = time.perf_counter()
        if now - last_log > 10:
            rate = rows_done / max(now - t0, 1e-9)
            eta = (sum(expected.values()) - rows_done) / rate if rate else float("nan")
            log.info("scored %d/%d rows this run (%d total), %.0f rows/s, ETA %.0fs",
                     rows_done, sum(expected.values()), total, rate, eta)
            last_log = now


def _commit(cfg: ScoreConfig, chunks: list[dict], spec: dict, wall: float, *, slides: list | None = None) -> dict:
    """Check every chunk has its part, then write the manifest that makes them visible."""
    done = _done_parts(cfg)
    missing = [c["key"] for c in chunks if c["key"] not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} chunks were not scored (first: {missing[0]}); "
                           "rerun the same command to finish them")
    files, ids, ok = [], [], 0
    for c in chunks:
        path = f"{preds.PARTS}/{done[c['key']]}"
        t = preds.read_part(urimod.join(cfg.out, path), ["id", "status"])
        if t.num_rows != c["num_rows"]:
            raise RuntimeError(f"{path}: {t.num_rows} rows, expected {c['num_rows']}")
        files.append({"path": path, "rows": t.num_rows})
        ids.append(t["id"])
        ok += pc.sum(pc.equal(t["status"], "ok")).as_py() or 0
    id_col = pa.chunked_array(ids, pa.string()) if ids else pa.chunked_array([], pa.string())
    counts = pc.value_counts(id_col)
    dups = [v["values"].as_py() for v in counts if v["counts"].as_py() > 1]
    if dups:
        log.warning("%d ids appear more than once in the input (kept as separate rows), e.g. %s",
                    len(dups), dups[:5])
    rows = sum(f["rows"] for f in files)
    manifest = {
        "files": files, "rows": rows, "ok": ok, "errors": rows - ok,
        "duplicate_input_ids": len(dups), "duplicate_id_examples": dups[:20],
        "model": spec["model"], "run": spec, "config": asdict(cfg), "wall_seconds": round(wall, 2),
    }
    if slides is not None:
        manifest["slides"] = {"summary": "slides/summary.csv", "per_slide": slides}
    manifest_uri = urimod.join(cfg.out, preds.MANIFEST)
    urimod.write_bytes_atomic(manifest_uri, json.dumps(manifest, indent=1).encode())
    manifest["manifest_uri"] = manifest_uri
    return manifest
