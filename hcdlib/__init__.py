"""hcd: histopathologic cancer detection at archive scale.

Public API for notebooks and user code:

    from hcdlib import load_model, read_predictions
    model, meta = load_model("runs/demo/model")              # nn.Module in eval mode + metadata
    preds = read_predictions("runs/demo/preds").to_pandas()  # committed rows only
"""

from __future__ import annotations

__all__ = ["load_model", "read_predictions"]


def __getattr__(name: str):
    # Deferred so that `import hcdlib.storage.uri` in a Ray read task does not pull in torch.
    if name == "load_model":
        from hcdlib.model.artifact import load_model

        return load_model
    if name == "read_predictions":
        from hcdlib.outputs.readers import read_predictions

        return read_predictions
    raise AttributeError(f"module 'hcdlib' has no attribute {name!r}")
