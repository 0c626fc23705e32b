"""docs/cli.md, generated from the commands' configs: every command and flag, its default and help.

    python -m hcdlib.cli_doc docs/cli.md      # rewrite it

A test fails when the file is stale, so the reference cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing

from hcdlib.cli import COMMANDS, _description
from hcdlib.config import flag_name

HEADER = """# Commands and flags

Generated from `hcdlib/config.py` by `python -m hcdlib.cli_doc docs/cli.md`; do not edit by hand.
Each command is `hcd <command>` and, with the same flags, `python jobs/<command>.py` (for
`ray job submit --working-dir . -- python jobs/<command>.py ...`). Every command also takes
`--verbose` (Ray's own logs, progress and warnings too).
"""


def _type(hint) -> str:
    if isinstance(hint, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    return {bool: "flag", int: "integer", float: "number", str: "text"}.get(hint, str(hint))


def _default(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING:
        return "required"
    if f.default is None:
        return "-"
    return "off" if f.default is False else f"`{f.default}`"


def markdown() -> str:
    """The whole of docs/cli.md."""
    out = [HEADER]
    for name, (config, _) in COMMANDS.items():
        hints = typing.get_type_hints(config)
        out += [f"## hcd {name}", "", _description(config), "", "| flag | type | default | what it does |",
                "|---|---|---|---|"]
        for f in dataclasses.fields(config):
            choices = f.metadata.get("choices")
            kind = " \\| ".join(map(str, choices)) if choices else _type(hints[f.name])
            text = " ".join(f.metadata.get("help", "").split()).replace("|", "\\|")
            out.append(f"| `{flag_name(f.name)}` | {kind} | {_default(f)} | {text} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1] if len(sys.argv) > 1 else "docs/cli.md", "w") as fh:
        fh.write(markdown())
