"""Model architectures: torchvision CNNs adapted to 96x96 patches and one logit.

``--weights imagenet`` uses torchvision's weight enums (downloads on first use where there is
internet); ``none`` starts from scratch; a URI loads a state dict with ``weights_only=True``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from hcdlib.config import ARCHES
from hcdlib.errors import UserError
from hcdlib.model.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from hcdlib.model.weights import read_state_dict


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


# hcdnet's shape is recorded in each artifact (``arch_args``), so a model loads as it was
# trained even after this default changes. Five stages: the fifth runs at 3x3 px, costs a few
# percent of the training steps/s and gains validation AUC in a 30-minute CPU budget.
HCDNET_SHAPE = {"stem": 16, "widths": (32, 64, 128, 256, 512)}


class HcdNet(nn.Module):
    """A small VGG-style CNN (4.7M parameters) that trains in minutes on a laptop CPU.

    The stem pools right away so the wide layers run at half the input's side: this costs a
    quarter of the compute of a full-resolution first block (138 vs 34 training images/s on 2
    cores, 96 px, fp32) for no loss that we could measure on PCam.
    """

    def __init__(self, stem: int = HCDNET_SHAPE["stem"], widths: tuple[int, ...] = HCDNET_SHAPE["widths"],
                 dropout: float = 0.2):
        super().__init__()
        self.arch_args = {"stem": stem, "widths": list(widths)}  # what the artifact records
        layers: list[nn.Module] = [*_conv_bn(3, stem), nn.MaxPool2d(2)]
        cin = stem
        for i, w in enumerate(widths):
            layers += [*_conv_bn(cin, w), *_conv_bn(w, w)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(cin, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (N, 1)."""
        return self.head(self.features(x))


def _torchvision(arch: str, pretrained: bool) -> nn.Module:
    import torchvision.models as tvm  # deferred: only the torchvision arches need it

    weights = tvm.get_model_weights(arch).DEFAULT if pretrained else None
    try:
        model = tvm.get_model(arch, weights=weights)
    except OSError as exc:  # no internet (URLError), a proxy, a full disk: the user's to fix
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise UserError(f"--weights imagenet: cannot download the {arch} ImageNet weights from {weights.url} "
                        f"({getattr(exc, 'reason', exc)}); on a machine without internet, copy that file to "
                        f"{cached}, or pass --weights <a state dict file>") from exc
    # One logit. The stems stay as they are: their adaptive pooling takes 96x96 inputs, and
    # dropping the stem's max-pool would cost 4x the compute for little gain on CPU.
    if arch.startswith("resnet"):
        model.fc = nn.Linear(model.fc.in_features, 1)
    elif arch == "densenet121":
        model.classifier = nn.Linear(model.classifier.in_features, 1)
    elif arch == "efficientnet_b0":
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, 1)
    return model


def preprocess_for(weights: str, *, crop: int = 96) -> Preprocess:
    """The input for ``weights`` (ImageNet's normalisation, else PCam's) through a centre ``crop``."""
    if weights == "imagenet":
        return Preprocess(IMAGENET_MEAN, IMAGENET_STD, crop=crop)
    return Preprocess(crop=crop)


def build_model(arch: str, *, weights: str = "none", crop: int = 96,
                arch_args: dict | None = None) -> tuple[nn.Module, Preprocess]:
    """Build ``arch`` with ``weights`` (none | imagenet | URI of a state dict) and its preprocessing.

    ``arch_args`` is the shape an artifact recorded (hcdnet's stem and widths); None: the default.
    """
    if arch not in ARCHES:
        raise UserError(f"unknown arch {arch!r}; choose from {', '.join(ARCHES)}")
    if weights == "imagenet" and arch == "hcdnet":
        raise UserError("hcdnet has no ImageNet weights; use --weights none or a torchvision arch")
    if arch_args and arch != "hcdnet":
        raise ValueError(f"{arch} takes no arch_args, got {arch_args!r}")
    model = HcdNet(**(arch_args or {})) if arch == "hcdnet" else _torchvision(arch, weights == "imagenet")
    pre = preprocess_for(weights, crop=crop)
    if weights not in ("none", "imagenet"):
        try:
            model.load_state_dict(read_state_dict(weights))
        except RuntimeError as exc:  # missing / unexpected keys, wrong shapes
            raise UserError(f"--weights {weights}: does not fit --arch {arch} "
                            f"({' '.join(str(exc).split())[:240]})") from exc
    return model, pre
