"""Locations: atomic writes, joins, and what a URI may be."""

import os

import pytest

from hcdlib.errors import UserError
from hcdlib.storage import uri as urimod


def test_atomic_write_fsyncs_before_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    urimod.write_bytes_atomic(str(tmp_path / "f"), b"data")
    assert calls == ["fsync", "replace", "fsync"]  # the file, the rename, then the directory
    assert (tmp_path / "f").read_bytes() == b"data" and os.listdir(tmp_path) == ["f"]


def test_join_and_resolve_keep_the_scheme_and_make_local_paths_absolute(tmp_path, monkeypatch):
    assert urimod.join("s3://b/runs/", "a", "b.json") == "s3://b/runs/a/b.json"
    assert urimod.join(str(tmp_path), "a") == str(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    assert urimod.absolute("preds") == str(tmp_path / "preds")
    assert urimod.absolute("file://preds") == f"file://{tmp_path / 'preds'}"
    assert urimod.absolute("s3://b/x") == "s3://b/x" and urimod.absolute(None) is None
    fs, path = urimod.resolve("file://" + str(tmp_path / "x"))
    assert path == str(tmp_path / "x") and urimod.to_uri(fs, path) == path
    assert urimod.resolve("s3://bucket/key/")[1] == "bucket/key"


def test_within_resolves_links_and_never_mixes_storages(tmp_path):
    (tmp_path / "proj" / "slides").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "proj")
    assert urimod.within(str(tmp_path / "link" / "slides" / "out"), str(tmp_path / "proj"))
    assert urimod.within(str(tmp_path / "proj" / ".." / "proj"), str(tmp_path / "proj"))
    assert not urimod.within(str(tmp_path / "projects"), str(tmp_path / "proj"))  # a prefix is not a parent
    assert urimod.within("s3://b/in/out", "s3://b/in") and not urimod.within("s3://b/input", "s3://b/in")
    assert not urimod.within("s3://b/in", str(tmp_path))


def test_an_out_folder_is_refused_where_a_file_stands_or_its_name_is_a_files(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserError, match=r"is a file, not a folder"):
        urimod.check_folder(str(tmp_path / "f.txt" / "out"))
    with pytest.raises(UserError, match=r"names a \.csv file.*hcd submission --out writes one CSV"):
        urimod.check_folder(str(tmp_path / "preds.csv"))
    (tmp_path / "old.parquet").mkdir()  # an earlier run's folder of that name is fine
    urimod.check_folder(str(tmp_path / "old.parquet"))
    with pytest.raises(UserError, match=r"--out .* is inside --input"):
        urimod.check_outside(str(tmp_path / "in" / "o"), [("--input", str(tmp_path / "in")), ("--labels", None)])


def test_delete_and_exists_on_files_and_trees(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_bytes(b"1")
    assert urimod.exists(str(tmp_path / "d")) and not urimod.is_file(str(tmp_path / "d"))
    assert urimod.is_file(str(tmp_path / "d" / "e" / "f"))
    urimod.delete(str(tmp_path / "d"))
    urimod.delete(str(tmp_path / "missing"))  # nothing there: fine
    assert not urimod.exists(str(tmp_path / "d"))
