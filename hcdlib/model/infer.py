"""The forward pass: :class:`Predictor` (what a scoring actor holds) and ``infer_batch`` (one call).

Tests and user code call them without Ray; the scoring actor
(:mod:`hcdlib.commands.score.actor`) only wraps a :class:`Predictor`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from hcdlib.config import TTA_CHOICES
from hcdlib.model.device import torch_dtype
from hcdlib.model.transforms import Preprocess, dihedral, eval_preset, norm_stats, to_input

log = logging.getLogger(__name__)


def for_inference(model: nn.Module) -> nn.Module:
    """The model as scoring runs it: each BatchNorm folded into the convolution before it, channels_last.

    In eval mode a BatchNorm is a fixed scale and shift that the convolution's weights can carry;
    folded, each activation map is written once instead of twice. A model torch.fx cannot trace
    is scored as it is.
    """
    from torch.fx.experimental.optimization import fuse  # torch only where a model runs

    try:
        model = fuse(model.eval())  # a copy: the loaded model is left as it was
    except Exception as exc:  # torch.fx raises several types for code it cannot trace; fusing is only a speed-up
        log.debug("scoring %s without folding BatchNorm: torch.fx cannot trace it (%s)", type(model).__name__, exc)
    return model.to(memory_format=torch.channels_last)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``: a CPU tensor bound for a GPU goes through pinned memory without blocking.

    A tensor already on a GPU (Ray Train's batches) is used where it is; pinning applies to CPU
    tensors only.
    """
    if x.device == device or (x.device.type == device.type and device.index is None):
        return x
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


# Rows one GPU forward pass may take when test-time views are stacked (memory, not speed, caps it).
GPU_FORWARD_ROWS = 4096


class Predictor:
    """P(tumour) of uint8 NHWC patches with one model on one device, constants made once.

    ``autocast``: "bf16", "fp16" or None (fp32); outputs are float32 either way. ``tta`` 4
    averages the four 90-degree rotations, 8 the whole dihedral group. On a GPU the views go
    through the model stacked, up to :data:`GPU_FORWARD_ROWS` rows a pass (one kernel launch
    per layer instead of one per view); on the CPU a view at a time, which keeps memory as small
    as the batch and costs nothing there. ``fixed_batch``: pad every call to this many patches,
    so that a compiled model sees one shape and never recompiles for a short last batch.
    """

    def __init__(self, model: nn.Module, preprocess: Preprocess, *, device: torch.device, tta: int = 1,
                 autocast: str | None = None, fixed_batch: int | None = None,
                 forward_rows: int | None = None):
        if tta not in TTA_CHOICES:
            raise ValueError(f"tta must be one of {TTA_CHOICES}, got {tta}")
        self.model, self.pre, self.device, self.tta = model, preprocess, device, tta
        self.dtype = torch_dtype(autocast)
        self.fixed_batch = fixed_batch
        self.forward_rows = forward_rows if forward_rows is not None else (
            GPU_FORWARD_ROWS if device.type == "cuda" else 0)
        self.stats = norm_stats(preprocess, device)

    def views_per_pass(self, n: int) -> int:
        """How many of the ``tta`` views one forward pass takes for a batch of ``n`` (a divisor of tta)."""
        k = self.tta
        while k > 1 and k * n > self.forward_rows:
            k //= 2
        return k

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's float32 logits for every view of ``x``, view-major (tta x n)."""
        k = self.views_per_pass(len(x))
        out = []
        for first in range(0, self.tta, k):
            views = [dihedral(x, v) for v in range(first, first + k)]
            # cat copies into one tensor, so every pass has the same shape and strides (a compiled
            # model's guards): an odd rotation of a channels_last batch alone has other strides
            batch = torch.cat(views) if k > 1 else views[0]
            out.append(self.model(batch.contiguous(memory_format=torch.channels_last)).float())
        return torch.cat(out).reshape(self.tta, -1)

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """P(tumour) for a batch, as float32 numpy.

        Under autocast, rows whose probability is not finite (an fp16 overflow) are scored again
        in fp32; a value still not finite is returned as it is, for the caller to record.
        """
        raw = torch.as_tensor(pixels)
        n = len(raw)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        x = raw
        if self.fixed_batch and n < self.fixed_batch:
            x = torch.cat([x, x.new_zeros((self.fixed_batch - n, *x.shape[1:]))])
        x = eval_preset(to_input(to_device(x, self.device), self.pre, channels_last=True, stats=self.stats))
        with torch.autocast(device_type=self.device.type, dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None):
            logits = self.logits(x)
        probs = torch.sigmoid(logits).mean(0)[:n].cpu().numpy()
        bad = ~np.isfinite(probs)
        if self.dtype is not None and bad.any():
            log.debug("%d of %d probabilities not finite under %s: scored again in fp32", bad.sum(), n, self.dtype)
            fp32 = Predictor(self.model, self.pre, device=self.device, tta=self.tta, forward_rows=self.forward_rows)
            probs[bad] = fp32(raw[torch.from_numpy(bad).to(raw.device)])
        return probs


def infer_batch(model: nn.Module, pixels: np.ndarray | torch.Tensor, *, device: torch.device,
                preprocess: Preprocess, tta: int = 1, autocast: str | None = None) -> np.ndarray:
    """P(tumour) for one batch of uint8 NHWC patches, as float32 numpy (see :class:`Predictor`).

    ``pixels`` may lie on any device (Ray Train hands GPU batches); fp32 unless ``autocast``.
    """
    return Predictor(model, preprocess, device=device, tta=tta, autocast=autocast)(pixels)


def compiled(model: nn.Module, *, backend: str | object = "inductor") -> nn.Module:
    """``torch.compile`` for scoring: static shapes (the :class:`Predictor` pads to one batch size)."""
    return torch.compile(model, dynamic=False, backend=backend)
