"""Benchmark tables into docs/performance.md, so that no figure there is typed by hand.

Each benchmark replaces its own table, with the machine, date, commit and command that made it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

from hcdlib.config import Settings, flag_name
from hcdlib.model.device import cpu_native_bf16

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    """CPU model, cores, whether it does bf16 natively, and the GPU if torch sees one."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # Linux names the CPU model there
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    text = f"{model}, {os.cpu_count()} cores, native bf16: {'yes' if cpu_native_bf16() else 'no'}"
    import torch

    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    return text


def commit() -> str:
    """The checkout's short commit, ``-dirty`` when tracked files other than the performance tables differ."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
               if not line.endswith("docs/performance.md")]  # the tables this very run writes
    return head + ("-dirty" if changed else "")


def command(job: str, cfg: Settings) -> str:
    """The command that reruns a benchmark: its job script and the flags that differ from the defaults."""
    parts = [f"python jobs/{job}.py"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "markdown" or value == f.default:
            continue
        parts.append(flag_name(f.name) if value is True else f"{flag_name(f.name)} {value}")
    return " ".join(parts)


def publish(path: str, key: str, title: str, table: str, *, job: str, cfg: Settings) -> None:
    """Write ``table`` into ``path`` under ``title``, replacing the block this benchmark wrote there before."""
    start, end = f"<!-- table:{key} -->", f"<!-- end:{key} -->"
    block = "\n".join([start, f"### {title}", "",
                       f"Machine: {machine()}. Date: {datetime.date.today()}. Commit: {commit()}.",
                       f"Command: `{command(job, cfg)}`", "", table.strip(), end])
    doc = Path(path).read_text() if os.path.exists(path) else "# Performance\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
    Path(path).write_text(doc)
