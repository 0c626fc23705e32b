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

    python jobs/bench_score.py --n 40000 --pipeline-only      # the (g) rows: benchmarks.pipeline
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.config import BenchScoreConfig
from benchmarks.data import FileDataset, PeakMemory, decoded, ensure_data, ensure_slides, replicated, upload
from benchmarks.doc import publish
from benchmarks.pipeline import pipeline_rows
from hcdlib.commands.score.actor import Scorer
from hcdlib.commands.score.run import ScoreConfig, score
from hcdlib.model.artifact import export_model, load_model
from hcdlib.model.device import pick
from hcdlib.model.transforms import Preprocess
from hcdlib.raykit.cluster import init_ray, plan_actors
from hcdlib.storage.s3local import aws_env, moto_server

log = logging.getLogger(__name__)


def _forward_rate(model_dir: str, pixels: np.ndarray, batch_size: int, tta: int) -> tuple[float, str]:
    """Patches/s of the forward pass over ``pixels`` in this process, all cores; and the device it ran on."""
    import torch

    from hcdlib.model.infer import Predictor, for_inference

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
    rate, device = ray.get(task.remote(model_dir, ray.put(decoded(tif)), cfg.batch_size, cfg.tta))
    log.info("(a) ran on %s", device)
    return rate


class ForwardLoop:
    """(a*) One of ``hcd score``'s model actors, fed batches from memory instead of the pipeline."""

    def __init__(self, **scorer_kwargs):

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


    plan = plan_actors(ray.cluster_resources())
    _, meta = load_model(model_dir)
    pixels = ray.put(decoded(tif, limit=max(4096, cfg.batch_size)))
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


def _dataloader_rate(model_dir: str, tif: str, batch_size: int, tta: int) -> float:
    """Patches/s of a plain DataLoader pipeline in this process."""
    import torch
    from torch.utils.data import DataLoader

    from hcdlib.model.infer import Predictor, for_inference

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
    with PeakMemory() as mem:
        m = score(ScoreConfig(model=model_dir, input=source, out=out, batch_size=cfg.batch_size, tta=cfg.tta,
                              overwrite=True, slides=slides))
    if m["errors"]:
        raise RuntimeError(f"benchmark input {source}: {m['errors']} rows failed; the numbers would be wrong")
    return m["rows"] / m["wall_seconds"], mem.peak


def run(cfg: BenchScoreConfig) -> dict:
    """Run every measurement and return the table (also logged)."""
    from hcdlib.model.architectures import build_model

    os.makedirs(cfg.work, exist_ok=True)
    tif, shards = ensure_data(cfg, cfg.n, f"n{cfg.n}")
    model_dir = os.path.join(cfg.work, f"model-{cfg.arch}")
    model, pre = build_model(cfg.arch)  # random weights: throughput does not depend on them
    export_model(model, model_dir, arch=cfg.arch, preprocess=pre)
    with contextlib.ExitStack() as stack:
        s3_uri, endpoint = cfg.s3_uri, None
        if not cfg.skip_s3 and cfg.s3_uri is None and not cfg.memory_only:
            try:  # before Ray starts, so its workers inherit the endpoint; the environment is restored after

                port = stack.enter_context(moto_server())
                endpoint = f"http://127.0.0.1:{port}"
                stack.enter_context(aws_env(endpoint))
                s3_uri = None if cfg.pipeline_only else upload(shards)
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
    init_ray()
    if cfg.memory_only:
        return _memory_rows(cfg, model_dir, shards, r)
    if cfg.pipeline_only:

        return {**r, **pipeline_rows(cfg, model_dir, tif, shards, s3_endpoint=endpoint)}
    r["a_model_only"] = model_only(model_dir, tif, cfg)
    r["a_star_actors"], r["actor_layout"] = model_only_actors(model_dir, tif, cfg)
    r["b_dataloader"] = dataloader_baseline(model_dir, tif, cfg)
    r["c_score_tif"], _ = hcd_score(model_dir, tif, os.path.join(cfg.work, "out-c"), cfg)
    r["d_score_parquet"], r["peak_rss_n"] = hcd_score(model_dir, shards, os.path.join(cfg.work, "out-d"), cfg)
    if s3_uri:
        r["e_score_s3"], _ = hcd_score(model_dir, s3_uri, s3_uri.rstrip("/") + "-preds", cfg)
    if not cfg.skip_memory:
        _, big = ensure_data(cfg, cfg.n * cfg.mem_factor, f"n{cfg.n * cfg.mem_factor}")
        _, r["peak_rss_kn"] = hcd_score(model_dir, big, os.path.join(cfg.work, "out-big"), cfg)
    if cfg.slide_tiles:
        slides, tiles = ensure_slides(cfg)
        _, tile_shards = ensure_data(cfg, tiles, f"n{tiles}")
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

        publish(cfg.markdown, "score", "Scoring: model alone, a DataLoader, and hcd score end to end",
                format_table(r, cfg), job="bench_score", cfg=cfg)
    return r


def _memory_rows(cfg: BenchScoreConfig, model_dir: str, shards: str, r: dict) -> dict:
    """(d) at N and at mem_factor x N: patches/s and peak RSS of driver + Ray workers, side by side."""
    kn = cfg.n * cfg.mem_factor
    big = replicated(shards, cfg.mem_factor, os.path.join(cfg.work, f"n{kn}-replicated-shards"))
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
