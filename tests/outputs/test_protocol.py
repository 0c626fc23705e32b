"""The commit protocol as a unit: exactly-once assembly, what a commit checks, what a stopped run lets go; no Ray."""

import gc
import json
import threading
import time
import weakref
from types import SimpleNamespace

import pyarrow as pa
import pytest

from hcdlib.commands.score.commit import commit
from hcdlib.commands.score.run import ScoreConfig
from hcdlib.errors import RunStopped, release_frames
from hcdlib.outputs import runfolder as preds
from hcdlib.outputs.assembly import ChunkAssembler


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

    preds.RunFolder(str(out)).claim(spec, overwrite=False)
    part("c0", "hcdnet-aaa")
    part("c1", "hcdnet-bbb")  # the other run's model
    with pytest.raises(RunStopped, match=r"part-c1.parquet holds predictions of model hcdnet-bbb, not of this run's "
                                         r"hcdnet-aaa: another hcd run wrote into the same --out while this one ran"):
        commit(cfg, chunks, spec, 1.0)
    assert not (out / preds.MANIFEST).exists()
    part("c1", "hcdnet-aaa")
    (out / preds.RUN_SPEC).write_text(json.dumps(dict(spec, model="hcdnet-bbb", format=preds.RUN_FORMAT)))
    with pytest.raises(RunStopped, match=r"_RUN.json is no longer this run's: another hcd run"):
        commit(cfg, chunks, spec, 1.0)
    (out / preds.RUN_SPEC).write_text(json.dumps(dict(spec, job="score", format=preds.RUN_FORMAT)))  # an extra key
    assert commit(cfg, chunks, spec, 1.0)["rows"] == 4 and (out / preds.MANIFEST).exists()


def test_a_stopped_run_lets_go_of_what_the_frames_of_a_still_running_thread_held():
    """A kept traceback (a log record) lets go of the locals of a thread that was still finishing.

    Ray Data raises a task's error in its executor thread and hands it over while that thread
    may still be finishing; its entry frame holds the executor and, through it, the model actors.
    """

    class Held:  # stands for the executor, held by the thread's entry frame, not by the raising one
        pass

    handed_over = threading.Event()
    box: dict = {}

    def step() -> None:
        try:
            raise OSError("shard gone")
        except OSError as exc:
            box["exc"] = exc
        handed_over.set()

    def executor_thread() -> None:
        held = Held()
        box["held"] = weakref.ref(held)
        step()
        time.sleep(0.5)  # still finishing (shutdown, stats) when the driver has the error

    worker = threading.Thread(target=executor_thread)
    worker.start()
    handed_over.wait(5)
    try:
        raise box.pop("exc")
    except OSError as exc:
        release_frames(exc)
        kept = exc  # as a log handler keeps the record's exc_info
    assert not worker.is_alive(), "release_frames returned before the thread it had to wait for ended"
    gc.collect()
    assert box["held"]() is None, "the finished thread's frames still hold its locals"
    assert "shard gone" in str(kept)


def test_a_kept_traceback_does_not_keep_what_a_closure_below_the_catching_frame_holds():
    """A cleared frame still holds its function: Ray Data's batch iterators are closures over the executor."""

    class Held:
        pass

    def make_reader(held: Held):
        def read() -> None:
            assert held is not None
            raise OSError("shard gone")
        return read

    reader = make_reader(Held())  # only the closure holds it
    held = weakref.ref(reader.__closure__[0].cell_contents)
    try:
        reader()
    except OSError as exc:
        del reader
        release_frames(exc)
        kept = exc  # as a log handler keeps the record's exc_info
    gc.collect()
    assert held() is None, "the traceback kept the closure of a frame below the one that caught the error"
    assert "shard gone" in str(kept)
