"""Workers that agree: one decision for all ranks (the clock, the budget), gathered validation, averaged statistics."""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def workers() -> int:
    """How many workers share this training run (1 without torch.distributed)."""
    import torch.distributed as dist  # torch only where a model runs

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather(values: np.ndarray) -> np.ndarray:
    """Concatenate a per-worker array across all workers (every worker gets the whole)."""
    import torch.distributed as dist  # torch only where a model runs

    if workers() == 1:
        return values
    parts: list = [None] * workers()
    dist.all_gather_object(parts, values)
    return np.concatenate(parts)


def agreed_max(value: float, device: torch.device) -> float:
    """The largest ``value`` over all workers, so every worker takes the same decision.

    Workers that read their own clocks would disagree on when the time budget runs out (one
    stops while the others wait in the next gradient all-reduce: a hang) and on the learning
    rate (DDP replicas drift apart). One scalar all-reduce per step keeps them in step.
    """
    import torch.distributed as dist  # torch only where a model runs

    if workers() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def average_across_workers(t: torch.Tensor) -> None:
    """Replace ``t`` in place by its mean over all workers (a no-op on one)."""
    import torch.distributed as dist  # torch only where a model runs

    if workers() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(workers())
