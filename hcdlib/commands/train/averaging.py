"""The weights that are validated and exported: an average of the run's, BatchNorm statistics re-estimated for it."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from hcdlib.commands.train.workers import agreed_max, average_across_workers

log = logging.getLogger(__name__)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> int:
    """Re-estimate ``model``'s BatchNorm running statistics from ``batches``; the images used.

    Running statistics are a momentum average of batch statistics taken while the weights
    moved, and an average of weights (:class:`WeightAverage`) never produced any of them. After
    a short run they do not match the weights at all: a model that separates the validation set
    in training mode (AUC 0.96) scored chance (0.51) in eval mode. A plain average over a few
    batches under the final weights (``momentum=None``) matches them.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    n = sum(len(x) for x in batches)
    # all workers or none: one that skipped would leave the others waiting in all_reduce
    if not bns or -agreed_max(-float(n), bns[0].running_mean.device) <= 0:
        return 0
    momenta, was_training = [m.momentum for m in bns], model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average, every batch weighted alike
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    # Each worker saw its own batches: the mean of the workers' averages is the average over all
    # of them (equal batch sizes), and every worker validates the same statistics.
    for m in bns:
        average_across_workers(m.running_mean)
        average_across_workers(m.running_var)
    return n


class WeightAverage:
    """An average of a model's weights: exponential, then uniform over the run's last stretch.

    Validated and exported instead of the raw weights: it costs no extra epochs and evens out
    the noise of the last steps. The exponential decay ramps up over the first steps
    (``(1 + t) / (10 + t)``) so the average does not remember the random initialisation. From
    ``--swa-from`` of the run on, every step weighs the same (stochastic weight averaging,
    Izmailov et al. 2018): as the learning rate falls, the weights circle a minimum, and their
    plain mean lies nearer its centre than any one of them.
    Its BatchNorm statistics follow the live model's between validations and are re-estimated
    before each (:func:`recalibrate_batchnorm`).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval()
        self.decay = decay
        self.uniform_steps = 0  # steps in the current uniform average; 0 while exponential

    @torch.no_grad()
    def update(self, live: nn.Module, step: int, *, uniform: bool = False) -> None:
        """Move the average towards ``live`` after optimiser step ``step``; integer buffers are copied.

        ``uniform``: the n-th uniform update weighs ``live`` 1/n, so the average is the plain
        mean of the weights since the first one (which it copies). An exponential update ends
        the uniform stretch, so a resumed run given a larger budget starts a new one later.
        """
        if uniform:
            self.uniform_steps += 1
            weight = 1.0 / self.uniform_steps
        else:
            self.uniform_steps = 0
            weight = 1.0 - min(self.decay, (1 + step) / (10 + step))
        ema, now = self.model.state_dict(), live.state_dict()
        floats = [k for k, v in ema.items() if v.is_floating_point()]
        torch._foreach_lerp_([ema[k] for k in floats], [now[k] for k in floats], weight)
        for k, v in ema.items():
            if not v.is_floating_point():
                v.copy_(now[k])

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so a resumed run averages on exactly as before."""
        return {"weights": self.model.state_dict(), "uniform_steps": self.uniform_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.model.load_state_dict(state["weights"])
        self.uniform_steps = int(state["uniform_steps"])
