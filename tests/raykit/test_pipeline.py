"""The read stage shared by training and scoring, called as Ray Data calls it (no Ray started)."""

import numpy as np
import pyarrow as pa

from hcdlib.raykit.pipeline import labelled_ok, patch_bytes, read_decode, skipped_rows
from hcdlib.sources.chunks import FilesChunk


def _chunk(synth_small, key: str, n: int) -> FilesChunk:
    ids = sorted(p.stem for p in synth_small.glob("*.tif"))[:n]
    return FilesChunk(key, n, ids=tuple(ids), sources=tuple(str(synth_small / f"{i}.tif") for i in ids),
                      labels=(1,) * n, slide_ids=(None,) * n, errors=(None,) * (n - 1) + ("refused",))


def test_read_decode_yields_each_chunk_in_blocks_that_name_chunk_and_row(synth_small):
    blocks = list(read_decode({"chunk": [_chunk(synth_small, "a", 5), _chunk(synth_small, "b", 3)]}, block_rows=2))
    assert [b.num_rows for b in blocks] == [2, 2, 1, 2, 1]  # never a block across two chunks
    t = pa.concat_tables(blocks)
    assert t["chunk"].to_pylist() == ["a"] * 5 + ["b"] * 3 and t["row"].to_pylist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert t["status"].to_pylist()[4] == "error" and t.schema.field("pixels").type.shape == (96, 96, 3)
    assert patch_bytes(2) == 2 * 96 * 96 * 3


def test_training_keeps_labelled_ok_rows_and_records_the_others_once(tmp_path):
    batch = {"status": np.array(["ok", "error", "ok", "ok"], object), "label": np.array([1.0, 0.0, np.nan, 0.0]),
             "pixels": np.zeros((4, 96, 96, 3), np.uint8), "chunk": np.array(["c"] * 4, object),
             "row": np.arange(4), "id": np.array(["p0", "p1", "p2", "p3"], object),
             "error": np.array([None, "not an image", None, None], object)}
    skipped = str(tmp_path / "skipped")
    out = labelled_ok(batch, skipped=skipped)
    assert out["label"].tolist() == [1, 0] and out["label"].dtype == np.int64 and len(out["pixels"]) == 2
    labelled_ok(batch, skipped=skipped)  # the same batch read again (another epoch) writes the same file
    got = skipped_rows(skipped)
    assert got.to_pydict() == {"chunk": ["c", "c"], "row": [1, 2], "id": ["p1", "p2"],
                               "error": ["not an image", "no label"]}
    assert skipped_rows(str(tmp_path / "none")).num_rows == 0
