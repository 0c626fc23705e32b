"""Listing an input: what must not be read is refused or named; the rest is listed."""

import os
import shutil
import signal

import pyarrow as pa
import pytest
from conftest import copy_patches

from hcdlib.sources import chunks
from hcdlib.sources.factory import open_source
from hcdlib.storage.listing import SourceError, list_files


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


def test_a_listing_is_sorted_recursive_and_leaves_macos_metadata_out(tmp_path, caplog):
    (tmp_path / "b" / "__MACOSX").mkdir(parents=True)
    for name in ("z.tif", "a.tif", "b/c.tif", "._a.tif", "b/__MACOSX/c.tif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "b" / "link").symlink_to(tmp_path / "b")  # a linked folder: named, not entered
    got = list_files(str(tmp_path))
    assert got.files == [str(tmp_path / n) for n in ("a.tif", "b/c.tif", "z.tif")]
    assert got.refused == [(str(tmp_path / "b" / "link"), "symlink to a folder; not followed")]
    assert "2 macOS metadata files" in caplog.text
    one = list_files(str(tmp_path / "a.tif"))  # a single file lists as itself
    assert one.files == [str(tmp_path / "a.tif")] and one.root == str(tmp_path / "a.tif")
    with pytest.raises(SourceError, match="no such file or directory"):
        list_files(str(tmp_path / "missing"))
