"""What hcd train refuses on the driver, before Ray starts."""

import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import csv_file, one_line_exit_2

from hcdlib import cli
from hcdlib.commands.train.data import open_sources
from hcdlib.commands.train.run import TrainConfig
from hcdlib.errors import UserError
from hcdlib.storage.listing import SourceError


def test_class_folder_labelled_2_and_unlabelled_patches_do_not_train(ten_patches, tmp_path, no_ray):
    folder, ids = ten_patches
    root = tmp_path / "cls"
    for n, i in enumerate(ids):
        (root / str(n % 3)).mkdir(parents=True, exist_ok=True)  # folders 0, 1 and 2
        shutil.copy(folder / f"{i}.tif", root / str(n % 3) / f"{i}.tif")
    with pytest.raises(SourceError, match=r"label 2 \(.*\) is not 0 or 1"):
        open_sources(TrainConfig(data=str(root), out=str(tmp_path / "run"), val_data=str(root)))
    partial = csv_file(tmp_path / "partial.csv", "id,label\n" + "".join(f"{i},1\n" for i in ids[:7]))
    with pytest.raises(SourceError, match=r"3 of 10 training patches have no label"):
        open_sources(TrainConfig(data=str(folder), labels=partial, out=str(tmp_path / "run"), val_data=str(folder)))


def test_train_cli_refuses_bad_labels_in_one_line_before_ray(ten_patches, tmp_path, capsys, no_ray):
    folder, ids = ten_patches
    bad = csv_file(tmp_path / "l.csv", "id,label\n" + "".join(f"{i},2\n" for i in ids))
    one_line_exit_2(capsys, ["train", "--data", str(folder), "--labels", bad, "--out", str(tmp_path / "r")],
                     expect="l.csv: row 2: label '2'")


def test_train_refuses_a_folder_none_of_whose_patches_can_be_read(ten_patches, tmp_path, capsys, no_ray):
    """Class folders of links to patches elsewhere: every entry is refused, so training would see nothing."""
    folder, _ = ten_patches
    links = tmp_path / "links"
    for i, p in enumerate(sorted(folder.glob("*.tif"))):
        (links / str(i % 2)).mkdir(parents=True, exist_ok=True)
        (links / str(i % 2) / p.name).symlink_to(p)
    capsys.readouterr()
    code = cli.main(["train", "--data", str(links), "--val-data", str(folder), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err
    # the listing's own warning, then the refusal: one line naming the folder, the reason and the fix
    assert len(lines) == 2 and "10 entries not read" in lines[0]
    assert "none of its 10 training patches can be read" in lines[1] and "outside the input folder" in lines[1]
    assert not (tmp_path / "r").exists()  # nothing written


def _class_folders(src: Path, root: Path, labelled: dict[str, int]) -> str:
    for i, label in labelled.items():
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        shutil.copy(src / f"{i}.tif", root / str(label) / f"{i}.tif")
    return str(root)


def test_train_refuses_one_class_and_validation_on_training_patches(ten_patches, tmp_path, capsys, caplog, no_ray):
    """Either would train the whole budget, then end in a traceback or export on an optimistic AUC."""
    folder, ids = ten_patches
    both = _class_folders(folder, tmp_path / "both", {i: n % 2 for n, i in enumerate(ids[:6])})
    held = _class_folders(folder, tmp_path / "held", {i: n % 2 for n, i in enumerate(ids[6:])})
    out = str(tmp_path / "run")
    train_src, val_src = open_sources(TrainConfig(data=both, val_data=held, out=out))  # a proper split passes
    assert (train_src.num_patches, val_src.num_patches) == (6, 4)

    normal = _class_folders(folder, tmp_path / "normal", dict.fromkeys(ids[:6], 0))
    with pytest.raises(SourceError, match=r"normal: all 6 training patches are labelled 0 \(normal\)"):
        open_sources(TrainConfig(data=normal, val_data=held, out=out))
    tumour = _class_folders(folder, tmp_path / "tumour", dict.fromkeys(ids[6:], 1))
    with pytest.raises(SourceError, match=r"all 4 validation patches are labelled 1 \(tumour\).*give validation"):
        open_sources(TrainConfig(data=both, val_data=tumour, out=out))
    # one slide group held out of --data (each patch is its own group here): one class, whatever the draw;
    # without slide ids the held-out patches have neighbours in training, which the log says
    caplog.set_level(logging.WARNING)
    with pytest.raises(SourceError, match=r"all 1 validation patches are labelled .*--val-fraction"):
        open_sources(TrainConfig(data=both, val_fraction=0.1, out=out))
    assert "no slide ids" in caplog.text and "its AUC is optimistic" in caplog.text

    overlap = _class_folders(folder, tmp_path / "overlap", {i: n % 2 for n, i in enumerate(ids[4:])})
    with pytest.raises(SourceError, match=rf"overlap: 2 of its 6 validation patches .* \(e.g. {ids[4]}\)"):
        open_sources(TrainConfig(data=both, val_data=overlap, out=out))
    one_line_exit_2(capsys, ["train", "--data", both, "--val-data", both, "--out", out],
                     expect="6 of its 6 validation patches have ids that are also training patches")
    assert not (tmp_path / "run").exists()


def test_train_refuses_duplicate_groups_and_says_slides_on_both_sides(ten_patches, tmp_path, caplog, no_ray):
    """--val-data with copies of training patches (one dup_group) or their slides validated without a word."""
    folder, ids = ten_patches
    both = _class_folders(folder, tmp_path / "both", {i: n % 2 for n, i in enumerate(ids[:6])})
    held = _class_folders(folder, tmp_path / "held", {i: n % 2 for n, i in enumerate(ids[6:])})
    out = str(tmp_path / "run")

    def labels(name: str, rows: dict[str, tuple[str, str]]) -> str:  # id -> (slide_id, dup_group)
        path = tmp_path / f"{name}.csv"
        path.write_text("id,label,slide_id,dup_group\n" + "".join(
            f"{i},{n % 2},{s},{d}\n" for n, (i, (s, d)) in enumerate(rows.items())))
        return str(path)

    caplog.set_level(logging.WARNING)
    train_csv = labels("t", {i: ("", f"g{n}") for n, i in enumerate(ids[:6])})
    # a proper split: other groups, other slides
    open_sources(TrainConfig(data=both, labels=train_csv, val_data=held, out=out,
                             val_labels=labels("v0", {i: ("", f"h{n}") for n, i in enumerate(ids[6:])})))
    assert "validation" not in caplog.text
    dups = labels("v1", {i: ("", f"g{n % 3}") for n, i in enumerate(ids[6:])})  # g0 and g1, g2 are training's
    with pytest.raises(SourceError, match=r"held: 4 of its 4 validation patches are in duplicate groups "
                                          r"\(dup_group\) that training patches .* \(e.g. group g0\)"):
        open_sources(TrainConfig(data=both, labels=train_csv, val_data=held, val_labels=dups, out=out))
    slide_csv = labels("t2", {i: (f"s{n % 2}", "") for n, i in enumerate(ids[:6])})
    same = labels("v2", {i: (f"s{n}", "") for n, i in enumerate(ids[6:])})  # s0, s1 are training's slides
    open_sources(TrainConfig(data=both, labels=slide_csv, val_data=held, val_labels=same, out=out))
    assert ("2 of its 4 validation patches come from slides that training patches come from too (e.g. slide s0)"
            in caplog.text)


def test_a_split_by_slide_does_not_warn(synth_small, tmp_path, caplog, no_ray):
    caplog.set_level(logging.WARNING)
    train_src, val_src = open_sources(TrainConfig(data=str(synth_small), out=str(tmp_path / "run")))
    held = set(val_src.items["slide_id"].to_pylist())
    assert held and held.isdisjoint(train_src.items["slide_id"].to_pylist())
    assert "no slide ids" not in caplog.text


def test_imagenet_weights_that_cannot_be_downloaded_are_one_line_before_ray(ten_patches, tmp_path, capsys,
                                                                             monkeypatch, no_ray):
    """Without internet each worker used to fail in a URLError traceback, after Ray had started."""
    import urllib.error

    import torchvision.models._api

    def offline(url, *_a, **_k):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    folder, _ = ten_patches
    line = one_line_exit_2(capsys, ["train", "--arch", "resnet18", "--weights", "imagenet", "--data", str(folder),
                                     "--out", str(tmp_path / "r")],
                            expect="--weights imagenet: cannot download the resnet18 ImageNet weights from https://")
    assert "Name or service not known" in line and "copy that file to" in line and "resnet18-" in line


def test_train_resumes_only_the_run_its_out_holds(ten_patches, tmp_path, no_ray):
    """Another --data or --lr into a run's --out used to resume (or re-export) the old weights under the new flags."""
    from hcdlib.commands.train.folder import TRAIN_SPEC
    from hcdlib.commands.train.run import train

    folder, ids = ten_patches
    both = _class_folders(folder, tmp_path / "both", {i: n % 2 for n, i in enumerate(ids[:6])})
    held = _class_folders(folder, tmp_path / "held", {i: n % 2 for n, i in enumerate(ids[6:])})
    other = _class_folders(folder, tmp_path / "other", {i: n % 2 for n, i in enumerate(ids[:5])})
    out = tmp_path / "run"
    cfg = TrainConfig(data=both, val_data=held, out=str(out), epochs=2)
    (out / "skipped").mkdir(parents=True)
    (out / "skipped" / "mine.txt").write_text("mine")  # the user's, in an --out hcd never trained in
    with pytest.raises(AssertionError, match="Ray was started"):  # a fresh run: spec written, then Ray
        train(cfg)
    assert json.loads((out / TRAIN_SPEC).read_text())["lr"] == cfg.lr
    assert (out / "skipped" / "mine.txt").read_text() == "mine"
    with pytest.raises(AssertionError, match="Ray was started"):  # hcd's earlier start: its record is redone
        train(cfg)
    assert not (out / "skipped").exists()
    (out / "ray_train").mkdir()  # the run started training
    with pytest.raises(UserError, match=r"holds a run with a different lr \(0.003 there, 0.01 now\); train into "
                                        r"another --out"):
        train(cfg.replace(lr=0.01))
    with pytest.raises(UserError, match=r"different data \('.*both' there, '.*' now\), train_fingerprint \('\w+' "
                                        r"there, '\w+' now: files of --data were added, removed or changed in size"):
        train(cfg.replace(data=other))
    for more in (cfg.replace(epochs=5), cfg.replace(time_budget_min=3.0, cache="off")):  # the same run, longer
        with pytest.raises(AssertionError, match="Ray was started"):
            train(more)


def test_train_out_inside_its_data_is_refused(ten_patches, tmp_path, capsys, no_ray):
    """Like score's and pack's --out: what training writes there would be listed with the patches next time."""
    folder, ids = ten_patches
    data = _class_folders(folder, tmp_path / "data", {i: n % 2 for n, i in enumerate(ids[:6])})
    held = _class_folders(folder, tmp_path / "held", {i: n % 2 for n, i in enumerate(ids[6:])})
    for flag, inside in (("--data", f"{data}/run"), ("--val-data", held)):
        one_line_exit_2(capsys, ["train", "--data", data, "--val-data", held, "--out", inside],
                         expect=f"--out {inside} is inside {flag} {held if flag == '--val-data' else data}: its "
                                "files would be read as input on the next run")
    assert sorted(p.name for p in Path(data).iterdir()) == ["0", "1"]


@pytest.mark.parametrize("name", ["model", "metrics"])
def test_a_fresh_train_run_never_replaces_a_model_it_cannot_resume(name, ten_patches, tmp_path, no_ray):
    """An --out holding model/ (a user's, or a run whose ray_train/ was deleted) had it replaced by the new run."""
    from hcdlib.commands.train.run import train

    folder, ids = ten_patches
    data = _class_folders(folder, tmp_path / "data", {i: n % 2 for n, i in enumerate(ids)})
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)
    (out / name / "model.json").write_text("mine")
    with pytest.raises(UserError, match=rf"run holds {name}/ but no training run to resume \(ray_train/\): a new run "
                                        rf"would replace it; train into another --out, or move {name}/ away"):
        train(TrainConfig(data=data, out=str(out), epochs=1))
    assert (out / name / "model.json").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [name]
