"""Scoring benchmark: where the time goes, measured side by side in one run.

    python jobs/bench_score.py --n 20000                      # this machine
    ray job submit --working-dir . -- python jobs/bench_score.py --n 200000 --s3-uri s3://b/bench

Same model, batch size and N synthetic patches for every row:
 (a) model only: forward passes on patches already decoded in memory, one process with a
     thread per core (the usual upper bound);
 (a*) the same in ``hcd score``'s own actor layout (e.g. 2 single-threaded actors on 2 cores):
     (d)/(a*) is what the data pipeline costs, with the parallel layout held equal;
 (b) what a user writes by hand: a torch DataLoader (num_workers = cores) over the .tif files;
 (c) ``hcd score`` from the folder of .tif files; (d) from Parquet shards; (e) (d) with the
     shards on S3 (a local moto server unless ``--s3-uri`` names a real bucket);
plus the peak memory of (d) for N and ``--mem-factor`` x N patches (streaming must not grow).

    python jobs/bench_score.py --n 40000 --pipeline-only      # the (g) rows: hcdlib.benchmark_pipeline
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from hcdlib import uri as urimod
from hcdlib.config import BenchScoreConfig

log = logging.getLogger(__name__)


def _tree_memory() -> tuple[int, int]:
    """Resident (RSS) and proportional (PSS) memory of this process, every Ray worker, raylet and GCS.

    RSS counts a shared page (the object store's) in every process that maps it; PSS splits it
    among them, so the PSS sum is what the machine actually holds.
    """
    rss = pss = 0
    me = str(os.getpid())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            if proc.name != me and not cmd.startswith(b"ray::") and b"/ray/core/src/ray/" not in cmd:
                continue
            for line in (proc / "smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


class PeakMemory:
    """Samples :func:`_tree_memory` in a thread while a block runs: ``peak`` (RSS) and ``peak_pss``.

    Once a second: reading ``smaps_rollup`` walks each process's page tables (~30 ms a sample
    here), and four samples a second took 13% of a core from the pipeline being measured.
    """

    def __enter__(self) -> PeakMemory:
        self.peak = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = _tree_memory()
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(1.0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _ensure_data(cfg: BenchScoreConfig, n: int, name: str) -> tuple[str, str]:
    """Synthetic .tif folder and its Parquet shards for ``n`` patches (reused across runs)."""
    from hcdlib.pack import PackConfig, pack
    from hcdlib.synth import SynthConfig, write_synth

    tif, shards = os.path.join(cfg.work, f"{name}-tif"), os.path.join(cfg.work, f"{name}-shards")
    if not os.path.exists(os.path.join(tif, "labels.csv")):
        write_synth(SynthConfig(out=tif, n=n, seed=123))
    if not _packed_by_this_hcd(shards):
        # A complete pack in an older format is the benchmark's own stale cache: packed again. A
        # pack cut short is left to hcd pack, which resumes it.
        if os.path.exists(os.path.join(shards, "_SUCCESS")):
            log.warning("%s: not in this hcd's pack format; packing it again", shards)
            shutil.rmtree(shards)
        pack(PackConfig(input=tif, out=shards))
    return tif, shards


def _packed_by_this_hcd(shards: str) -> bool:
    """Whether the benchmark's cached ``shards`` are complete and in this hcd's pack format.

    Shards an older ``hcd pack`` left in the work folder (without the decoded ``pixels`` column,
    or with another codec for it) would be read fine, so every row after them would time the old
    format, silently.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hcdlib.chunks import ROW_SCHEMA
    from hcdlib.pack import shard_options

    if not os.path.exists(os.path.join(shards, "_SUCCESS")):
        return False
    first = next(Path(shards).rglob("*.parquet"), None)
    if first is None or pq.read_schema(first).names != ROW_SCHEMA.names:
        return False
    probe = io.BytesIO()  # what this hcd's pack writes, as Parquet's metadata names it
    pq.write_table(pa.table([pa.nulls(1, f.type) for f in ROW_SCHEMA], schema=ROW_SCHEMA), probe, **shard_options(1))
    return _pixels_codec(first) == _pixels_codec(io.BytesIO(probe.getvalue()))


def _pixels_codec(source) -> str:
    import pyarrow.parquet as pq

    meta = pq.read_metadata(source)
    return meta.row_group(0).column(meta.schema.names.index("pixels")).compression


def _decoded(tif: str, limit: int | None = None) -> np.ndarray:
    from hcdlib.decode import decode_patch

    files = sorted(Path(tif).glob("*.tif"))[:limit]
    return np.stack([decode_patch(f.read_bytes()).pixels for f in files])


def _forward_rate(model_dir: str, pixels: np.ndarray, batch_size: int, tta: int) -> tuple[float, str]:
    """Patches/s of the forward pass over ``pixels`` in this process, all cores; and the device it ran on."""
    import torch

    from hcdlib.artifact import load_model
    from hcdlib.device import pick
    from hcdlib.infer import Predictor, for_inference
    from hcdlib.transforms import Preprocess

    torch.set_num_threads(os.cpu_count() or 1)
    plan = pick()
    device = torch.device(plan.device)
    model, meta = load_model(model_dir, device=device)
    predict = Predictor(for_inference(model), Preprocess.from_dict(meta["preprocess"]), device=device, tta=tta,
                        autocast=plan.autocast)
    predict(pixels[:batch_size])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        predict(pixels[i:i + batch_size])  # returns on the host: the device has finished
    return len(pixels) / (time.perf_counter() - t0), f"{plan.device} {plan.autocast or 'fp32'}"


def where_actors_run(resources: dict, *, beside_driver: bool = False) -> dict:
    """Ray options for a benchmark task that must run where ``hcd score``'s model actors run.

    On a GPU where the cluster has one, else on CPUs (the task's threads use every core of its
    node; its request is bookkeeping). ``beside_driver``: on the driver's node, for a task that
    reads the driver's files (its GPU if it has one).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    gpu = resources.get("GPU", 0) >= 1
    opts: dict = {"num_cpus": 1, "num_gpus": 1 if gpu else 0}
    if beside_driver:
        me = ray.get_runtime_context().get_node_id()
        mine = next(n for n in ray.nodes() if n["NodeID"] == me)
        opts["num_gpus"] = 1 if mine["Resources"].get("GPU", 0) >= 1 else 0
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(me, soft=False)
    return opts


def model_only(model_dir: str, tif: str, cfg: BenchScoreConfig) -> float:
    """(a) patches/s of the forward pass alone, one process using every core (or a GPU), patches in memory.

    Run in a Ray task placed as a model actor is, so a GPU cluster measures its GPU, not the
    driver's CPU.
    """
    import ray

    task = ray.remote(_forward_rate).options(**where_actors_run(ray.cluster_resources()))
    rate, device = ray.get(task.remote(model_dir, ray.put(_decoded(tif)), cfg.batch_size, cfg.tta))
    log.info("(a) ran on %s", device)
    return rate


class ForwardLoop:
    """(a*) One of ``hcd score``'s model actors, fed batches from memory instead of the pipeline."""

    def __init__(self, **scorer_kwargs):
        from hcdlib.score import Scorer

        self.scorer = Scorer(**scorer_kwargs)

    def run(self, pixels: np.ndarray, batches: int, batch_size: int) -> tuple[float, float, int]:
        """Score ``batches`` batches cycling through ``pixels``; returns (start, end, patches)."""
        starts = range(0, len(pixels) - batch_size + 1, batch_size)
        t0 = time.time()
        for b, i in zip(range(batches), itertools.cycle(starts)):
            self.scorer.forward(pixels[i:i + batch_size])
            if b == 0:  # the first batch is warm-up (kernel selection); time from the second
                t0 = time.time()
        return t0, time.time(), (batches - 1) * batch_size


def model_only_actors(model_dir: str, tif: str, cfg: BenchScoreConfig) -> tuple[float, str]:
    """(a*) patches/s of the forward pass alone in ``hcd score``'s actor layout, patches in memory.

    Same actors, threads and CPU/GPU requests as the scoring run, so (d)/(a*) is the cost of
    the data pipeline alone. Returns the rate and the layout, e.g. "2 actors x 1 thread".
    """
    import ray

    from hcdlib.artifact import load_model
    from hcdlib.rayutil import plan_actors

    plan = plan_actors(ray.cluster_resources())
    _, meta = load_model(model_dir)
    pixels = ray.put(_decoded(tif, limit=max(4096, cfg.batch_size)))
    per_actor = max(2, -(-cfg.n // cfg.batch_size // plan.actors) + 1)  # + 1 warm-up batch each
    actor_cls = ray.remote(ForwardLoop).options(num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None)
    loops = [actor_cls.remote(model_uri=model_dir, sha256=meta["sha256"], tta=cfg.tta, threads=plan.torch_threads,
                              batch_size=cfg.batch_size)
             for _ in range(plan.actors)]
    runs = ray.get([a.run.remote(pixels, per_actor, cfg.batch_size) for a in loops])
    for a in loops:
        ray.kill(a)
    rate = sum(n for *_, n in runs) / (max(e for _, e, _ in runs) - min(s for s, _, _ in runs))
    return rate, f"{plan.actors} actors x {plan.torch_threads} thread{'s' * (plan.torch_threads > 1)}"


class FileDataset:
    """The baseline a user writes: one PIL decode per item in DataLoader workers (+ label if given)."""

    def __init__(self, files: list[Path], labels: list[int] | None = None):
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        with Image.open(self.files[i]) as im:
            pixels = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
        return pixels if self.labels is None else (pixels, self.labels[i])


def _dataloader_rate(model_dir: str, tif: str, batch_size: int, tta: int) -> float:
    """Patches/s of a plain DataLoader pipeline in this process."""
    import torch
    from torch.utils.data import DataLoader

    from hcdlib.artifact import load_model
    from hcdlib.device import pick
    from hcdlib.infer import Predictor, for_inference
    from hcdlib.transforms import Preprocess

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    plan = pick()
    device = torch.device(plan.device)
    model, meta = load_model(model_dir, device=device)
    predict = Predictor(for_inference(model), Preprocess.from_dict(meta["preprocess"]), device=device, tta=tta,
                        autocast=plan.autocast)
    loader = DataLoader(FileDataset(sorted(Path(tif).glob("*.tif"))), batch_size=batch_size,
                        num_workers=cores, pin_memory=device.type == "cuda")
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        predict(batch)
        n += len(batch)
    return n / (time.perf_counter() - t0)


def dataloader_baseline(model_dir: str, tif: str, cfg: BenchScoreConfig) -> float:
    """(b) patches/s of a plain DataLoader pipeline in one process, on the driver's node (its files), its GPU if any."""
    import ray

    task = ray.remote(_dataloader_rate).options(**where_actors_run(ray.cluster_resources(), beside_driver=True))
    return ray.get(task.remote(model_dir, tif, cfg.batch_size, cfg.tta))


def hcd_score(model_dir: str, source: str, out: str, cfg: BenchScoreConfig, *,
              slides: bool = False) -> tuple[float, int]:
    """(c)-(f) patches/s of ``hcd score`` end to end (listing, actors, commit) and its peak memory."""
    from hcdlib.score import ScoreConfig, score

    with PeakMemory() as mem:
        m = score(ScoreConfig(model=model_dir, input=source, out=out, batch_size=cfg.batch_size, tta=cfg.tta,
                              overwrite=True, slides=slides))
    if m["errors"]:
        raise RuntimeError(f"benchmark input {source}: {m['errors']} rows failed; the numbers would be wrong")
    return m["rows"] / m["wall_seconds"], mem.peak


def _ensure_slides(cfg: BenchScoreConfig) -> tuple[str, int]:
    """Four square synthetic slides at PCam resolution holding ``cfg.slide_tiles`` tissue tiles."""
    from hcdlib.slides import PCAM_MPP
    from hcdlib.synth import synth_slide_pixels, write_slide_tiff

    side = max(1, int((cfg.slide_tiles / 4) ** 0.5))
    folder = os.path.join(cfg.work, f"slides-{side}")
    os.makedirs(folder, exist_ok=True)
    for i in range(4):
        path = os.path.join(folder, f"slide_{i}.tif")
        if not os.path.exists(path):
            write_slide_tiff(path, synth_slide_pixels(side, side, seed=200 + i), mpp=PCAM_MPP)
    return folder, 4 * side * side


def _upload(shards: str, uri: str = "s3://hcd-bench/shards") -> str:
    """Copy a local folder to ``uri`` on the S3 server the environment points at; returns the URI."""
    import boto3
    import pyarrow.fs as pafs

    s3, bucket = boto3.client("s3"), uri[len("s3://"):].split("/")[0]
    if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=bucket)
    fs, path = urimod.resolve(uri)
    pafs.copy_files(shards, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def run(cfg: BenchScoreConfig) -> dict:
    """Run every measurement and return the table (also logged)."""
    from hcdlib.artifact import export_model
    from hcdlib.models import build_model

    os.makedirs(cfg.work, exist_ok=True)
    tif, shards = _ensure_data(cfg, cfg.n, f"n{cfg.n}")
    model_dir = os.path.join(cfg.work, f"model-{cfg.arch}")
    model, pre = build_model(cfg.arch)  # random weights: throughput does not depend on them
    export_model(model, model_dir, arch=cfg.arch, preprocess=pre)
    with contextlib.ExitStack() as stack:
        s3_uri, endpoint = cfg.s3_uri, None
        if not cfg.skip_s3 and cfg.s3_uri is None and not cfg.memory_only:
            try:  # before Ray starts, so its workers inherit the endpoint; the environment is restored after
                from hcdlib.s3local import aws_env, moto_server

                port = stack.enter_context(moto_server())
                endpoint = f"http://127.0.0.1:{port}"
                stack.enter_context(aws_env(endpoint))
                s3_uri = None if cfg.pipeline_only else _upload(shards)
            except (ImportError, RuntimeError) as exc:
                log.warning("no local S3 server (%s; pip install 'hcd[test]'): leaving out the S3 rows", exc)
                s3_uri = endpoint = None
        return _run_rows(cfg, _base_row(cfg), model_dir, tif, shards, s3_uri, endpoint)


def _base_row(cfg: BenchScoreConfig) -> dict:
    """The settings every row shares, printed above the table."""
    return {"n": cfg.n, "arch": cfg.arch, "batch_size": cfg.batch_size, "tta": cfg.tta, "cpus": os.cpu_count()}


def _run_rows(cfg: BenchScoreConfig, r: dict, model_dir: str, tif: str, shards: str, s3_uri: str | None,
              endpoint: str | None = None) -> dict:
    """Every measurement, one after another in this process (side by side in one run)."""
    from hcdlib.rayutil import init_ray

    init_ray()
    if cfg.memory_only:
        return _memory_rows(cfg, model_dir, shards, r)
    if cfg.pipeline_only:
        from hcdlib.benchmark_pipeline import pipeline_rows

        return {**r, **pipeline_rows(cfg, model_dir, tif, shards, s3_endpoint=endpoint)}
    r["a_model_only"] = model_only(model_dir, tif, cfg)
    r["a_star_actors"], r["actor_layout"] = model_only_actors(model_dir, tif, cfg)
    r["b_dataloader"] = dataloader_baseline(model_dir, tif, cfg)
    r["c_score_tif"], _ = hcd_score(model_dir, tif, os.path.join(cfg.work, "out-c"), cfg)
    r["d_score_parquet"], r["peak_rss_n"] = hcd_score(model_dir, shards, os.path.join(cfg.work, "out-d"), cfg)
    if s3_uri:
        r["e_score_s3"], _ = hcd_score(model_dir, s3_uri, s3_uri.rstrip("/") + "-preds", cfg)
    if not cfg.skip_memory:
        _, big = _ensure_data(cfg, cfg.n * cfg.mem_factor, f"n{cfg.n * cfg.mem_factor}")
        _, r["peak_rss_kn"] = hcd_score(model_dir, big, os.path.join(cfg.work, "out-big"), cfg)
    if cfg.slide_tiles:
        slides, tiles = _ensure_slides(cfg)
        _, tile_shards = _ensure_data(cfg, tiles, f"n{tiles}")
        r["slide_tiles"] = tiles
        r["f_score_slides"], _ = hcd_score(model_dir, slides, os.path.join(cfg.work, "out-f"), cfg, slides=True)
        r["f_score_parquet_same_n"], _ = hcd_score(model_dir, tile_shards, os.path.join(cfg.work, "out-f2"), cfg)
    a = r["a_model_only"]
    r["ratios"] = {"c/a": r["c_score_tif"] / a, "d/a": r["d_score_parquet"] / a,
                   "d/a*": r["d_score_parquet"] / r["a_star_actors"], "d/b": r["d_score_parquet"] / r["b_dataloader"]}
    if "e_score_s3" in r:
        r["ratios"]["e/a"] = r["e_score_s3"] / a
    if "f_score_slides" in r:
        r["ratios"]["slides/parquet (same count)"] = r["f_score_slides"] / r["f_score_parquet_same_n"]
    if "peak_rss_kn" in r:
        r["ratios"][f"mem {cfg.mem_factor}N/N"] = r["peak_rss_kn"] / r["peak_rss_n"]
    log.info("\n%s", format_table(r, cfg))
    if cfg.markdown:
        from hcdlib.benchmark_doc import publish

        publish(cfg.markdown, "score", "Scoring: model alone, a DataLoader, and hcd score end to end",
                format_table(r, cfg), job="bench_score", cfg=cfg)
    return r


def _replicated(shards: str, k: int, out: str) -> str:
    """``k`` copies of a pack's shards with distinct ids: a k x N archive without rendering k x N patches."""
    import json

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from hcdlib.pack import shard_options
    from hcdlib.sources import PACK_MANIFEST

    if _packed_by_this_hcd(out):
        return out
    shutil.rmtree(out, ignore_errors=True)  # the benchmark's own copies, from an older hcd or cut short
    os.makedirs(out)
    files = []
    for f in json.loads(Path(shards, PACK_MANIFEST).read_text())["files"]:
        t = pq.read_table(os.path.join(shards, f["path"]))
        for j in range(k):
            ids = pc.binary_join_element_wise(t["id"], pa.scalar(f"r{j}"), "-")
            name = f"r{j}-{os.path.basename(f['path'])}"
            pq.write_table(t.set_column(0, "id", ids), os.path.join(out, name), **shard_options(1024))
            files.append({"path": name, "rows": t.num_rows})
    Path(out, PACK_MANIFEST).write_text(json.dumps({"files": files, "rows": sum(f["rows"] for f in files)}))
    return out


def _memory_rows(cfg: BenchScoreConfig, model_dir: str, shards: str, r: dict) -> dict:
    """(d) at N and at mem_factor x N: patches/s and peak RSS of driver + Ray workers, side by side."""
    kn = cfg.n * cfg.mem_factor
    big = _replicated(shards, cfg.mem_factor, os.path.join(cfg.work, f"n{kn}-replicated-shards"))
    r["d_score_parquet"], r["peak_rss_n"] = hcd_score(model_dir, shards, os.path.join(cfg.work, "out-d"), cfg)
    r["d_score_parquet_kn"], r["peak_rss_kn"] = hcd_score(model_dir, big, os.path.join(cfg.work, "out-big"), cfg)
    table = "\n".join([
        f"{cfg.arch}, batch {cfg.batch_size}, TTA {cfg.tta}, {r['cpus']} CPUs", "",
        "| (d) hcd score, Parquet shards | patches | patches/s | peak RSS |", "|---|---:|---:|---:|",
        f"| N | {cfg.n} | {r['d_score_parquet']:.0f} | {r['peak_rss_n'] / 2**30:.2f} GiB |",
        f"| {cfg.mem_factor}N | {kn} | {r['d_score_parquet_kn']:.0f} | {r['peak_rss_kn'] / 2**30:.2f} GiB |",
        "", f"peak RSS {cfg.mem_factor}N / N: {r['peak_rss_kn'] / r['peak_rss_n']:.2f} (target <= 1.25)"])
    log.info("\n%s", table)
    if cfg.markdown:
        from hcdlib.benchmark_doc import publish

        publish(cfg.markdown, "memory", "Memory at archive scale", table, job="bench_score", cfg=cfg)
    return r


def format_table(r: dict, cfg: BenchScoreConfig) -> str:
    """The benchmark result as a Markdown table."""
    rows = [("(a) model only, decoded in memory, one process x all cores", r["a_model_only"]),
            (f"(a*) model only, decoded in memory, hcd's layout: {r['actor_layout']}", r["a_star_actors"]),
            ("(b) torch DataLoader over .tif", r["b_dataloader"]),
            ("(c) hcd score, .tif folder", r["c_score_tif"]), ("(d) hcd score, Parquet shards", r["d_score_parquet"])]
    if "e_score_s3" in r:
        rows.append(("(e) hcd score, Parquet shards on S3", r["e_score_s3"]))
    if "f_score_slides" in r:
        rows.append((f"(f) hcd score, 4 slides, {r['slide_tiles']} tiles (tiles/s)", r["f_score_slides"]))
        rows.append((f"(f') hcd score, {r['slide_tiles']} pre-cut patches in Parquet", r["f_score_parquet_same_n"]))
    lines = [f"N={r['n']}, {r['arch']}, batch {r['batch_size']}, TTA {r['tta']}, {r['cpus']} CPUs",
             "", "| pipeline | patches/s |", "|---|---:|"]
    lines += [f"| {name} | {v:.0f} |" for name, v in rows]
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in r["ratios"].items()]
    if "peak_rss_kn" in r:
        lines.append(f"\npeak RSS (d): N {r['peak_rss_n'] / 2**30:.2f} GiB, {cfg.mem_factor}N "
                     f"{r['peak_rss_kn'] / 2**30:.2f} GiB")
    return "\n".join(lines)
