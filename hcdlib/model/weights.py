"""Weights on disk: the file names of an exported model folder, and reading a state dict safely.

Both the architectures (``--weights URI``) and the artifact (export, load) use these; nothing here
builds a model, so neither imports the other for them.
"""

from __future__ import annotations

import io
import pickle
from typing import TYPE_CHECKING

from hcdlib.errors import UserError
from hcdlib.storage import uri as urimod

if TYPE_CHECKING:  # torch only where weights are read: the driver checks artifacts without it
    import torch

# The files of an exported model folder (<train-out>/model).
WEIGHTS, META = "model.safetensors", "model.json"


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A state dict from ``uri``: safetensors, a torch file loaded with ``weights_only=True``, or an hcd model folder.

    Never unpickles code: a pickle that holds anything but tensors is refused with one line.
    """
    import torch  # deferred: see TYPE_CHECKING above
    if urimod.exists(urimod.join(uri, WEIGHTS)):  # an hcd model folder (<train-out>/model): its weights
        uri = urimod.join(uri, WEIGHTS)
    try:
        data = urimod.read_bytes(uri)
    except OSError as exc:
        raise UserError(f"--weights {uri}: cannot read: {exc}") from exc
    try:
        if uri.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
        else:  # weights_only: a state dict of tensors, never pickled code
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # pickled objects other than tensors: never unpickled
        raise UserError(f"--weights {uri}: not a state dict of tensors: it holds pickled Python objects, which hcd "
                        "refuses to load (save model.state_dict(), or use safetensors)") from exc
    except Exception as exc:  # safetensors', zipfile's and torch's errors for a damaged file: "not weights"
        raise UserError(f"--weights {uri}: not a state dict of tensors (safetensors, or torch.save of a "
                        f"state_dict); refused: {' '.join(str(exc).split())[:200]}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {uri}: holds a {type(state).__name__}, not a state dict of tensors")
    return state
