"""The GPU check: what hcd's GPU paths do on one GPU machine, in one command of at most 10 minutes.

    python jobs/gpu_check.py --out gpu-check              # on a GPU machine (no network needed)
    python jobs/gpu_check.py --out gpu-check --dry-run    # tiny sizes on the CPU: CI runs it

Writes ``<out>/gpu_check.json`` and ``<out>/gpu_check.md``. Sections, each timed: the
environment; the device each of three Ray actors takes (asking 0, 0.5 and 1 GPU); the model
alone (hcdnet and resnet50, batches of 256 to 4096, TTA 1 and 8, fp32 against the default
arithmetic, every output finite); ``hcd score`` end to end on packed patches (defaults, a larger
batch, TTA 8, --compile) with the GPU's utilisation; ``hcd train`` under a time budget, resumed
and exported. A section that needs Ray is skipped, with the reason, where Ray is not installed.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks.config import GpuCheckConfig
from benchmarks.gpu_report import markdown
from hcdlib.commands.pack import pack
from hcdlib.commands.score.run import score
from hcdlib.commands.synth import write_synth
from hcdlib.commands.train.folder import clear_run
from hcdlib.config import PackConfig, ScoreConfig, SynthConfig, TrainConfig
from hcdlib.model.device import DeviceError, native_bf16, pick, probe
from hcdlib.raykit.cluster import init_ray

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sizes:
    """How much each section runs: the full check on a GPU, or a dry run that only proves the code works."""

    arches: tuple[str, ...]
    batches: tuple[int, ...]
    patches: int  # per model-only row
    score_patches: int
    train_minutes: tuple[float, ...]  # a first run's budget, then the resumed run's (0: by epochs)
    compile: bool


FULL = Sizes(("hcdnet", "resnet50"), (256, 1024, 4096), 16_384, 20_000, (1.0, 2.0), True)
DRY = Sizes(("hcdnet",), (8, 16), 16, 128, (0.0,), False)  # one short training run: resume is the full check's


def _ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def environment() -> dict:
    """torch, CUDA, the GPU, its capability and whether bf16 is native there; Ray if installed."""
    import torch


    facts = probe()
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": facts.cuda_available, "capability": facts.capability,
           "gpu": torch.cuda.get_device_name(0) if facts.cuda_available else None,
           "gpu_native_bf16": native_bf16(facts, "cuda"), "cpu_native_bf16": facts.cpu_native_bf16,
           "cpus": os.cpu_count(), "ray": None}
    if _ray_available():
        import ray

        env["ray"] = ray.__version__
    return env


def _probe_in_actor() -> dict:

    facts = probe()
    try:
        plan = pick(facts=facts).to_dict()
    except DeviceError as exc:
        plan = {"error": str(exc)}
    return {"ray_gpu_ids": facts.ray_gpu_ids, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), **plan}


def probes() -> list[dict]:
    """The device decision inside Ray tasks asking for 0, 0.5 and 1 GPU."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    rows = []
    for asked in (0.0, 0.5, 1.0):
        if asked > gpus:
            rows.append({"asked_gpus": asked, "skipped": f"this Ray has {gpus:g} GPUs"})
            continue
        task = ray.remote(_probe_in_actor).options(num_gpus=asked, num_cpus=0.5)
        rows.append({"asked_gpus": asked, **ray.get(task.remote())})
    return rows


def model_rows(sizes: Sizes) -> list[dict]:
    """Patches/s of the model alone per arch, batch, TTA and arithmetic; bf16 against fp32; finite outputs."""
    import torch

    from hcdlib.model.architectures import build_model
    from hcdlib.model.infer import Predictor, for_inference

    plan = pick()
    device = torch.device(plan.device)
    rng = np.random.default_rng(0)
    rows = []
    for arch in sizes.arches:
        model, pre = build_model(arch)
        model = for_inference(model.to(device))
        for batch in sizes.batches:
            pixels = torch.from_numpy(rng.integers(0, 256, (max(batch, sizes.patches), 96, 96, 3), dtype=np.uint8))
            for tta in (1, 8):
                ref = None
                for arith in dict.fromkeys((None, plan.autocast)):
                    predict = Predictor(model, pre, device=device, tta=tta, autocast=arith)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    first = predict(pixels[:batch])  # also the warm-up
                    t0 = time.perf_counter()
                    outs = [predict(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
                    rate = len(pixels) / (time.perf_counter() - t0)
                    ref = first if ref is None else ref
                    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
                    rows.append({"arch": arch, "batch": batch, "tta": tta, "arithmetic": arith or "fp32",
                                 "patches_per_s": round(rate, 1),
                                 "finite": bool(np.isfinite(np.concatenate(outs)).all()),
                                 "max_abs_dp_vs_fp32": float(np.abs(first - ref).max()), "peak_gpu_mib": peak})
    return rows


class GpuSampler:
    """Samples the GPU's utilisation and memory with nvidia-smi twice a second while a block runs."""

    def __enter__(self) -> GpuSampler:
        self.util: list[float] = []
        self.mem: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-i", "0"]
        while not self._stop.wait(0.5):
            out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.split(",")
            if len(out) == 2:
                self.util.append(float(out[0]))
                self.mem.append(float(out[1]))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict:
        """Mean utilisation and peak memory (None without nvidia-smi)."""
        return {"gpu_util_mean": round(float(np.mean(self.util)), 1) if self.util else None,
                "gpu_mem_peak_mib": max(self.mem) if self.mem else None}


def _data(work: str, n: int) -> tuple[str, str]:
    """Synthetic labelled patches packed into Parquet shards: ``n`` to train on and score, a quarter to validate."""
    made = []
    for name, count, seed in (("train", n, 7), ("valid", max(64, n // 4), 8)):
        tif, shards = os.path.join(work, f"synth-{name}-{count}"), os.path.join(work, f"shards-{name}-{count}")
        if not os.path.exists(os.path.join(shards, "_SUCCESS")):
            write_synth(SynthConfig(out=tif, n=count, seed=seed))
            pack(PackConfig(input=tif, out=shards, labels=os.path.join(tif, "labels.csv")))
        made.append(shards)
    return made[0], made[1]


def score_rows(sizes: Sizes, work: str, model_dir: str, shards: str) -> list[dict]:
    """``hcd score`` end to end: defaults, a larger batch, TTA 8 and (on a GPU) --compile."""
    runs = {"defaults": {}, "batch 4096": {"batch_size": 4096}, "tta 8": {"tta": 8}}
    if sizes.compile:
        runs["compile"] = {"compile": True}
    rows = []
    for name, flags in runs.items():
        with GpuSampler() as gpu:
            m = score(ScoreConfig(model=model_dir, input=shards, out=os.path.join(work, f"score-{name}"),
                                  overwrite=True, **flags))
        rows.append({"run": name, "rows": m["rows"], "errors": m["errors"], "wall_s": m["wall_seconds"],
                     "patches_per_s": round(m["rows"] / m["wall_seconds"], 1),
                     "batch_size": m["config"]["batch_size"], **gpu.summary()})
    return rows


def train_rows(sizes: Sizes, work: str, shards: tuple[str, str]) -> tuple[list[dict], str]:
    """``hcd train`` under a budget, then resumed with a larger one, and exported; returns rows and the model."""
    from hcdlib.commands.train.run import train

    out = os.path.join(work, "train")
    clear_run(out)  # an earlier check's run, by hcd's own names: nothing else in --out is touched
    rows = []
    for i, minutes in enumerate(sizes.train_minutes):
        # a dry run trains by epochs (1, then 2): a budget on 2 CPU cores would go to starting Ray
        budget = {"time_budget_min": minutes} if minutes else {"epochs": i + 1}
        cfg = TrainConfig(data=shards[0], val_data=shards[1], out=out, batch_size=128 if minutes else 32, **budget)
        with GpuSampler() as gpu:
            t0 = time.perf_counter()
            meta = train(cfg)
        m = meta["metrics"]
        rows.append({"run": "resumed" if i else "first", "wall_s": round(time.perf_counter() - t0, 1),
                     "epochs_run": m.get("epochs_run"), "val_auc": m.get("val_auc"),
                     "images_per_s": m.get("images_per_s"), "arithmetic": m.get("arithmetic"),
                     "exported": os.path.exists(os.path.join(out, "model", "model.json")), **gpu.summary()})
    return rows, os.path.join(out, "model")


def _section(report: dict, name: str, fn: Callable, *args, needs_ray: bool = False):
    """Run one section into ``report``, timed; a failure is recorded and the next section runs."""
    if needs_ray and report["environment"]["ray"] is None:
        report[name] = {"skipped": "Ray is not installed (see docs/gpu-check.md for carrying its wheels)"}
        return None
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as exc:  # the check reports every section: one failure must not hide the others
        log.exception("%s failed", name)
        report[name] = {"failed": f"{type(exc).__name__}: {exc}"}
        return None
    report[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
    report[name] = out[0] if isinstance(out, tuple) else out
    return out


def run(cfg: GpuCheckConfig) -> dict:
    """Run every section, write ``gpu_check.json`` and ``gpu_check.md`` into ``cfg.out``; return the report."""
    sizes = DRY if cfg.dry_run else FULL
    os.makedirs(cfg.out, exist_ok=True)
    report: dict = {"dry_run": cfg.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "environment": environment()}
    _section(report, "models", model_rows, sizes)
    if report["environment"]["ray"] is not None:

        init_ray(dashboard=True)  # Ray Train needs the dashboard
    _section(report, "probes", probes, needs_ray=True)
    shards = _section(report, "data", _data, cfg.out, sizes.score_patches, needs_ray=True)
    trained = _section(report, "train", train_rows, sizes, cfg.out, shards, needs_ray=True) if shards else None
    if trained:
        _section(report, "score", score_rows, sizes, cfg.out, trained[1], shards[0], needs_ray=True)
    failed = [k for k, v in report.items() if isinstance(v, dict) and "failed" in v]
    report["failed_sections"] = failed
    with open(os.path.join(cfg.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(cfg.out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    log.info("GPU check written to %s (%s)", cfg.out, f"failed: {', '.join(failed)}" if failed else "every section ran")
    return report
