"""The training run's folder: its spec, the checks before a resume, and the export of the best epoch."""

from __future__ import annotations

import io
import logging
import os
from dataclasses import asdict

import pyarrow.fs as pafs

from hcdlib.commands.train.data import SKIPPED
from hcdlib.commands.train.loop import METRICS_DIR, STATE_FILE, VAL
from hcdlib.config import TrainConfig
from hcdlib.errors import UserError
from hcdlib.model.architectures import build_model, preprocess_for
from hcdlib.model.artifact import export_model
from hcdlib.sources.base import PatchSource
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)


RUN_NAME = "ray_train"


# Where a run exports its model artifact, in --out.
MODEL_DIR = "model"


# What a training run was started with, in --out: a rerun resumes it only with the same.
TRAIN_SPEC = "_TRAIN.json"


def clear_run(out: str) -> None:
    """Delete the training run hcd wrote in ``out`` (its own names only), so the next one starts fresh.

    Only where ``out`` holds hcd's markers of a run (the spec, or Ray Train's run folder).
    """
    if not (urimod.exists(urimod.join(out, TRAIN_SPEC)) or urimod.exists(urimod.join(out, RUN_NAME))):
        return
    for name in (RUN_NAME, METRICS_DIR, MODEL_DIR, SKIPPED, TRAIN_SPEC):  # the spec last
        urimod.delete(urimod.join(out, name))


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
    import torch  # torch only where a model runs


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
    import torch  # torch only where a model runs


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
