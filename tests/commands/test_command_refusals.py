"""Misused locations and flags of every command: one line naming the fix, exit code 2, before Ray."""

import logging
import shutil

import pytest
from conftest import one_line_exit_2

from hcdlib import cli
from hcdlib.commands.score.run import ScoreConfig, score
from hcdlib.errors import UserError
from hcdlib.model.architectures import build_model
from hcdlib.model.artifact import check_artifact, export_model
from hcdlib.storage import uri as urimod


@pytest.mark.parametrize("argv", [
    ["score", "--model", "{model}", "--input", "{input}"], ["pack", "--input", "{input}"],
    ["train", "--data", "{input}"], ["evaluate", "--predictions", "{input}", "--labels", "{labels}"],
    ["synth", "--n", "5"], ["demo"]])
def test_an_out_that_a_file_stands_in_is_one_line(argv, any_model, synth_small, tmp_path, capsys, no_ray):
    """The first write used to fail in pyarrow with a traceback (FileExistsError); the file is left alone."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    args = [a.format(model=any_model, input=synth_small, labels=synth_small / "labels.csv") for a in argv]
    for out in (blocker, blocker / "sub"):
        one_line_exit_2(capsys, [*args, "--out", str(out)], expect=f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("argv", [
    ["score", "--model", "{model}", "--input", "{input}"], ["pack", "--input", "{input}"],
    ["train", "--data", "{input}"], ["evaluate", "--predictions", "{input}", "--labels", "{labels}"]])
def test_an_out_named_like_a_file_is_one_line(argv, any_model, synth_small, tmp_path, capsys, no_ray):
    """`--out preds.csv` made a folder of that name, holding Parquet parts: not the CSV a user meant."""
    args = [a.format(model=any_model, input=synth_small, labels=synth_small / "labels.csv") for a in argv]
    for name, hint in (("preds.csv", " (hcd submission --out writes one CSV)"), ("model.pt", "")):
        line = one_line_exit_2(capsys, [*args, "--out", str(tmp_path / name)],
                                expect=f"names a {name[name.index('.'):]} file, and --out is a folder")
        assert line.endswith("give a folder name" + hint)
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("argv", [
    ["score", "--model", "{model}", "--input", "{input}"], ["pack", "--input", "{input}"],
    ["train", "--data", "{input}"], ["evaluate", "--predictions", "{input}", "--labels", "{labels}"],
    ["submission", "--predictions", "{input}"], ["synth", "--n", "5"], ["demo"]])
def test_a_relative_out_in_a_ray_jobs_working_dir_copy_is_one_line(argv, any_model, synth_small, tmp_path, capsys,
                                                                    monkeypatch, no_ray):
    """A relative --out in `ray job submit --working-dir .` went into Ray's copy of the folder, deleted later.

    The user's own folder never saw the predictions.
    """
    args = [a.format(model=any_model, input=synth_small, labels=synth_small / "labels.csv") for a in argv]
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1234"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv(urimod.RAY_JOB_ENV, "{}")
    out = "preds.csv" if argv[0] == "submission" else "preds"
    line = one_line_exit_2(capsys, [*args, "--out", out], expect=f"--out {out}: a relative path in a Ray job lies")
    assert str(copy) in line and line.endswith("give an absolute path (on storage every node of the cluster sees) "
                                               "or an s3:// URI")
    assert list(copy.iterdir()) == []
    if argv[0] == "demo":  # its default --out is relative too
        one_line_exit_2(capsys, args, expect="--out hcd-demo: a relative path in a Ray job lies")
    # an absolute --out, a Ray job run from elsewhere, and a plain command are not affected
    urimod.check_kept(str(tmp_path / "preds"), "--out")
    urimod.check_kept("s3://bucket/preds", "--out")
    monkeypatch.chdir(tmp_path)
    urimod.check_kept("preds", "--out")
    monkeypatch.chdir(copy)
    monkeypatch.delenv(urimod.RAY_JOB_ENV)
    urimod.check_kept("preds", "--out")


def test_score_out_inside_the_model_folder_is_one_line(any_model, synth_small, tmp_path, capsys, no_ray):
    """Predictions were written into the model artifact's folder, beside its weights."""
    model = tmp_path / "model"
    shutil.copytree(any_model, model)
    before = sorted(p.name for p in model.iterdir())
    for out in (model, model / "preds"):
        one_line_exit_2(capsys, ["score", "--model", str(model), "--input", str(synth_small), "--out", str(out)],
                         expect=f"--out {out} is inside --model {model}: the predictions would be written into")
    assert sorted(p.name for p in model.iterdir()) == before


def test_an_out_in_a_bucket_that_does_not_exist_is_one_line(any_model, synth_small, bucket, capsys, no_ray):
    """The first write used to fail in pyarrow ("Bucket not found") with a traceback."""
    for argv in (["score", "--model", str(any_model), "--input", str(synth_small)],
                 ["train", "--data", str(synth_small)]):
        one_line_exit_2(capsys, [*argv, "--out", "s3://hcd-no-such-bucket/run"],
                         expect="--out s3://hcd-no-such-bucket/run: bucket hcd-no-such-bucket does not exist")
    urimod.check_folder(f"{bucket}/not/yet/written")  # a bucket that exists: its folders need not


def test_mpp_for_patches_is_refused(any_model, synth_small, tmp_path, capsys, no_ray):
    """--mpp on patches was ignored without a word: they were scored as they were."""
    one_line_exit_2(capsys, ["score", "--model", str(any_model), "--input", str(synth_small), "--out",
                              str(tmp_path / "o"), "--mpp", "0.5"],
                     expect=f"--mpp 0.5 sets the resolution of whole-slide images, and {synth_small} holds patches")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["score", "--model", "m", "--input", "{uri}", "--out", "o"],
                                  ["train", "--data", "d", "--out", "{uri}"],
                                  ["pack", "--input", "{uri}", "--out", "o"]])
def test_an_s3_uri_with_credentials_is_refused_without_repeating_them(argv, capsys, no_ray):
    uri = "s3://AKIAEXAMPLE:s3cr3tKEY@bucket/prefix"
    line = one_line_exit_2(capsys, [a.format(uri=uri) for a in argv],
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


def test_overwrite_never_deletes_the_input(any_model, synth_small, tmp_path, no_ray):
    proj = tmp_path / "proj"
    shutil.copytree(synth_small, proj / "slides")  # the example: --input proj/slides --out proj
    before = sorted(p.name for p in (proj / "slides").iterdir())
    with pytest.raises(UserError, match="where hcd score writes its outputs"):
        score(ScoreConfig(model=str(any_model), input=str(proj / "slides"), out=str(proj), overwrite=True))
    with pytest.raises(UserError, match="inside --input"):
        score(ScoreConfig(model=str(any_model), input=str(proj), out=str(proj / "preds"), overwrite=True))
    assert sorted(p.name for p in (proj / "slides").iterdir()) == before


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
def test_bad_score_flags_are_one_line(flags, expect, any_model, synth_small, tmp_path, capsys, no_ray):
    one_line_exit_2(capsys, ["score", "--model", str(any_model), "--input", str(synth_small),
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
    one_line_exit_2(capsys, argv, expect=expect)


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(_args):
        raise KeyError("a bug, not the user's fault")

    monkeypatch.setitem(cli.COMMANDS, "submission", (cli.SubmissionConfig, broken))
    with pytest.raises(KeyError):  # not swallowed into exit code 2: Python prints it and exits 1
        cli.main(["submission", "--predictions", "p", "--out", "o.csv"])
