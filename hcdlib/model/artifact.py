"""The model artifact: what training exports and scoring (and users) load.

``<dir>/model.safetensors`` holds the weights (safetensors: tensors only, no pickled code)
and ``<dir>/model.json`` the metadata: arch, preprocessing, threshold, validation metrics,
training config and the weights' content hash, which is the model id in every output row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import TYPE_CHECKING

from hcdlib.config import ARCHES
from hcdlib.errors import UserError
from hcdlib.model.transforms import Preprocess
from hcdlib.model.weights import META, WEIGHTS
from hcdlib.storage import uri as urimod

if TYPE_CHECKING:  # torch is imported where a model is built: check_artifact needs none of it
    import torch
    from torch import nn

log = logging.getLogger(__name__)

FORMAT = "hcd-model/1"  # the one artifact format this hcd writes and reads
# Keys of the safetensors header's metadata in which an export records the model it holds.
DECLARED_ARCH, DECLARED_ARCH_ARGS = "hcd_arch", "hcd_arch_args"
# Bytes per element of each safetensors dtype (the format's own list).
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


class ArtifactError(UserError, ValueError):
    """A model artifact is missing, incomplete or inconsistent."""


def export_model(model: nn.Module, out: str, *, arch: str, preprocess: Preprocess,
                 threshold: float = 0.5, metrics: dict | None = None, config: dict | None = None) -> dict:
    """Write ``model`` to the artifact directory ``out``; return the metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    arch_args = getattr(model, "arch_args", None)
    # The weights say which model they are, inside the hashed file, so that check_artifact can
    # refuse a model.json whose arch or shape was edited without importing torch.
    from safetensors.torch import save as save_safetensors  # imports torch: the driver's checks run without it

    blob = save_safetensors(state, metadata={DECLARED_ARCH: arch, DECLARED_ARCH_ARGS: json.dumps(arch_args)})
    meta = {
        "format": FORMAT,
        "arch": arch,
        **({"arch_args": arch_args} if arch_args else {}),  # hcdnet's shape
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


def read_meta(uri: str) -> dict:
    """The artifact's ``model.json``, checked for what loading needs; :class:`ArtifactError` if not."""
    target = urimod.join(uri, META)
    try:
        meta = json.loads(urimod.read_bytes(target))
    except FileNotFoundError:
        raise ArtifactError(f"{uri}: not a model artifact (no {META}); pass the <train-out>/model folder") from None
    except OSError as exc:
        if urimod.is_file(uri):  # the weights or model.json itself, not the folder holding them
            raise ArtifactError(f"{uri}: a file, not a model artifact; pass the folder that holds {META} and "
                                f"{WEIGHTS} (<train-out>/model)") from None
        raise ArtifactError(f"{target}: cannot read: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{target}: invalid JSON ({exc}); re-export or re-copy the model") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(f"{target}: not a JSON object; re-export or re-copy the model")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{target}: format {meta.get('format')!r}, and this hcd reads {FORMAT} models only; "
                            "export the model again with this hcd")
    missing = [k for k in ("arch", "preprocess", "sha256") if k not in meta]
    if meta.get("arch") == "hcdnet" and "arch_args" not in meta:
        missing.append("arch_args")
    if missing:
        raise ArtifactError(f"{target}: missing {', '.join(missing)}; re-export or re-copy the model")
    if meta["arch"] not in ARCHES:
        raise ArtifactError(f"{target}: unknown arch {meta['arch']!r} (this hcd knows {', '.join(ARCHES)})")
    if "arch_args" in meta and not _valid_arch_args(meta["arch"], meta["arch_args"]):
        raise ArtifactError(f"{target}: invalid arch_args {str(meta['arch_args'])[:80]} for {meta['arch']}; "
                            "re-export or re-copy the model")
    try:
        Preprocess.from_dict(meta["preprocess"])
        float(meta.get("threshold", 0.5))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{target}: invalid preprocess or threshold ({exc!r})") from exc
    return meta


def _valid_arch_args(arch: str, args: object) -> bool:
    """Whether ``args`` is a shape hcdnet can be built with (the only arch that records one)."""
    def size(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096

    return (arch == "hcdnet" and isinstance(args, dict) and set(args) == {"stem", "widths"} and size(args["stem"])
            and isinstance(args["widths"], list) and 1 <= len(args["widths"]) <= 8
            and all(size(w) for w in args["widths"]))


def arch_args_of(meta: dict) -> dict | None:
    """The shape to build an artifact's model with (hcdnet's; None for the others)."""
    return meta.get("arch_args")


def check_artifact(uri: str) -> tuple[dict, bytes]:
    """``(metadata, weights)`` of an artifact whose weights match its hash; :class:`ArtifactError` if not.

    Needs no torch (a fraction of a second), so ``hcd score`` runs it before anything else: a
    missing, half-copied, tampered or mixed artifact is refused before Ray starts. The weights
    must be a well-formed safetensors file that declares the model it holds, the one
    ``model.json`` names.
    """
    meta = read_meta(uri)
    target = urimod.join(uri, WEIGHTS)
    try:
        blob = urimod.read_bytes(target)
    except OSError as exc:
        raise ArtifactError(f"{target}: cannot read the weights: {exc}") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta.get("sha256"):
        raise ArtifactError(f"{target}: weights hash {digest[:12]} does not match {META} "
                            f"({str(meta.get('sha256'))[:12]}); the artifact is corrupt or mixed")
    try:
        declared = safetensors_header(blob).get("__metadata__") or {}
    except ValueError as exc:
        raise ArtifactError(f"{target}: not {meta['arch']} weights in safetensors format ({exc})") from None
    if DECLARED_ARCH not in declared:
        raise ArtifactError(f"{target}: the weights do not declare the model they hold, as every {FORMAT} export's "
                            "do; export the model again with this hcd")
    try:
        held = (declared[DECLARED_ARCH], json.loads(declared.get(DECLARED_ARCH_ARGS, "null")))
    except json.JSONDecodeError:
        raise ArtifactError(f"{target}: the model its header declares is not JSON; re-export the model") from None
    named = (meta["arch"], arch_args_of(meta))
    if held != named:
        raise ArtifactError(f"{target}: these are {_model_name(*held)} weights, but {META} says "
                            f"{_model_name(*named)}; the artifact was edited or mixed: re-export or re-copy it")
    return meta, blob


def _model_name(arch: str, arch_args: dict | None) -> str:
    return f"{arch} of shape {arch_args}" if arch_args else arch


def safetensors_header(blob: bytes) -> dict:
    """The JSON header of a safetensors file, checked as the format requires; ValueError if malformed.

    Every tensor's bytes must match its dtype and shape, and the tensors must tile the data
    region exactly, so a truncated or padded file is caught here, without torch.
    """
    if len(blob) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8:
        raise ValueError(f"header of {n} bytes in a file of {len(blob)}")
    try:
        header = json.loads(blob[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            if not isinstance(t, dict) or not all(isinstance(v, str) for v in t.values()):
                raise ValueError("__metadata__ is not a map of strings")
            continue
        if not _tensor_entry_ok(t):
            raise ValueError(f"tensor {name[:60]!r}: malformed entry {str(t)[:120]}")
        spans.append(tuple(t["data_offsets"]))
    spans.sort()
    edge = 0
    for begin, end in spans:
        if begin != edge:
            raise ValueError("tensor data overlaps or leaves gaps")
        edge = end
    if edge != len(blob) - 8 - n:
        raise ValueError(f"tensor data ends at byte {edge} of a {len(blob) - 8 - n}-byte data region")
    return header


def load_model(uri: str, *, device: str | torch.device = "cpu",
               checked: tuple[dict, bytes] | None = None) -> tuple[nn.Module, dict]:
    """Load an exported model: returns the ``nn.Module`` in eval mode and its metadata dict.

    Checks the weights against the hash in the metadata (:func:`check_artifact`, or pass its
    result as ``checked``), so a half-copied artifact fails loudly instead of scoring with
    wrong weights; every problem is one :class:`ArtifactError` naming the file.
    """
    from hcdlib.model.architectures import build_model

    meta, blob = checked or check_artifact(uri)
    target = urimod.join(uri, WEIGHTS)
    model, _ = build_model(meta["arch"], weights="none", arch_args=arch_args_of(meta))
    try:
        from safetensors.torch import load as load_safetensors  # imports torch, as the model just built does

        model.load_state_dict(load_safetensors(blob))
    except Exception as exc:  # safetensors' own error type, or RuntimeError for mismatched tensors
        raise ArtifactError(f"{target}: not {meta['arch']} weights in safetensors format "
                            f"({str(exc).splitlines()[0][:200]})") from exc
    return model.to(device).eval(), meta


def _tensor_entry_ok(t: object) -> bool:
    """A safetensors header entry with a known dtype, a shape and offsets spanning exactly its bytes."""
    if not isinstance(t, dict) or t.get("dtype") not in _DTYPE_BYTES:
        return False
    shape, offsets = t.get("shape"), t.get("data_offsets")
    if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        return False
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape + offsets):
        return False
    return offsets[1] - offsets[0] == math.prod(shape) * _DTYPE_BYTES[t["dtype"]]


def model_id(meta: dict) -> str:
    """Short id of a model artifact (its weights' content hash), stamped on every prediction."""
    return f"{meta['arch']}-{meta['sha256'][:16]}"
