"""The model artifact and --weights, checked on the driver without torch where it can be."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import one_line_exit_2

from hcdlib.model.architectures import build_model
from hcdlib.model.artifact import ArtifactError, check_artifact, export_model, load_model


def _artifact(tmp_path: Path) -> Path:
    model, pre = build_model("hcdnet")
    export_model(model, str(tmp_path / "m"), arch="hcdnet", preprocess=pre)
    return tmp_path / "m"


@pytest.mark.parametrize("damage", ["tampered", "truncated", "unknown_arch", "invalid_json", "no_json"])
def test_bad_model_artifact_is_one_line_before_ray(damage, synth_small, tmp_path, capsys, no_ray):
    m = _artifact(tmp_path)
    blob, meta = (m / "model.safetensors").read_bytes(), json.loads((m / "model.json").read_text())
    expect = {"tampered": "does not match", "truncated": "does not match", "unknown_arch": "unknown arch 'vit_h'",
              "invalid_json": "invalid JSON", "no_json": "not a model artifact"}[damage]
    if damage == "tampered":
        (m / "model.safetensors").write_bytes(blob[:-8] + b"\0" * 8)
    elif damage == "truncated":
        (m / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    elif damage == "unknown_arch":
        (m / "model.json").write_text(json.dumps(dict(meta, arch="vit_h")))
    elif damage == "invalid_json":
        (m / "model.json").write_text(json.dumps(meta)[:40])
    else:
        (m / "model.json").unlink()
    with pytest.raises(ArtifactError, match=expect):
        load_model(str(m))
    one_line_exit_2(capsys, ["score", "--model", str(m), "--input", str(synth_small),
                                      "--out", str(tmp_path / "o")], expect=expect)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["model.safetensors", "model.json"])
def test_a_model_file_instead_of_its_folder_names_the_folder_to_pass(name, synth_small, tmp_path, capsys, no_ray):
    """It used to be 'cannot read: ... Not a directory' about a path that does not exist."""
    m = _artifact(tmp_path)
    expect = "model." + name.split(".")[1] + ": a file, not a model artifact; pass the folder that holds model.json"
    with pytest.raises(ArtifactError, match=expect):
        load_model(str(m / name))
    one_line_exit_2(capsys, ["score", "--model", str(m / name), "--input", str(synth_small),
                              "--out", str(tmp_path / "o")], expect=expect)


def _rehash(m: Path, blob: bytes, **meta_changes) -> None:
    """Write ``blob`` as the weights and a model.json whose hash matches it (a consistent-looking artifact)."""
    meta = json.loads((m / "model.json").read_text())
    (m / "model.safetensors").write_bytes(blob)
    (m / "model.json").write_text(json.dumps(dict(meta, sha256=hashlib.sha256(blob).hexdigest(), **meta_changes)))


def test_truncated_safetensors_with_matching_hash_is_refused_without_torch(tmp_path):
    m = _artifact(tmp_path)
    blob = (m / "model.safetensors").read_bytes()
    n = int.from_bytes(blob[:8], "little")
    for bad, why in [(blob[:1000], "header of"), (blob[:-4], "ends at byte"), (blob + b"\0" * 4, "ends at byte"),
                     (blob[:8] + b"[1]" + blob[11:], "not JSON")]:
        _rehash(m, bad)
        with pytest.raises(ArtifactError, match=r"model\.safetensors: not hcdnet weights in safetensors format \(.*"
                                                + why):
            check_artifact(str(m))
        with pytest.raises(ArtifactError, match="not hcdnet weights in safetensors format"):
            load_model(str(m))
    header = json.loads(blob[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [*header[name]["shape"], 2]  # claims twice the bytes it has
    text = json.dumps(header).encode()
    _rehash(m, len(text).to_bytes(8, "little") + text + blob[8 + n:])
    with pytest.raises(ArtifactError, match="malformed entry"):
        check_artifact(str(m))


def test_weights_declare_their_model_so_an_edited_model_json_is_refused_without_torch(
        synth_small, tmp_path, capsys, no_ray, monkeypatch):
    """The driver builds no model for weights that say which model they are (``hcd score``).

    model.json is not covered by the weights' hash: changing its arch or shape must not let
    the weights be loaded into another model. Weights exported before they declared their
    model are refused, naming the format.
    """
    import hcdlib.model.architectures

    m = _artifact(tmp_path)
    meta = json.loads((m / "model.json").read_text())

    def built(*_a, **_k):
        raise AssertionError("the driver built the model")

    monkeypatch.setattr(hcdlib.model.architectures, "build_model", built)
    # A problem found after the artifact check shows the check passed without building the model.
    one_line_exit_2(capsys, ["score", "--model", str(m), "--input", str(synth_small),
                              "--out", str(synth_small / "o")], expect="is inside --input")
    wider = dict(meta["arch_args"], widths=[*meta["arch_args"]["widths"][:-1], 1024])
    for edit, expect in [({"arch_args": wider}, "but model.json says hcdnet of shape"),
                         ({"arch": "resnet18", "arch_args": None}, "but model.json says resnet18")]:
        (m / "model.json").write_text(json.dumps({k: v for k, v in dict(meta, **edit).items() if v is not None}))
        with pytest.raises(ArtifactError, match=expect):
            check_artifact(str(m))
        one_line_exit_2(capsys, ["score", "--model", str(m), "--input", str(synth_small),
                                  "--out", str(tmp_path / "o")], expect=expect)
    monkeypatch.undo()
    # Weights without the declaration: not an export of this format, refused before Ray.
    from safetensors.torch import save

    old, _ = build_model("hcdnet", arch_args={"stem": 8, "widths": [16]})
    blob = save({k: v.contiguous() for k, v in old.state_dict().items()})
    _rehash(m, blob, arch="hcdnet", arch_args=meta["arch_args"])
    with pytest.raises(ArtifactError, match="do not declare the model they hold, as every hcd-model/1 export's do"):
        check_artifact(str(m))
    one_line_exit_2(capsys, ["score", "--model", str(m), "--input", str(synth_small),
                              "--out", str(tmp_path / "o")], expect="export the model again with this hcd")
    assert not (tmp_path / "o").exists()


def test_pickle_as_weights_is_one_line_before_ray(ten_patches, tmp_path, capsys, no_ray):
    folder, _ = ten_patches

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    line = one_line_exit_2(capsys, ["train", "--data", str(folder), "--out", str(tmp_path / "r"),
                                             "--weights", str(tmp_path / "evil.pt")],
                            expect="evil.pt: not a state dict of tensors: it holds pickled Python objects")
    assert "refuses" in line and not Path("pwned").exists()
    other, _ = build_model("resnet18")
    torch.save(other.state_dict(), tmp_path / "r18.pt")
    one_line_exit_2(capsys, ["train", "--data", str(folder), "--out", str(tmp_path / "r"),
                                      "--weights", str(tmp_path / "r18.pt")], expect="does not fit --arch hcdnet")
