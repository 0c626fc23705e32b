"""Reading committed outputs, the Kaggle submission, and an output folder claimed by a run."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from conftest import one_line_exit_2

from hcdlib import cli
from hcdlib.errors import UserError
from hcdlib.outputs import readers
from hcdlib.outputs import runfolder as preds
from hcdlib.storage import uri as urimod


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
    one_line_exit_2(capsys, ["evaluate", "--predictions", str(synth_small), "--labels",
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
    one_line_exit_2(capsys, ["submission", "--predictions", str(out), "--out", str(tmp_path / "sub.csv")],
                     expect="predictions of whole-slide tiles, and a Kaggle submission lists the patch ids")
    assert not (tmp_path / "sub.csv").exists()


def test_submission_never_replaces_a_file_without_overwrite(tmp_path, capsys):
    """``--out train_labels.csv`` by mistake used to replace the user's labels without a word."""
    out = tmp_path / "out"
    _committed(out, {"a": [("p1", 0.25), ("p2", 0.5)]})
    theirs = tmp_path / "train_labels.csv"
    theirs.write_text("id,label\np1,1\np2,0\n")
    one_line_exit_2(capsys, ["submission", "--predictions", str(out), "--out", str(theirs)],
                     expect=f"--out {theirs} exists: hcd does not replace a file it may not have written")
    assert theirs.read_text() == "id,label\np1,1\np2,0\n"
    assert cli.main(["submission", "--predictions", str(out), "--out", str(theirs), "--overwrite"]) == 0
    for flags in ([], ["--overwrite"]):  # a folder: with --overwrite, os.replace's IsADirectoryError traceback
        one_line_exit_2(capsys, ["submission", "--predictions", str(out), "--out", str(tmp_path), *flags],
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
