"""What hcd refuses before any work starts, and what it records as an error row (no Ray here).

Each test names the misuse it stands for; every one of them failed on the code before the
refusals were added (labels, pixel formats, overwrite, manifests, artifacts, flags, listing).
"""

import hashlib
import io
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import tifffile
import torch
from conftest import copy_patches
from PIL import Image

from hcdlib import cli
from hcdlib.commands.evaluate.metrics import load_labels
from hcdlib.commands.pack import PackConfig, pack
from hcdlib.commands.score.run import ScoreConfig, score
from hcdlib.commands.train.data import open_sources
from hcdlib.commands.train.run import TrainConfig
from hcdlib.errors import UserError
from hcdlib.model.architectures import build_model
from hcdlib.model.artifact import ArtifactError, check_artifact, export_model, load_model
from hcdlib.model.infer import infer_batch
from hcdlib.model.transforms import Preprocess
from hcdlib.outputs import readers
from hcdlib.outputs import runfolder as preds
from hcdlib.sources import chunks
from hcdlib.sources.decode import decode_patch
from hcdlib.sources.factory import open_source
from hcdlib.sources.labels import check_labelled, read_labels
from hcdlib.sources.slides.plan import slide_id_of
from hcdlib.storage import uri as urimod
from hcdlib.storage.listing import SourceError, list_files


@pytest.fixture()
def no_ray(monkeypatch):
    """Fail the test if anything tries to start or join Ray: refusals come before it."""
    import hcdlib.commands.demo
    import hcdlib.commands.score.run
    import hcdlib.commands.train.run
    import hcdlib.raykit.cluster

    def refuse(*_a, **_k):
        raise AssertionError("Ray was started before the input was checked")

    for module in (hcdlib.raykit.cluster, hcdlib.commands.score.run, hcdlib.commands.train.run, hcdlib.commands.demo):
        monkeypatch.setattr(module, "init_ray", refuse)


def _one_line_exit_2(capsys, argv: list[str], *, expect: str) -> str:
    """Run ``hcd`` in-process; the user error must be one line naming ``expect``, with exit code 2."""
    capsys.readouterr()
    t0 = time.perf_counter()
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and expect in lines[0], lines
    assert "Traceback" not in err
    assert time.perf_counter() - t0 < 20
    return lines[0]


# ---- labels ---------------------------------------------------------------------------------

@pytest.fixture()
def ten_patches(synth_small, tmp_path) -> tuple[Path, list[str]]:
    folder = tmp_path / "k"
    folder.mkdir()
    ids = sorted(p.stem for p in synth_small.glob("*.tif"))[:10]
    for i in ids:
        shutil.copy(synth_small / f"{i}.tif", folder / f"{i}.tif")
    return folder, ids


def _csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_labels_csv_without_label_column_is_refused(ten_patches, tmp_path, no_ray):
    folder, ids = ten_patches
    bad = _csv(tmp_path / "nolabel.csv", "id,slide_id\n" + "".join(f"{i},s\n" for i in ids))
    with pytest.raises(SourceError, match=r"nolabel.csv: labels CSV needs a 'label' column"):
        read_labels(bad)
    with pytest.raises(SourceError, match="needs a 'label' column"):
        open_sources(TrainConfig(data=str(folder), labels=bad, out=str(tmp_path / "run")))
    with pytest.raises(SourceError, match="needs a 'label' column"):
        load_labels(bad)
    from hcdlib.commands.pack import PackConfig, pack

    with pytest.raises(SourceError, match="needs a 'label' column"):  # it packed every row with no label
        pack(PackConfig(input=str(folder), labels=bad, out=str(tmp_path / "packed")))
    assert not (tmp_path / "run").exists() and not (tmp_path / "packed").exists()
    read_labels(bad, require_label=False)  # scoring may carry slide ids without labels


@pytest.mark.parametrize("value", ["2", "-1", "0.5", "positive", "tumours", "", "1.01", "10", "01"])
def test_label_that_is_not_0_or_1_is_refused_naming_row_and_value(ten_patches, tmp_path, value):
    folder, ids = ten_patches
    rows = [f"{i},{1 if n % 2 else 0}\n" for n, i in enumerate(ids)]
    rows[3] = f"{ids[3]},{value}\n"
    bad = _csv(tmp_path / "labels.csv", "id,label\n" + "".join(rows))
    with pytest.raises(SourceError, match=rf"labels.csv: row 5: label '{value}' for id '{ids[3]}' is not 0 or 1"):
        read_labels(bad)
    with pytest.raises(SourceError, match="row 5"):
        pack(PackConfig(input=str(folder), labels=bad, out=str(tmp_path / "shards")))
    assert not (tmp_path / "shards").exists()  # refused before any shard was written


def test_labels_written_as_floats_or_class_names_are_read_as_0_and_1(tmp_path):
    """0.0 / 1.0 (pandas writes a label column with a gap in it so) and Tumor / Normal (CAMELYON16's words).

    Each is the same label as 1 or 0.
    """
    path = _csv(tmp_path / "labels.csv", "id,label\na,0.0\nb,1.0\nc, 1 \nd,1.000\ne,0\nf,Tumor\ng,normal\nh,TUMOUR\n")
    assert read_labels(path)["label"].to_pylist() == [0, 1, 1, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("text", [
    "ID,Label,Slide_ID\n007,1,s1\n008,0,s2\n",                   # a spreadsheet's capitals
    "\ufeffid;label;slide_id\r\n007;1;s1\r\n008;0;s2\r\n",       # Excel's UTF-8 export in a comma-decimal locale
    '"id"\t"label"\t"slide_id"\n"007"\t"1"\ts1\n008\t0\ts2\n',    # tab-separated, quoted
])
def test_labels_csv_from_a_spreadsheet_is_read(tmp_path, text):
    """Each of these was refused for want of an 'id' column; ids keep their leading zeros."""
    t = read_labels(_csv(tmp_path / "labels.csv", text))
    assert t.select(["id", "label", "slide_id"]).to_pylist() == [{"id": "007", "label": 1, "slide_id": "s1"},
                                                                 {"id": "008", "label": 0, "slide_id": "s2"}]
    with pytest.raises(SourceError, match=r"needs an 'id' column, has \['image_id', 'label'\]"):
        read_labels(_csv(tmp_path / "other.csv", "image_id,label\na,1\n"))
    # CAMELYON16's reference.csv has no header: its first row was taken for one
    with pytest.raises(SourceError, match=r"has \['test_001', 'Tumor', 'Macro'\]; its first line names the columns "
                                          r"\(id,label\[,slide_id\]\): add that line if the file starts with data"):
        read_labels(_csv(tmp_path / "reference.csv", "test_001,Tumor,Macro\ntest_002,Normal,\n"))


def test_ids_written_with_the_file_extension_name_the_same_patches(ten_patches, tmp_path):
    """A CSV made from a file listing has abc.tif where hcd's id is abc: every patch went unlabelled."""
    folder, ids = ten_patches
    rows = "".join(f"{i}{'.tif' if n % 3 else '.TIFF'},{n % 2}\n" for n, i in enumerate(ids))
    path = _csv(tmp_path / "labels.csv", "id,label\n" + rows + "x.png.jpg,1\n")
    t = read_labels(path)
    assert t["id"].to_pylist() == [*ids, "x.png"] and t["label"].to_pylist() == [*(n % 2 for n in range(len(ids))), 1]
    src = open_source(str(folder), path, require_label=True)
    assert check_labelled(src, "training")["label"].to_pylist() == [n % 2 for n in range(len(ids))]
    both = _csv(tmp_path / "both.csv", f"id,label\n{ids[0]},0\n{ids[0]}.tif,0\n")
    with pytest.raises(SourceError, match=rf"listed more than once, e.g. '{ids[0]}' on rows 2, 3"):
        read_labels(both)


def test_id_listed_twice_is_refused(ten_patches, tmp_path):
    folder, ids = ten_patches
    bad = _csv(tmp_path / "dup.csv", "id,label\n" + "".join(f"{i},0\n" for i in ids) + f"{ids[2]},1\n")
    with pytest.raises(SourceError, match=rf"listed more than once, e.g. '{ids[2]}' on rows 4, 12"):
        pack(PackConfig(input=str(folder), labels=bad, out=str(tmp_path / "shards")))
    with pytest.raises(SourceError, match="more than once"):
        load_labels(bad)


def test_class_folder_labelled_2_and_unlabelled_patches_do_not_train(ten_patches, tmp_path, no_ray):
    folder, ids = ten_patches
    root = tmp_path / "cls"
    for n, i in enumerate(ids):
        (root / str(n % 3)).mkdir(parents=True, exist_ok=True)  # folders 0, 1 and 2
        shutil.copy(folder / f"{i}.tif", root / str(n % 3) / f"{i}.tif")
    with pytest.raises(SourceError, match=r"label 2 \(.*\) is not 0 or 1"):
        open_sources(TrainConfig(data=str(root), out=str(tmp_path / "run"), val_data=str(root)))
    partial = _csv(tmp_path / "partial.csv", "id,label\n" + "".join(f"{i},1\n" for i in ids[:7]))
    with pytest.raises(SourceError, match=r"3 of 10 training patches have no label"):
        open_sources(TrainConfig(data=str(folder), labels=partial, out=str(tmp_path / "run"), val_data=str(folder)))


def test_train_cli_refuses_bad_labels_in_one_line_before_ray(ten_patches, tmp_path, capsys, no_ray):
    folder, ids = ten_patches
    bad = _csv(tmp_path / "l.csv", "id,label\n" + "".join(f"{i},2\n" for i in ids))
    _one_line_exit_2(capsys, ["train", "--data", str(folder), "--labels", bad, "--out", str(tmp_path / "r")],
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
    _one_line_exit_2(capsys, ["train", "--data", both, "--val-data", both, "--out", out],
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


@pytest.mark.parametrize("argv", [
    ["score", "--model", "{model}", "--input", "{input}"], ["pack", "--input", "{input}"],
    ["train", "--data", "{input}"], ["evaluate", "--predictions", "{input}", "--labels", "{labels}"],
    ["synth", "--n", "5"], ["demo"]])
def test_an_out_that_a_file_stands_in_is_one_line(argv, model_dir, synth_small, tmp_path, capsys, no_ray):
    """The first write used to fail in pyarrow with a traceback (FileExistsError); the file is left alone."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    args = [a.format(model=model_dir, input=synth_small, labels=synth_small / "labels.csv") for a in argv]
    for out in (blocker, blocker / "sub"):
        _one_line_exit_2(capsys, [*args, "--out", str(out)], expect=f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("argv", [
    ["score", "--model", "{model}", "--input", "{input}"], ["pack", "--input", "{input}"],
    ["train", "--data", "{input}"], ["evaluate", "--predictions", "{input}", "--labels", "{labels}"]])
def test_an_out_named_like_a_file_is_one_line(argv, model_dir, synth_small, tmp_path, capsys, no_ray):
    """`--out preds.csv` made a folder of that name, holding Parquet parts: not the CSV a user meant."""
    args = [a.format(model=model_dir, input=synth_small, labels=synth_small / "labels.csv") for a in argv]
    for name, hint in (("preds.csv", " (hcd submission --out writes one CSV)"), ("model.pt", "")):
        line = _one_line_exit_2(capsys, [*args, "--out", str(tmp_path / name)],
                                expect=f"names a {name[name.index('.'):]} file, and --out is a folder")
        assert line.endswith("give a folder name" + hint)
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("argv", [
    ["score", "--model", "{model}", "--input", "{input}"], ["pack", "--input", "{input}"],
    ["train", "--data", "{input}"], ["evaluate", "--predictions", "{input}", "--labels", "{labels}"],
    ["submission", "--predictions", "{input}"], ["synth", "--n", "5"], ["demo"]])
def test_a_relative_out_in_a_ray_jobs_working_dir_copy_is_one_line(argv, model_dir, synth_small, tmp_path, capsys,
                                                                    monkeypatch, no_ray):
    """A relative --out in `ray job submit --working-dir .` went into Ray's copy of the folder, deleted later.

    The user's own folder never saw the predictions.
    """
    args = [a.format(model=model_dir, input=synth_small, labels=synth_small / "labels.csv") for a in argv]
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1234"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv(urimod.RAY_JOB_ENV, "{}")
    out = "preds.csv" if argv[0] == "submission" else "preds"
    line = _one_line_exit_2(capsys, [*args, "--out", out], expect=f"--out {out}: a relative path in a Ray job lies")
    assert str(copy) in line and line.endswith("give an absolute path (on storage every node of the cluster sees) "
                                               "or an s3:// URI")
    assert list(copy.iterdir()) == []
    if argv[0] == "demo":  # its default --out is relative too
        _one_line_exit_2(capsys, args, expect="--out hcd-demo: a relative path in a Ray job lies")
    # an absolute --out, a Ray job run from elsewhere, and a plain command are not affected
    urimod.check_kept(str(tmp_path / "preds"), "--out")
    urimod.check_kept("s3://bucket/preds", "--out")
    monkeypatch.chdir(tmp_path)
    urimod.check_kept("preds", "--out")
    monkeypatch.chdir(copy)
    monkeypatch.delenv(urimod.RAY_JOB_ENV)
    urimod.check_kept("preds", "--out")


def test_score_out_inside_the_model_folder_is_one_line(model_dir, synth_small, tmp_path, capsys, no_ray):
    """Predictions were written into the model artifact's folder, beside its weights."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    before = sorted(p.name for p in model.iterdir())
    for out in (model, model / "preds"):
        _one_line_exit_2(capsys, ["score", "--model", str(model), "--input", str(synth_small), "--out", str(out)],
                         expect=f"--out {out} is inside --model {model}: the predictions would be written into")
    assert sorted(p.name for p in model.iterdir()) == before


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
    line = _one_line_exit_2(capsys, ["train", "--arch", "resnet18", "--weights", "imagenet", "--data", str(folder),
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
        _one_line_exit_2(capsys, ["train", "--data", data, "--val-data", held, "--out", inside],
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


def test_an_out_in_a_bucket_that_does_not_exist_is_one_line(model_dir, synth_small, bucket, capsys, no_ray):
    """The first write used to fail in pyarrow ("Bucket not found") with a traceback."""
    for argv in (["score", "--model", str(model_dir), "--input", str(synth_small)],
                 ["train", "--data", str(synth_small)]):
        _one_line_exit_2(capsys, [*argv, "--out", "s3://hcd-no-such-bucket/run"],
                         expect="--out s3://hcd-no-such-bucket/run: bucket hcd-no-such-bucket does not exist")
    urimod.check_folder(f"{bucket}/not/yet/written")  # a bucket that exists: its folders need not


def test_mpp_for_patches_is_refused(model_dir, synth_small, tmp_path, capsys, no_ray):
    """--mpp on patches was ignored without a word: they were scored as they were."""
    _one_line_exit_2(capsys, ["score", "--model", str(model_dir), "--input", str(synth_small), "--out",
                              str(tmp_path / "o"), "--mpp", "0.5"],
                     expect=f"--mpp 0.5 sets the resolution of whole-slide images, and {synth_small} holds patches")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["score", "--model", "m", "--input", "{uri}", "--out", "o"],
                                  ["train", "--data", "d", "--out", "{uri}"],
                                  ["pack", "--input", "{uri}", "--out", "o"]])
def test_an_s3_uri_with_credentials_is_refused_without_repeating_them(argv, capsys, no_ray):
    uri = "s3://AKIAEXAMPLE:s3cr3tKEY@bucket/prefix"
    line = _one_line_exit_2(capsys, [a.format(uri=uri) for a in argv],
                            expect="an s3:// URI with credentials in it is refused")
    assert "s3cr3tKEY" not in line and "AKIAEXAMPLE" not in line


def test_scoring_with_a_model_of_weak_validation_auc_says_so(tmp_path, caplog):
    """A model exported after a few steps scores like any other: its probabilities looked like evidence."""
    from hcdlib.commands.score.run import _warn_weak

    caplog.set_level(logging.WARNING)
    model, pre = build_model("hcdnet")
    for auc, said in ((0.31, "worse than chance: its probabilities point the wrong way"),
                      (0.62, "its probabilities are weak"), (0.93, None)):
        out = tmp_path / f"m{auc}"
        export_model(model, str(out), arch="hcdnet", preprocess=pre, metrics={"val_auc": auc, "epoch": 1, "val_n": 198})
        caplog.clear()
        _warn_weak(str(out), check_artifact(str(out))[0])
        line = f"this model's validation AUC is {auc:.3f} (epoch 1, 198 patches), {said}; scored anyway"
        assert line in caplog.text if said else caplog.text == ""


# ---- pixel formats --------------------------------------------------------------------------

def _tif(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def test_16_bit_and_float_patches_are_scaled_or_refused_never_clipped(synth_small, model_dir):
    rgb = decode_patch(sorted(synth_small.glob("*.tif"))[0].read_bytes()).pixels
    gray8 = np.asarray(Image.fromarray(rgb).convert("L"))
    as16 = decode_patch(_tif(gray8.astype(np.uint16) * 257))
    as8 = decode_patch(_tif(gray8))
    assert as16.error is None and "scaled 16-bit grayscale" in as16.note
    np.testing.assert_array_equal(as16.pixels, as8.pixels)
    rgb16 = decode_patch(_tif(rgb.astype(np.uint16) * 257))  # 16 bits per channel: PIL scales it itself
    np.testing.assert_array_equal(rgb16.pixels, rgb)
    assert rgb16.note == "scaled 16-bit RGB to 8 bits" and decode_patch(_tif(rgb)).note is None
    for arr, mode in ((gray8.astype(np.float32) / 255, "F"), (gray8.astype(np.int32) * 1000, "I")):
        res = decode_patch(_tif(arr))
        assert res.pixels is None and f"pixel format {mode} cannot be converted" in res.error
    model, meta = load_model(str(model_dir))
    pre = Preprocess.from_dict(meta["preprocess"])
    p = infer_batch(model, np.stack([as8.pixels, as16.pixels, rgb16.pixels, rgb]), device=torch.device("cpu"),
                    preprocess=pre)
    assert p[0] == pytest.approx(p[1], abs=1e-6) and p[2] == pytest.approx(p[3], abs=1e-6)


# ---- listing ----------------------------------------------------------------------------------

def test_listing_refuses_what_must_not_be_read(synth_small, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    good = copy_patches(synth_small, folder, 3)
    os.mkfifo(folder / "pipe.tif")  # a named pipe: opening it would block forever
    (folder / "passwd.tif").symlink_to("/etc/passwd")
    (folder / "zero.tif").symlink_to("/dev/zero")
    (folder / "inside.tif").symlink_to(folder / good[0].name)  # a link inside the root is fine
    weird = os.fsencode(str(folder)) + b"/caf\xe9.tif"  # Latin-1 bytes: not UTF-8
    with open(weird, "wb") as f:
        f.write(good[1].read_bytes())
    (folder / "big.tif").write_bytes(good[2].read_bytes() + b"\0" * 4096)
    monkeypatch.setattr(chunks, "MAX_PATCH_BYTES", 30_000)  # cap bytes per patch (default 64 MiB)

    signal.alarm(60)  # a hang (the pipe) fails the test instead of the whole run
    try:
        src = open_source(str(folder))
        rows = pa.concat_tables(c.rows() for c in src.chunks(4)).to_pylist()
    finally:
        signal.alarm(0)
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == 3 + 6
    for p in good:
        assert by_id[p.stem]["error"] is None and by_id[p.stem]["image"] == p.read_bytes()
    assert by_id["inside"]["error"] is None
    assert "not a regular file" in by_id["pipe"]["error"]
    assert "outside the input folder" in by_id["passwd"]["error"] and by_id["passwd"]["image"] is None
    assert "outside the input folder" in by_id["zero"]["error"]
    assert "larger than" in by_id["big"]["error"] and by_id["big"]["image"] is None
    assert by_id["big"]["error"].endswith("(a whole-slide image? hcd score --slides tiles it)")
    assert by_id["caf\\xe9"]["error"].startswith("file name is not valid UTF-8")
    assert by_id["caf\\xe9"]["source"].endswith("caf\\xe9.tif")
    with pytest.raises(SourceError, match="not a regular file or folder"):
        list_files(str(folder / "pipe.tif"))


def test_slide_ids_are_unique_per_input():
    assert slide_id_of("/d/a/s1.svs", "/d") == "a/s1"
    assert slide_id_of("/d/b/s1.svs", "/d") == "b/s1"
    assert slide_id_of("/d/s2.tif", "/d") == "s2"
    assert slide_id_of("/d/only.svs", "/d/only.svs") == "only"
    assert slide_id_of("bucket/x/a/s1.svs", "bucket/x") == "a/s1"


# ---- the commit protocol --------------------------------------------------------------------

def _committed(out: Path, parts: dict[str, list[tuple[str, float]]]) -> None:
    """A committed output written through the protocol's own functions (what hcd score does)."""
    files = []
    for key, rows in parts.items():
        t = pa.table({"id": [r[0] for r in rows], "prob": pa.array([r[1] for r in rows], pa.float32()),
                      "status": ["ok"] * len(rows)})
        preds.write_part(urimod.join(str(out), preds.PARTS, preds.part_name(key)), t)
        size = (out / preds.PARTS / preds.part_name(key)).stat().st_size
        files.append({"path": f"{preds.PARTS}/{preds.part_name(key)}", "rows": len(rows), "bytes": size})
    rows = sum(f["rows"] for f in files)
    (out / preds.MANIFEST).write_text(json.dumps({"files": files, "rows": rows, "ok": rows, "errors": 0}))


def test_readers_refuse_a_part_that_differs_from_the_manifest(tmp_path):
    out = tmp_path / "out"
    _committed(out, {"a": [("p1", 0.1), ("p2", 0.9)], "b": [("p3", 0.5)]})
    assert readers.read_predictions(str(out)).num_rows == 3
    part = out / preds.PARTS / preds.part_name("a")
    t = preds.read_part(str(part)).slice(0, 1)
    preds.write_part(str(part), t)  # replaced after the commit, one row short
    with pytest.raises(preds.CorruptOutputError, match=r"part-a.parquet: .*(bytes|rows), the manifest recorded"):
        readers.read_predictions(str(out))
    part.unlink()
    with pytest.raises(preds.CorruptOutputError, match="listed in the manifest but missing"):
        readers.read_predictions(str(out))


def test_truncated_manifest_is_named(tmp_path):
    out = tmp_path / "out"
    _committed(out, {"a": [("p1", 0.1)]})
    full = (out / preds.MANIFEST).read_bytes()
    (out / preds.MANIFEST).write_bytes(full[: len(full) // 2])
    with pytest.raises(preds.CorruptOutputError, match=r"_SUCCESS: corrupt manifest .*rerun the same hcd score"):
        readers.read_predictions(str(out))


def test_readers_tell_an_unfinished_run_from_a_folder_that_holds_none(synth_small, tmp_path, capsys):
    """`evaluate --predictions <a patch folder>` was told to rerun 'the same command' to resume."""
    _one_line_exit_2(capsys, ["evaluate", "--predictions", str(synth_small), "--labels",
                              str(synth_small / "labels.csv"), "--out", str(tmp_path / "r")],
                     expect=f"{synth_small}: not the output of an hcd run (no _SUCCESS or _RUN.json); pass the "
                            "--out of hcd score")
    out = tmp_path / "out"
    _committed(out, {"a": [("p1", 0.1)]})
    (out / preds.RUN_SPEC).write_text("{}")
    (out / preds.MANIFEST).unlink()  # a run that stopped before its commit
    with pytest.raises(preds.NotCommittedError, match="no _SUCCESS manifest; the run did not finish"):
        readers.read_predictions(str(out))


def test_zero_byte_and_short_parts_are_not_done(tmp_path):
    out = tmp_path / "out"
    _committed(out, {"a": [("p1", 0.1), ("p2", 0.2)], "b": [("p3", 0.3)], "c": [("p4", 0.4)]})
    (out / preds.PARTS / preds.part_name("b")).write_bytes(b"")  # a crash left a zero-byte part
    (out / preds.PARTS / preds.part_name("c")).write_bytes(b"PAR1garbage")
    assert set(preds.RunFolder(str(out)).done({"a": 2, "b": 1, "c": 1, "d": 1})) == {"a"}
    assert set(preds.RunFolder(str(out)).done({"a": 3})) == set()  # a part with fewer rows than its chunk


def test_atomic_write_fsyncs_before_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    urimod.write_bytes_atomic(str(tmp_path / "f"), b"data")
    assert calls == ["fsync", "replace", "fsync"]  # the file, the rename, then the directory
    assert (tmp_path / "f").read_bytes() == b"data" and os.listdir(tmp_path) == ["f"]


def test_submission_has_one_row_per_id(tmp_path):
    out = tmp_path / "out"
    _committed(out, {"a": [("p1", 0.25), ("p2", 0.5)], "b": [("p1", 0.25)]})  # the same patch twice
    n = readers.write_submission(str(out), str(tmp_path / "sub.csv"))
    sub = pacsv.read_csv(tmp_path / "sub.csv").to_pydict()
    assert n == 2 and sub == {"id": ["p1", "p2"], "label": [0.25, 0.5]}
    clash = tmp_path / "clash"
    _committed(clash, {"a": [("p1", 0.25), ("p2", 0.5)], "b": [("p2", 0.75)]})  # two images named p2
    with pytest.raises(UserError, match=r"1 ids have rows with different predictions .*e.g. p2"):
        readers.write_submission(str(clash), str(tmp_path / "sub2.csv"))
    assert not (tmp_path / "sub2.csv").exists()


def test_submission_of_slide_tiles_is_refused(tmp_path, capsys):
    """Tile ids (<slide>_<x>_<y>) were written as a Kaggle submission of 'patches'."""
    out = tmp_path / "out"
    _committed(out, {"s1": [("s1_0_0", 0.25), ("s1_96_0", 0.5)]})
    manifest = json.loads((out / preds.MANIFEST).read_text())
    (out / preds.MANIFEST).write_text(json.dumps({**manifest, "slides": {"scored": 1, "failed": 0}}))
    _one_line_exit_2(capsys, ["submission", "--predictions", str(out), "--out", str(tmp_path / "sub.csv")],
                     expect="predictions of whole-slide tiles, and a Kaggle submission lists the patch ids")
    assert not (tmp_path / "sub.csv").exists()


def test_submission_never_replaces_a_file_without_overwrite(tmp_path, capsys):
    """``--out train_labels.csv`` by mistake used to replace the user's labels without a word."""
    out = tmp_path / "out"
    _committed(out, {"a": [("p1", 0.25), ("p2", 0.5)]})
    theirs = tmp_path / "train_labels.csv"
    theirs.write_text("id,label\np1,1\np2,0\n")
    _one_line_exit_2(capsys, ["submission", "--predictions", str(out), "--out", str(theirs)],
                     expect=f"--out {theirs} exists: hcd does not replace a file it may not have written")
    assert theirs.read_text() == "id,label\np1,1\np2,0\n"
    assert cli.main(["submission", "--predictions", str(out), "--out", str(theirs), "--overwrite"]) == 0
    for flags in ([], ["--overwrite"]):  # a folder: with --overwrite, os.replace's IsADirectoryError traceback
        _one_line_exit_2(capsys, ["submission", "--predictions", str(out), "--out", str(tmp_path), *flags],
                         expect=f"--out {tmp_path} is a folder; give the CSV's file name, e.g. "
                                f"{tmp_path}/submission.csv")
    assert pacsv.read_csv(theirs).to_pydict() == {"id": ["p1", "p2"], "label": [0.25, 0.5]}


def test_claim_output_deletes_only_what_hcd_wrote(tmp_path):
    out = tmp_path / "out"
    _committed(out, {"a": [("p1", 0.1)]})
    (out / preds.RUN_SPEC).write_text(json.dumps({"format": preds.RUN_FORMAT, "model": "m1"}))
    slides = out / "slides"
    slides.mkdir()
    ours = ["s1-0123abcd.heatmap.png", "s1-0123abcd.geojson", "s1-0123abcd.thumbnail.png",
            "s1-0123abcd.tissue.png", "summary.csv"]
    for name in ours:
        (slides / name).write_bytes(b"x")
    theirs = [out / "notes.txt", out / preds.PARTS / "README.md", slides / "my-figure.png"]
    for p in theirs:
        p.write_text("the user's own file")
    with pytest.raises(UserError, match="holds a run with a different model"):
        preds.RunFolder(str(out)).claim({"model": "m2"}, overwrite=False)
    preds.RunFolder(str(out)).claim({"model": "m2"}, overwrite=True)
    assert all(p.read_text() == "the user's own file" for p in theirs)
    assert not any((slides / n).exists() for n in ours)
    assert not list((out / preds.PARTS).glob("*.parquet")) and not (out / preds.MANIFEST).exists()
    assert json.loads((out / preds.RUN_SPEC).read_text()) == {"format": preds.RUN_FORMAT, "model": "m2"}
    (out / preds.RUN_SPEC).write_text(json.dumps({"model": "m2"}))  # another hcd's run: named, not continued
    with pytest.raises(UserError, match=r"_RUN.json: a run of format None, and this hcd continues hcd-run/1 runs"):
        preds.RunFolder(str(out)).claim({"model": "m2"}, overwrite=False)
    preds.RunFolder(str(out)).claim({"model": "m2"}, overwrite=True)  # still hcd's to clear
    foreign = tmp_path / "foreign"
    (foreign / preds.PARTS).mkdir(parents=True)
    with pytest.raises(UserError, match="did not write"):  # no run spec: not hcd's parts folder
        preds.RunFolder(str(foreign)).claim({"model": "m2"}, overwrite=True)


def test_overwrite_never_deletes_the_input(model_dir, synth_small, tmp_path, no_ray):
    proj = tmp_path / "proj"
    shutil.copytree(synth_small, proj / "slides")  # the example: --input proj/slides --out proj
    before = sorted(p.name for p in (proj / "slides").iterdir())
    with pytest.raises(UserError, match="where hcd score writes its outputs"):
        score(ScoreConfig(model=str(model_dir), input=str(proj / "slides"), out=str(proj), overwrite=True))
    with pytest.raises(UserError, match="inside --input"):
        score(ScoreConfig(model=str(model_dir), input=str(proj), out=str(proj / "preds"), overwrite=True))
    assert sorted(p.name for p in (proj / "slides").iterdir()) == before


# ---- the model artifact and --weights, checked on the driver --------------------------------

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
    _one_line_exit_2(capsys, ["score", "--model", str(m), "--input", str(synth_small),
                                      "--out", str(tmp_path / "o")], expect=expect)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["model.safetensors", "model.json"])
def test_a_model_file_instead_of_its_folder_names_the_folder_to_pass(name, synth_small, tmp_path, capsys, no_ray):
    """It used to be 'cannot read: ... Not a directory' about a path that does not exist."""
    m = _artifact(tmp_path)
    expect = "model." + name.split(".")[1] + ": a file, not a model artifact; pass the folder that holds model.json"
    with pytest.raises(ArtifactError, match=expect):
        load_model(str(m / name))
    _one_line_exit_2(capsys, ["score", "--model", str(m / name), "--input", str(synth_small),
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
    _one_line_exit_2(capsys, ["score", "--model", str(m), "--input", str(synth_small),
                              "--out", str(synth_small / "o")], expect="is inside --input")
    wider = dict(meta["arch_args"], widths=[*meta["arch_args"]["widths"][:-1], 1024])
    for edit, expect in [({"arch_args": wider}, "but model.json says hcdnet of shape"),
                         ({"arch": "resnet18", "arch_args": None}, "but model.json says resnet18")]:
        (m / "model.json").write_text(json.dumps({k: v for k, v in dict(meta, **edit).items() if v is not None}))
        with pytest.raises(ArtifactError, match=expect):
            check_artifact(str(m))
        _one_line_exit_2(capsys, ["score", "--model", str(m), "--input", str(synth_small),
                                  "--out", str(tmp_path / "o")], expect=expect)
    monkeypatch.undo()
    # Weights without the declaration: not an export of this format, refused before Ray.
    from safetensors.torch import save

    old, _ = build_model("hcdnet", arch_args={"stem": 8, "widths": [16]})
    blob = save({k: v.contiguous() for k, v in old.state_dict().items()})
    _rehash(m, blob, arch="hcdnet", arch_args=meta["arch_args"])
    with pytest.raises(ArtifactError, match="do not declare the model they hold, as every hcd-model/1 export's do"):
        check_artifact(str(m))
    _one_line_exit_2(capsys, ["score", "--model", str(m), "--input", str(synth_small),
                              "--out", str(tmp_path / "o")], expect="export the model again with this hcd")
    assert not (tmp_path / "o").exists()


def test_pickle_as_weights_is_one_line_before_ray(ten_patches, tmp_path, capsys, no_ray):
    folder, _ = ten_patches

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    line = _one_line_exit_2(capsys, ["train", "--data", str(folder), "--out", str(tmp_path / "r"),
                                             "--weights", str(tmp_path / "evil.pt")],
                            expect="evil.pt: not a state dict of tensors: it holds pickled Python objects")
    assert "refuses" in line and not Path("pwned").exists()
    other, _ = build_model("resnet18")
    torch.save(other.state_dict(), tmp_path / "r18.pt")
    _one_line_exit_2(capsys, ["train", "--data", str(folder), "--out", str(tmp_path / "r"),
                                      "--weights", str(tmp_path / "r18.pt")], expect="does not fit --arch hcdnet")


# ---- flags ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "expect"), [
    (["--mpp", "0"], "--mpp must be in [0.05, 20]"),
    (["--mpp", "-1"], "--mpp must be in [0.05, 20]"),
    (["--mpp", "500"], "--mpp must be in [0.05, 20]"),
    (["--mpp", "nan"], "--mpp must be in"),
    (["--tissue-threshold", "1.5"], "--tissue-threshold must be in [0, 1]"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--chunk-size", "-5"], "--chunk-size must be >= 1, got -5"),
    (["--tta", "3"], "--tta: invalid choice"),
    (["--cpus-per-actor", "-1"], "--cpus-per-actor must be >= 0, got -1.0"),
])
def test_bad_score_flags_are_one_line(flags, expect, model_dir, synth_small, tmp_path, capsys, no_ray):
    _one_line_exit_2(capsys, ["score", "--model", str(model_dir), "--input", str(synth_small),
                                      "--out", str(tmp_path / "o"), *flags], expect=expect)


@pytest.mark.parametrize(("argv", "expect"), [
    (["evaluate", "--predictions", "p", "--labels", "l.csv", "--out", "o", "--threshold", "2"], "--threshold must be"),
    (["evaluate", "--predictions", "p", "--labels", "l.csv", "--out", "o", "--target-sensitivity", "0"],
     "--target-sensitivity must be"),
    (["train", "--data", "d", "--out", "o", "--lr", "0"], "--lr must be in (0, 10]"),
    (["train", "--data", "d", "--out", "o", "--time-budget-min", "-3"], "--time-budget-min must be"),
    (["train", "--data", "d", "--out", "o", "--arch", "vgg11"], "--arch: invalid choice: 'vgg11'"),
])
def test_bad_flags_of_other_commands_are_one_line(argv, expect, capsys, no_ray):
    _one_line_exit_2(capsys, argv, expect=expect)


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(_args):
        raise KeyError("a bug, not the user's fault")

    monkeypatch.setitem(cli.COMMANDS, "submission", (cli.SubmissionConfig, broken))
    with pytest.raises(KeyError):  # not swallowed into exit code 2: Python prints it and exits 1
        cli.main(["submission", "--predictions", "p", "--out", "o.csv"])


def test_unlistable_sub_folder_is_named_and_the_rest_listed(synth_small, tmp_path, monkeypatch):
    import hcdlib.storage.listing as listing

    for sub in ("ok", "locked"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        shutil.copy(sorted(synth_small.glob("*.tif"))[0], tmp_path / "in" / sub / "a.tif")
    real = os.scandir

    def scandir(path):  # root reads any folder, so the refusal of one is simulated
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(listing.os, "scandir", scandir)
    found = list_files(str(tmp_path / "in"))
    assert found.files == [str(tmp_path / "in" / "ok" / "a.tif")]
    assert found.refused == [(str(tmp_path / "in" / "locked"),
                              "folder cannot be listed (Permission denied); its files are not read")]


# ---- the Ray address ------------------------------------------------------------------------

def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_ray_address_where_nothing_listens_is_refused_at_once(model_dir, synth_small, tmp_path):
    """``ray.init`` waited over two minutes, silently, at a closed port; hcd says so in a line."""
    import subprocess
    import sys

    address = f"127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "hcdlib.cli", "score", "--model", str(model_dir), "--input",
                          str(synth_small), "--out", str(tmp_path / "o"), "--address", address],
                         capture_output=True, text=True, timeout=120)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and f"no Ray cluster answers at {address}" in lines[0], lines
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "o" / "parts").exists()


def test_check_address_passes_a_listening_port_and_ray_lookups():
    import socket

    from hcdlib.raykit.cluster import check_address

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_address(f"127.0.0.1:{s.getsockname()[1]}")
        check_address(f"ray://127.0.0.1:{s.getsockname()[1]}")
    for lookup in ("auto", "local"):
        check_address(lookup)
    with pytest.raises(UserError, match=r"no Ray cluster answers at ray://127\.0\.0\.1"):
        check_address(f"ray://127.0.0.1:{_closed_port()}")
