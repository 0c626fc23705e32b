"""The per-worker training loop run by Ray Train's ``TorchTrainer``.

:class:`TrainLoop` owns what every epoch needs and nothing model-specific: epochs, the
one-cycle schedule (sized by steps *or* by the time budget, whichever runs out first),
BatchNorm statistics re-estimated for the validated weights, validation gathered across
workers, checkpoints through ``ray.train.report``, resume from ``ray.train.get_checkpoint()``,
early stopping and rank-0 logging.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hcdlib.commands.train.averaging import WeightAverage, recalibrate_batchnorm
from hcdlib.commands.train.schedule import one_cycle, roc_auc, scaled_lr, stop_reason, training_autocast, trains_in_bf16
from hcdlib.commands.train.workers import agreed_max, gather
from hcdlib.config import TrainConfig
from hcdlib.model.architectures import build_model
from hcdlib.model.device import autocast_dtype, choose, probe
from hcdlib.model.infer import Predictor
from hcdlib.model.transforms import eval_preset, to_input, train_preset
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
# BatchNorm statistics are re-estimated for the validated weights from this many of the
# epoch's last training images (per worker): a forward pass over them took 0.9-1.1 s on 2 cores,
# about 1% of an epoch of the 20,000 shared patches.
BN_IMAGES = 512
# Multi-worker runs agree on the clock (one all-reduce and a host sync) every this many steps,
# not every step; the time budget and the schedule's time progress move in these steps.
CLOCK_SYNC_STEPS = 8
END_RESERVE_S = 15.0  # of a time budget: the last checkpoint, the export and shutting down
TRAIN, VAL = "train", "val"  # dataset keys
METRICS_DIR = "metrics"  # in --out: each epoch's metrics, written by rank 0, followed by the driver


@dataclass(frozen=True)
class WorkerJob:
    """What the driver sends every training worker."""

    cfg: TrainConfig
    n_train: int  # training patches listed: sizes the schedule's steps
    threads: int  # torch threads per worker
    started_at: float  # when `hcd train` started (time.time()): the budget counts from there


class TrainLoop:
    """One worker's training run.

    ``job`` is what :mod:`hcdlib.commands.train.run` sends each worker: frozen and typed, so a
    misspelt field fails on the driver, never on a worker.
    """

    def __init__(self, job: WorkerJob):
        import ray.train  # Ray only where a job runs
        import ray.train.torch  # Ray only where a job runs

        self.cfg = job.cfg
        self.n_train = job.n_train
        self.ctx = ray.train.get_context()
        self.rank, self.world = self.ctx.get_world_rank(), self.ctx.get_world_size()
        torch.set_num_threads(job.threads)
        torch.manual_seed(self.cfg.seed + self.rank)
        facts = probe()
        choose(facts)  # raises DeviceError where Ray gave a GPU that torch cannot use
        self.device = ray.train.torch.get_device()
        self.bf16 = trains_in_bf16(self.device, self.cfg.precision, facts)
        # validation scores as `hcd score --precision auto` does on this device
        self.val_autocast = autocast_dtype(facts, self.device.type, "auto", fp16_fallback=True)
        self.peak_lr = scaled_lr(self.cfg.lr, self.cfg.batch_size * self.world)
        if self.rank == 0:
            log.info("training on %s in %s (--precision %s), peak learning rate %.3g for a global batch of %d",
                     self.device.type, "bf16 autocast" if self.bf16 else "fp32", self.cfg.precision,
                     self.peak_lr, self.cfg.batch_size * self.world)


        model, self.pre = build_model(self.cfg.arch, weights=self.cfg.weights, crop=self.cfg.crop)
        model = model.to(self.device, memory_format=torch.channels_last)
        # The averaged weights are what is validated and exported (see WeightAverage).
        averaged = self.cfg.ema or self.cfg.swa_from < 1
        self.ema = WeightAverage(model, self.cfg.ema) if averaged else None
        self.model = ray.train.torch.prepare_model(model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.peak_lr, weight_decay=self.cfg.weight_decay)
        self.loss_fn = nn.BCEWithLogitsLoss()
        # The epoch's last uint8 training batches, for recalibrate_batchnorm.
        self.recent: collections.deque = collections.deque(maxlen=math.ceil(BN_IMAGES / self.cfg.batch_size))
        self.steps_per_epoch = max(1, math.ceil(self.n_train / (self.cfg.batch_size * self.world)))
        self.total_steps = self.steps_per_epoch * self.cfg.epochs
        # The budget is the run's wall time: start-up, validation and checkpoints count, and
        # the loop stops a little early so that the last report and the export fit in it.
        budget = (self.cfg.time_budget_min or 0) * 60
        self.budget_s = budget - min(END_RESERVE_S, 0.1 * budget)
        # Resumable state: everything below goes into each checkpoint.
        self.epoch, self.step, self.elapsed = 0, 0, 0.0
        self.val_s = 0.0  # the last validation's seconds: training stops that much before the budget
        self.best = {"auc": -1.0, "epoch": -1, "metrics": {}}
        self.best_state: dict | None = None
        self.history: list[dict] = []
        if not self._restore():  # a fresh run: the time since `hcd train` started counts
            self.elapsed = min(max(time.time() - job.started_at, 0.0), 600.0)

    # ---- state ---------------------------------------------------------------------------
    def _unwrapped(self) -> nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    def _restore(self) -> bool:
        import ray.train  # Ray only where a job runs

        ckpt = ray.train.get_checkpoint()
        if not ckpt:
            return False
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        self._unwrapped().load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state.get("ema") or state["model"])
        self.epoch, self.step, self.elapsed = state["epoch"], state["step"], state["elapsed"]
        self.best, self.best_state = state["best"], state["best_model"]
        self.history = state["history"]
        self.val_s = self.history[-1].get("val_seconds", 0.0) if self.history else 0.0
        if self.rank == 0:
            log.info("resumed from checkpoint after epoch %d (%.0fs trained)", self.epoch, self.elapsed)
        return True

    def _checkpoint_state(self) -> dict:
        return {"model": self._unwrapped().state_dict(), "optimizer": self.opt.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "epoch": self.epoch, "step": self.step, "elapsed": self.elapsed, "best": self.best,
                "best_model": self.best_state, "history": self.history}

    # ---- one epoch ---------------------------------------------------------------------
    def _budget_left(self) -> bool:
        """Whether a resumed run may train more: a larger budget than the one that stopped it."""
        return bool(self.budget_s) and not self._out_of_time() and self.history[-1]["stopped"] == "time budget"

    def _training_s(self) -> float:
        """Seconds of the run by which training must stop: the budget less the epoch's validation.

        So the last epoch's validation fits in the budget too: with ``--val-tta 8`` it took 70-86 s
        per epoch on 2 cores, and a 30-minute run that trained to the budget's end ran 71 s over.
        """
        return max(self.budget_s - self.val_s, 0.5 * self.budget_s)

    def _out_of_time(self) -> bool:
        return bool(self.budget_s) and self.elapsed >= self._training_s()

    def _progress(self) -> float:
        by_time = self.elapsed / self._training_s() if self.budget_s else 0.0
        return max(self.step / self.total_steps, by_time)

    def _evaluated(self) -> nn.Module:
        """The weights validation sees and export writes: the average when there is one."""
        return self.ema.model if self.ema is not None else self._unwrapped()

    def train_epoch(self, shard) -> dict:
        """Train over this worker's shard once (or until the time budget runs out)."""
        self.model.train()
        seen, t0 = 0, time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)  # summed where the loss is: no host sync per step
        start_elapsed = self.elapsed
        self.recent.clear()
        for batch in shard.iter_torch_batches(batch_size=self.cfg.batch_size, drop_last=self.world > 1,
                                              local_shuffle_buffer_size=4 * self.cfg.batch_size):
            if self.world == 1 or self.step % CLOCK_SYNC_STEPS == 0:  # every worker takes the same steps
                self.elapsed = agreed_max(start_elapsed + time.perf_counter() - t0, self.device)
                if self._out_of_time():
                    break
            for g in self.opt.param_groups:
                g["lr"] = self.peak_lr * one_cycle(self._progress())
            pixels = batch["pixels"].to(self.device, non_blocking=True)
            self.recent.append(pixels)
            x = train_preset(to_input(pixels, self.pre))
            y = batch["label"].to(self.device).float().view(-1, 1)
            with training_autocast(self.device, self.bf16):
                loss = self.loss_fn(self.model(x).float(), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.ema is not None:
                self.ema.update(self._unwrapped(), self.step, uniform=self._progress() >= self.cfg.swa_from)
            self.step += 1
            seen += len(y)
            loss_sum += loss.detach() * len(y)
        self.elapsed = start_elapsed + time.perf_counter() - t0
        wall = time.perf_counter() - t0
        return {"train_loss": float(loss_sum) / max(seen, 1), "images_per_s": seen * self.world / max(wall, 1e-9),
                "uniform_steps": self.ema.uniform_steps if self.ema is not None else 0,
                "epoch_seconds": wall, "arithmetic": "bf16 autocast" if self.bf16 else "fp32"}

    def recalibrate(self) -> int:
        """Re-estimate the validated model's BatchNorm statistics from the epoch's last batches.

        Un-augmented, as validation and scoring see patches; in training's arithmetic (it is a
        forward pass of training).
        """
        batches = [eval_preset(to_input(p, self.pre)) for p in self.recent]
        self.recent.clear()
        with training_autocast(self.device, self.bf16):
            return recalibrate_batchnorm(self._evaluated(), batches)

    def validate(self, shard) -> dict:
        """Loss, accuracy and ROC AUC over the whole validation set (gathered from all workers).

        Scored by a :class:`~hcdlib.model.infer.Predictor`, as ``hcd score --tta <--val-tta>`` scores on
        this device, so the exported epoch is chosen on numbers scoring reproduces. The batches
        come to the host (Ray's default puts them on the worker's GPU): the predictor copies the
        pixels to the device through pinned memory, and labels are read on the host.
        """
        predict = Predictor(self._evaluated().eval(), self.pre, device=self.device, tta=self.cfg.val_tta,
                            autocast=self.val_autocast)
        probs, labels = [], []
        for batch in shard.iter_torch_batches(batch_size=512, device="cpu"):
            probs.append(predict(batch["pixels"]))
            labels.append(batch["label"].cpu().numpy())
        p = gather(np.concatenate(probs) if probs else np.zeros(0, np.float32))
        y = gather(np.concatenate(labels) if labels else np.zeros(0, np.int64))
        eps = 1e-7
        loss = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))) if len(y) else float("nan")
        return {"val_loss": loss, "val_acc": float(np.mean((p >= 0.5) == y)) if len(y) else float("nan"),
                "val_auc": roc_auc(y, p), "val_n": len(y), "val_tta": self.cfg.val_tta}

    # ---- the run -----------------------------------------------------------------------
    def run(self) -> None:
        """Epoch loop: train, validate, checkpoint, report; stop on epochs, budget or patience."""
        import ray.train  # Ray only where a job runs

        train_shard, val_shard = ray.train.get_dataset_shard(TRAIN), ray.train.get_dataset_shard(VAL)
        if self.history and self.history[-1]["stopped"] and not self._budget_left():
            if self.rank == 0:  # rerun of a finished run: nothing to do but export again
                log.info("run already stopped (%s) after epoch %d", self.history[-1]["stopped"], self.epoch)
            return
        while self.epoch < self.cfg.epochs:
            stats = self.train_epoch(train_shard)
            t_val = time.perf_counter()
            stats["bn_images"] = self.recalibrate()
            stats.update(self.validate(val_shard))
            val_dt = time.perf_counter() - t_val
            self.val_s = stats["val_seconds"] = agreed_max(val_dt, self.device)
            self.elapsed = agreed_max(self.elapsed + val_dt, self.device)
            self.epoch += 1
            auc = stats["val_auc"]
            if not math.isnan(auc) and auc > self.best["auc"]:
                self.best = {"auc": auc, "epoch": self.epoch, "metrics": stats}
                self.best_state = {k: v.detach().cpu().clone() for k, v in self._evaluated().state_dict().items()}
            stopped = stop_reason(out_of_time=self._out_of_time(),
                                  epochs_since_best=self.epoch - self.best["epoch"], patience=self.cfg.patience,
                                  averaging=stats["uniform_steps"] > 0)
            stats.update(epoch=self.epoch, elapsed_s=self.elapsed, lr=self.opt.param_groups[0]["lr"],
                         best_auc=self.best["auc"], best_epoch=self.best["epoch"], stopped=stopped)
            self.history.append(stats)
            t_report = time.perf_counter()
            self._report(stats)
            self.elapsed += time.perf_counter() - t_report  # checkpointing is wall time too
            if stopped:
                break

    def _report(self, stats: dict) -> None:
        import ray.train  # Ray only where a job runs

        if self.rank == 0:
            left = (self.cfg.epochs - self.epoch) * stats["epoch_seconds"]
            if self.budget_s:
                left = min(left, max(self.budget_s - self.elapsed, 0))
            log.info("epoch %d/%d  loss %.4f  val_loss %.4f  val_acc %.4f  val_auc %.4f  %.0f img/s  ETA %.0fs%s",
                     self.epoch, self.cfg.epochs, stats["train_loss"], stats["val_loss"], stats["val_acc"],
                     stats["val_auc"], stats["images_per_s"], left,
                     f"  (stopping: {stats['stopped']})" if stats["stopped"] else "")
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if self.rank == 0:
                torch.save(self._checkpoint_state(), os.path.join(d, STATE_FILE))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report({k: v for k, v in stats.items() if isinstance(v, int | float | str)}, checkpoint=ckpt)
        if self.rank == 0:  # after report: a metrics file means its epoch's checkpoint exists

            urimod.write_bytes_atomic(urimod.join(self.cfg.out, METRICS_DIR, f"epoch_{self.epoch:03d}.json"),
                                      json.dumps(stats, indent=1).encode())


def train_loop_per_worker(job: WorkerJob) -> None:
    """Ray Train entry point (given as ``functools.partial(train_loop_per_worker, job)``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    TrainLoop(job).run()
