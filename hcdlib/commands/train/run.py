"""``hcd train``: fine-tune a CNN on patches with Ray Train, then export the best epoch.

    hcd train --data /data/pcam-real/train --val-data /data/pcam-real/valid --out runs/pcam --time-budget-min 30
    ray job submit --working-dir . -- python jobs/train.py --data s3://b/train-shards --out s3://b/run \
        --arch resnet50 --weights imagenet --workers 8 --gpus-per-worker 1

Data comes through Ray Data (the same sources, decoding and preprocessing as scoring) and is
streamed to ``TorchTrainer`` workers. Checkpoints go to ``<out>/ray_train/`` every epoch;
rerunning the same command resumes from the latest one. The best epoch is exported to
``<out>/model/`` (see :mod:`hcdlib.model.artifact`), which ``hcd score --model`` loads.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time

import pyarrow.fs as pafs

from hcdlib.commands.train.data import SKIPPED, build_datasets, caches_decoded, open_sources, report_skipped
from hcdlib.commands.train.folder import MODEL_DIR, RUN_NAME, TRAIN_SPEC, check_resumable, export_best, run_spec
from hcdlib.commands.train.loop import METRICS_DIR, TRAIN, VAL, WorkerJob, train_loop_per_worker
from hcdlib.config import TrainConfig
from hcdlib.console import progress
from hcdlib.errors import Interrupted, UserError
from hcdlib.model.architectures import build_model
from hcdlib.outputs.runfolder import RunFolder
from hcdlib.raykit.cluster import (
    check_gpus,
    init_ray,
    is_local,
    planning_resources,
)
from hcdlib.sources.base import PatchSource
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)


def _scaling(cfg: TrainConfig, resources: dict, gpus: float | None = None):
    """Workers from the cluster: one per GPU, else one (or ``--workers``) sharing the CPU with reads.

    ``gpus``: what :func:`hcdlib.raykit.cluster.gpus_to_plan` counts on (default: the GPUs in ``resources``).
    """
    from ray.train import ScalingConfig  # Ray only where a job runs

    cpus = float(resources.get("CPU", 1))
    gpus = float(resources.get("GPU", 0)) if gpus is None else gpus
    gpw = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
    workers = cfg.workers or (max(1, int(gpus // gpw)) if gpw else 1)
    if gpw % 1 and workers > 1:
        raise UserError(f"--gpus-per-worker {gpw:g} makes {workers} workers, and two training ranks cannot share a "
                        "GPU (NCCL refuses or serialises them): give whole GPUs per worker, or --workers 1")
    # A worker's CPU request is a scheduling hint; its torch threads use its share of cores.
    # Requests that add up to every CPU would starve Ray Data's read tasks (a silent hang).
    cpw = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else min(1.0, cpus / (2 * workers))
    if workers * cpw >= cpus:
        raise UserError(f"{workers} workers x {cpw:g} CPUs leaves no CPU for reading data on a {cpus:g}-CPU "
                         "cluster; use fewer --workers or a smaller --cpus-per-worker")
    threads = max(1, int(cpus // workers)) if not gpw else max(1, int(cpw))
    res = {"CPU": cpw, **({"GPU": gpw} if gpw else {})}
    return ScalingConfig(num_workers=workers, use_gpu=bool(gpw), resources_per_worker=res), threads


def train(cfg: TrainConfig) -> dict:
    """Train, checkpointing every epoch, and export the best epoch to ``<out>/model``."""
    started_at = time.time()  # the time budget counts from here: start-up is part of the run
    cfg, train_src, val_src = _checked(cfg)
    init_ray(cfg.address, dashboard=True)
    scaling, threads, resources = _scaled(cfg)
    n_all = train_src.num_patches + val_src.num_patches
    cache = caches_decoded(cfg, n_all, resources.get("object_store_memory", 0))
    t_cache = time.perf_counter()
    datasets = build_datasets(cfg, train_src, val_src, cache=cache)
    cache_s = time.perf_counter() - t_cache if cache else 0.0
    if cache:
        log.info("decoded the %d listed patches into Ray's object store in %.0f s: epochs read them from memory "
                 "(--cache off reads and decodes every epoch)", n_all, cache_s)
    # Decoded into the cache now, what was left out is known before training starts.
    listed = {TRAIN: train_src.num_patches, VAL: val_src.num_patches}
    skipped = report_skipped(cfg, listed) if cache else None
    log.debug("Ray Train: %s, %d torch threads per worker", scaling, threads)
    job = WorkerJob(cfg, train_src.num_patches, threads, started_at)
    result = _fit(cfg, job, scaling, datasets)
    if skipped is None:  # streamed: decoded during the epochs, so known now
        skipped = report_skipped(cfg, listed)
    return dict(export_best(cfg, result.checkpoint), data_cache_s=cache_s, skipped=skipped)


def _checked(cfg: TrainConfig) -> tuple[TrainConfig, PatchSource, PatchSource]:
    """Everything the user gave, checked before Ray starts, and the run folder claimed; the two sources.

    An error here cannot succeed on a worker either, and Ray Train would retry it max_failures times.
    """
    cfg = cfg.located("data", "out", "labels", "val_data", "val_labels")  # workers do not share our cwd
    if cfg.weights not in ("none", "imagenet"):
        cfg = cfg.located("weights")
    run_dir = urimod.join(cfg.out, RUN_NAME)
    urimod.check_folder(cfg.out)
    urimod.check_outside(cfg.out, [("--data", cfg.data), ("--val-data", cfg.val_data)])
    if cfg.resume and not urimod.exists(run_dir):
        raise UserError(f"--resume: {cfg.out} has no training run to resume ({run_dir} missing)")
    if cfg.weights != "none":  # a pickle, a truncated file, another arch's weights; ImageNet's that cannot be
        build_model(cfg.arch, weights=cfg.weights)  # downloaded (else now in torch's cache, for the workers)
    train_src, val_src = open_sources(cfg)
    spec = run_spec(cfg, train_src, val_src)
    if urimod.exists(run_dir):
        RunFolder(cfg.out, spec_name=TRAIN_SPEC).check(
            spec, fix="train into another --out, or resume with the data and settings the run started with")
        check_resumable(cfg, run_dir)
        log.info("resuming the training run in %s from its latest checkpoint", run_dir)
        return cfg, train_src, val_src
    # A fresh run (a spec left by a run that never started training is replaced). An exported model
    # (or metrics) with no run to resume beside it: a user's folder, or a run whose Ray Train folder
    # was deleted. A new run would replace the model without a word.
    for name in (MODEL_DIR, METRICS_DIR):
        if urimod.exists(urimod.join(cfg.out, name)):
            raise UserError(f"--out {cfg.out} holds {name}/ but no training run to resume ({RUN_NAME}/): a new "
                            f"run would replace it; train into another --out, or move {name}/ away")
    if urimod.exists(urimod.join(cfg.out, TRAIN_SPEC)):  # hcd started here before: its record is made again
        urimod.delete(urimod.join(cfg.out, SKIPPED))
    RunFolder(cfg.out, spec_name=TRAIN_SPEC).write_spec(spec)
    return cfg, train_src, val_src


def _scaled(cfg: TrainConfig):
    """The workers for this cluster (GPUs from the autoscaler or the flags), their torch threads, its resources."""
    resources, gpus = planning_resources(cfg.address, per=cfg.gpus_per_worker, count=cfg.workers,
                                         flags="--workers and --gpus-per-worker")
    scaling, threads = _scaling(cfg, resources, gpus)
    per = scaling.resources_per_worker.get("GPU", 0)
    check_gpus(resources, scaling.num_workers * per, local=is_local(cfg.address),
               asked=f"training workers: {scaling.num_workers} x {per:g} GPU (--workers, --gpus-per-worker)")
    return scaling, threads, resources


def _fit(cfg: TrainConfig, job: WorkerJob, scaling, datasets: dict):
    """Ray Train's run, followed on the console; Ctrl-C says what is kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig  # Ray only where a job runs
    from ray.train.torch import TorchTrainer  # Ray only where a job runs

    fs, path = urimod.resolve(cfg.out)
    fs.create_dir(path, recursive=True)
    trainer = TorchTrainer(
        functools.partial(train_loop_per_worker, job), scaling_config=scaling, datasets=datasets,
        run_config=RunConfig(name=RUN_NAME, storage_path=path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)))
    stop = threading.Event()
    watcher = threading.Thread(target=_follow_epochs, args=(cfg, job.started_at, stop), daemon=True)
    watcher.start()
    try:
        return trainer.fit()
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ctrl-C: Ray Train takes SIGINT itself (it aborts the run), then ray.get ends in SystemExit(1),
        # which left the command without a word.
        log.debug("training interrupted", exc_info=exc)
        raise Interrupted(f"training interrupted; the checkpoints written so far (if any) are kept in "
                          f"{urimod.join(cfg.out, RUN_NAME)}: rerun the same command to resume from the last") from None
    finally:
        stop.set()
        watcher.join(10)


def _follow_epochs(cfg: TrainConfig, started_at: float, stop: threading.Event) -> None:
    """The driver's view of training: a live bar on a terminal, else a line per epoch.

    The workers' own logs stay in Ray's log files (hcdlib.console), so the driver follows the
    per-epoch metrics files that rank 0 writes after each checkpoint.
    """
    budget = (cfg.time_budget_min or 0) * 60
    bar = progress(budget or cfg.epochs, desc="training", unit="s" if budget else "epoch")
    fs, path = urimod.resolve(urimod.join(cfg.out, METRICS_DIR))
    seen: set[str] = set()
    last_line = 0.0
    while not stop.wait(1.0):
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError:
            continue
        for info in sorted((i for i in infos if i.base_name.endswith(".json") and i.path not in seen),
                           key=lambda i: i.path):
            seen.add(info.path)
            try:
                st = json.loads(urimod.read_bytes(urimod.to_uri(fs, info.path)))
            except (OSError, ValueError):
                continue
            views = f" (TTA {st['val_tta']})" if st.get("val_tta", 1) > 1 else ""
            line = (f"epoch {st['epoch']}: val AUC{views} {st['val_auc']:.4f} (best {st['best_auc']:.4f}, epoch "
                    f"{st['best_epoch']}), {st['images_per_s']:.0f} images/s"
                    + (f" ({st['arithmetic']})" if st["epoch"] == 1 and "arithmetic" in st else ""))
            if bar.disable:  # a log file, not a terminal: a line every 30 s at most
                if time.time() - last_line >= 30:
                    log.info("%s", line)
                    last_line = time.time()
            else:
                bar.set_postfix_str(line)
                if not budget:
                    bar.update(1)
        if budget and not bar.disable:
            bar.n = min(budget, time.time() - started_at)
            bar.refresh()
    bar.close()
