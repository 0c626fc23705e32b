"""The model artifact: what training exports and scoring (and users) load.

``<dir>/model.safetensors`` holds the weights (safetensors: tensors only, no pickled code)
and ``<dir>/model.json`` the metadata: arch, preprocessing, threshold, validation metrics,
training config and the weights' content hash, which is the model id in every output row.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from hcdlib import uri as urimod
from hcdlib.models import build_model
from hcdlib.transforms import Preprocess

log = logging.getLogger(__name__)

WEIGHTS, META = "model.safetensors", "model.json"


class ArtifactError(ValueError):
    """A model artifact is missing, incomplete or inconsistent."""


def export_model(model: nn.Module, out: str, *, arch: str, preprocess: Preprocess,
                 threshold: float = 0.5, metrics: dict | None = None, config: dict | None = None) -> dict:
    """Write ``model`` to the artifact directory ``out``; return the metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save_safetensors(state)
    meta = {
        "format": "hcd-model/1",
        "arch": arch,
        "preprocess": preprocess.to_dict(),
        "threshold": threshold,
        "metrics": metrics or {},
        "config": config or {},
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    # Weights first, metadata last: a directory with model.json is complete.
    urimod.write_bytes_atomic(urimod.join(out, WEIGHTS), blob)
    urimod.write_bytes_atomic(urimod.join(out, META), json.dumps(meta, indent=1).encode())
    log.info("exported %s model %s to %s", arch, meta["sha256"][:12], out)
    return meta


def load_model(uri: str, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load an exported model: returns the ``nn.Module`` in eval mode and its metadata dict.

    Checks the weights against the hash in the metadata, so a half-copied artifact fails
    loudly instead of scoring with wrong weights.
    """
    try:
        meta = json.loads(urimod.read_bytes(urimod.join(uri, META)))
        blob = urimod.read_bytes(urimod.join(uri, WEIGHTS))
    except (OSError, FileNotFoundError) as exc:
        raise ArtifactError(f"{uri}: not a model artifact ({META} + {WEIGHTS}): {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{uri}/{META}: invalid JSON: {exc}") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta.get("sha256"):
        raise ArtifactError(f"{uri}: weights hash {digest[:12]} does not match {META} "
                            f"({str(meta.get('sha256'))[:12]}); the artifact is corrupt or mixed")
    model, _ = build_model(meta["arch"], weights="none")
    model.load_state_dict(load_safetensors(blob))
    return model.to(device).eval(), meta


def model_id(meta: dict) -> str:
    """Short id of a model artifact (its weights' content hash), stamped on every prediction."""
    return f"{meta['arch']}-{meta['sha256'][:16]}"
