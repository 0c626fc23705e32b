"""Every command's settings, each defined once: its default, type, help and allowed values.

    hcd score --help        # flags generated from ScoreConfig below
    python -c "from hcdlib.config import ScoreConfig; print(ScoreConfig(model='m', input='i', out='o'))"

The ``hcd`` command line is derived from these dataclasses (:func:`hcdlib.cli.add_flags`): a
field becomes ``--field-name`` with the field's type, default and ``help``, so a default is
written here and nowhere else. Library callers build the same objects directly. Every value
is checked when the object is built (``range``, ``choices``), so a bad flag is one line on the
driver, before Ray starts. The objects are frozen: a Ray Train worker gets the object itself,
and a typo in a field name is an error on the driver, not a ``KeyError`` on a worker.

This module imports nothing heavy (no torch, pyarrow or Ray), so ``hcd --help`` is instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field, fields

from hcdlib.errors import UserError, check_range

# Architectures hcd can build (hcdlib.model.architectures holds the builders).
ARCHES = ("hcdnet", "resnet18", "resnet50", "densenet121", "efficientnet_b0")
# Test-time augmentation: 1 none, 4 rotations, 8 the dihedral group.
TTA_CHOICES = (1, 4, 8)
# Training arithmetic: auto is bf16 autocast where the hardware does bf16 natively, else fp32.
PRECISIONS = ("auto", "bf16", "fp32")
BACKENDS = ("torch", "openvino")  # the runtime of the scoring actors' model
# Decoded training data kept in Ray's object store: auto decides by its size (hcdlib.commands.train.run).
CACHE_CHOICES = ("auto", "on", "off")
# Plausible scanner resolutions in microns per pixel (a 100x oil objective is ~0.1; a 1x overview ~10).
MPP_RANGE = (0.05, 20.0)
# Share of a tile that must be tissue for it to be scored: on the coverage benchmark
# (benchmarks/coverage.py) the highest that keeps 95% of the visible tissue in scored tiles,
# with glass well under a quarter of their area.
TISSUE_THRESHOLD = 0.25


def setting(default=MISSING, help: str = "", *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, choices: tuple | None = None, output: bool = False):
    """A config field with its help text and allowed values (a field without default is required).

    ``output``: the location the command writes to (checked by :func:`hcdlib.storage.uri.check_kept`).
    """
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices, "output": output}
    return field(default=default, metadata=meta)


def precision_setting():
    """``--precision``, one definition for training and scoring."""
    return setting("auto", "arithmetic of the model: auto is bf16 autocast where the device does bf16 natively "
                           "(GPUs of compute capability 8.0 or more; CPUs with AVX512-BF16 or AMX), else fp32 "
                           "(scoring on an older GPU: fp16, every probability checked finite); probabilities are "
                           "float32 either way", choices=PRECISIONS)


def flag_name(name: str) -> str:
    """``batch_size`` -> ``--batch-size``: how a field is spelled on the command line."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Settings:
    """Base of every command's config: checks each field against its ``setting`` on construction."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or not f.metadata:
                continue
            if isinstance(value, str) and value.lower().startswith("s3://") and "@" in value[5:].split("/")[0]:
                # The message must not repeat the value: it would put the secret in logs and shells.
                raise UserError(f"{flag_name(f.name)}: an s3:// URI with credentials in it is refused (they would "
                                "land in logs and manifests); give them through the AWS environment or config files")
            choices = f.metadata["choices"]
            if choices is not None and value not in choices:
                raise UserError(f"{flag_name(f.name)} must be one of {', '.join(map(str, choices))}, got {value!r}")
            check_range(flag_name(f.name), value, f.metadata["lo"], f.metadata["hi"], lo_open=f.metadata["lo_open"])
            if f.metadata["output"]:
                from hcdlib.storage.uri import check_kept

                check_kept(value, flag_name(f.name))
        self.check()

    def check(self) -> None:
        """Rules that involve more than one field (none by default)."""

    def replace(self, **changes):
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def located(self, *names: str):
        """A copy with the local paths in fields ``names`` made absolute (see :func:`hcdlib.storage.uri.absolute`)."""
        from hcdlib.storage.uri import absolute

        return dataclasses.replace(self, **{n: absolute(getattr(self, n)) for n in names})


@dataclass(frozen=True)
class SynthConfig(Settings):
    """Write synthetic H&E patches (Kaggle layout + labels.csv)."""

    out: str = setting(help="output folder URI (local path or s3://)", output=True)
    n: int = setting(2000, "number of patches", lo=1)
    slides: int = setting(8, "number of simulated slides", lo=1)
    seed: int = setting(0, "random seed (output is deterministic)")
    format: str = setting("tif", "tif (lossless) or jpg (q75)", choices=("tif", "jpg"))
    positive_fraction: float = setting(0.4, "fraction of tumour patches", lo=0, hi=1)


@dataclass(frozen=True)
class PackConfig(Settings):
    """Pack any patch source into Parquet shards (few large objects instead of millions)."""

    input: str = setting(help="patch source URI (folder, class folders, shards, PatchCamelyon .h5)")
    out: str = setting(help="output folder URI for the shards", output=True)
    labels: str | None = setting(None, "labels CSV URI (id,label[,slide_id])")
    rows_per_file: int = setting(10_000, "patches per shard", lo=1)
    row_group_size: int = setting(1024, "patches per row group: the unit of scoring work and resume", lo=1)
    threads: int = setting(4, "parallel reads (object stores answer small GETs slowly)", lo=1)
    overwrite: bool = setting(False, "replace an earlier, different hcd pack run in --out (only files hcd wrote)")


@dataclass(frozen=True)
class ScoreConfig(Settings):
    """Batch-score patches or whole slides with Ray Data; writes committed Parquet predictions."""

    model: str = setting(help="model artifact URI (the <train-out>/model folder)")
    input: str = setting(help="patch source or slide folder URI")
    out: str = setting(help="output URI for predictions", output=True)
    labels: str | None = setting(None, "labels CSV URI (optional; carried for slide ids)")
    tta: int = setting(1, "test-time augmentation: 1 none, 4 rotations, 8 dihedral group", choices=TTA_CHOICES)
    batch_size: int | None = setting(None, "patches per model call (default 256 on CPU actors, 1024 on GPU actors)",
                                     lo=1)
    precision: str = precision_setting()
    backend: str = setting("torch", "the model's runtime: torch, or openvino on CPU actors (pip install "
                                    "'hcd[openvino]'; faster on CPUs with native bf16)", choices=BACKENDS)
    actors: int | None = setting(None, "model actors (default: from the cluster; on a cluster with no GPU node up "
                                       "and no autoscaler limits, give it with --gpus-per-actor)", lo=1)
    gpus_per_actor: float | None = setting(None, "GPUs per actor (default 0.5 where GPUs exist: two actors share "
                                                 "each GPU; 0 scores on CPUs)", lo=0)
    cpus_per_actor: float | None = setting(None, "CPUs per actor (default: what leaves the readers a share)", lo=0)
    chunk_size: int = setting(1024, "patches per work unit (the granularity of resume)", lo=1)
    compile: bool = setting(False, "torch.compile the model in each actor")
    resize: bool = setting(False, "resize patches of another size to 96x96")
    slides: bool = setting(False, "the input holds whole-slide images (automatic for .svs/.ndpi/.mrxs/...; "
                                  "needed for .tif)")
    mpp: float | None = setting(None, "slides: microns per pixel, overriding (or replacing) the metadata",
                                lo=MPP_RANGE[0], hi=MPP_RANGE[1])
    tissue_threshold: float = setting(TISSUE_THRESHOLD, "slides: fraction of a tile that must be tissue for it to be "
                                                        "scored",
                                      lo=0, hi=1)
    overwrite: bool = setting(False, "replace an earlier hcd run in --out (only files hcd wrote)")
    address: str | None = setting(None, "Ray address (default: RAY_ADDRESS, else a local Ray)")


@dataclass(frozen=True)
class TrainConfig(Settings):
    """Train a patch classifier with Ray Train; exports the best epoch to <out>/model.

    The defaults are tuned for a 30-minute budget on a CPU (docs/training.md).
    """

    data: str = setting(help="training patch source URI")
    out: str = setting(help="run folder URI: checkpoints, metrics, model/", output=True)
    labels: str | None = setting(None, "labels CSV URI for --data")
    val_data: str | None = setting(None, "validation source URI (default: hold out groups of --data)")
    val_labels: str | None = setting(None, "labels CSV URI for --val-data")
    val_fraction: float = setting(0.15, "share of --data's slide groups held out when there is no --val-data",
                                  lo=0, hi=1, lo_open=True)
    arch: str = setting("hcdnet", "hcdnet is small and fast on CPU; the others are torchvision CNNs", choices=ARCHES)
    weights: str = setting("none", "none | imagenet | URI of a state dict (safetensors or a tensors-only .pt) "
                                   "or of an hcd model folder (<train-out>/model) to start from")
    epochs: int = setting(40, "maximum epochs", lo=1)
    batch_size: int = setting(128, "per-worker batch size", lo=1)
    lr: float = setting(3e-3, "peak learning rate of the one-cycle schedule at a global batch of 128; scaled by "
                              "sqrt(global batch / 128) for more workers or larger batches", lo=0, hi=10, lo_open=True)
    weight_decay: float = setting(1e-4, "AdamW weight decay", lo=0)
    patience: int = setting(6, "early stopping: epochs without validation AUC gain, counted until "
                                 "the uniform weight average (--swa-from) starts", lo=1)
    crop: int = setting(96, "the model sees the centre CROP px of each 96 px patch (the label is about the "
                            "centre 32 px; a smaller crop trains faster); recorded in the model, so scoring "
                            "crops the same", lo=32, hi=96)
    ema: float = setting(0.997, "decay of the exponential moving average of the weights that is validated "
                                "and exported (0: the raw weights until --swa-from)", lo=0, hi=0.9999)
    swa_from: float = setting(0.6, "from this share of the run (its time budget, else its epochs) on, the "
                                   "exported weights are the plain mean of every step's (stochastic weight "
                                   "averaging); 1: never", lo=0, hi=1)
    val_tta: int = setting(1, "dihedral views averaged in each validation, as in scoring: 8 chooses the "
                              "exported epoch on the metric that scoring with 8 views reports, at 8x "
                              "validation's compute (time a budget then spends on validation)",
                           choices=TTA_CHOICES)
    precision: str = precision_setting()
    workers: int | None = setting(None, "Ray Train workers (default: one per GPU, else 1)", lo=1)
    gpus_per_worker: float | None = setting(None, "GPUs per worker (default 1 where GPUs exist; a fraction only "
                                                  "with one worker: two ranks cannot share a GPU)", lo=0)
    cpus_per_worker: float | None = setting(None, "CPUs Ray reserves per worker", lo=0)
    time_budget_min: float | None = setting(None, "stop cleanly (with a checkpoint) after M minutes",
                                            lo=0, lo_open=True)
    seed: int = setting(0, "random seed")
    resume: bool = setting(False, "require an existing run in --out to resume")
    max_failures: int = setting(2, "worker failures Ray Train recovers from (from the last checkpoint)", lo=0)
    chunk_size: int = setting(512, "patches per read task", lo=1)
    cache: str = setting("auto", "keep the decoded patches in Ray's object store after one read, so epochs "
                                 "do not read and decode them again: auto (when they fill at most half of "
                                 "the object store of the nodes up when training starts; on an autoscaling "
                                 "cluster that may be the head's alone: give on when the data fits the GPU "
                                 "nodes'), on, off", choices=CACHE_CHOICES)
    address: str | None = setting(None, "Ray address (default: RAY_ADDRESS, else a local Ray)")

    def check(self) -> None:
        """ImageNet weights only for torchvision architectures; --val-labels needs --val-data; whole GPUs per rank."""
        if self.gpus_per_worker and self.gpus_per_worker % 1 and (self.workers or 1) > 1:
            raise UserError(f"--gpus-per-worker {self.gpus_per_worker:g} with {self.workers} workers would put two "
                            "training ranks on one GPU, which NCCL refuses or serialises; give whole GPUs per worker, "
                            "or one worker")
        if self.weights == "imagenet" and self.arch == "hcdnet":
            raise UserError("hcdnet has no ImageNet weights; use --weights none or a torchvision --arch")
        if self.val_labels and not self.val_data:  # it was ignored: validation came from --data, with --labels
            raise UserError("--val-labels labels --val-data, which is not given; without --val-data, validation is "
                            "held out of --data and labelled by --labels")


# Class names of tumour in QuPath (Tumor), Camelyon16's ASAP groups (_0, _1) and Camelyon17 (metastases).
TUMOUR_CLASSES = "tumor,tumour,metastasis,metastases,_0,_1"
OTHER_CLASSES = "_2,normal,exclusion,other,stroma,necrosis,immune cells,region*,ignore*"


@dataclass(frozen=True)
class EvalConfig(Settings):
    """Metrics, figures and an HTML report for committed predictions against labels."""

    predictions: str = setting(help="output URI of hcd score")
    out: str = setting(help="report folder URI", output=True)
    labels: str | None = setting(None, "labels CSV (id,label[,slide_id]; ids may be slide ids) or a labelled patch "
                                       "source; needed unless --annotations")
    annotations: str | None = setting(None, "folder of slide annotations (QuPath GeoJSON, ASAP XML), a file per "
                                             "slide named as the slide: tile, slide and lesion (FROC) metrics")
    tumour_classes: str = setting(TUMOUR_CLASSES, "annotation classes that outline tumour (comma-separated, "
                                                  "case-insensitive, * matches any text)")
    other_classes: str = setting(OTHER_CLASSES, "other annotation classes, cut out of the tumour they lie in "
                                                "(Camelyon16's _2); a class in neither list is refused")
    allow_missing: bool = setting(False, "evaluate over a partial join (counted)")
    target_sensitivity: float = setting(0.95, "operating point to report", lo=0, hi=1, lo_open=True)
    threshold: float | None = setting(None, "decision threshold (default: the model's, else 0.5)", lo=0, hi=1)
    bootstrap: int = setting(1000, "bootstrap resamples for the AUC interval", lo=0)
    top_k: int = setting(3, "most confident errors shown per kind", lo=1)
    grid: int = setting(8, "patches per row in the report's patch grids", lo=1)
    seed: int = setting(0, "random seed of the bootstrap")


@dataclass(frozen=True)
class SubmissionConfig(Settings):
    """Write a Kaggle submission CSV (id,label) from committed predictions."""

    predictions: str = setting(help="output URI of hcd score")
    out: str = setting(help="CSV URI to write (an existing file is refused unless --overwrite)", output=True)
    overwrite: bool = setting(False, "replace an existing --out file")


@dataclass(frozen=True)
class DemoConfig(Settings):
    """Run the whole product on real PatchCamelyon patches that ship with hcd.

    Trains, scores, evaluates, and scores a slide assembled from held-out patches.
    """

    out: str = setting("hcd-demo", "folder for everything the demo writes", output=True)
    minutes: float = setting(2.0, "training time budget", lo=0, lo_open=True)
