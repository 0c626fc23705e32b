"""Slides on S3 are downloaded once per node and run, shared by every task, and cleaned up."""

import os
import threading
from pathlib import Path

import pytest

from hcdlib.storage import staging
from hcdlib.storage import uri as urimod


@pytest.fixture()
def downloads(monkeypatch) -> list[str]:
    """Every download the staging code makes (what S3 would be asked for, whole slides)."""
    got: list[str] = []
    real = staging._download

    def counting(slide_uri, dest):
        got.append(slide_uri)
        real(slide_uri, dest)

    monkeypatch.setattr(staging, "_download", counting)
    return got


def _put(uri: str, data: bytes) -> None:
    fs, path = urimod.resolve(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)


def test_a_slide_is_downloaded_once_per_run_and_node(bucket, tmp_path, downloads):
    slide = f"{bucket}/a/s1.svs"
    _put(slide, b"slide bytes" * 1000)
    opened = []

    def task():  # four read tasks of the same slide at once, as Ray runs them on one node
        with staging.local_slide(slide, stage="run1", root=str(tmp_path)) as path:
            opened.append(path)
            assert Path(path).read_bytes() == b"slide bytes" * 1000

    threads = [threading.Thread(target=task) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert downloads == [slide] and len(set(opened)) == 1  # one download; every task read the same copy
    with staging.local_slide(slide, stage="run1", root=str(tmp_path)):
        pass
    assert downloads == [slide]  # a later task (or a resumed run) finds it staged
    staging.remove_stage("run1", root=str(tmp_path))
    assert not (tmp_path / "run1").exists() and tmp_path.exists()


def test_without_a_stage_the_copy_is_private_and_removed(bucket, downloads):
    slide = f"{bucket}/s2.svs"
    _put(slide, b"x" * 10)
    with staging.local_slide(slide) as path:
        assert Path(path).read_bytes() == b"x" * 10
    assert not os.path.exists(path) and downloads == [slide]


def test_local_slides_are_never_copied(tmp_path, downloads):
    (tmp_path / "s.svs").write_bytes(b"local")
    with staging.local_slide(str(tmp_path / "s.svs"), stage="run1", root=str(tmp_path / "stage")) as path:
        assert path == str(tmp_path / "s.svs")
    assert downloads == [] and not (tmp_path / "stage").exists()


def test_a_full_disk_evicts_the_least_recently_used_slides(bucket, tmp_path, downloads, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")

    def disk(folder):  # a 5,000-byte disk: the budget is half of it, two 1,000-byte slides
        staged = sum(p.stat().st_size for p in (tmp_path / "r").glob("*.svs"))
        return usage(5000, staged, 5000 - staged)

    monkeypatch.setattr(staging.shutil, "disk_usage", disk)
    s0, s1, s2 = (f"{bucket}/s{i}.svs" for i in range(3))
    for s in (s0, s1, s2):
        _put(s, b"y" * 1000)

    def use(s):
        with staging.local_slide(s, stage="r", root=str(tmp_path)) as path:
            assert Path(path).read_bytes() == b"y" * 1000

    use(s0)
    use(s1)
    use(s0)  # used again: s1 is now the least recently used
    use(s2)  # no room for three: s1 goes
    assert downloads == [s0, s1, s2] and len(list((tmp_path / "r").glob("*.svs"))) == 2
    use(s0)
    assert downloads == [s0, s1, s2]  # s0 stayed
    use(s1)
    assert downloads == [s0, s1, s2, s1]  # s1 had gone: downloaded again


def test_stage_key_is_stable_for_a_rerun_and_differs_between_runs():
    assert staging.stage_key("s3://b/out", "abc") == staging.stage_key("s3://b/out", "abc")
    assert staging.stage_key("s3://b/out", "abc") != staging.stage_key("s3://b/out2", "abc")


def test_the_server_sends_a_staged_slide_once(bucket, s3_server, tmp_path):
    """Counted by the S3 server itself (moto's recorder, as the benchmark counts): one slide's bytes, no more."""
    import boto3

    from hcdlib.storage.s3local import recorded

    slide, data = f"{bucket}/c/s3.svs", os.urandom(3 * 2**20 + 17)
    _put(slide, data)
    with recorded(s3_server) as sent:
        for _ in range(3):  # three tasks of the run, one after another
            with staging.local_slide(slide, stage="run3", root=str(tmp_path)) as path:
                assert Path(path).read_bytes() == data
        fs, path = urimod.resolve(slide)
        with fs.open_input_file(path) as f:  # and one ranged read outside staging
            assert f.read_at(1000, 5) == data[5:1005]
        # and a suffix range (the last 100 bytes), as some readers ask for a footer
        bucket_name, key = slide[len("s3://"):].split("/", 1)
        tail = boto3.client("s3").get_object(Bucket=bucket_name, Key=key, Range="bytes=-100")["Body"].read()
        assert tail == data[-100:]
    assert sent == {slide[len("s3://"):]: len(data) + 1000 + 100}


def test_a_mirax_slide_is_staged_with_its_data_folder(bucket, tmp_path, downloads, monkeypatch):
    """OpenSlide opens s.mrxs with the folder s/ beside it; staged alone, a MIRAX slide on S3 could not be read."""
    from collections import namedtuple

    files = {"Slidedat.ini": b"[GENERAL]", "Data0000.dat": b"d" * 300, "more/Data0001.dat": b"e" * 200}
    for name in ("m1", "m2"):
        _put(f"{bucket}/x/{name}.mrxs", b"mirax index")
        for rel, data in files.items():
            _put(f"{bucket}/x/{name}/{rel}", data)
    _put(f"{bucket}/x/m1-notes.txt", b"not part of it")

    def staged_as(path: str) -> dict[str, bytes]:
        folder = Path(path).with_suffix("")
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    with staging.local_slide(f"{bucket}/x/m1.mrxs") as path:  # a private copy
        assert Path(path).read_bytes() == b"mirax index" and staged_as(path) == files
    assert not os.path.exists(path) and downloads[-1] == f"{bucket}/x/m1.mrxs"  # the slide file last
    downloads.clear()
    for _ in range(2):
        with staging.local_slide(f"{bucket}/x/m1.mrxs", stage="r", root=str(tmp_path)) as path:
            assert staged_as(path) == files
    assert sorted(downloads) == sorted([f"{bucket}/x/m1.mrxs", *(f"{bucket}/x/m1/{r}" for r in files)])
    # A full disk evicts a slide with its data folder: room for one MIRAX slide (511 bytes) only.
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda folder: usage(1200, 511, 1200 - 511))
    with staging.local_slide(f"{bucket}/x/m2.mrxs", stage="r", root=str(tmp_path)) as second:
        assert staged_as(second) == files
    assert not os.path.exists(path) and not os.path.exists(Path(path).with_suffix(""))
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if not p.name.endswith(".lock")) == sorted(
        [Path(second).name, Path(second).stem])
