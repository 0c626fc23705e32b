"""The benchmarks' data: synthetic patches packed once and reused, slides, copies on S3, and memory sampling.

What a benchmark caches must be what it claims to time: shards from an older ``hcd pack`` are
packed again rather than timed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np

from benchmarks.config import BenchScoreConfig
from hcdlib.commands.pack import PackConfig, pack, shard_options
from hcdlib.commands.synth import SynthConfig, write_synth
from hcdlib.commands.synth_slides import synth_slide_pixels, write_slide_tiff
from hcdlib.sources.base import PACK_MANIFEST
from hcdlib.sources.chunks import ROW_SCHEMA
from hcdlib.sources.decode import decode_patch
from hcdlib.sources.slides.source import PCAM_MPP
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)


def tree_memory() -> tuple[int, int]:
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
    """Samples :func:`tree_memory` in a thread while a block runs: ``peak`` (RSS) and ``peak_pss``.

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
            rss, pss = tree_memory()
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(1.0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ensure_data(cfg: BenchScoreConfig, n: int, name: str) -> tuple[str, str]:
    """Synthetic .tif folder and its Parquet shards for ``n`` patches (reused across runs)."""
    tif, shards = os.path.join(cfg.work, f"{name}-tif"), os.path.join(cfg.work, f"{name}-shards")
    if not os.path.exists(os.path.join(tif, "labels.csv")):
        write_synth(SynthConfig(out=tif, n=n, seed=123))
    if not packed_by_this_hcd(shards):
        # A complete pack in an older format is the benchmark's own stale cache: packed again. A
        # pack cut short is left to hcd pack, which resumes it.
        if os.path.exists(os.path.join(shards, "_SUCCESS")):
            log.warning("%s: not in this hcd's pack format; packing it again", shards)
            shutil.rmtree(shards)
        pack(PackConfig(input=tif, out=shards))
    return tif, shards


def packed_by_this_hcd(shards: str) -> bool:
    """Whether the benchmark's cached ``shards`` are complete and in this hcd's pack format.

    Shards an older ``hcd pack`` left in the work folder (without the decoded ``pixels`` column,
    or with another codec for it) would be read fine, so every row after them would time the old
    format, silently.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq


    if not os.path.exists(os.path.join(shards, "_SUCCESS")):
        return False
    first = next(Path(shards).rglob("*.parquet"), None)
    if first is None or pq.read_schema(first).names != ROW_SCHEMA.names:
        return False
    probe = io.BytesIO()  # what this hcd's pack writes, as Parquet's metadata names it
    pq.write_table(pa.table([pa.nulls(1, f.type) for f in ROW_SCHEMA], schema=ROW_SCHEMA), probe, **shard_options(1))
    return pixels_codec(first) == pixels_codec(io.BytesIO(probe.getvalue()))


def pixels_codec(source) -> str:
    """The compression of a shard's ``pixels`` column, as its Parquet metadata names it."""
    import pyarrow.parquet as pq

    meta = pq.read_metadata(source)
    return meta.row_group(0).column(meta.schema.names.index("pixels")).compression


def decoded(tif: str, limit: int | None = None) -> np.ndarray:
    """The first ``limit`` .tif patches of a folder, decoded (model-only rows score them from memory)."""
    files = sorted(Path(tif).glob("*.tif"))[:limit]
    return np.stack([decode_patch(f.read_bytes()).pixels for f in files])


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


def ensure_slides(cfg: BenchScoreConfig) -> tuple[str, int]:
    """Four square synthetic slides at PCam resolution holding ``cfg.slide_tiles`` tissue tiles."""
    side = max(1, int((cfg.slide_tiles / 4) ** 0.5))
    folder = os.path.join(cfg.work, f"slides-{side}")
    os.makedirs(folder, exist_ok=True)
    for i in range(4):
        path = os.path.join(folder, f"slide_{i}.tif")
        if not os.path.exists(path):
            write_slide_tiff(path, synth_slide_pixels(side, side, seed=200 + i), mpp=PCAM_MPP)
    return folder, 4 * side * side


def upload(shards: str, uri: str = "s3://hcd-bench/shards") -> str:
    """Copy a local folder to ``uri`` on the S3 server the environment points at; returns the URI."""
    import boto3
    import pyarrow.fs as pafs

    s3, bucket = boto3.client("s3"), uri[len("s3://"):].split("/")[0]
    if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=bucket)
    fs, path = urimod.resolve(uri)
    pafs.copy_files(shards, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def replicated(shards: str, k: int, out: str) -> str:
    """``k`` copies of a pack's shards with distinct ids: a k x N archive without rendering k x N patches."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq


    if packed_by_this_hcd(out):
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
