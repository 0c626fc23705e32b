"""Chunks: the units of work and resume, read where a task runs, never larger than a patch may be."""

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from hcdlib.sources.chunks import (
    MAX_PATCH_BYTES,
    ROW_SCHEMA,
    FilesChunk,
    ShardChunk,
    footer_bytes,
    largest_chunk,
    read_patch_file,
)


def test_a_files_chunk_reads_its_files_and_keeps_listing_refusals_as_errors(synth_small, tmp_path):
    ids = sorted(p.stem for p in synth_small.glob("*.tif"))[:3]
    sources = tuple(str(synth_small / f"{i}.tif") for i in ids)
    c = FilesChunk("k", 3, ids=tuple(ids), sources=sources, labels=(1, 0, None), slide_ids=("s", None, None),
                   errors=(None, None, "refused at listing"))
    rows = c.rows()
    assert rows.column_names == [*ROW_SCHEMA.names, "error"] and c.expected_ids() == ids
    assert rows["image"][0].as_py() == (synth_small / f"{ids[0]}.tif").read_bytes()
    assert rows["image"][2].as_py() is None and rows["error"].to_pylist() == [None, None, "refused at listing"]
    got = c.read()
    assert got["pixels"].shape == (3, 96, 96, 3) and list(got["status"]) == ["ok", "ok", "error"]


def test_a_shard_chunk_reads_one_row_group_with_the_listed_footer_and_refuses_a_changed_shard(tmp_path):
    t = pa.table({"id": ["a", "b", "c", "d"], "image": pa.array([b"1", b"2", b"3", b"4"], pa.binary())})
    path = str(tmp_path / "s.parquet")
    pq.write_table(t, path, row_group_size=2)
    meta = pq.read_metadata(path)
    size = (tmp_path / "s.parquet").stat().st_size
    rows = ShardChunk("k", 2, shard=path, row_group=1, footer=footer_bytes(meta), shard_bytes=size).rows()
    assert rows["id"].to_pylist() == ["c", "d"] and rows.schema.field("label").type == pa.int64()
    assert rows["label"].null_count == 2 and rows["error"].null_count == 2  # columns a shard lacks: nulls
    stale = ShardChunk("k", 2, shard=path, row_group=1, footer=footer_bytes(meta), shard_bytes=size + 1)
    with pytest.raises(OSError, match="changed since it was listed"):  # not read with its old footer
        stale.rows()
    assert largest_chunk([stale, FilesChunk("x", 7, (), (), (), (), ())]) == 7 and largest_chunk([]) == 1


def test_a_patch_file_is_read_only_when_regular_and_small(tmp_path):
    fs = pafs.LocalFileSystem()
    (tmp_path / "p.tif").write_bytes(b"abc")
    assert read_patch_file(fs, str(tmp_path / "p.tif")) == (b"abc", None)
    assert "not a regular file" in read_patch_file(fs, str(tmp_path))[1]
    data, why = read_patch_file(fs, str(tmp_path / "missing.tif"))
    assert data is None and why.startswith("cannot read")
    assert MAX_PATCH_BYTES == 64 * 2**20
