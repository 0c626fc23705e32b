import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest
import torch
from conftest import REPO, ray_worker_pids, upload_dir
from PIL import Image

from hcdlib import read_predictions
from hcdlib.commands.pack import PackConfig, pack
from hcdlib.commands.score.run import ScoreConfig, score
from hcdlib.errors import UserError
from hcdlib.model.architectures import build_model
from hcdlib.model.artifact import export_model, load_model
from hcdlib.model.infer import infer_batch
from hcdlib.model.transforms import dihedral, to_input
from hcdlib.outputs import assembly
from hcdlib.outputs.readers import write_submission
from hcdlib.outputs.runfolder import NotCommittedError, read_manifest
from hcdlib.raykit.cluster import plan_actors
from hcdlib.sources.decode import decode_patch


@pytest.fixture()
def corrupt_set(synth_small, tmp_path) -> tuple[Path, dict]:
    """The 300 synthetic patches plus 15 corrupt files (5%) and one duplicated id."""
    folder = tmp_path / "in"
    shutil.copytree(synth_small, folder)
    good = sorted(p for p in folder.glob("*.tif"))
    bad = {}
    for i in range(15):
        name = f"{i:040x}.tif"
        kind = i % 3
        data = b"" if kind == 0 else good[i].read_bytes()[:500] if kind == 1 else b"GIF89a not really"
        (folder / name).write_bytes(data)
        bad[name[:-4]] = ("empty file", "cannot decode", "not an image")[kind]
    (folder / "again").mkdir()
    shutil.copy(good[0], folder / "again" / good[0].name)  # the same id twice
    grey = [f"{900 + i:040x}" for i in range(2)]  # scored after a conversion, with a note
    for i, name in enumerate(grey):
        Image.open(good[i]).convert("L").save(folder / f"{name}.tif")
    return folder, {"bad": bad, "dup": good[0].stem, "grey": grey, "n": 300 + 15 + 1 + 2}


def _cfg(model_dir, inp, out, **kw) -> ScoreConfig:
    # fp32 unless a test says otherwise: the exact comparisons with infer_batch below are fp32's,
    # and --precision auto is bf16 on CPUs that do it natively (its own test below)
    return ScoreConfig(model=str(model_dir), input=str(inp), out=str(out), chunk_size=kw.pop("chunk_size", 64),
                       precision=kw.pop("precision", "fp32"), **kw)


def test_infer_batch_matches_the_model_without_ray(model_dir, synth_small):
    model, meta = load_model(str(model_dir))
    from hcdlib.model.transforms import Preprocess

    pre = Preprocess.from_dict(meta["preprocess"])
    pixels = np.stack([decode_patch(p.read_bytes()).pixels for p in sorted(synth_small.glob("*.tif"))[:16]])
    probs = infer_batch(model, pixels, device=torch.device("cpu"), preprocess=pre)
    with torch.no_grad():
        x = to_input(torch.from_numpy(pixels), pre)
        expect = torch.sigmoid(model(x)).view(-1).numpy()
        expect8 = np.mean([torch.sigmoid(model(dihedral(x, k))).view(-1).numpy() for k in range(8)], axis=0)
    assert probs.dtype == np.float32 and probs.shape == (16,)
    np.testing.assert_allclose(probs, expect, atol=1e-5)
    np.testing.assert_allclose(infer_batch(model, pixels, device=torch.device("cpu"), preprocess=pre, tta=8),
                               expect8, atol=1e-5)
    assert probs.std() > 0.05  # a real spread, so the comparisons above mean something
    with pytest.raises(ValueError, match="tta"):
        infer_batch(model, pixels, device=torch.device("cpu"), preprocess=pre, tta=3)


def test_score_exactly_once_with_corrupt_files(ray_session, model_dir, corrupt_set, tmp_path):
    folder, info = corrupt_set
    m = score(_cfg(model_dir, folder, tmp_path / "out"))
    assert m["rows"] == info["n"] and m["errors"] == 15 and m["ok"] == info["n"] - 15
    assert m["duplicate_input_ids"] == 1 and m["duplicate_id_examples"] == [info["dup"]]
    assert m["noted"] == 2 and m["note_examples"] == {"converted L to RGB": 2}
    assert m["error_example"].split(": ")[0] in {f"patch {i}" for i in info["bad"]}
    t = read_predictions(str(tmp_path / "out")).to_pandas()
    assert sorted(t[t.note.notna()].id) == info["grey"]
    assert len(t) == info["n"]
    assert t.groupby("source").size().max() == 1  # every input file exactly once
    errors = t[t.status == "error"].set_index("id")
    assert set(errors.index) == set(info["bad"])
    for pid, msg in info["bad"].items():
        assert errors.loc[pid, "error"].startswith(f"patch {pid}: ") and msg in errors.loc[pid, "error"]
        assert np.isnan(errors.loc[pid, "prob"])
    ok = t[t.status == "ok"]
    assert ok.prob.between(0, 1).all() and ok.error.isna().all()
    assert (t.model == m["model"]).all() and t.x.isna().all()
    # the pipeline's probabilities are the plain function's
    model, meta = load_model(str(model_dir))
    from hcdlib.model.transforms import Preprocess

    sample = ok.sample(20, random_state=0)
    pixels = np.stack([decode_patch(Path(s).read_bytes()).pixels for s in sample.source])
    direct = infer_batch(model, pixels, device=torch.device("cpu"), preprocess=Preprocess.from_dict(meta["preprocess"]))
    np.testing.assert_allclose(sample.prob.to_numpy(), direct, atol=1e-5)


def test_resume_skips_done_chunks_and_refuses_mixing(ray_session, model_dir, synth_small, tmp_path):
    out = tmp_path / "out"
    first = score(_cfg(model_dir, synth_small, out))
    parts = sorted((out / "parts").iterdir())
    assert len(parts) == 5  # 300 patches in chunks of 64
    # simulate a crash after three chunks: two parts and the manifest never got written
    for p in parts[3:]:
        p.unlink()
    (out / "_SUCCESS").unlink()
    with pytest.raises(NotCommittedError):
        read_predictions(str(out))
    kept = {p.name: p.stat().st_mtime_ns for p in parts[:3]}
    again = score(_cfg(model_dir, synth_small, out))
    assert {p.name: p.stat().st_mtime_ns for p in parts[:3]} == kept  # done work was not redone
    assert again["rows"] == first["rows"] == 300
    t = read_predictions(str(out))
    assert sorted(t["id"].to_pylist()) == sorted(p.stem for p in synth_small.glob("*.tif"))

    other, pre = build_model("hcdnet")
    export_model(other, str(tmp_path / "other"), arch="hcdnet", preprocess=pre)
    with pytest.raises(UserError, match="different model"):
        score(_cfg(tmp_path / "other", synth_small, out))
    replaced = score(_cfg(tmp_path / "other", synth_small, out, overwrite=True))
    assert replaced["model"] != first["model"] and replaced["rows"] == 300


def _start_score_job(ray_session, model_dir, data, out) -> subprocess.Popen:
    """``jobs/score.py`` as its own driver process on the session's Ray cluster."""
    args = ["--model", str(model_dir), "--input", str(data), "--out", str(out), "--chunk-size", "64",
            "--tta", "8", "--batch-size", "32", "--precision", "fp32"]  # as _cfg, which the reruns use
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    # SIGINT as a terminal delivers it, even where this test runs with it ignored (a background job)
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "score.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _parts(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.parquet")} if (out / "parts").exists() else {}


@pytest.fixture(scope="module")
def synth_1200(tmp_path_factory) -> Path:
    from hcdlib.commands.synth import SynthConfig, write_synth

    data = tmp_path_factory.mktemp("s1200") / "data"
    write_synth(SynthConfig(out=str(data), n=1200, seed=9))
    return data


def test_killed_model_actor_is_replaced_and_output_is_exact(ray_session, model_dir, synth_1200, tmp_path):
    out = tmp_path / "out"
    proc = _start_score_job(ray_session, model_dir, synth_1200, out)
    killed, deadline = [], time.time() + 120
    while not killed and time.time() < deadline and proc.poll() is None:
        pids = ray_worker_pids("Scorer")
        if _parts(out) and pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        time.sleep(0.1)
    _, err = proc.communicate(timeout=300)
    assert killed, "no model actor was seen to kill"
    assert len(_parts(out)) > 0 and proc.returncode == 0, err[-2000:]
    m = read_manifest(str(out))
    assert m["rows"] == 1200 and m["errors"] == 0 and len(m["files"]) == 19  # 1200 / 64
    ids = read_predictions(str(out))["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 1200


def _signal_mid_run(ray_session, model_dir, data, out, sig: int) -> tuple[int, str, dict[str, int]]:
    """A scoring driver sent ``sig`` once two parts are written: its exit code, stderr and the parts kept."""
    proc = _start_score_job(ray_session, model_dir, data, out)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(_parts(out)) < 2:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err, _parts(out)


def test_killed_driver_resumes_to_exact_output(ray_session, model_dir, synth_1200, tmp_path):
    out = tmp_path / "out"
    _, _, before = _signal_mid_run(ray_session, model_dir, synth_1200, out, signal.SIGKILL)
    assert 2 <= len(before) < 19, "the driver was not killed mid-run"
    assert not (out / "_SUCCESS").exists()
    m = score(_cfg(model_dir, synth_1200, out, tta=8, batch_size=32))
    after = _parts(out)
    assert all(after[n] == t for n, t in before.items())  # work done before the kill was kept
    assert m["rows"] == 1200 and len(after) == 19
    ids = read_predictions(str(out))["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 1200


def test_ctrl_c_says_what_is_kept_in_one_line_and_the_rerun_finishes(ray_session, model_dir, synth_1200, tmp_path):
    """Ctrl-C ended in a KeyboardInterrupt traceback, exit code 1, with no word of what was kept."""
    out = tmp_path / "out"
    code, err, kept = _signal_mid_run(ray_session, model_dir, synth_1200, out, signal.SIGINT)
    assert code == 130 and "Traceback" not in err, err[-3000:]
    assert 2 <= len(kept) < 19, "the driver was not interrupted mid-run"
    assert err.strip().splitlines()[-1] == (f"scoring stopped: interrupted; {len(kept)} of 19 chunks are committed "
                                            "and kept: rerun the same command to finish the rest")
    m = score(_cfg(model_dir, synth_1200, out, tta=8, batch_size=32))
    assert m["rows"] == 1200 and all(_parts(out)[n] == t for n, t in kept.items())


def test_score_on_s3_input_and_output(ray_session, model_dir, synth_small, bucket):
    upload_dir(synth_small, f"{bucket}/patches")
    pack(PackConfig(input=f"{bucket}/patches", out=f"{bucket}/shards", rows_per_file=128, row_group_size=64))
    for name in ("patches", "shards"):
        out = f"{bucket}/preds-{name}"
        m = score(_cfg(model_dir, f"{bucket}/{name}", out))
        assert m["rows"] == 300 and m["errors"] == 0
        assert m["manifest_uri"] == f"{out}/_SUCCESS"
        t = read_predictions(out)
        assert sorted(t["id"].to_pylist()) == sorted(p.stem for p in synth_small.glob("*.tif"))
        assert read_manifest(out)["files"][0]["path"].startswith("parts/")
    a = read_predictions(f"{bucket}/preds-patches").sort_by("id")["prob"].to_numpy()
    b = read_predictions(f"{bucket}/preds-shards").sort_by("id")["prob"].to_numpy()
    np.testing.assert_allclose(a, b)  # same patches, same model: layout does not matter


def test_precision_auto_scores_in_the_arithmetic_the_cpu_does_natively(ray_session, model_dir, synth_small,
                                                                        tmp_path):
    """--precision auto is bf16 where the CPU has AVX512-BF16 or AMX, else fp32; probabilities stay float32."""
    from hcdlib.model.device import pick

    auto = score(_cfg(model_dir, synth_small, tmp_path / "auto", precision="auto"))
    assert auto["run"]["precision"] == "auto" and auto["ok"] == 300
    a = read_predictions(str(tmp_path / "auto")).to_pandas().set_index("id").sort_index()
    score(_cfg(model_dir, synth_small, tmp_path / "fp32"))
    b = read_predictions(str(tmp_path / "fp32")).to_pandas().set_index("id").sort_index()
    assert a.prob.dtype == np.float32
    diff = np.abs(a.prob.to_numpy() - b.prob.to_numpy())
    if pick().autocast is None:  # no native bf16 here: auto is fp32, the same numbers
        np.testing.assert_allclose(a.prob.to_numpy(), b.prob.to_numpy(), atol=1e-6)
    else:  # bf16: close to fp32, and not fp32 itself
        assert diff.max() < 0.02 and diff.max() > 0
    with pytest.raises(UserError, match=r"holds a run with a different precision \(.auto. there, .bf16. now"):
        score(_cfg(model_dir, synth_small, tmp_path / "auto", precision="bf16"))


def test_submission_csv(ray_session, model_dir, corrupt_set, tmp_path):
    folder, info = corrupt_set
    score(_cfg(model_dir, folder, tmp_path / "out"))
    n = write_submission(str(tmp_path / "out"), str(tmp_path / "sub.csv"))
    sub = pacsv.read_csv(tmp_path / "sub.csv").to_pandas()
    # the duplicated id is the same patch twice: one row (Kaggle refuses repeated ids)
    assert list(sub.columns) == ["id", "label"] and len(sub) == n == info["n"] - 1 and sub.id.is_unique
    assert sub.id.is_monotonic_increasing
    assert sub.label.between(0, 1).all()
    assert (sub.set_index("id").loc[list(info["bad"]), "label"] == 0.5).all()


def test_reads_of_local_patches_run_one_task_per_cpu_left_to_them(synth_small, tmp_path):
    """More CPU-bound read tasks than CPUs only started more processes: 2.3 s of start-up on 2 cores."""
    from hcdlib.commands.score.stream import read_tasks
    from hcdlib.sources.factory import open_source
    from hcdlib.sources.slides.read import TilesChunk

    chunks = open_source(str(synth_small)).chunks(64)
    cfg = ScoreConfig(model="m", input=str(synth_small), out=str(tmp_path / "o"))
    assert read_tasks(cfg, chunks, plan_actors({"CPU": 2})) == 1  # 2 actors x 0.5 CPU leave 1
    assert read_tasks(cfg, chunks, plan_actors({"CPU": 64})) == 16
    assert read_tasks(cfg, chunks, plan_actors({"CPU": 16, "GPU": 1}, gpus_per_actor=1)) == 15
    assert read_tasks(cfg, chunks, plan_actors({"CPU": 16, "GPU": 1})) == 14  # two actors on the GPU
    # S3 reads wait on the network, and slides' tile reads ran faster in parallel: Ray Data decides
    assert read_tasks(cfg.replace(input="s3://b/p"), chunks, plan_actors({"CPU": 2})) is None
    tiles = [TilesChunk.__new__(TilesChunk)]
    assert read_tasks(cfg, tiles, plan_actors({"CPU": 2})) is None


def test_a_chunk_leaves_the_read_task_as_one_block_per_model_actor(synth_small, tmp_path):
    """Ray's cost is per block: blocks of one model batch held (g) to 11-12k rows/s, one per actor 16.5-17k."""
    from hcdlib.commands.score.stream import block_rows
    from hcdlib.sources.factory import open_source

    chunks = open_source(str(synth_small)).chunks(128)  # 300 patches: 128, 128, 44
    cfg = ScoreConfig(model="m", input=str(synth_small), out=str(tmp_path / "o"), batch_size=16)
    assert block_rows(cfg, chunks, plan_actors({"CPU": 2})) == 64  # 2 actors: half a chunk each
    assert block_rows(cfg, chunks, plan_actors({"CPU": 16, "GPU": 1}, gpus_per_actor=1)) == 128  # one actor: all
    assert block_rows(cfg, chunks, plan_actors({"CPU": 64})) == 16  # more actors than batches: one batch each
    assert block_rows(cfg.replace(batch_size=256), chunks, plan_actors({"CPU": 2})) == 256


# A model actor that notes which chunk it scores, and whose second copy starts 3 s late.
_LATE_ACTOR_DRIVER = """
import os, sys, time
from hcdlib.config import ScoreConfig
from hcdlib.commands.score.actor import Scorer
from hcdlib.commands.score.run import score

model, data, out, first_up, calls = sys.argv[1:]


class SecondActorLate(Scorer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            os.close(os.open(first_up, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            time.sleep(3)

    def __call__(self, batch):
        with open(calls, "a") as f:
            f.writelines(f"{os.getpid()} {key}\\n" for key in set(batch["chunk"].to_pylist()))
        time.sleep(0.5)  # what a real model takes for a block; this tiny one takes milliseconds
        return super().__call__(batch)


score(ScoreConfig(model=model, input=data, out=out, chunk_size=64, batch_size=32), actor=SecondActorLate)
"""


def test_every_cpu_model_actor_scores_the_first_chunk_when_one_starts_late(ray_session, model_dir, synth_small,
                                                                          tmp_path):
    """Both CPU model actors score the first chunk, so the first part is committed after half of it.

    The first actor up took both halves (Ray Data gives a ready actor 2 blocks at once), and the
    first part waited for that one actor to score them in turn. Run in a fresh driver process, as
    `hcd score` and `ray job submit` run it (one actor scored both halves in 3 of 3 runs before the
    change, none of 4 after). Not in-process: in a process's later pipelines the second half comes
    later (1.1 s after the first with hcdnet, against 0.2 s), and this tiny model's actor is free
    again by then (both halves to one actor in 8 of 8 runs); hcdnet's 3 s halves split (3 of 3).
    """
    (tmp_path / "driver.py").write_text(_LATE_ACTOR_DRIVER)
    calls = tmp_path / "calls.txt"
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(model_dir), str(synth_small),
                    str(tmp_path / "out"), str(tmp_path / "first-actor-up"), str(calls)],
                   env=env, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    assert read_manifest(str(tmp_path / "out"))["rows"] == 300  # chunks of 64: 2 blocks of 32 each
    actors = {line.split()[0] for line in calls.read_text().splitlines() if line.endswith(" files-000000")}
    assert len(actors) == 2, f"one actor scored the whole first chunk:\n{calls.read_text()}"


def test_a_model_actor_that_cannot_start_stops_the_run_in_one_line(ray_session, model_dir, synth_small, tmp_path):
    """The error a model actor's __init__ raised, in the one line that says the run stopped.

    It was "ActorDiedError: The actor died because of an error raised in its creation task,
    <colour codes>ray::MapWorker(...)", cut at 300 characters before the error itself.
    """
    from hcdlib.commands.score.actor import Scorer
    from hcdlib.errors import RunStopped

    class StoreFails(Scorer):
        def __init__(self, *args, **kwargs):
            raise OSError(5, "Input/output error", "model.safetensors")

    out = tmp_path / "out"
    with pytest.raises(RunStopped) as stopped:
        score(_cfg(model_dir, synth_small, out), actor=StoreFails)
    message = str(stopped.value)
    assert message.startswith("scoring stopped: a model actor could not start: OSError: [Errno 5] Input/output "
                              "error: 'model.safetensors'; 0 of 5 chunks are committed"), message
    assert "\n" not in message and "\x1b" not in message
    assert score(_cfg(model_dir, synth_small, out))["rows"] == 300  # the dead actors hold no CPU


def test_the_read_cap_reaches_ray_data(ray_session, model_dir, synth_small, tmp_path):
    """The cap is what Ray Data is told: the read stage's task pool, under the model actors' stage."""
    from hcdlib.commands.score.stream import scoring_dataset
    from hcdlib.sources.factory import open_source

    cfg = ScoreConfig(model=str(model_dir), input=str(synth_small), out=str(tmp_path / "o"))
    ds = scoring_dataset(cfg, open_source(str(synth_small)).chunks(64), plan_actors({"CPU": 2}), "sha")
    (read,) = ds._logical_plan.dag.input_dependencies
    assert read.compute.size == 1


def test_the_pipeline_of_a_gpu_plan_can_be_built(ray_session, model_dir, synth_small):
    """Ray Data refuses GPU actors without a batch size: every run on a GPU stopped with a ValueError.

    The dataset is built, not run (this machine has no GPU). A run end to end on a Ray that
    declares a GPU it does not have (the actor falls back to the CPU) gave the CPU plan's output.
    """
    from hcdlib.commands.score.stream import scoring_dataset
    from hcdlib.sources.factory import open_source

    chunks = open_source(str(synth_small)).chunks(64)
    gpu = plan_actors({"CPU": 16, "GPU": 2})
    for plan in (gpu, plan_actors({"CPU": 2})):
        ds = scoring_dataset(_cfg(model_dir, synth_small, "unused"), chunks, plan, "sha")
        assert "MapBatches(Scorer)" in str(ds)


def test_manifest_is_json_with_the_effective_config(ray_session, model_dir, synth_small, tmp_path, monkeypatch):
    # A chunk leaves the read task as one block per model actor (at least a model batch), so it
    # is shared by all actors: the driver sees the actors' output blocks, one per call.
    seen = []
    add = assembly.ChunkAssembler.add
    monkeypatch.setattr(assembly.ChunkAssembler, "add",
                        lambda self, batch: seen.append(batch.num_rows) or add(self, batch))
    score(_cfg(model_dir, synth_small, tmp_path / "out", tta=4, batch_size=16))
    m = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert m["config"]["tta"] == 4 and m["run"]["tta"] == 4
    assert sum(f["rows"] for f in m["files"]) == m["rows"] == 300
    # 4 chunks of 64 rows and one of 44, in blocks of 32 (the test Ray has 2 CPUs: 2 actors)
    assert sorted(seen) == [12] + [32] * 9


def test_packed_pixels_score_exactly_as_the_files(ray_session, model_dir, corrupt_set, tmp_path):
    """Packing stores decodable patches as pixels: predictions do not change, bad files stay error rows."""
    import pyarrow.parquet as pq

    from hcdlib.model.transforms import Preprocess

    folder, info = corrupt_set
    unlabelled = tmp_path / "unlabelled"  # a test archive: the corrupt files have no labels, and need none
    shutil.copytree(folder, unlabelled, ignore=shutil.ignore_patterns("labels.csv"))
    pack(PackConfig(input=str(unlabelled), out=str(tmp_path / "shards"), rows_per_file=200, row_group_size=64))
    stored = pq.read_table(next((tmp_path / "shards" / "parts").glob("part-*.parquet")), columns=["pixels", "image"])
    assert stored["pixels"].null_count < stored.num_rows  # pixels really are stored, not just bytes
    files = score(_cfg(model_dir, folder, tmp_path / "from-files")).get("manifest_uri")
    packed = score(_cfg(model_dir, tmp_path / "shards", tmp_path / "from-pack"))
    a = read_predictions(str(tmp_path / "from-files")).to_pandas().sort_values(["id", "source"]).reset_index()
    b = read_predictions(str(tmp_path / "from-pack")).to_pandas().sort_values(["id", "source"]).reset_index()
    assert files and packed["rows"] == info["n"] and list(a.id) == list(b.id)
    assert list(a.status) == list(b.status) and list(a.error.fillna("")) == list(b.error.fillna(""))
    assert list(a.note.fillna("")) == list(b.note.fillna("")) and a.note.notna().sum() == len(info["grey"])
    np.testing.assert_allclose(a.prob.to_numpy(), b.prob.to_numpy(), atol=1e-6, equal_nan=True)
    model, meta = load_model(str(model_dir))
    ok = a[a.status == "ok"]
    pixels = np.stack([decode_patch(Path(s).read_bytes()).pixels for s in ok.source])
    direct = infer_batch(model, pixels, device=torch.device("cpu"), preprocess=Preprocess.from_dict(meta["preprocess"]))
    np.testing.assert_allclose(b.prob[a.status == "ok"].to_numpy(), direct, atol=1e-5)
