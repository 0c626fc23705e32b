import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from hcdlib.commands.synth import SynthConfig, generate, write_synth


def test_deterministic_for_a_seed(tmp_path):
    a = list(generate(20, seed=5))
    b = list(generate(20, seed=5))
    c = list(generate(20, seed=6))
    assert [r[:3] for r in a] == [r[:3] for r in b]
    assert all(np.array_equal(x[3], y[3]) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x[3], y[3]) for x, y in zip(a, c, strict=True))
    # ranges render the same patches as a full run (parallel synth relies on it)
    part = list(generate(20, seed=5, start=10, stop=15))
    assert all(np.array_equal(x[3], y[3]) for x, y in zip(a[10:15], part, strict=True))
    # and the files written are byte-identical across runs, parallel or not
    write_synth(SynthConfig(out=str(tmp_path / "a"), n=30, seed=5), processes=1)
    write_synth(SynthConfig(out=str(tmp_path / "b"), n=30, seed=5), processes=2)
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def _hist(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([np.histogram(pixels[..., ch], bins=16, range=(0, 256))[0] for ch in range(3)])


@pytest.mark.slow  # trains two small classifiers on 2,400 patches
def test_learnable_but_not_by_colour_histogram():
    rows = list(generate(2400, seed=11))
    y = np.array([r[1] for r in rows])
    assert 0.3 < y.mean() < 0.5
    whole = np.array([_hist(r[3]) for r in rows]) / 96**2
    centre = np.array([_hist(r[3][32:64, 32:64]) for r in rows]) / 32**2

    def auc(x):
        model = LogisticRegression(max_iter=3000).fit(x[:1600], y[:1600])
        return roc_auc_score(y[1600:], model.predict_proba(x[1600:])[:, 1])

    # A colour histogram of the whole patch does not solve it ...
    assert auc(whole) < 0.95
    # ... while the label really is in the centre 32x32 (so a CNN that looks there can learn it).
    assert auc(centre) > 0.95


def test_synth_writes_only_into_a_new_empty_or_its_own_folder(tmp_path):
    """Into a real data folder it would mix synthetic patches in and replace the user's labels.csv."""
    import pytest

    from hcdlib.errors import UserError

    own = tmp_path / "own"
    write_synth(SynthConfig(out=str(own), n=5, seed=1), processes=1)
    write_synth(SynthConfig(out=str(own), n=5, seed=1), processes=1)  # its own output: written again
    assert len(list(own.glob("*.tif"))) == 5
    (tmp_path / "empty").mkdir()
    write_synth(SynthConfig(out=str(tmp_path / "empty"), n=5, seed=1), processes=1)
    for name, content in (("labels.csv", "id,label\nabc,1\n"), (f"{'a' * 40}.tif", "patch")):
        theirs = tmp_path / name.split(".")[0][:6]
        theirs.mkdir()
        (theirs / name).write_text(content)
        with pytest.raises(UserError, match="holds files hcd synth did not write"):
            write_synth(SynthConfig(out=str(theirs), n=5, seed=1), processes=1)
        assert [p.name for p in theirs.iterdir()] == [name] and (theirs / name).read_text() == content
