"""``hcd train``: fine-tune a CNN on patches with Ray Train, then export the best epoch.

    hcd train --data /data/pcam-real/train --val-data /data/pcam-real/valid --out runs/pcam --time-budget-min 30
    ray job submit --working-dir . -- python jobs/train.py --data s3://b/train-shards --out s3://b/run \
        --arch resnet50 --weights imagenet --workers 8 --gpus-per-worker 1

Data comes through Ray Data (the same sources, decoding and preprocessing as scoring) and is
streamed to ``TorchTrainer`` workers. Checkpoints go to ``<out>/ray_train/`` every epoch;
rerunning the same command resumes from the latest one. The best epoch is exported to
``<out>/model/`` (see :mod:`hcdlib.artifact`), which ``hcd score --model`` loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from dataclasses import asdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from hcdlib import predictions as preds
from hcdlib import uri as urimod
from hcdlib.chunks import Chunk
from hcdlib.config import TrainConfig
from hcdlib.errors import Interrupted, UserError
from hcdlib.sources import FileSource, PatchSource, SourceError, check_labelled, open_source
from hcdlib.train_loop import METRICS_DIR, TRAIN, VAL

log = logging.getLogger(__name__)

RUN_NAME = "ray_train"
# Where a run exports its model artifact, in --out.
MODEL_DIR = "model"


def split_by_group(src: PatchSource, fraction: float) -> tuple[PatchSource, PatchSource]:
    """Hold out ``fraction`` of the *groups* (slide, duplicate group, else patch) for validation.

    Patches of one slide (or pixel-identical duplicates) are never on both sides, so the
    validation AUC is not inflated by near-copies of training patches.
    """
    if not isinstance(src, FileSource):  # shards and HDF5 files hold no slide groups to split by
        fix = ("camelyonpatch_level_2_split_valid_x.h5, PCam's validation split" if src.layout == "pcam_h5"
               else "the validation set packed separately")
        raise UserError(f"{src.uri}: a validation split of {src.layout.replace('_', ' ')} needs --val-data ({fix})")
    groups = sorted(set(src.items["group"].to_pylist()),
                    key=lambda g: hashlib.sha1(g.encode()).hexdigest())  # stable on every run and machine
    if len(groups) < 2:
        raise UserError(f"{src.uri}: one group only ({groups}); a grouped validation split needs --val-data")
    if src.items["slide_id"].null_count == src.items.num_rows:
        # Kaggle's train_labels.csv has no slides: neighbours of one slide land on both sides.
        log.warning("%s: no slide ids (a slide_id column in the labels CSV), so validation holds out single "
                    "patches, not slides, and its AUC is optimistic; give --val-data from other slides",
                    src.uri)
    n_val = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    mask = pc.is_in(src.items["group"], value_set=pa.array(groups[:n_val], pa.string()))
    val, train = src.items.filter(mask), src.items.filter(pc.invert(mask))
    return src.with_items(train), src.with_items(val)


def _shuffled_chunks(src: PatchSource, chunk_size: int, seed: int) -> list[Chunk]:
    """Training chunks with patches shuffled first: listings are sorted (class folders by label).

    Shards keep their row groups whole (each is one chunk); only the chunks' order is shuffled.
    """
    if isinstance(src, FileSource):
        order = list(range(src.items.num_rows))
        random.Random(seed).shuffle(order)
        src = src.with_items(src.items.take(pa.array(order)))
    chunks = src.chunks(chunk_size)
    random.Random(seed + 1).shuffle(chunks)
    return chunks


def open_sources(cfg: TrainConfig) -> tuple[PatchSource, PatchSource]:
    """The training and validation sources, listed and checked (every patch labelled 0 or 1)."""
    # require_label: a labels CSV without a label column is refused (labels not 0/1, repeated ids always are)
    src = open_source(cfg.data, cfg.labels, require_label=True)
    if cfg.val_data:
        train_src, val_src = src, open_source(cfg.val_data, cfg.val_labels, require_label=True)
    else:
        train_src, val_src = split_by_group(src, cfg.val_fraction)
    check_split((train_src, check_labelled(train_src, "training")),
                (val_src, check_labelled(val_src, "validation")), held_out=not cfg.val_data)
    log.info("train: %d patches, validation: %d patches", train_src.num_patches, val_src.num_patches)
    return train_src, val_src


def check_split(train: tuple[PatchSource, pa.Table], val: tuple[PatchSource, pa.Table], *, held_out: bool) -> None:
    """Refuse a split that holds one class only, or that validates on training patches.

    ``train`` and ``val``: each source with its ``id, label`` table (:func:`check_labelled`).
    Either misuse would run the whole budget for nothing the user can trust: an AUC over one
    class is undefined (the run used to end in a traceback after training), and an AUC over
    patches the model learnt is optimistic without a word, and it picks the exported epoch.
    ``held_out``: the validation patches are slide groups held out of ``--data``.
    """
    for (src, t), what in ((train, "training"), (val, "validation")):
        if not t.num_rows:
            raise SourceError(f"{src.uri}: no {what} patches")
        tumour = pc.sum(t["label"]).as_py()
        if tumour in (0, t.num_rows):
            fix = ("hold out more slide groups (--val-fraction) or give --val-data" if what == "validation" and held_out
                   else f"give {what} patches of both classes")
            raise SourceError(f"{src.uri}: all {t.num_rows} {what} patches are labelled {1 if tumour else 0} "
                              f"({'tumour' if tumour else 'normal'}); training and its validation AUC need both "
                              f"normal (0) and tumour (1) patches: {fix}")
    (train_src, train_t), (val_src, val_t) = train, val
    if same := _overlap(val_t["id"], train_t["id"]):
        raise SourceError(f"{val_src.uri}: {same[0]} of its {val_t.num_rows} validation patches have ids that are also "
                          f"training patches in {train_src.uri} (e.g. {same[1]}), so the validation AUC would count "
                          "patches the model learnt; validate on patches kept out of --data, or leave out --val-data "
                          "to hold out slide groups of --data")
    if held_out:  # split_by_group kept every slide and duplicate group on one side
        return
    # Pixel-identical copies (one duplicate group of a labels CSV, no slide to tell) are the same
    # patch under two ids: as above, refused.
    dup = _overlap(_dup_groups(val_src), _dup_groups(train_src))
    if dup:
        raise SourceError(f"{val_src.uri}: {dup[0]} of its {val_t.num_rows} validation patches are in duplicate "
                          f"groups (dup_group) that training patches in {train_src.uri} are in too (e.g. group "
                          f"{dup[1]}), so the validation AUC would count copies of patches the model learnt; keep "
                          "each duplicate group on one side")
    # Patches of one slide on both sides: allowed (some data sets cannot be split otherwise), said.
    slides = _overlap(val_t["slide_id"], pc.drop_null(train_t["slide_id"]))
    if slides:
        log.warning("%s: %d of its %d validation patches come from slides that training patches come from too "
                    "(e.g. slide %s): the validation AUC, which picks the exported epoch, is optimistic; validate on "
                    "other slides", val_src.uri, slides[0], val_t.num_rows, slides[1])


def _dup_groups(src: PatchSource) -> pa.ChunkedArray:
    """Each patch's duplicate group, where it has one and no slide (``group`` is then that group or the id)."""
    items = src.items
    if "group" not in items.column_names:  # shards carry no groups
        return pa.chunked_array([], pa.string())
    mine = pc.and_(items["slide_id"].is_null(), pc.not_equal(items["group"], items["id"]))
    return pc.filter(items["group"], mine)


def _overlap(values: pa.ChunkedArray, others: pa.ChunkedArray) -> tuple[int, str] | None:
    """How many of ``values`` (nulls never) are among ``others``, and the first; None when none."""
    shared = pc.fill_null(pc.is_in(values, value_set=others.combine_chunks()), False)
    n = pc.sum(shared).as_py() or 0
    return (n, values[pc.index(shared, True).as_py()].as_py()) if n else None


# Of Ray's object store, what decoded training + validation patches may fill under --cache auto.
# The rest stays for what is in flight (Ray Train's batches, checkpoints).
CACHE_STORE_FRACTION = 0.5


def caches_decoded(cfg: TrainConfig, patches: int, object_store_bytes: float) -> bool:
    """Whether to decode the data once into Ray's object store (``--cache``) rather than every epoch.

    Re-reading costs every epoch the same reads and decodes: on 2 cores, Ray Data's read tasks
    took 0.17 of a core beside the train worker. Kept, the epochs after the first read blocks
    from memory. Only what fits comfortably: a larger archive streams as before.
    """
    from hcdlib.pipeline import patch_bytes

    if cfg.cache != "auto":
        return cfg.cache == "on"
    return patch_bytes(patches) <= CACHE_STORE_FRACTION * object_store_bytes


def build_datasets(cfg: TrainConfig, train_src: PatchSource, val_src: PatchSource, *,
                   cache: bool = False) -> dict:
    """The train/val Ray Datasets, keyed by :data:`TRAIN` / :data:`VAL`; decoded now with ``cache``."""
    from ray.data import RandomSeedConfig

    from hcdlib.pipeline import decoded_dataset, labelled_ok

    datasets = {}
    for key, s in ((TRAIN, train_src), (VAL, val_src)):
        chunks = _shuffled_chunks(s, cfg.chunk_size, cfg.seed) if key == TRAIN else s.chunks(cfg.chunk_size)
        # a folder per split: their chunks' keys (and so the record's file names) are alike
        ds = decoded_dataset(chunks).map_batches(labelled_ok, fn_kwargs={"skipped": urimod.join(cfg.out, SKIPPED, key)})
        if cache:
            ds = ds.materialize()
        if cache and key == TRAIN:  # kept blocks would come back in one order every epoch: a new order
            # each epoch, reproducible from --seed (a reorder of references, no data moves)
            ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True))
        datasets[key] = ds
    return datasets


def _scaling(cfg: TrainConfig, resources: dict, gpus: float | None = None):
    """Workers from the cluster: one per GPU, else one (or ``--workers``) sharing the CPU with reads.

    ``gpus``: what :func:`hcdlib.rayutil.gpus_to_plan` counts on (default: the GPUs in ``resources``).
    """
    from ray.train import ScalingConfig

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
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from hcdlib.models import build_model
    from hcdlib.rayutil import autoscaler_limits, check_gpus, gpus_to_plan, init_ray, is_fixed, is_local
    from hcdlib.train_loop import train_loop_per_worker

    started_at = time.time()  # the time budget counts from here: start-up is part of the run
    cfg = cfg.located("data", "out", "labels", "val_data", "val_labels")  # workers do not share our cwd
    if cfg.weights not in ("none", "imagenet"):
        cfg = cfg.located("weights")
    # Everything the user gave is checked before Ray starts: an error here cannot succeed on a
    # worker either, and Ray Train would retry it max_failures times.
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
        # Runs from before hcd wrote a spec have none: they resume as they did.
        preds.check_run_spec(cfg.out, spec, name=TRAIN_SPEC,
                             fix="train into another --out, or resume with the data and settings the run started with")
        check_resumable(cfg, run_dir)
        log.info("resuming the training run in %s from its latest checkpoint", run_dir)
    else:  # a fresh run (a spec left by a run that never started training is replaced)
        # An exported model (or metrics) with no run to resume beside it: a user's folder, or a run
        # whose Ray Train folder was deleted. A new run would replace the model without a word.
        for name in (MODEL_DIR, METRICS_DIR):
            if urimod.exists(urimod.join(cfg.out, name)):
                raise UserError(f"--out {cfg.out} holds {name}/ but no training run to resume ({RUN_NAME}/): a new "
                                f"run would replace it; train into another --out, or move {name}/ away")
        if urimod.exists(urimod.join(cfg.out, TRAIN_SPEC)):  # hcd started here before: its record is made again
            urimod.delete(urimod.join(cfg.out, SKIPPED))
        urimod.write_bytes_atomic(urimod.join(cfg.out, TRAIN_SPEC), json.dumps(spec, indent=1).encode())
    init_ray(cfg.address, dashboard=True)
    resources = ray.cluster_resources()
    gpus = gpus_to_plan(resources, None if is_fixed(cfg.address) else autoscaler_limits(),
                        fixed=is_fixed(cfg.address), per=cfg.gpus_per_worker, count=cfg.workers,
                        flags="--workers and --gpus-per-worker")
    scaling, threads = _scaling(cfg, resources, gpus)
    per = scaling.resources_per_worker.get("GPU", 0)
    check_gpus(resources, scaling.num_workers * per, local=is_local(cfg.address),
               asked=f"training workers: {scaling.num_workers} x {per:g} GPU (--workers, --gpus-per-worker)")
    n_train, n_all = train_src.num_patches, train_src.num_patches + val_src.num_patches
    cache = caches_decoded(cfg, n_all, resources.get("object_store_memory", 0))
    t_cache = time.perf_counter()
    datasets = build_datasets(cfg, train_src, val_src, cache=cache)
    cache_s = time.perf_counter() - t_cache if cache else 0.0
    if cache:
        log.info("decoded the %d listed patches into Ray's object store in %.0f s: epochs read them from memory "
                 "(--cache off reads and decodes every epoch)", n_all, cache_s)
    # Decoded into the cache now, what was left out is known before training starts.
    listed = {TRAIN: n_train, VAL: val_src.num_patches}
    skipped = report_skipped(cfg, listed) if cache else None
    log.debug("Ray Train: %s, %d torch threads per worker", scaling, threads)
    fs, path = urimod.resolve(cfg.out)
    fs.create_dir(path, recursive=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "n_train": n_train, "threads": threads,
                           "started_at": started_at},
        scaling_config=scaling,
        datasets=datasets,
        run_config=RunConfig(
            name=RUN_NAME, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    stop = threading.Event()
    watcher = threading.Thread(target=_follow_epochs, args=(cfg, started_at, stop), daemon=True)
    watcher.start()
    try:
        result = trainer.fit()
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ctrl-C: Ray Train takes SIGINT itself (it aborts the run), then ray.get ends in SystemExit(1),
        # which left the command without a word.
        log.debug("training interrupted", exc_info=exc)
        raise Interrupted(f"training interrupted; the checkpoints written so far (if any) are kept in "
                          f"{urimod.join(cfg.out, RUN_NAME)}: rerun the same command to resume from the last") from None
    finally:
        stop.set()
        watcher.join(10)
    if skipped is None:  # streamed: decoded during the epochs, so known now
        skipped = report_skipped(cfg, listed)
    return dict(export_best(cfg, result.checkpoint), data_cache_s=cache_s, skipped=skipped)


def _follow_epochs(cfg: TrainConfig, started_at: float, stop: threading.Event) -> None:
    """The driver's view of training: a live bar on a terminal, else a line per epoch.

    The workers' own logs stay in Ray's log files (hcdlib.console), so the driver follows the
    per-epoch metrics files that rank 0 writes after each checkpoint.
    """
    from hcdlib.console import progress

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


# What a training run was started with, in --out: a rerun resumes it only with the same.
TRAIN_SPEC = "_TRAIN.json"
# Where the patches that training left out (could not be decoded) are recorded, in --out.
SKIPPED = "skipped"
SPLIT_NAMES = {TRAIN: "training", VAL: "validation"}


def clear_run(out: str) -> None:
    """Delete the training run hcd wrote in ``out`` (its own names only), so the next one starts fresh.

    Only where ``out`` holds hcd's markers of a run (the spec, or Ray Train's run folder).
    """
    if not (urimod.exists(urimod.join(out, TRAIN_SPEC)) or urimod.exists(urimod.join(out, RUN_NAME))):
        return
    for name in (RUN_NAME, METRICS_DIR, MODEL_DIR, SKIPPED, TRAIN_SPEC):  # the spec last
        urimod.delete(urimod.join(out, name))


def report_skipped(cfg: TrainConfig, listed: dict[str, int]) -> int:
    """Say how many listed patches training leaves out, with an example; return the count.

    A patch that cannot be decoded cannot train; it is recorded in ``<out>/skipped/`` (id and
    reason) by the read stage, and said here, never dropped without a word. ``listed``: the
    patches listed per split. A split that lost every patch is refused: with no training patch the
    run ended in a traceback, and with no validation patch no epoch could be chosen.
    """
    from hcdlib.pipeline import skipped_rows

    per = {key: skipped_rows(urimod.join(cfg.out, SKIPPED, key)) for key in (TRAIN, VAL)}
    t = pa.concat_tables(per.values())
    if not t.num_rows:
        return 0
    for key, rows in per.items():
        if rows.num_rows and rows.num_rows >= listed[key]:
            raise UserError(f"none of the {listed[key]} {SPLIT_NAMES[key]} patches could be decoded (e.g. "
                            f"{rows['id'][0].as_py()}: {rows['error'][0].as_py()}); each is listed in "
                            f"{urimod.join(cfg.out, SKIPPED, key)}; hcd trains on 96x96 RGB patches (tif, png or "
                            "jpg): convert them")
    example = f"{t['id'][0].as_py()}: {t['error'][0].as_py()}"
    log.warning("%d of the %d listed training and validation patches could not be decoded and are left out "
                "(e.g. %s); each is listed in %s", t.num_rows, sum(listed.values()), example,
                urimod.join(cfg.out, SKIPPED))
    return t.num_rows


def run_spec(cfg: TrainConfig, train_src: PatchSource, val_src: PatchSource) -> dict:
    """What defines a training run's model: its data (as listed) and the settings that shape the weights.

    A rerun in the same --out resumes the run, so it must be the same run: with another --data
    or --lr it used to resume (or re-export) the old run's weights under the new run's flags,
    which the model artifact then recorded. A larger --epochs or --time-budget-min, other
    workers, precision or cache continue the same run and may change.
    """
    return {"job": "train", "data": cfg.data, "labels": cfg.labels, "val_data": cfg.val_data,
            "val_labels": cfg.val_labels, "val_fraction": None if cfg.val_data else cfg.val_fraction,
            "train_fingerprint": train_src.fingerprint(), "val_fingerprint": val_src.fingerprint(),
            "arch": cfg.arch, "weights": cfg.weights, "crop": cfg.crop, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "weight_decay": cfg.weight_decay, "ema": cfg.ema, "swa_from": cfg.swa_from,
            "seed": cfg.seed}


def check_resumable(cfg: TrainConfig, run_dir: str) -> None:
    """Refuse to resume a run whose latest checkpoint holds another model than ``cfg`` builds.

    Another ``--arch``, or an hcdnet of an older hcd (another shape), would otherwise fail on
    every worker as Ray Train restores it, and be retried ``--max-failures`` times.
    """
    import io

    import torch

    from hcdlib.models import build_model
    from hcdlib.train_loop import STATE_FILE

    fs, path = urimod.resolve(run_dir)
    ckpts = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path))
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    if not ckpts:
        return
    try:  # hcd's own checkpoint, and still tensors only
        state = torch.load(io.BytesIO(urimod.read_bytes(urimod.to_uri(fs, f"{ckpts[-1]}/{STATE_FILE}"))),
                           map_location="cpu", weights_only=True)
    except OSError:  # an interrupted checkpoint: Ray Train's restore decides
        return
    model, _ = build_model(cfg.arch, weights="none")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {k: tuple(v.shape) for k, v in state["model"].items()} != want:
        raise UserError(f"--out {cfg.out}: its training run was checkpointed with another model than --arch "
                        f"{cfg.arch} builds (another --arch, or an hcdnet of an older hcd); train into a new --out, "
                        "or resume with the --arch the run started with")


def export_best(cfg: TrainConfig, checkpoint) -> dict:
    """Export the best epoch stored in ``checkpoint`` to ``<out>/model``."""
    import torch

    from hcdlib.artifact import export_model
    from hcdlib.models import build_model, preprocess_for
    from hcdlib.train_loop import STATE_FILE

    if checkpoint is None:
        raise RuntimeError(f"training in {cfg.out} produced no checkpoint")
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    if state["step"] == 0 and cfg.time_budget_min:  # an untrained model looks like any other: never export one
        raise UserError(f"--time-budget-min {cfg.time_budget_min:g}: the budget ran out before the first training "
                        f"step ({state['elapsed']:.0f} s went to starting Ray and reading the data); nothing was "
                        "exported: give a larger budget")
    if state["step"] == 0:
        raise RuntimeError(f"training in {cfg.out} ran no step, and no time budget stopped it")
    if state["best_model"] is None:
        # listed with both classes (checked before Ray), so the patches that decoded are of one class
        raise UserError(f"no epoch produced a validation AUC: the validation patches that could be decoded are of "
                        f"one class (those left out are listed in {urimod.join(cfg.out, SKIPPED, VAL)}); give "
                        "validation data of both classes that decode")
    model, _ = build_model(cfg.arch, weights="none")
    model.load_state_dict(state["best_model"])
    metrics = dict(state["best"]["metrics"], best_epoch=state["best"]["epoch"], epochs_run=state["epoch"])
    meta = export_model(model, urimod.join(cfg.out, MODEL_DIR), arch=cfg.arch,
                        preprocess=preprocess_for(cfg.weights, crop=cfg.crop), metrics=metrics, config=asdict(cfg))
    meta["history"] = state["history"]
    return meta
