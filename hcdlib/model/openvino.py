"""OpenVINO as the runtime of CPU scoring actors (``hcd score --backend openvino``).

On CPUs with native bf16 it runs hcd's default model 1.7-3x faster than torch's bf16 autocast
(jobs/bench_backends.py; the table in docs/performance.md). The torch model is converted once per
actor with its preprocessing inside (uint8 NHWC in, P(tumour) out): nothing is written beside the
artifact, whose hash the actor has already checked.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import numpy as np

from hcdlib.config import TTA_CHOICES
from hcdlib.model.transforms import Preprocess, to_input

log = logging.getLogger(__name__)

# --precision as OpenVINO's inference precision hint; auto keeps its own choice (bf16 where native).
PRECISION_HINTS = {"auto": None, "bf16": "bf16", "fp32": "f32"}


def available() -> bool:
    """Whether OpenVINO is installed (``pip install 'hcd[openvino]'``), without importing it."""
    return importlib.util.find_spec("openvino") is not None


def with_preprocessing(model, pre: Preprocess):
    """``model`` behind its preprocessing and sigmoid, uint8 NHWC in, P(tumour) out: what OpenVINO converts."""
    import torch  # torch only where a model runs

    class Scored(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return torch.sigmoid(self.model(to_input(x, pre, channels_last=False))).view(-1)

    return Scored().eval()


def dihedral_nhwc(x: np.ndarray, k: int) -> np.ndarray:
    """The k-th (0..7) element of the dihedral group on NHWC images (as :func:`~hcdlib.model.transforms.dihedral`)."""
    if k >= 4:
        x = x[:, :, ::-1]
    return np.ascontiguousarray(np.rot90(x, k % 4, axes=(1, 2)))


class OpenVinoPredictor:
    """P(tumour) of uint8 NHWC patches through OpenVINO on the CPU, called as :class:`~hcdlib.model.infer.Predictor`."""

    def __init__(self, model, preprocess: Preprocess, *, tta: int = 1, threads: int = 1, precision: str = "auto"):
        import openvino as ov
        import torch  # torch only where a model runs

        if tta not in TTA_CHOICES:
            raise ValueError(f"tta must be one of {TTA_CHOICES}, got {tta}")
        self.tta, size = tta, preprocess.size
        example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
        with warnings.catch_warnings():  # the tracer's warnings about Python branches on shapes
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            converted = ov.convert_model(with_preprocessing(model.eval(), preprocess), example_input=example,
                                         input=[(ov.PartialShape([-1, size, size, 3]), ov.Type.u8)])
        # Unpinned: OpenVINO pins its threads to cores, and each actor's process pinned its one
        # thread to the same core (two actors on 2 cores: 343 patches/s each, 692 unpinned).
        config = {"INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False}
        if PRECISION_HINTS[precision]:
            config["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[precision]
        self.compiled = ov.Core().compile_model(converted, "CPU", config)
        self.precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        log.debug("OpenVINO model compiled: %s, %d threads", self.precision, threads)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """P(tumour) for a batch, float32 (the mean over the ``tta`` views)."""
        x = np.ascontiguousarray(pixels, dtype=np.uint8)
        if not len(x):
            return np.zeros(0, dtype=np.float32)
        views = [np.asarray(self.compiled(dihedral_nhwc(x, k) if k else x)[0], np.float32) for k in range(self.tta)]
        return np.mean(views, axis=0).astype(np.float32)
