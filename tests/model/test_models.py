import io
import json

import pytest
import torch

from hcdlib.errors import UserError
from hcdlib.model.architectures import ARCHES, build_model, preprocess_for
from hcdlib.model.artifact import ArtifactError, export_model, load_model
from hcdlib.model.transforms import IMAGENET_MEAN, PCAM_MEAN


@pytest.mark.parametrize("arch", ARCHES)
def test_every_arch_takes_96px_patches_and_gives_one_logit(arch):
    model, pre = build_model(arch, weights="none")
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 96))
    assert out.shape == (2, 1)
    assert pre.mean == PCAM_MEAN and preprocess_for("imagenet").mean == IMAGENET_MEAN


@pytest.mark.parametrize("arch", ARCHES)
def test_scoring_folds_batchnorm_without_changing_the_probabilities(arch):
    """for_inference folds each BatchNorm after a convolution into it; P(tumour) stays within float tolerance."""
    import numpy as np

    from hcdlib.model.infer import for_inference, infer_batch

    torch.manual_seed(0)
    model, pre = build_model(arch, weights="none")
    with torch.no_grad():  # trained-like statistics, so that folding has something to get wrong
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
    model.eval()
    pixels = np.random.default_rng(0).integers(0, 256, (8, 96, 96, 3), dtype=np.uint8)
    want = infer_batch(model, pixels, device=torch.device("cpu"), preprocess=pre, tta=4)
    fast = for_inference(model)
    np.testing.assert_allclose(infer_batch(fast, pixels, device=torch.device("cpu"), preprocess=pre, tta=4), want,
                               atol=1e-5)
    def batchnorms(m):
        return sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    assert batchnorms(model) > 0  # the loaded model itself is left as it was
    if arch != "densenet121":  # densenet normalises before its convolutions: nothing there to fold
        assert batchnorms(fast) == 0


def test_a_model_torch_fx_cannot_trace_is_scored_unfolded():
    from hcdlib.model.infer import for_inference

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = -x
            return self.bn(self.conv(x)).mean((1, 2, 3))[:, None]

    model = Branchy().eval()
    x = torch.randn(2, 3, 8, 8)
    fast = for_inference(model)
    assert isinstance(fast.bn, torch.nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_unknown_arch_and_hcdnet_imagenet_are_clear_errors():
    with pytest.raises(UserError, match="unknown arch"):
        build_model("vgg11")
    with pytest.raises(UserError, match="no ImageNet weights"):
        build_model("hcdnet", weights="imagenet")


def test_weights_from_a_state_dict_uri(tmp_path):
    src, _ = build_model("hcdnet")
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    model, _ = build_model("hcdnet", weights=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_weights_from_an_hcd_model_folder(tmp_path):
    """--weights <train-out>/model (to start from an earlier run) was 'cannot read: is a directory'."""
    src, pre = build_model("hcdnet")
    export_model(src, str(tmp_path / "model"), arch="hcdnet", preprocess=pre, metrics={}, config={})
    model, _ = build_model("hcdnet", weights=str(tmp_path / "model"))
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_pickled_code_is_never_loaded(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf, _use_new_zipfile_serialization=True)
    path.write_bytes(buf.getvalue())
    with pytest.raises(UserError, match="holds pickled Python objects, which hcd refuses to load"):
        build_model("hcdnet", weights=str(path))


def test_tampered_artifact_is_refused(tmp_path):
    model, pre = build_model("hcdnet")
    export_model(model, str(tmp_path / "m"), arch="hcdnet", preprocess=pre)
    blob = (tmp_path / "m" / "model.safetensors").read_bytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(blob[:-8] + b"\0" * 8)
    with pytest.raises(ArtifactError, match="does not match"):
        load_model(str(tmp_path / "m"))
    with pytest.raises(ArtifactError, match="not a model artifact"):
        load_model(str(tmp_path / "nothing"))


def test_the_model_sees_the_centre_crop_its_artifact_records(tmp_path):
    """Train and score crop through one definition (to_input), stored in the artifact; old artifacts see 96 px."""
    import numpy as np

    from hcdlib.model.artifact import ArtifactError, check_artifact
    from hcdlib.model.transforms import Preprocess, to_input

    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8))
    full, crop = to_input(pixels, Preprocess()), to_input(pixels, Preprocess(crop=64))
    assert full.shape[-2:] == (96, 96) and crop.shape[-2:] == (64, 64)
    torch.testing.assert_close(crop, full[..., 16:80, 16:80])
    model, pre = build_model("hcdnet", crop=64)
    assert pre.crop == 64 and model(crop).shape == (2, 1)
    old = Preprocess().to_dict()
    del old["crop"]
    with pytest.raises(KeyError, match="crop"):  # one format: every field recorded
        Preprocess.from_dict(old)
    with pytest.raises(ValueError, match=r"crop 128 must be in 32\.\.size"):
        Preprocess(crop=128)
    out = tmp_path / "m"
    export_model(model, str(out), arch="hcdnet", preprocess=pre)
    assert check_artifact(str(out))[0]["preprocess"]["crop"] == 64
    meta = json.loads((out / "model.json").read_text())
    meta["preprocess"]["crop"] = 0
    (out / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="invalid preprocess"):
        check_artifact(str(out))


def test_an_hcdnet_artifact_loads_in_the_shape_it_was_trained_with(tmp_path):
    """The artifact records hcdnet's shape; one without it, or of another format, is refused naming it."""
    import numpy as np

    from hcdlib.model.architectures import HCDNET_SHAPE, HcdNet
    from hcdlib.model.infer import infer_batch

    pixels = np.random.default_rng(1).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    new, pre = build_model("hcdnet")
    assert new.arch_args == {"stem": HCDNET_SHAPE["stem"], "widths": list(HCDNET_SHAPE["widths"])}
    export_model(new, str(tmp_path / "new"), arch="hcdnet", preprocess=pre)
    assert json.loads((tmp_path / "new" / "model.json").read_text())["arch_args"] == new.arch_args
    loaded, _ = load_model(str(tmp_path / "new"))
    np.testing.assert_array_equal(infer_batch(loaded, pixels, device=cpu, preprocess=pre),
                                  infer_batch(new.eval(), pixels, device=cpu, preprocess=pre))
    # a four-stage net loads in its own shape
    old = HcdNet(stem=16, widths=(32, 64, 128, 256)).eval()
    export_model(old, str(tmp_path / "old"), arch="hcdnet", preprocess=pre)
    loaded, _ = load_model(str(tmp_path / "old"))
    assert len(loaded.state_dict()) == len(old.state_dict()) < len(new.state_dict())
    np.testing.assert_array_equal(infer_batch(loaded, pixels, device=cpu, preprocess=pre),
                                  infer_batch(old, pixels, device=cpu, preprocess=pre))
    meta = json.loads((tmp_path / "old" / "model.json").read_text())
    for edit, expect in (({"arch_args": None}, "missing arch_args"),
                         ({"format": "hcd-model/0"}, "format 'hcd-model/0', and this hcd reads hcd-model/1"),
                         ({"format": None}, "format None")):
        (tmp_path / "old" / "model.json").write_text(
            json.dumps({k: v for k, v in {**meta, **edit}.items() if v is not None}))
        with pytest.raises(ArtifactError, match=expect):
            load_model(str(tmp_path / "old"))
    for bad in ({"stem": 16}, {"stem": 16, "widths": [32, "64"]}, {"stem": True, "widths": [8]}, [16, 32]):
        meta["arch_args"] = bad
        (tmp_path / "old" / "model.json").write_text(json.dumps(meta))
        with pytest.raises(ArtifactError, match="invalid arch_args"):
            load_model(str(tmp_path / "old"))
