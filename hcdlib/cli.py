"""The ``hcd`` command line: one parser per command, shared by ``hcd <command>`` and ``jobs/<command>.py``.

    hcd --help
    hcd demo
    ray job submit --working-dir . -- python jobs/score.py --help

Each ``*_parser()`` returns an unparsed ``argparse.ArgumentParser`` so other launchers can
reuse or extend it; ``main`` parses, builds the command's config object and calls the library.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from hcdlib.errors import RunStopped, UserError

log = logging.getLogger("hcd")


class _Parser(argparse.ArgumentParser):
    """argparse with defaults in ``--help`` and the one-line error every user mistake gets."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def synth_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Flags of ``hcd synth``."""
    p = parser or _Parser(prog="hcd synth")
    p.description = "Write synthetic H&E patches (Kaggle layout + labels.csv)."
    p.add_argument("--out", required=True, help="output folder URI (local path or s3://)")
    p.add_argument("--n", type=_positive_int, default=2000, help="number of patches")
    p.add_argument("--slides", type=_positive_int, default=8, help="number of simulated slides")
    p.add_argument("--seed", type=int, default=0, help="random seed (output is deterministic)")
    p.add_argument("--format", choices=("tif", "jpg"), default="tif", help="tif (lossless) or jpg (q75)")
    return p


def pack_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Flags of ``hcd pack``."""
    p = parser or _Parser(prog="hcd pack")
    p.description = "Pack any patch source into Parquet shards (few large objects instead of millions)."
    p.add_argument("--input", required=True, help="patch source URI (folder, class folders, shards)")
    p.add_argument("--labels", help="labels CSV URI (id,label[,slide_id])")
    p.add_argument("--out", required=True, help="output folder URI for the shards")
    p.add_argument("--rows-per-file", type=_positive_int, default=10_000, help="patches per shard")
    return p


def score_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Flags of ``hcd score``."""
    p = parser or _Parser(prog="hcd score")
    p.description = "Batch-score patches with Ray Data; writes committed Parquet predictions."
    p.add_argument("--model", required=True, help="model artifact URI (the <train-out>/model folder)")
    p.add_argument("--input", required=True, help="patch source URI")
    p.add_argument("--labels", help="labels CSV URI (optional; carried for slide ids)")
    p.add_argument("--out", required=True, help="output URI for predictions")
    p.add_argument("--tta", type=int, choices=(1, 4, 8), default=1,
                   help="test-time augmentation: 1 none, 4 rotations, 8 dihedral group")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="patches per model call")
    p.add_argument("--actors", type=_positive_int, help="model actors (default: from the cluster)")
    p.add_argument("--gpus-per-actor", type=float, help="GPUs per actor (default 1 where GPUs exist)")
    p.add_argument("--cpus-per-actor", type=float, help="CPUs per actor")
    p.add_argument("--chunk-size", type=_positive_int, default=1024,
                   help="patches per work unit (the granularity of resume)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in each actor")
    p.add_argument("--resize", action="store_true", help="resize patches of another size to 96x96")
    p.add_argument("--slides", action="store_true",
                   help="the input holds whole-slide images (automatic for .svs/.ndpi/.mrxs/...; needed for .tif)")
    p.add_argument("--mpp", type=float, help="slides: microns per pixel, overriding (or replacing) the metadata")
    p.add_argument("--tissue-threshold", type=float, default=0.5,
                   help="slides: fraction of a tile that must be tissue for it to be scored")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    return p


def train_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Flags of ``hcd train``."""
    p = parser or _Parser(prog="hcd train")
    p.description = "Train a patch classifier with Ray Train; exports the best epoch to <out>/model."
    p.add_argument("--data", required=True, help="training patch source URI")
    p.add_argument("--labels", help="labels CSV URI for --data")
    p.add_argument("--val-data", help="validation source URI (default: hold out groups of --data)")
    p.add_argument("--val-labels", help="labels CSV URI for --val-data")
    p.add_argument("--out", required=True, help="run folder URI: checkpoints, metrics, model/")
    # No `choices=`: listing them would import torch, and `--help` should be instant.
    p.add_argument("--arch", default="hcdnet",
                   help="hcdnet (small, fast on CPU), resnet18, resnet50, densenet121 or efficientnet_b0")
    p.add_argument("--weights", default="none", help="none | imagenet | URI of a state dict")
    p.add_argument("--epochs", type=_positive_int, default=40, help="maximum epochs")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="per-worker batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--patience", type=_positive_int, default=6, help="early stopping: epochs without AUC gain")
    p.add_argument("--workers", type=_positive_int, help="Ray Train workers (default: one per GPU, else 1)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default 1 where GPUs exist)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs Ray reserves per worker")
    p.add_argument("--time-budget-min", type=float, help="stop cleanly (with a checkpoint) after M minutes")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--resume", action="store_true", help="require an existing run in --out to resume")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    return p


def submission_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Flags of ``hcd submission``."""
    p = parser or _Parser(prog="hcd submission")
    p.description = "Write a Kaggle submission CSV (id,label) from committed predictions."
    p.add_argument("--predictions", required=True, help="output URI of hcd score")
    p.add_argument("--out", required=True, help="CSV URI to write")
    return p


def evaluate_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Flags of ``hcd evaluate``."""
    p = parser or _Parser(prog="hcd evaluate")
    p.description = "Metrics, figures and an HTML report for committed predictions against labels."
    p.add_argument("--predictions", required=True, help="output URI of hcd score")
    p.add_argument("--labels", required=True, help="labels CSV (id,label[,slide_id]) or a labelled patch source")
    p.add_argument("--out", required=True, help="report folder URI")
    p.add_argument("--allow-missing", action="store_true", help="evaluate over a partial join (counted)")
    p.add_argument("--target-sensitivity", type=float, default=0.95, help="operating point to report")
    p.add_argument("--threshold", type=float, help="decision threshold (default: the model's)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC interval")
    return p


def bench_score_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Flags of ``hcd bench-score``."""
    p = parser or _Parser(prog="hcd bench-score")
    p.description = "Scoring benchmark: model only vs DataLoader vs hcd score (tif, Parquet, S3), one run."
    p.add_argument("--n", type=_positive_int, default=20_000, help="synthetic patches")
    p.add_argument("--arch", default="resnet18", help="architecture")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="patches per model call")
    p.add_argument("--tta", type=int, choices=(1, 4, 8), default=1, help="test-time augmentation")
    p.add_argument("--work", default="bench-out", help="local folder for data and outputs")
    p.add_argument("--mem-factor", type=_positive_int, default=5, help="memory check at this many times N")
    p.add_argument("--s3-uri", help="score shards already at this S3 URI for (e) (default: a local moto server)")
    p.add_argument("--skip-s3", action="store_true", help="leave out (e)")
    p.add_argument("--skip-memory", action="store_true", help="leave out the N vs k*N memory check")
    p.add_argument("--slide-tiles", type=int, default=6400,
                   help="(f) tiles in a synthetic slide archive vs as many Parquet patches; 0 leaves it out")
    p.add_argument("--memory-only", action="store_true",
                   help="only (d) at N and --mem-factor x N: throughput and peak memory side by side")
    return p


def bench_train_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Flags of ``hcd bench-train``."""
    p = parser or _Parser(prog="hcd bench-train")
    p.description = "Training benchmark on real patches: AUC under a time budget, or Ray Train vs plain loop."
    p.add_argument("--train", required=True, help="training patch source (e.g. pcam-real/train)")
    p.add_argument("--valid", required=True, help="validation patch source (e.g. pcam-real/valid)")
    p.add_argument("--out", default="bench-out/train", help="output folder")
    p.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    p.add_argument("--throughput", action="store_true", help="images/s of Ray Train vs a plain PyTorch loop")
    p.add_argument("--throughput-n", type=_positive_int, default=4096, help="patches for the throughput epoch")
    return p


def demo_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Flags of ``hcd demo``."""
    p = parser or _Parser(prog="hcd demo")
    p.description = ("Run the whole product on real PatchCamelyon patches that ship with hcd: train, score, "
                     "evaluate, and score a slide assembled from held-out patches.")
    p.add_argument("--out", default="hcd-demo", help="folder for everything the demo writes")
    p.add_argument("--minutes", type=float, default=2.0, help="training time budget")
    return p


def _config_kwargs(args: argparse.Namespace) -> dict:
    """A command's flags as its config's fields (what main() itself consumes left out)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "verbose")}


def run_synth(args: argparse.Namespace) -> int:
    """``hcd synth``."""
    from hcdlib.synth import SynthConfig, write_synth

    write_synth(SynthConfig(out=args.out, n=args.n, slides=args.slides, seed=args.seed, format=args.format))
    log.info("wrote %d patches and labels.csv to %s", args.n, args.out)
    return 0


def run_pack(args: argparse.Namespace) -> int:
    """``hcd pack``."""
    from hcdlib.pack import PackConfig, pack

    m = pack(PackConfig(input=args.input, labels=args.labels, out=args.out, rows_per_file=args.rows_per_file))
    log.info("packed %d patches into %d shards at %s", m["rows"], len(m["files"]), args.out)
    return 0


def run_score(args: argparse.Namespace) -> int:
    """``hcd score``."""
    from hcdlib.score import ScoreConfig, score

    cfg = ScoreConfig(**_config_kwargs(args))
    m = score(cfg)
    wall = m["wall_seconds"]
    log.info(
        "\n== hcd score summary ==\n rows     %d\n ok       %d\n errors   %d\n dup ids  %d\n"
        " wall     %.1fs\n rate     %.0f patches/s\n model    %s\n manifest %s",
        m["rows"], m["ok"], m["errors"], m["duplicate_input_ids"], wall, m["rows"] / max(wall, 1e-9),
        m["model"], m["manifest_uri"])
    return 0


def run_train(args: argparse.Namespace) -> int:
    """``hcd train``."""
    from hcdlib.train import TrainConfig, train

    meta = train(TrainConfig(**_config_kwargs(args)))
    m = meta["metrics"]
    log.info("\n== hcd train summary ==\n best epoch %s of %s\n val AUC    %.4f\n val acc    %.4f\n"
             " model      %s/model (%s)", m.get("best_epoch"), m.get("epochs_run"), m.get("val_auc", float("nan")),
             m.get("val_acc", float("nan")), args.out, meta["sha256"][:12])
    return 0


def run_submission(args: argparse.Namespace) -> int:
    """``hcd submission``."""
    from hcdlib.predictions import read_manifest, write_submission

    errors = read_manifest(args.predictions)["errors"]
    if errors:
        log.warning("%d patches failed to decode; they get label 0.5 in the submission", errors)
    n = write_submission(args.predictions, args.out)
    log.info("wrote %d rows to %s", n, args.out)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """``hcd evaluate``."""
    from hcdlib.evaluate import EvalConfig, evaluate

    m = evaluate(EvalConfig(**_config_kwargs(args)))
    p = m["patch"]
    log.info("\n== hcd evaluate summary ==\n patches  %d\n ROC AUC  %.4f (95%% CI %.4f-%.4f)\n PR AUC   %.4f\n"
             " report   %s", p["n"], p["roc_auc"], *(p["roc_auc_ci95"] or (float("nan"),) * 2), p["pr_auc"],
             f"{args.out}/report.html")
    return 0


def run_bench_score(args: argparse.Namespace) -> int:
    """``hcd bench-score``."""
    from hcdlib.benchmark_score import BenchScoreConfig, run

    run(BenchScoreConfig(**_config_kwargs(args)))
    return 0


def run_bench_train(args: argparse.Namespace) -> int:
    """``hcd bench-train``."""
    from hcdlib.benchmark_train import BenchTrainConfig, run

    run(BenchTrainConfig(**_config_kwargs(args)))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``hcd demo``."""
    from hcdlib.demo import DemoConfig
    from hcdlib.demo import run_demo as demo

    demo(DemoConfig(out=args.out, minutes=args.minutes))
    return 0


Command = tuple[Callable[..., argparse.ArgumentParser], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "demo": (demo_parser, run_demo),
    "synth": (synth_parser, run_synth),
    "pack": (pack_parser, run_pack),
    "train": (train_parser, run_train),
    "score": (score_parser, run_score),
    "evaluate": (evaluate_parser, run_evaluate),
    "submission": (submission_parser, run_submission),
    "bench-score": (bench_score_parser, run_bench_score),
    "bench-train": (bench_train_parser, run_bench_train),
}


def get_args_parser() -> argparse.ArgumentParser:
    """The ``hcd`` parser with every command as a sub-parser."""
    parser = _Parser(prog="hcd",
                                     description="Histopathologic cancer detection at archive scale.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (build, _) in COMMANDS.items():
        p = build(sub.add_parser(name, help=build().description))
        p.prog = f"hcd {name}"
        p.add_argument("--verbose", action="store_true", help="also show Ray's own logs, progress and warnings")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hcd`` (console script) and of every ``jobs/*.py``."""
    from hcdlib.console import setup_logging

    args = get_args_parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    try:
        return COMMANDS[args.command][1](args)
    except UserError as exc:  # the user can fix it: one line naming the thing and the fix
        log.error("%s", " ".join(str(exc).split()))
        return 2
    except RunStopped as exc:  # storage or a node went away: committed work is kept, a rerun resumes
        log.debug("run stopped", exc_info=exc)
        log.error("%s", " ".join(str(exc).split()))
        return 3
    # Anything else is a bug or a fault of the machine: it keeps its traceback and exit code 1.


if __name__ == "__main__":
    sys.exit(main())
