import numpy as np
import pyarrow.parquet as pq
import pytest

from hcdlib.commands.pack import PackConfig, pack, read_packed
from hcdlib.commands.synth import SynthConfig, write_synth
from hcdlib.sources.chunks import FilesChunk
from hcdlib.sources.decode import decode_patch, decode_table
from hcdlib.sources.factory import open_source
from hcdlib.storage.listing import SourceError


@pytest.fixture(scope="module")
def synth_10k(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth10k") / "kaggle"
    write_synth(SynthConfig(out=str(out), n=10_000, slides=8, seed=3))
    return out


@pytest.mark.slow
def test_pack_round_trip_10k(synth_10k, tmp_path):
    out = tmp_path / "shards"
    manifest = pack(PackConfig(input=str(synth_10k), out=str(out), rows_per_file=2500))
    assert manifest["rows"] == 10_000 and len(manifest["files"]) == 4
    packed = read_packed(str(out))
    original = open_source(str(synth_10k))
    assert sorted(packed["id"].to_pylist()) == sorted(original.items["id"].to_pylist())
    # Lossless patches are stored decoded: no bytes kept, and the pixels are the file's, exactly.
    assert packed["image"].null_count == 10_000 and packed["pixels"].null_count == 0
    decoded = decode_table(packed)
    row = {pid: i for i, pid in enumerate(decoded["id"])}
    rng = np.random.default_rng(0)
    for i in rng.choice(10_000, 300, replace=False):
        pid = original.items["id"][int(i)].as_py()
        with open(original.items["source"][int(i)].as_py(), "rb") as f:
            raw = f.read()
        assert decoded["status"][row[pid]] == "ok"
        np.testing.assert_array_equal(decoded["pixels"][row[pid]], decode_patch(raw).pixels)
    assert packed["label"].null_count == 0 and packed["slide_id"].null_count == 0


def test_patch_columns_are_lz4_without_a_dictionary(synth_small, tmp_path):
    """Scoring reads the pixels on its critical path: zstd made that read 5x slower than LZ4."""
    out = tmp_path / "shards"
    pack(PackConfig(input=str(synth_small), out=str(out)))
    shard = next(out.rglob("*.parquet"))
    group = pq.read_metadata(shard).row_group(0)
    cols = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    for name in ("pixels", "image"):
        assert cols[name].compression == "LZ4" and not cols[name].has_dictionary_page, name
    assert cols["id"].compression == "ZSTD" and cols["slide_id"].has_dictionary_page
    packed = read_packed(str(out))
    assert packed["pixels"].null_count == 0  # and they are the files' pixels (the round trip above)


def test_pack_is_atomic_and_resumable(synth_small, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    real_read = FilesChunk.rows
    calls = {"n": 0}

    def flaky_read(chunk):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("simulated crash while reading shard 3")
        return real_read(chunk)

    monkeypatch.setattr(FilesChunk, "rows", flaky_read)
    with pytest.raises(OSError, match="simulated crash"):
        pack(PackConfig(input=str(synth_small), out=str(out), rows_per_file=50, threads=1))
    written = sorted(p.name for p in (out / "parts").iterdir())
    # only complete shards (the failed one absent), no manifest, no partial file of any name
    assert "part-files-000002.parquet" not in written and not (out / "_SUCCESS").exists()
    assert all(n.startswith("part-files-") and n.endswith(".parquet") for n in written)
    assert len(written) >= 2
    for name in written:
        assert pq.read_metadata(out / "parts" / name).num_rows == 50
    mtimes = {n: (out / "parts" / n).stat().st_mtime_ns for n in written}
    # The unfinished pack is not an input: its shards are some of the patches (it used to be read
    # with a warning), nor are its parts/ read on their own.
    for unfinished in (out, out / "parts"):
        with pytest.raises(SourceError, match=r"hcd pack that has not finished .* run the same hcd pack command"):
            open_source(str(unfinished))

    monkeypatch.undo()
    manifest = pack(PackConfig(input=str(synth_small), out=str(out), rows_per_file=50, threads=1))
    assert manifest["rows"] == 300 and len(manifest["files"]) == 6
    assert {n: (out / "parts" / n).stat().st_mtime_ns for n in written} == mtimes  # kept, not rewritten
    assert (out / "_SUCCESS").exists()
    assert open_source(str(out)).num_patches == open_source(str(out / "parts")).num_patches == 300


def test_reader_takes_only_manifest_listed_shards(synth_small, tmp_path):
    out = tmp_path / "shards"
    pack(PackConfig(input=str(synth_small), out=str(out), rows_per_file=100))
    # a stray file (e.g. from another tool) is not part of the pack
    (out / "stray.parquet").write_bytes((out / "parts" / "part-files-000000.parquet").read_bytes())
    src = open_source(str(out))
    assert src.num_patches == 300
    rows = sum(c.rows().num_rows for c in src.chunks())
    assert rows == 300


def test_shards_packed_without_labels_say_to_repack_with_them(synth_small, tmp_path):
    """The fix used to be "give --labels", which shards refuse: the user went round in a circle."""
    from hcdlib.sources.labels import check_labelled

    plain = tmp_path / "plain"
    for p in sorted(synth_small.glob("*.tif"))[:20]:  # the patches without their labels.csv (a test set)
        plain.mkdir(exist_ok=True)
        (plain / p.name).write_bytes(p.read_bytes())
    pack(PackConfig(input=str(plain), out=str(tmp_path / "shards")))
    with pytest.raises(SourceError, match=r"20 of 20 training patches have no label .*; they were packed without "
                                          r"labels: pack the patches again with hcd pack --labels <CSV>$"):
        check_labelled(open_source(str(tmp_path / "shards")), "training")


def test_a_pack_missing_shards_its_manifest_lists_says_so_and_a_rerun_restores_them(synth_small, tmp_path, caplog):
    """A removed shard failed as 'not a readable Parquet shard', all of them as 'no patch images'."""
    import logging

    out = tmp_path / "shards"
    pack(PackConfig(input=str(synth_small), out=str(out), rows_per_file=100))
    parts = sorted((out / "parts").glob("*.parquet"))
    parts[1].unlink()
    fix = "run the same hcd pack command again to write them again"
    missing = rf"1 of the 3 shards its _SUCCESS lists are missing \(e\.g\. {parts[1]}\); {fix}"
    with pytest.raises(SourceError, match=missing):
        open_source(str(out))
    for p in parts:
        p.unlink(missing_ok=True)
    with pytest.raises(SourceError, match=r"3 of the 3 shards its _SUCCESS lists are missing"):
        open_source(str(out))
    pack(PackConfig(input=str(synth_small), out=str(out), rows_per_file=100))
    assert open_source(str(out)).num_patches == 300
    # Spark and Hadoop leave an empty _SUCCESS beside their part files: a marker, not a manifest
    spark = tmp_path / "spark"
    spark.mkdir()
    for p in parts:
        (spark / p.name).write_bytes(p.read_bytes())
    (spark / "_SUCCESS").write_bytes(b"")
    caplog.set_level(logging.WARNING)
    caplog.clear()
    assert open_source(str(spark)).num_patches == 300
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_repacking_shards_reruns_and_refuses_foreign_files(synth_small, tmp_path):
    from hcdlib.errors import UserError

    pack(PackConfig(input=str(synth_small), out=str(tmp_path / "a"), rows_per_file=100))
    first = pack(PackConfig(input=str(tmp_path / "a"), out=str(tmp_path / "b")))  # shards -> shards
    again = pack(PackConfig(input=str(tmp_path / "a"), out=str(tmp_path / "b")))  # a rerun keeps them
    assert first["rows"] == again["rows"] == 300 and first["files"] == again["files"]
    foreign = tmp_path / "c" / "parts"
    foreign.mkdir(parents=True)
    (foreign / "part-files-000000.parquet").write_bytes(b"not ours")  # somebody else's file: never overwritten
    with pytest.raises(UserError, match=r"holds parts that hcd did not write \(no _RUN.json\)"):
        pack(PackConfig(input=str(synth_small), out=str(foreign.parent), rows_per_file=100))
    assert (foreign / "part-files-000000.parquet").read_bytes() == b"not ours"
    # another input into a finished pack: refused, unless --overwrite (which replaces only hcd's files)
    with pytest.raises(UserError, match="holds a run with a different input"):
        pack(PackConfig(input=str(synth_small), out=str(tmp_path / "b")))
    (tmp_path / "b" / "notes.txt").write_text("mine")
    assert pack(PackConfig(input=str(synth_small), out=str(tmp_path / "b"), overwrite=True))["rows"] == 300
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
