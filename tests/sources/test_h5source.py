"""PatchCamelyon's HDF5 release as a patch source: files written here in the release's exact layout."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from hcdlib.commands.pack import pack, read_packed
from hcdlib.config import PackConfig
from hcdlib.errors import UserError
from hcdlib.sources.factory import open_source
from hcdlib.sources.h5 import H5Source


def write_pcam(folder, split: str, n: int, *, seed: int = 0, labels: bool = True, y_rows: int | None = None):
    """``camelyonpatch_level_2_split_<split>_{x,y}.h5`` as the release writes them (gzip, chunked, uint8)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    y = rng.integers(0, 2, (n if y_rows is None else y_rows, 1, 1, 1), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(min(n, 32), 96, 96, 3), compression="gzip")
    if labels:
        with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f.create_dataset("y", data=y, chunks=(min(len(y), 32), 1, 1, 1), compression="gzip")
    return x, y.reshape(-1)


def test_a_pcam_folder_is_a_source_with_exact_pixels_labels_and_stable_ids(tmp_path):
    x, y = write_pcam(tmp_path, "valid", 70)
    write_pcam(tmp_path, "test", 20, seed=1)
    src = open_source(str(tmp_path))
    assert isinstance(src, H5Source) and src.layout == "pcam_h5" and src.num_patches == 90
    assert src.has_labels()
    chunks = [c for c in src.chunks(32) if c.split == "valid"]
    assert [c.num_rows for c in chunks] == [32, 32, 6] and chunks[1].key == "h5-valid-000001"
    rows = chunks[1].read()
    assert list(rows["id"][:2]) == ["valid-32", "valid-33"] and (rows["status"] == "ok").all()
    np.testing.assert_array_equal(rows["pixels"], x[32:64])
    assert list(rows["label"]) == y[32:64].tolist()
    labels = src.label_table()  # splits in file-name order: test, then valid
    assert labels.num_rows == 90 and labels["id"][20].as_py() == "valid-0" and labels["id"][89].as_py() == "valid-69"
    assert labels["label"].to_pylist()[20:] == y.tolist()
    assert src.fingerprint() == open_source(str(tmp_path)).fingerprint()


def test_one_x_file_is_its_split_alone_and_a_split_without_y_is_unlabelled(tmp_path):
    write_pcam(tmp_path / "a", "train", 40)
    one = open_source(str(tmp_path / "a" / "camelyonpatch_level_2_split_train_x.h5"))
    assert one.num_patches == 40 and one.has_labels()
    write_pcam(tmp_path / "b", "test", 10, labels=False)
    bare = open_source(str(tmp_path / "b"))
    assert not bare.has_labels() and bare.chunks(8)[0].read()["label"].tolist() == [None] * 8


def test_x_and_y_of_different_lengths_or_a_truncated_file_are_refused_naming_the_files(tmp_path):
    write_pcam(tmp_path / "pair", "train", 40, y_rows=39)
    with pytest.raises(UserError, match=r"split_train_x\.h5 holds 40 patches and .*split_train_y\.h5 39 labels"):
        open_source(str(tmp_path / "pair"))
    write_pcam(tmp_path / "cut", "train", 40)
    x = tmp_path / "cut" / "camelyonpatch_level_2_split_train_x.h5"
    x.write_bytes(x.read_bytes()[:3000])
    with pytest.raises(UserError, match=r"split_train_x\.h5: not a readable HDF5 file"):
        open_source(str(tmp_path / "cut"))
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_train_x.h5", "w") as f:
        f.create_dataset("x", data=np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(UserError, match=r"dataset 'x' is uint8 \(4, 64, 64, 3\); PatchCamelyon's is uint8"):
        open_source(str(tmp_path / "camelyonpatch_level_2_split_train_x.h5"))


def test_labels_csv_and_packed_archives_beside_the_h5_are_refused(tmp_path):
    write_pcam(tmp_path / "p", "train", 8)
    (tmp_path / "labels.csv").write_text("id,label\ntrain-0,1\n")
    with pytest.raises(UserError, match=r"their labels are the _y\.h5 files beside them"):
        open_source(str(tmp_path / "p"), str(tmp_path / "labels.csv"))
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "camelyonpatch_level_2_split_train_x.h5.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(UserError, match=r"gunzip the \.gz files"):
        open_source(str(tmp_path / "gz"))


def test_pack_keeps_pcam_pixels_and_labels_exactly(tmp_path):
    x, y = write_pcam(tmp_path / "pcam", "valid", 50)
    pack(PackConfig(input=str(tmp_path / "pcam"), out=str(tmp_path / "shards"), rows_per_file=20))
    t = read_packed(str(tmp_path / "shards"))
    assert t["id"].to_pylist() == [f"valid-{i}" for i in range(50)] and t["label"].to_pylist() == y.tolist()
    got = np.frombuffer(b"".join(t["pixels"].to_pylist()), np.uint8).reshape(50, 96, 96, 3)
    np.testing.assert_array_equal(got, x)


def test_a_file_damaged_after_listing_makes_error_rows_not_a_crash(tmp_path):
    write_pcam(tmp_path, "test", 40)
    chunk = open_source(str(tmp_path)).chunks(16)[1]
    x = tmp_path / "camelyonpatch_level_2_split_test_x.h5"
    x.write_bytes(x.read_bytes()[:5000])
    rows = chunk.read()
    assert (rows["status"] == "error").all() and "cannot read rows 16-31" in rows["error"][0]


def test_training_on_h5_without_val_data_names_the_valid_split(tmp_path):
    from hcdlib.commands.train.data import open_sources
    from hcdlib.config import TrainConfig

    write_pcam(tmp_path, "train", 20)
    cfg = TrainConfig(data=str(tmp_path / "camelyonpatch_level_2_split_train_x.h5"), out=str(tmp_path / "o"))
    with pytest.raises(UserError, match=r"needs --val-data \(camelyonpatch_level_2_split_valid_x\.h5"):
        open_sources(cfg)


@pytest.mark.slow
def test_hcd_score_reads_pcam_h5_exactly_once_with_the_same_probabilities(ray_session, model_dir, tmp_path):
    import torch

    from hcdlib import load_model, read_predictions
    from hcdlib.commands.score.run import score
    from hcdlib.config import ScoreConfig
    from hcdlib.model.infer import for_inference, infer_batch
    from hcdlib.model.transforms import Preprocess

    x, _ = write_pcam(tmp_path / "pcam", "test", 150)
    m = score(ScoreConfig(model=str(model_dir), input=str(tmp_path / "pcam"), out=str(tmp_path / "o"),
                          chunk_size=64, precision="fp32"))
    assert (m["rows"], m["ok"]) == (150, 150)
    t = read_predictions(str(tmp_path / "o")).to_pandas().set_index("id")
    assert sorted(t.index) == sorted(f"test-{i}" for i in range(150))
    model, meta = load_model(str(model_dir))
    want = infer_batch(for_inference(model), x[:20], device=torch.device("cpu"),
                       preprocess=Preprocess.from_dict(meta["preprocess"]))
    np.testing.assert_allclose(t.loc[[f"test-{i}" for i in range(20)], "prob"].to_numpy(), want, atol=1e-5)
