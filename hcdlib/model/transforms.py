"""The one preprocessing definition, shared by training and scoring.

Patches travel as uint8 NHWC arrays (4x smaller than float, so cheap to ship between Ray
tasks and to copy to a GPU); :func:`to_input` turns them into normalised float NCHW on the
target device. The normalisation is stored in the model artifact, so scoring uses exactly
what training used. Augmentation works on whole batches of tensors so it runs on the GPU
when there is one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from hcdlib.sources.decode import PCAM_MPP

if TYPE_CHECKING:  # torch is imported where it is used: checking a model artifact needs only Preprocess
    import torch

# A PCam label is about the centre 32x32 px of the patch: every crop the model sees holds it.
LABEL_PX = 32
# PatchCamelyon channel statistics (RGB, 0..1); ImageNet's for ImageNet-pretrained weights.
PCAM_MEAN, PCAM_STD = (0.70, 0.54, 0.69), (0.24, 0.28, 0.22)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """What a model takes as input, saved in its artifact (as TIAToolbox's IO config is).

    Normalisation, and the resolution a patch is cut at: ``size`` px at ``mpp`` microns per
    pixel. Slide scoring cuts tiles to this, so a model trained at another magnification needs
    no code change, only its artifact. ``crop``: the model sees only the centre ``crop`` px of
    each patch (the label is about the centre 32x32 px, and a 64 px crop costs 0.4x the compute).
    """

    mean: tuple[float, float, float] = PCAM_MEAN
    std: tuple[float, float, float] = PCAM_STD
    size: int = 96
    mpp: float = PCAM_MPP
    crop: int = 96

    def __post_init__(self) -> None:
        if not (min(LABEL_PX, self.size) <= self.crop <= self.size and self.mpp > 0):
            raise ValueError(f"crop {self.crop} must be in {min(LABEL_PX, self.size)}..size ({self.size}) "
                             f"and mpp {self.mpp} > 0")

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """Inverse of :meth:`to_dict`; KeyError where a field is missing."""
        return cls(mean=tuple(d["mean"]), std=tuple(d["std"]), size=int(d["size"]), mpp=float(d["mpp"]),
                   crop=int(d["crop"]))


def norm_stats(pre: Preprocess, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``pre``'s mean and std as (1, 3, 1, 1) tensors on ``device``: made once by a caller that scores often.

    Made on every call, they are two host-to-device copies per batch on a GPU.
    """
    import torch  # torch only where a model runs

    return (torch.tensor(pre.mean, device=device).view(1, 3, 1, 1),
            torch.tensor(pre.std, device=device).view(1, 3, 1, 1))


def to_input(pixels: torch.Tensor, pre: Preprocess, *, channels_last: bool = True,
             stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 NHWC -> the centre ``pre.crop`` px, normalised float32 NCHW (channels_last on request).

    ``stats``: :func:`norm_stats` on the pixels' device, where the caller keeps them.
    """
    import torch  # torch only where a model runs

    side = pixels.shape[1]
    if pre.crop < side:  # cropped as uint8, before the float copy: the cheap place
        o = (side - pre.crop) // 2
        pixels = pixels[:, o:o + pre.crop, o:o + pre.crop]
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = stats if stats is not None else norm_stats(pre, x.device)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0..7) element of the dihedral group D4 applied to NCHW images."""
    import torch  # torch only where a model runs

    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def train_preset(x: torch.Tensor, *, generator: torch.Generator | None = None,
                 stain_jitter: float = 0.05, brightness: float = 0.1) -> torch.Tensor:
    """Training augmentation on a normalised NCHW batch.

    Tissue has no orientation, so every dihedral transform is a valid sample; mild per-image
    colour jitter mimics stain and scanner variation between slides. (Stain-space HED jitter
    and crops shifted around the labelled centre were measured and did not help: docs/performance.md.)
    """
    import torch  # torch only where a model runs

    n, dev = x.shape[0], x.device
    # drawn on the batch's device (a generator must live there too), so a GPU step never waits
    # for a host copy; the view is chosen by masks, not by indices that nonzero() syncs to learn
    gen_dev = generator.device if generator is not None else dev
    ks = torch.randint(0, 8, (n, 1, 1, 1), generator=generator, device=gen_dev).to(dev)
    out = torch.where(ks >= 4, x.flip(-1), x)  # k = flip (k >= 4), then rotate by k % 4
    rot = ks % 4
    out = torch.where(rot >= 2, out.flip(-2, -1), out)  # 180 degrees
    out = torch.where(rot % 2 == 1, torch.rot90(out, 1, dims=(-2, -1)), out)  # 90 more: 90 or 270 (square patches)
    rand = [torch.rand(shape, generator=generator, device=gen_dev).to(dev) * 2 - 1
            for shape in ((n, 3, 1, 1), (n, 3, 1, 1), (n, 1, 1, 1))]
    scale, shift, bright = 1 + rand[0] * stain_jitter * 4, rand[1] * stain_jitter * 4, rand[2] * brightness * 4
    return out * scale + shift + bright


def eval_preset(x: torch.Tensor) -> torch.Tensor:
    """Evaluation/scoring preprocessing beyond :func:`to_input`: none (kept as a named hook)."""
    return x
