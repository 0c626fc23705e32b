"""hcd score --backend openvino: the same probabilities as torch fp32, on CPU actors only."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import one_line_exit_2
from sklearn.metrics import roc_auc_score

from hcdlib.commands.score.actor import Scorer
from hcdlib.model import openvino
from hcdlib.model.artifact import load_model
from hcdlib.model.infer import Predictor
from hcdlib.model.transforms import Preprocess
from hcdlib.sources.decode import decode_patch

pytestmark = pytest.mark.skipif(not openvino.available(), reason="OpenVINO is not installed (hcd[openvino])")


@pytest.fixture(scope="module")
def patches(synth_small):
    import pyarrow.csv as pacsv

    labels = pacsv.read_csv(synth_small / "labels.csv").to_pydict()
    x = np.stack([decode_patch((synth_small / f"{i}.tif").read_bytes()).pixels for i in labels["id"]])
    return x, np.array(labels["label"])


@pytest.mark.slow  # converts the model twice: seconds each
@pytest.mark.parametrize("precision, tta", [("fp32", 1), ("auto", 8)])
def test_openvino_gives_torch_fp32s_probabilities(model_dir, patches, precision, tta):
    x, y = patches
    x, y = (x, y) if tta == 1 else (x[:96], y[:96])  # eight views: fewer patches, the same check
    model, meta = load_model(str(model_dir))
    pre = Preprocess.from_dict(meta["preprocess"])
    want = Predictor(model, pre, device=torch.device("cpu"), tta=tta)(x)
    got = openvino.OpenVinoPredictor(model, pre, tta=tta, threads=1, precision=precision)(x)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() < (1e-4 if precision == "fp32" else 0.01)
    assert abs(roc_auc_score(y, got) - roc_auc_score(y, want)) <= 0.001


@pytest.mark.slow
def test_the_scoring_actor_runs_openvino_where_asked(model_dir, patches):
    from ray.data.extensions import ArrowTensorArray

    x, _ = patches
    batch = pa.table({"id": [f"p{i}" for i in range(8)], "status": ["ok"] * 7 + ["error"],
                      "error": [None] * 7 + ["bad"], "pixels": ArrowTensorArray.from_numpy(x[:8])})
    from hcdlib.model.artifact import check_artifact

    sha = check_artifact(str(model_dir))[0]["sha256"]
    a = Scorer(str(model_dir), sha256=sha, tta=1, threads=1, batch_size=4, backend="openvino", precision="fp32")
    b = Scorer(str(model_dir), sha256=sha, tta=1, threads=1, batch_size=4, precision="fp32")
    assert isinstance(a.predict, openvino.OpenVinoPredictor)
    pa_, pb = a(batch)["prob"].to_numpy(zero_copy_only=False), b(batch)["prob"].to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(pa_[:7], pb[:7], atol=1e-4)
    assert np.isnan(pa_[7]) and np.isnan(pb[7])


def test_dihedral_views_match_torchs():
    from hcdlib.model.transforms import dihedral

    x = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    for k in range(8):
        want = dihedral(torch.from_numpy(x).permute(0, 3, 1, 2), k).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(openvino.dihedral_nhwc(x, k), want)


@pytest.mark.parametrize("flags, expect", [
    (["--gpus-per-actor", "1"], "--backend openvino runs on CPU actors, and --gpus-per-actor 1 asks for GPUs"),
    (["--compile"], "--compile compiles the torch model; --backend openvino compiles its own"),
])
def test_openvino_with_gpus_or_compile_is_one_line(any_model, synth_small, tmp_path, capsys, no_ray, flags, expect):
    one_line_exit_2(capsys, ["score", "--model", str(any_model), "--input", str(synth_small), "--out",
                             str(tmp_path / "o"), "--backend", "openvino", *flags], expect=expect)


def test_openvino_not_installed_is_one_line(any_model, synth_small, tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.setattr(openvino, "available", lambda: False)
    one_line_exit_2(capsys, ["score", "--model", str(any_model), "--input", str(synth_small), "--out",
                             str(tmp_path / "o"), "--backend", "openvino"], expect="pip install 'hcd[openvino]'")
