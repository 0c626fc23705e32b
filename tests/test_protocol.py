"""Exactly-once chunk assembly, as a unit: no Ray, no timing."""

import pyarrow as pa

from hcdlib.predictions import ChunkAssembler


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
