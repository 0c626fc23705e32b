"""What a training step runs in and when a run stops: the one-cycle schedule, the learning rate, bf16, patience."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from hcdlib.model.device import DeviceFacts, autocast_dtype, probe

log = logging.getLogger(__name__)


def one_cycle(progress: float, *, pct_start: float = 0.25, div: float = 25.0, final_div: float = 1e4) -> float:
    """One-cycle LR factor (of max LR) at ``progress`` in [0, 1]: cosine up, then cosine down."""
    p = min(max(progress, 0.0), 1.0)
    if p < pct_start:
        lo, hi, t = 1 / div, 1.0, p / pct_start
    else:
        lo, hi, t = 1.0, 1 / final_div, (p - pct_start) / (1 - pct_start)
    return hi + (lo - hi) * (1 + math.cos(math.pi * t)) / 2


def stop_reason(*, out_of_time: bool, epochs_since_best: int, patience: int, averaging: bool) -> str:
    """Why the run stops after this epoch ("time budget", "early stopping"), or "" to go on.

    Patience does not end a run once the uniform weight average has begun: that stretch is the
    schedule's low-learning-rate end, where the averaged model gains most and where the AUC moves
    from one epoch to the next by as much as one run's noise, so a short plateau there is not a
    reason to stop.
    """
    if out_of_time:
        return "time budget"
    return "early stopping" if epochs_since_best >= patience and not averaging else ""


def trains_in_bf16(device: torch.device, precision: str, facts: DeviceFacts | None = None) -> bool:
    """Whether training's forward passes run under bf16 autocast, per ``--precision`` (auto | bf16 | fp32).

    auto: bf16 where ``device`` does it natively (:mod:`hcdlib.model.device`), else fp32: training never
    falls back to fp16, which would need loss scaling.
    """
    return autocast_dtype(facts or probe(), device.type, precision, fp16_fallback=False) == "bf16"


# The global batch (patches per optimiser step over all workers) at which --lr is the peak rate.
LR_REFERENCE_BATCH = 128


def scaled_lr(lr: float, global_batch: int) -> float:
    """The peak learning rate for ``global_batch``: ``lr`` x sqrt(global_batch / 128).

    The square-root rule for adaptive optimisers (Adam's update is normalised by the gradient's
    scale, so the linear rule of SGD over-shoots; Malladi et al. 2022): one worker at the default
    batch of 128 trains at ``--lr`` itself, eight GPU workers at 128 each at 2.83 x ``--lr``.
    """
    return lr * math.sqrt(global_batch / LR_REFERENCE_BATCH)


def training_autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """The autocast context of a training step.

    bf16 autocast keeps fp32 master weights and optimiser state: no loss scaling (unlike fp16).
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC with scikit-learn; NaN when only one class is present."""
    return float(roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else float("nan")
