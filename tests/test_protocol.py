"""The commit protocol as a unit: exactly-once chunk assembly and what a commit checks; no Ray, no timing."""

import json
from types import SimpleNamespace

import pyarrow as pa
import pytest

from hcdlib import predictions as preds
from hcdlib.errors import RunStopped
from hcdlib.predictions import ChunkAssembler
from hcdlib.score import ScoreConfig, _commit


def _rows(chunk: str, rows: list[int]) -> pa.Table:
    return pa.table({"chunk": [chunk] * len(rows), "row": pa.array(rows, pa.int64()),
                     "id": [f"{chunk}-{r}" for r in rows]})


def test_chunk_arriving_in_many_out_of_order_pieces_comes_back_once_in_order():
    a = ChunkAssembler({"c1": 5})
    assert a.add(_rows("c1", [3, 1])) == []
    assert a.add(_rows("c1", [4])) == []
    [(key, rows)] = a.add(_rows("c1", [0, 2]))
    assert key == "c1" and rows["row"].to_pylist() == [0, 1, 2, 3, 4]
    assert rows["id"].to_pylist() == [f"c1-{i}" for i in range(5)]


def test_retried_rows_count_once_and_late_repeats_are_dropped():
    a = ChunkAssembler({"c1": 3, "c2": 2})
    assert a.add(_rows("c1", [0, 1])) == []
    assert a.add(_rows("c1", [1, 0])) == []  # a retry repeats rows already in: still incomplete
    [(key, rows)] = a.add(pa.concat_tables([_rows("c2", [0]), _rows("c1", [2, 2])]))
    assert key == "c1" and rows["row"].to_pylist() == [0, 1, 2]
    assert a.add(_rows("c1", [0, 1, 2])) == []  # a whole retried chunk after the hand-back: ignored
    [(key, rows)] = a.add(_rows("c2", [1, 0]))
    assert key == "c2" and rows.num_rows == 2 and a.done == {"c1", "c2"}


def test_interleaved_chunks_in_one_batch_complete_together():
    a = ChunkAssembler({"x": 2, "y": 1, "z": 2})
    done = a.add(pa.concat_tables([_rows("y", [0]), _rows("x", [1]), _rows("z", [0]), _rows("x", [0])]))
    assert sorted(k for k, _ in done) == ["x", "y"]
    assert [k for k, _ in a.add(_rows("z", [1]))] == ["z"]


def test_a_commit_refuses_parts_of_another_run_that_took_over_the_folder(tmp_path):
    """Two commands into one --out, the second with --overwrite: the first's commit listed the second's parts."""
    out = tmp_path / "preds"
    cfg = ScoreConfig(model="m", input="i", out=str(out))
    spec = {"input": "i", "input_fingerprint": "f", "model": "hcdnet-aaa", "tta": 1, "chunk_size": 2}
    chunks = [SimpleNamespace(key=k, num_rows=2) for k in ("c0", "c1")]

    def part(key: str, model: str) -> None:
        preds.write_part(str(out / preds.PARTS / preds.part_name(key)), pa.table({
            "id": [f"{key}a", f"{key}b"], "prob": pa.array([0.1, 0.9], pa.float32()), "status": ["ok", "ok"],
            "source": ["s", "s"], "model": [model, model]}))

    preds.claim_output(str(out), spec, overwrite=False)
    part("c0", "hcdnet-aaa")
    part("c1", "hcdnet-bbb")  # the other run's model
    with pytest.raises(RunStopped, match=r"part-c1.parquet holds predictions of model hcdnet-bbb, not of this run's "
                                         r"hcdnet-aaa: another hcd run wrote into the same --out while this one ran"):
        _commit(cfg, chunks, spec, 1.0)
    assert not (out / preds.MANIFEST).exists()
    part("c1", "hcdnet-aaa")
    (out / preds.RUN_SPEC).write_text(json.dumps(dict(spec, model="hcdnet-bbb")))  # the other run's spec
    with pytest.raises(RunStopped, match=r"_RUN.json is no longer this run's: another hcd run"):
        _commit(cfg, chunks, spec, 1.0)
    (out / preds.RUN_SPEC).write_text(json.dumps(dict(spec, job="score")))  # ours (an older hcd's extra key)
    assert _commit(cfg, chunks, spec, 1.0)["rows"] == 4 and (out / preds.MANIFEST).exists()
