"""The (g) rows of the scoring benchmark: the pipeline alone, measured side by side in one run.

    python jobs/bench_score.py --n 40000 --pipeline-only      # the (g) rows alone

(g) rows time the pipeline alone: the model actors' forward pass is a constant
(:class:`ConstantScorer`, benchmark only), everything else is ``hcd score``. Each is run at N
and 5N inputs (copies with new ids or names, not re-rendered); steady state is 4N / (T(5N) -
T(N)), so start-up does not count, and start-up is its own pair of rows: a fresh ``hcd score``
process with the real model, from its start to its first committed part, joining a Ray that is
already up (as under ``ray job submit``) and starting its own (a user's first command).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np

from benchmarks.config import BenchScoreConfig
from benchmarks.data import PeakMemory, replicated, upload
from benchmarks.doc import publish
from hcdlib.commands.score.actor import Scorer
from hcdlib.commands.score.run import ScoreConfig, score
from hcdlib.commands.synth_slides import synth_slide_pixels, write_slide_tiff
from hcdlib.model.artifact import model_id, read_meta
from hcdlib.raykit.cluster import init_ray
from hcdlib.sources.slides.source import PCAM_MPP
from hcdlib.storage.s3local import recorded, whole_object_reads

log = logging.getLogger(__name__)


class ConstantScorer(Scorer):
    """Benchmark only: ``hcd score``'s model actor with the forward pass replaced by a constant.

    Everything else an actor does (receive the decoded batch, build the output rows) stays, so
    a run with it measures the pipeline alone: read, decode, move, collect, write. Never used
    by ``hcd score`` itself (``score(cfg, actor=ConstantScorer)`` is how the benchmark asks).
    """

    def __init__(self, model_uri: str, *, sha256: str, tta: int, threads: int, batch_size: int,
                 compile: bool = False, precision: str = "auto", backend: str = "torch"):

        self.model_id, self.batch_size = model_id(read_meta(model_uri)), batch_size

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        """0.5 for every patch, without touching the pixels."""
        return np.full(len(pixels), 0.5, dtype=np.float32)


def _linked_copies(src: str, k: int, out: str, pattern: str) -> str:
    """``k`` hard-linked copies of the files matching ``pattern`` in ``src``, under new names."""
    if os.path.isdir(out):
        return out
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    for f in sorted(Path(src).glob(pattern)):
        for j in range(k):
            os.link(f, os.path.join(tmp, f"r{j}-{f.name}"))
    os.rename(tmp, out)
    return out


def _timed(model_dir: str, source: str, out: str, *, slides: bool = False) -> tuple[float, int, tuple[int, int]]:
    """Seconds, rows and peak (RSS, PSS) of one in-process ``hcd score`` with a constant for the forward pass."""
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        m = score(ScoreConfig(model=model_dir, input=source, out=out, overwrite=True, slides=slides),
                  actor=ConstantScorer)
    if m["errors"]:
        raise RuntimeError(f"benchmark input {source}: {m['errors']} rows failed; the numbers would be wrong")
    return time.perf_counter() - t0, m["rows"], (mem.peak, mem.peak_pss)


def _steady(model_dir: str, small: str, big: str, out: str, *, slides: bool = False, warm: bool = True) -> dict:
    """Steady-state rows/s (from the difference of two sizes) and the start-up it implies.

    Ray is started and the N input scored once, untimed, first: if the run at N started Ray,
    T(N) would hold Ray's start (7 s here) and T(5N) not, and the difference would overstate the
    rate (17,693 against 10,103 rows/s, the same (g) measured both ways back to back). The first
    job on a Ray also starts Ray Data's own actors (2 s more), which the warm-up takes too.
    (``warm=False``: the caller has done it, e.g. outside a count of the bytes the timed runs read.)
    """
    init_ray()
    if warm:
        _timed(model_dir, small, out + "-warm", slides=slides)
    t1, n1, m1 = _timed(model_dir, small, out + "-n", slides=slides)
    t5, n5, m5 = _timed(model_dir, big, out + "-5n", slides=slides)
    rate = (n5 - n1) / (t5 - t1)
    log.info("%s: %d rows in %.1fs, %d in %.1fs: %.0f rows/s steady", small, n1, t1, n5, t5, rate)
    return {"rows": (n1, n5), "seconds": (t1, t5), "steady": rate, "startup_in_process": t1 - n1 / rate,
            "peak_rss": (m1[0], m5[0]), "peak_pss": (m1[1], m5[1])}


def first_part_seconds(model_dir: str, source: str, out: str, *, address: str | None = None) -> float:
    """A fresh ``hcd score`` process (real model): start to first committed part.

    It starts its own Ray, or joins the one at ``address`` (as under ``ray job submit``).
    """
    import shutil
    import subprocess
    import sys

    shutil.rmtree(out, ignore_errors=True)
    parts = Path(out, "parts")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if address:  # the running Ray has token authentication on (Ray's default for a new cluster)
        env.update(RAY_ADDRESS=address, RAY_AUTH_MODE="token")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hcdlib.cli", "score", "--model", model_dir, "--input", source,
                             "--out", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # its Ray's processes are in its session: killed with it
    try:
        while not (parts.is_dir() and any(parts.iterdir())):
            if proc.poll() is not None:
                raise RuntimeError(f"hcd score exited with {proc.returncode} before its first part")
            time.sleep(0.05)
        return time.perf_counter() - t0
    finally:
        _kill_with_its_ray(proc)


def _kill_with_its_ray(proc) -> None:
    """Kill an ``hcd score`` process (started in a session of its own) and the Ray it started; wait until gone.

    Killed alone, the command left its raylet, GCS and workers to notice and tear down on the
    same two cores as the next measurement (some of Ray's agents lived on for good): back to
    back, start-up measured 17.7-18.8 s where runs a quiet machine apart measured 13.2-14.5 s.
    A user's command ends with ``ray.shutdown``, so the next one does not meet that.
    """
    def session_members() -> list[int]:
        pids = []
        for d in os.listdir("/proc"):
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if d.isdigit() and int(fields[3]) == proc.pid:  # field 6 of stat: the session id
                pids.append(int(d))
        return pids

    proc.kill()
    proc.wait()
    deadline = time.time() + 60
    while (left := session_members()) and time.time() < deadline:
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _slide_folders(w: str) -> tuple[str, str]:
    """8 and 40 hard links of one synthetic 6720 px square slide (4,900 tissue tiles each)."""
    side = 70
    base = os.path.join(w, f"slide-{side}.tif")
    if not os.path.exists(base):
        write_slide_tiff(base, synth_slide_pixels(side, side, seed=300), mpp=PCAM_MPP)
    one = os.path.join(w, "slide-one")
    os.makedirs(one, exist_ok=True)
    if not os.path.exists(os.path.join(one, "s.tif")):
        os.link(base, os.path.join(one, "s.tif"))
    return (_linked_copies(one, 8, os.path.join(w, "slides-8"), "*.tif"),
            _linked_copies(one, 40, os.path.join(w, "slides-40"), "*.tif"))


def pipeline_rows(cfg: BenchScoreConfig, model_dir: str, tif: str, shards: str, *,
                  s3_endpoint: str | None = None) -> dict:
    """(g): the pipeline alone on Parquet shards, .tif files and slides; start-up of a fresh command.

    With ``s3_endpoint`` (the benchmark's moto server, recording requests) the shards and slides
    are also read from S3.
    """
    w = cfg.work
    r: dict = {}
    big = replicated(shards, 5, os.path.join(w, f"n{cfg.n * 5}-replicated-shards"))
    r["g"] = _steady(model_dir, shards, big, os.path.join(w, "out-g"))
    r["g-tif"] = _steady(model_dir, _linked_copies(tif, 1, os.path.join(w, f"n{cfg.n}-tif-linked"), "*.tif"),
                         _linked_copies(tif, 5, os.path.join(w, f"n{cfg.n * 5}-tif-linked"), "*.tif"),
                         os.path.join(w, "out-g-tif"))
    slides, more_slides = _slide_folders(w)
    r["g-slides"] = _steady(model_dir, slides, more_slides, os.path.join(w, "out-g-slides"), slides=True)
    if s3_endpoint:
        r.update(s3_rows(model_dir, {"shards": shards, "shards-5n": big, "slides": slides, "slides-5n": more_slides},
                         w, s3_endpoint))
    import ray

    # Start-up as a job on a Ray that is already up (`ray job submit`, a second `hcd score`): this
    # benchmark's own, idle now. Then as a user's first command meets it: Ray started by the command
    # (after this one is shut down: two Rays on these cores would not be a measurement).
    address = ray.get_runtime_context().gcs_address
    r["startup_joined"] = [first_part_seconds(model_dir, shards, os.path.join(w, "out-startup"), address=address)
                           for _ in range(3)]
    ray.shutdown()
    r["startup"] = [first_part_seconds(model_dir, shards, os.path.join(w, "out-startup")) for _ in range(3)]
    log.info("\n%s", format_pipeline(r, cfg))
    if cfg.markdown:

        publish(cfg.markdown, "pipeline", "The pipeline alone: what hcd can feed a GPU", format_pipeline(r, cfg),
                job="bench_score", cfg=cfg)
    return r


def s3_rows(model_dir: str, local: dict[str, str], w: str, endpoint: str) -> dict:
    """(g-S3) and (g-slides-S3): the same inputs as (g) and (g-slides), read from the S3 server.

    Outputs stay local, as in the local rows. For slides, the bytes the server sent per slide
    (counted by the server) are reported against the slide's size.
    """
    uris = {}
    for name, folder in local.items():  # the server is the benchmark's own, empty at its start
        t0 = time.perf_counter()
        uris[name] = upload(folder, f"s3://hcd-bench/{name}")
        log.info("uploaded %s to %s in %.0f s", folder, uris[name], time.perf_counter() - t0)
    r = {"g-S3": _steady(model_dir, uris["shards"], uris["shards-5n"], os.path.join(w, "out-g-s3"))}
    # The same reads from a server that reads each whole object per ranged GET, as stock moto does:
    # what the row above measured before the server read ranges only (hcdlib.storage.s3local.serve).
    with whole_object_reads(int(endpoint.rsplit(":", 1)[1])):
        r["g-S3-whole"] = _steady(model_dir, uris["shards"], uris["shards-5n"], os.path.join(w, "out-g-s3-whole"))
    out = os.path.join(w, "out-g-slides-s3")
    _timed(model_dir, uris["slides"], out + "-warm", slides=True)  # outside the count: it reads the N slides too
    with recorded(endpoint) as sent:
        r["g-slides-S3"] = _steady(model_dir, uris["slides"], uris["slides-5n"], out, slides=True, warm=False)
    size = os.path.getsize(next(Path(local["slides"]).glob("*.tif")))
    per_slide = [v for k, v in sent.items() if k.endswith(".tif")]
    r["g-slides-S3"]["s3_bytes_per_slide"] = (min(per_slide) / size, max(per_slide) / size, size)
    log.info("S3 bytes sent per slide / slide size: %.2f-%.2f (%d slides of %d bytes)",
             min(per_slide) / size, max(per_slide) / size, len(per_slide), size)
    return r


def _mem(pair: tuple[int, int]) -> str:
    return f"{pair[0] / 2**30:.2f}, {pair[1] / 2**30:.2f} GiB ({pair[1] / pair[0]:.2f}x)"


def format_pipeline(r: dict, cfg: BenchScoreConfig) -> str:
    """The (g) rows as a Markdown table."""
    cpus = os.cpu_count() or 1
    lines = [f"pipeline alone (forward pass = a constant), {cpus} CPUs, steady state = 4N / (T(5N) - T(N))", "",
             "| row | N, 5N | T(N), T(5N) s | steady rows/s | per core | start-up in process | peak PSS N, 5N "
             "| peak RSS N, 5N |", "|---|---|---|---:|---:|---:|---|---|"]
    names = {"g": "(g) Parquet shards, local disk", "g-S3": "(g-S3) the same shards on the local S3 server",
             "g-S3-whole": "(g-S3) the same, the server reading the whole shard for each ranged GET (stock moto)",
             "g-tif": "(g-tif) folder of .tif files",
             "g-slides": "(g-slides) tiles of pyramidal TIFF slides (tiles/s)",
             "g-slides-S3": "(g-slides-S3) the same slides on the local S3 server (tiles/s)"}
    for key, name in names.items():
        if key in r:
            x = r[key]
            lines.append(f"| {name} | {x['rows'][0]}, {x['rows'][1]} | {x['seconds'][0]:.1f}, {x['seconds'][1]:.1f} "
                         f"| {x['steady']:.0f} | {x['steady'] / cpus:.0f} | {x['startup_in_process']:.1f} s "
                         f"| {_mem(x['peak_pss'])} | {_mem(x['peak_rss'])} |")
    if "g-slides-S3" in r:
        lo, hi, size = r["g-slides-S3"]["s3_bytes_per_slide"]
        lines += ["", f"(g-slides-S3) bytes the S3 server sent per slide / the slide's size: {lo:.2f}-{hi:.2f} "
                      f"({size / 2**20:.0f} MiB slides; counted by the server)"]
    lines.append("")
    for key, how in (("startup", "Ray started by the command"), ("startup_joined", "joining a Ray already running")):
        s = r[key]
        lines.append(f"start-up of a fresh `hcd score` (real {cfg.arch} model, {how}), start to first committed "
                     f"part: {', '.join(f'{v:.1f}' for v in s)} s (median {sorted(s)[len(s) // 2]:.1f} s)")
    return "\n".join(lines)
