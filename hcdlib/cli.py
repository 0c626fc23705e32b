"""The ``hcd`` command line: one parser per command, shared by ``hcd <command>`` and ``jobs/<command>.py``.

    hcd --help
    hcd demo
    ray job submit --working-dir . -- python jobs/score.py --help

Every flag is generated from the command's config dataclass in :mod:`hcdlib.config` (type,
default, help, allowed values), so a setting is defined once. ``command_parser(name)`` returns
an unparsed ``argparse.ArgumentParser`` other launchers can reuse or extend; ``main`` parses,
builds the command's config object (which checks every value) and calls the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable

from hcdlib.config import (
    DemoConfig,
    EvalConfig,
    PackConfig,
    ScoreConfig,
    Settings,
    SubmissionConfig,
    SynthConfig,
    TrainConfig,
    flag_name,
)
from hcdlib.errors import Interrupted, RunStopped, UserError, storage_fault

log = logging.getLogger("hcd")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it has none or its help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with defaults in ``--help`` and the one-line error every user mistake gets."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_METAVARS = {int: "N", float: "X", str: "TEXT"}


def add_flags(parser: argparse.ArgumentParser, config: type[Settings]) -> argparse.ArgumentParser:
    """Add one flag per field of ``config``: its type, default and help come from the dataclass.

    Ranges and choices are checked when the config object is built from the parsed flags, so
    the command line and library callers meet the same rules and the same one-line messages.
    """
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # `int | None`: the flag is optional, its type int
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        required = f.default is dataclasses.MISSING
        kwargs: dict = {"help": f.metadata.get("help", "")}
        if kind is bool:
            kwargs.update(action="store_true")
        else:
            kwargs.update(type=kind, metavar=_METAVARS.get(kind, "VALUE"))
            if f.metadata.get("choices"):
                kwargs.update(choices=f.metadata["choices"], metavar=None)
        if required:  # no "(default: None)" in --help for a flag that has none
            kwargs.update(required=True, default=argparse.SUPPRESS)
        else:
            kwargs.update(default=f.default)
        parser.add_argument(flag_name(f.name), **kwargs)
    return parser


def command_parser(name: str, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The flags of ``hcd <name>`` (reusable by other launchers: pass a parser to extend it)."""
    config = COMMANDS[name][0]
    p = parser or _Parser(prog=f"hcd {name}")
    p.description = _description(config)
    add_flags(p, config)
    p.add_argument("--verbose", action="store_true", help="also show Ray's own logs, progress and warnings")
    return p


def _description(config: type[Settings]) -> str:
    return (config.__doc__ or "").strip().split("\n\n")[0]


def run_synth(cfg: SynthConfig) -> int:
    """``hcd synth``."""
    from hcdlib.commands.synth import write_synth

    write_synth(cfg)  # it logs what it wrote
    return 0


def run_pack(cfg: PackConfig) -> int:
    """``hcd pack``."""
    from hcdlib.commands.pack import pack

    m = pack(cfg)
    log.info("packed %d patches into %d shards at %s", m["rows"], len(m["files"]), cfg.out)
    return 0


def run_score(cfg: ScoreConfig) -> int:
    """``hcd score``."""
    from hcdlib.commands.score.run import score
    from hcdlib.storage import uri as urimod

    m = score(cfg)
    wall = m["wall_seconds"]
    rate = m["rows"] / max(wall, 1e-9)
    slides = ""
    if "slides" in m:  # where a pathologist looks next: the heatmaps and the per-slide table
        per = m["slides"]["per_slide"]
        bad = sum(s["status"] != "ok" for s in per)
        tiles = sum(s.get("tiles_failed") or 0 for s in per)  # unreadable tiles of slides that were scored
        # a slide with no tissue tile (glass, a failed scan) has no prediction row: say so here
        empty = sum(s["status"] == "ok" and not (s.get("tiles_scored") or s.get("tiles_failed")) for s in per)
        notes = [f"{tiles} tiles could not be read"] if tiles else []
        notes += [f"{empty} with no tissue tile"] if empty else []
        said = f" ({', '.join(notes)})" if notes else ""
        slides = (f"\n slides   {len(per) - bad} scored{said}, "
                  f"{bad} failed: heatmaps, GeoJSON and summary.csv in {urimod.join(cfg.out, 'slides')}")
    errors = f"{m['errors']}" + (f", e.g. {m['error_example']}" if m.get("error_example") else "")
    noted = ""
    if m.get("noted"):  # converted on the way in (grey, 16-bit, resized, partly outside a slide's scan)
        top = next(iter(m["note_examples"]))
        noted = f"\n notes    {m['noted']} rows scored after a conversion, e.g. {m['note_examples'][top]} x '{top}'"
    log.info(
        "\n== hcd score summary ==\n rows     %d\n ok       %d\n errors   %s%s\n dup ids  %d\n"
        " wall     %.1fs\n rate     %s patches/s\n model    %s\n manifest %s%s",
        m["rows"], m["ok"], errors, noted, m["duplicate_input_ids"], wall,
        f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}", m["model"], m["manifest_uri"], slides)
    if m["rows"] and not m["ok"]:  # committed, and worth nothing: a script must not read it as done
        log.warning("nothing was scored: all %d rows are errors (e.g. %s); fix the input or the flag the error "
                    "names and rerun with --overwrite",
                    m["rows"], m.get("error_example") or "see the error column")
        return 2
    return 0


def run_train(cfg: TrainConfig) -> int:
    """``hcd train``."""
    from hcdlib.commands.train.run import train

    meta = train(cfg)
    m = meta["metrics"]
    skipped = (f"\n skipped    {meta['skipped']} patches that could not be decoded (listed in {cfg.out}/skipped)"
               if meta.get("skipped") else "")
    views = f" (TTA {m['val_tta']})" if m.get("val_tta", 1) > 1 else ""
    log.info("\n== hcd train summary ==\n best epoch %s of %s\n val AUC    %.4f%s\n val acc    %.4f\n"
             " model      %s/model (%s)%s", m.get("best_epoch"), m.get("epochs_run"), m.get("val_auc", float("nan")),
             views, m.get("val_acc", float("nan")), cfg.out, meta["sha256"][:12], skipped)
    return 0


def run_submission(cfg: SubmissionConfig) -> int:
    """``hcd submission``."""
    from hcdlib.outputs.readers import write_submission
    from hcdlib.outputs.runfolder import read_manifest

    n = write_submission(cfg.predictions, cfg.out, overwrite=cfg.overwrite)
    errors = read_manifest(cfg.predictions)["errors"]
    if errors:
        log.warning("%d patches failed to decode; they have label 0.5 in the submission", errors)
    log.info("wrote %d rows to %s", n, cfg.out)
    return 0


def run_evaluate(cfg: EvalConfig) -> int:
    """``hcd evaluate``."""
    from hcdlib.commands.evaluate.metrics import evaluate
    from hcdlib.commands.evaluate.report import PLURAL, unit_of

    m = evaluate(cfg)
    p, failed, unit = m["patch"], m["join"]["error_rows"], unit_of(m)
    # Patches that failed to decode (slides that could not be read) have no probability: the
    # metrics cover the others, and say so.
    why = {"patch": "failed to decode", "tile": "failed to read"}.get(unit, "had no tile scored")
    errors = (f"\n errors   {failed} {'' if unit == 'tile' else 'labelled '}{PLURAL[unit]} {why}: not in the metrics"
              if failed else "")
    per = {"slide": " (each scored by its highest tile probability)",
           "tile": " (against the annotated tumour under each tile's centre)"}.get(unit, "")
    lesion = (m.get("lesion") or {}).get("froc")
    extra = f"\n FROC     {lesion['score']:.4f} ({lesion['lesions']} lesions)" if lesion else ""
    log.info("\n== hcd evaluate summary ==\n %-8s %d%s%s\n ROC AUC  %.4f (95%% CI %.4f-%.4f)\n PR AUC   %.4f%s\n"
             " report   %s", PLURAL[unit], p["n"], per, errors, p["roc_auc"],
             *(p["roc_auc_ci95"] or (float("nan"),) * 2), p["pr_auc"], extra, f"{cfg.out}/report.html")
    return 0



def run_demo(cfg: DemoConfig) -> int:
    """``hcd demo``."""
    from hcdlib.commands.demo import run_demo as demo

    demo(cfg)
    return 0


# Each command: the config its flags come from, and what runs it.
COMMANDS: dict[str, tuple[type[Settings], Callable[..., int]]] = {
    "demo": (DemoConfig, run_demo),
    "synth": (SynthConfig, run_synth),
    "pack": (PackConfig, run_pack),
    "train": (TrainConfig, run_train),
    "score": (ScoreConfig, run_score),
    "evaluate": (EvalConfig, run_evaluate),
    "submission": (SubmissionConfig, run_submission),
}


def get_args_parser() -> argparse.ArgumentParser:
    """The ``hcd`` parser with every command as a sub-parser."""
    parser = _Parser(prog="hcd", description="Histopathologic cancer detection at archive scale.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config, _) in COMMANDS.items():
        p = sub.add_parser(name, help=_description(config), formatter_class=_Formatter)
        command_parser(name, p).prog = f"hcd {name}"
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hcd`` (console script) and of every ``jobs/*.py``."""
    from hcdlib.console import setup_logging

    args = vars(get_args_parser().parse_args(argv))
    command, verbose = args.pop("command"), args.pop("verbose")
    setup_logging(verbose=verbose)
    config, run = COMMANDS[command]
    try:
        return run(config(**args))
    except UserError as exc:  # the user can fix it: one line naming the thing and the fix
        log.error("%s", " ".join(str(exc).split()))
        return 2
    except Interrupted as exc:  # Ctrl-C where hcd counts what is kept
        log.error("%s", " ".join(str(exc).split()))
        return 130
    except KeyboardInterrupt:  # Ctrl-C anywhere else: hcd writes a file whole (a temporary name, then a rename)
        log.error("interrupted; what was committed is kept: rerun the same command to resume")
        return 130
    except RunStopped as exc:  # storage or a node went away: committed work is kept, a rerun resumes
        log.debug("run stopped", exc_info=exc)
        log.error("%s", " ".join(str(exc).split()))
        return 3
    except OSError as exc:
        if not storage_fault(exc):
            raise
        # S3 refused or did not answer before the run began (the same in a run is RunStopped, above)
        log.debug("storage fault", exc_info=exc)
        log.error("%s; check the URI, the network and the AWS settings (AWS_ENDPOINT_URL_S3, AWS_REGION, "
                  "credentials), then rerun", " ".join(str(exc).split()))
        return 3
    # Anything else is a bug or a fault of the machine: it keeps its traceback and exit code 1.


if __name__ == "__main__":
    sys.exit(main())
