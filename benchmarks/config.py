"""The benchmarks' settings, each defined once (their flags are generated as hcd's are)."""

from __future__ import annotations

from dataclasses import dataclass

from hcdlib.config import ARCHES, TTA_CHOICES, Settings, setting


@dataclass(frozen=True)
class BenchScoreConfig(Settings):
    """Scoring benchmark: model only vs DataLoader vs hcd score (tif, Parquet, S3, slides), one run."""

    n: int = setting(20_000, "synthetic patches", lo=1)
    arch: str = setting("resnet18", "architecture", choices=ARCHES)
    batch_size: int = setting(256, "patches per model call", lo=1)
    tta: int = setting(1, "test-time augmentation", choices=TTA_CHOICES)
    work: str = setting("bench-out", "local folder for data and outputs", output=True)
    mem_factor: int = setting(5, "memory check at this many times N", lo=1)
    s3_uri: str | None = setting(None, "score shards already at this S3 URI for (e) (default: a local moto server)")
    skip_s3: bool = setting(False, "leave out (e)")
    skip_memory: bool = setting(False, "leave out the N vs k*N memory check")
    slide_tiles: int = setting(6400, "(f) tiles in a synthetic slide archive vs as many Parquet patches; "
                                     "0 leaves it out", lo=0)
    memory_only: bool = setting(False, "only (d) at N and --mem-factor x N: throughput and peak memory side by side")
    pipeline_only: bool = setting(False, "only the (g) rows: the pipeline alone (a constant instead of the model), "
                                         "steady state from N and 5N, and the start-up of a fresh hcd score")
    markdown: str | None = setting(None, "also write the table into this Markdown file (docs/performance.md), "
                                         "replacing the table this benchmark wrote there before")


@dataclass(frozen=True)
class BenchCoverageConfig(Settings):
    """Tissue coverage of scored tiles against --tissue-threshold, on synthetic slides of ragged, pale tissue."""

    slides: int = setting(4, "synthetic slides (one seed each)", lo=1)
    side: int = setting(4096, "slide width in level-0 px (height 3/4 of it)", lo=512)
    thresholds: str = setting("0.5,0.25,0.1,0.05", "tissue thresholds to measure (comma-separated)")
    slides_dir: str | None = setting(None, "measure the slides OpenSlide opens in this local folder (e.g. .svs) "
                                           "instead of synthetic ones")
    work: str = setting("bench-out/coverage", "local folder for the slides", output=True)
    markdown: str | None = setting(None, "also write the table into this Markdown file (docs/performance.md), "
                                         "replacing the table this benchmark wrote there before")


@dataclass(frozen=True)
class BenchBackendsConfig(Settings):
    """CPU scoring backends side by side: torch fp32/bf16/compiled, ONNX Runtime, OpenVINO, int8; hcd score."""

    model: str = setting(help="an exported hcd model (e.g. bench_train's run/model)")
    valid: str = setting(help="a labelled patch source: every backend's AUC over it")
    n: int = setting(4096, "patches per timed round (taken from --valid)", lo=1)
    batch_size: int = setting(256, "patches per model call", lo=1)
    rounds: int = setting(3, "timed rounds per backend (the best is reported)", lo=1)
    n_score: int = setting(40_000, "synthetic packed patches for hcd score end to end", lo=1)
    steady_factor: int = setting(3, "also score this many times --n-score (the same shards, copied): the "
                                    "actors' steady rate from the difference; 1 leaves it out", lo=1)
    work: str = setting("bench-out/backends", "local folder for exports, data and outputs", output=True)
    markdown: str | None = setting(None, "also write the table into this Markdown file (docs/performance.md), "
                                         "replacing the table this benchmark wrote there before")


@dataclass(frozen=True)
class GpuCheckConfig(Settings):
    """Check hcd's GPU paths on one GPU machine; JSON and a Markdown table in --out."""

    out: str = setting("gpu-check", "folder for the report and the check's own data", output=True)
    dry_run: bool = setting(False, "tiny sizes on whatever device there is (CPU in CI): proves the check runs")


@dataclass(frozen=True)
class BenchTrainConfig(Settings):
    """Training benchmark on real patches: AUC under a time budget, or Ray Train vs plain loop."""

    train: str = setting(help="training patch source (e.g. pcam-real/train)")
    valid: str = setting(help="validation patch source (e.g. pcam-real/valid)")
    out: str = setting("bench-out/train", "output folder", output=True)
    minutes: float = setting(30.0, "training time budget", lo=0, lo_open=True)
    throughput: bool = setting(False, "images/s of Ray Train vs a plain PyTorch loop")
    throughput_n: int = setting(4096, "patches for the throughput epochs", lo=1)
    test: str | None = setting(None, "a labelled test source never used in training or epoch choice: also "
                                     "scored (dihedral TTA 8) and its AUC reported")
    markdown: str | None = setting(None, "also write the table into this Markdown file (docs/performance.md), "
                                         "replacing the table this benchmark wrote there before")
