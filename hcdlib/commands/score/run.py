"""Batch scoring with Ray Data: read -> decode -> model actors -> committed Parquet.

    hcd score --model runs/demo/model --input /data/test --out /data/preds
    ray job submit --working-dir . -- python jobs/score.py --model s3://b/model --input s3://b/test --out s3://b/preds

The input is listed once (:func:`hcdlib.sources.factory.open_source`, slides included) and cut into
chunks (a slice of files, a Parquet row group, a run of slide tiles), each of which reads itself.
Ray Data reads and decodes chunks in parallel tasks and streams the uint8 patches to a pool
of model actors; the driver gathers each chunk's predictions and writes the chunk as one
part file once all its rows are in. A part is written atomically and only once, so:
- a rerun after a crash skips chunks that have a part (resume), and
- the committed output holds each input row once, whatever retries Ray made.
``_SUCCESS`` is written last and lists every part (see :mod:`hcdlib.outputs.runfolder`).
"""

from __future__ import annotations

import gc
import logging
import re
import time

from hcdlib.commands.score.actor import Scorer
from hcdlib.commands.score.commit import commit
from hcdlib.commands.score.stream import default_batch, run_pipeline
from hcdlib.config import ScoreConfig
from hcdlib.errors import Interrupted, RunStopped, UserError, outside_cause, release_frames
from hcdlib.model import openvino
from hcdlib.model.artifact import check_artifact, model_id
from hcdlib.model.transforms import Preprocess
from hcdlib.outputs import runfolder as preds
from hcdlib.outputs.runfolder import RunFolder
from hcdlib.raykit.cluster import (
    check_gpus,
    init_ray,
    is_local,
    plan_actors,
    planning_resources,
)
from hcdlib.sources.base import Source
from hcdlib.sources.chunks import Chunk
from hcdlib.sources.factory import open_source
from hcdlib.sources.slides.source import SlideSource, SlideTiling
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)


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

    Everything the user gave is checked here, on the driver, before Ray starts (:func:`_checked`).
    The driver imports no torch: on 2 cores that import, beside Ray's start, delayed the first
    part by 1-3 s. ``actor`` is the model actor's class; only benchmarks pass another (one whose
    forward pass is a constant, to time the pipeline alone).
    """
    t0 = time.perf_counter()
    cfg, meta, src = _checked(cfg)
    spec = run_spec(cfg, meta, src.fingerprint())
    folder = RunFolder(cfg.out)
    folder.claim(spec, overwrite=cfg.overwrite)
    init_ray(cfg.address)  # slides are planned in Ray tasks; patch runs need it next anyway
    chunks = src.chunks(cfg.chunk_size)
    log.info("%s: %s", cfg.input, src.describe())
    done = folder.done({c.key: c.num_rows for c in chunks})
    todo = [c for c in chunks if c.key not in done]
    if len(todo) < len(chunks):
        log.info("resuming: %d of %d chunks were already committed", len(chunks) - len(todo), len(chunks))
    if todo:
        # A manifest from an earlier commit must not list parts this run is about to rewrite.
        urimod.delete(urimod.join(cfg.out, preds.MANIFEST))
        cfg, plan = _planned(cfg)
        _stream(cfg, todo, plan, meta["sha256"], total=src.num_patches, done=len(chunks) - len(todo),
                of=len(chunks), actor=actor)
    extra = src.finish(cfg.out, threshold=float(meta.get("threshold", 0.5)))  # slides: heatmaps, GeoJSON
    return commit(cfg, chunks, spec, time.perf_counter() - t0, slides=extra)


def _checked(cfg: ScoreConfig) -> tuple[ScoreConfig, dict, Source]:
    """The config with absolute paths, the model's metadata and the listed input, all checked.

    The artifact (metadata, hash, the model its weights declare), --out against --input, and the
    input, which is listed once.
    """
    cfg = cfg.located("model", "input", "out", "labels")  # Ray's processes do not share our working directory
    _check_backend(cfg)
    meta, _ = check_artifact(cfg.model)
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
    return cfg, meta, src


def _check_backend(cfg: ScoreConfig) -> None:
    """``--backend openvino``: installed, on CPU actors, and without torch's --compile."""
    if cfg.backend != "openvino":
        return
    if not openvino.available():
        raise UserError("--backend openvino: OpenVINO is not installed; pip install 'hcd[openvino]' (on every node "
                        "of a cluster), or score with --backend torch")
    if cfg.gpus_per_actor:
        raise UserError(f"--backend openvino runs on CPU actors, and --gpus-per-actor {cfg.gpus_per_actor:g} asks "
                        "for GPUs; drop --gpus-per-actor (or pass 0), or score on GPUs with --backend torch")
    if cfg.compile:
        raise UserError("--compile compiles the torch model; --backend openvino compiles its own: drop --compile")


def _planned(cfg: ScoreConfig):
    """The model actors for this cluster (GPUs from the autoscaler or the flags), and the batch they take."""
    per = 0.0 if cfg.backend == "openvino" else cfg.gpus_per_actor  # OpenVINO's actors take no GPU
    resources, gpus = planning_resources(cfg.address, per=per, count=cfg.actors,
                                         flags="--actors and --gpus-per-actor")
    plan = plan_actors(resources, actors=cfg.actors, cpus_per_actor=cfg.cpus_per_actor, gpus_per_actor=per, gpus=gpus)
    check_gpus(resources, plan.actors * plan.gpus_per_actor, local=is_local(cfg.address),
               asked=f"model actors: {plan.actors} x {plan.gpus_per_actor:g} GPU (--actors, --gpus-per-actor)")
    log.debug("model actors: %s", plan)
    return cfg.replace(batch_size=cfg.batch_size or default_batch(plan)), plan


def _stream(cfg: ScoreConfig, todo: list[Chunk], plan, sha256: str, *, total: int, done: int, of: int,
            actor: type) -> None:
    """Score ``todo``; a fault outside hcd or Ctrl-C stops the run in one line that says what is kept."""
    written: set[str] = set()
    stopped, stop = None, RunStopped
    try:
        run_pipeline(cfg, todo, plan, sha256, total=total, written=written, actor=actor)
    except KeyboardInterrupt as exc:  # Ctrl-C: the parts in flight were finished (run_pipeline)
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
        raise stop(f"scoring stopped: {stopped}; {done + len(written)} of {of} chunks are committed and kept: "
                   "rerun the same command to finish the rest")


def _stop_reason(cause: BaseException) -> str:
    """The fault that stopped a run, in one line (Ray's texts carry colour codes and tracebacks).

    A model actor whose ``__init__`` raised (the model unreadable, changed, or too big for the
    device) reaches the driver as an ``ActorDiedError`` that keeps only the text of that
    traceback, whose last line is the error itself.
    """
    import ray.exceptions as rex  # Ray only where a job runs

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause))
    if isinstance(cause, rex.RayActorError) and cause.actor_init_failed:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return f"a model actor could not start: {lines[-1][:300]}"
    return f"{type(cause).__name__}: {' '.join(text.split())[:300]}"


def run_spec(cfg: ScoreConfig, meta: dict, fingerprint: str) -> dict:
    """What must match for a rerun to continue the run already in ``cfg.out``."""
    spec = {"input": cfg.input, "input_fingerprint": fingerprint, "model": model_id(meta),
            "tta": cfg.tta, "precision": cfg.precision, "backend": cfg.backend, "chunk_size": cfg.chunk_size}
    if cfg.slides or cfg.mpp is not None:
        spec.update(mpp=cfg.mpp, tissue_threshold=cfg.tissue_threshold)
    return spec
