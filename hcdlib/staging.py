"""Slides on S3, staged once per node and run.

OpenSlide reads local files only. Each task that needs a slide on S3 (planning it, or reading
one of its tile chunks) used to download it whole: a 2 GB slide cut into 20 chunks moved 40 GB.
Now the first task on a node downloads it into the run's staging folder and every later task on
that node opens the same copy; a lock per slide makes a task that arrives during the download
wait for it instead of starting its own. Local slides are never copied.

The folder is keyed by the run (``--out`` and the input), so a resumed run finds what it had
staged, and is removed when the run ends (:func:`remove_stage` on every node). On a full
disk the least recently used slides of the run are removed first: the folder stays within
half of what the disk has free (plus what the folder itself holds).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

from hcdlib import uri as urimod

log = logging.getLogger(__name__)

STAGE_ROOT = os.path.join(tempfile.gettempdir(), "hcd-staged-slides")
_BLOCK = 64 * 2**20


def stage_key(out: str, fingerprint: str) -> str:
    """The staging folder's name for one scoring run: stable across reruns of the same run."""
    return hashlib.sha1(f"{out}\n{fingerprint}".encode()).hexdigest()[:16]


@contextlib.contextmanager
def local_slide(slide_uri: str, *, stage: str | None = None, root: str = STAGE_ROOT) -> Iterator[str]:
    """A local path to read the slide at ``slide_uri`` from.

    Local slides are their own path. A slide on S3 is staged in ``<root>/<stage>`` (shared by
    every task of the run on this node); without ``stage`` it is a private copy removed after.
    """
    if not urimod.is_s3(slide_uri):
        yield urimod.resolve(slide_uri)[1]
        return
    if stage is None:
        fd, tmp = tempfile.mkstemp(suffix=os.path.splitext(slide_uri)[1], prefix="hcd-slide-")
        os.close(fd)
        try:
            _download(slide_uri, tmp)
            yield tmp
        finally:
            os.unlink(tmp)
        return
    folder = os.path.join(root, stage)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, hashlib.sha1(slide_uri.encode()).hexdigest()[:20] + os.path.splitext(slide_uri)[1])
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per slide and node; the others wait for it
        try:
            if not os.path.exists(path):
                fs, remote = urimod.resolve(slide_uri)
                _make_room(folder, fs.get_file_info(remote).size)
                tmp = f"{path}.part-{os.getpid()}"
                _download(slide_uri, tmp)
                os.replace(tmp, path)  # a crash mid-download leaves a .part file, never a short slide
            now = time.time_ns()  # most recently used (the clock's ns, not the file system's coarser tick)
            os.utime(path, ns=(now, now))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    # Evicted while open (another task needing room) is harmless: an open file outlives its name.
    yield path


def _download(slide_uri: str, dest: str) -> None:
    fs, path = urimod.resolve(slide_uri)
    with fs.open_input_stream(path) as src, open(dest, "wb") as out:
        while block := src.read(_BLOCK):
            out.write(block)
    log.debug("staged %s (%d bytes)", slide_uri, os.path.getsize(dest))


def _make_room(folder: str, need: int) -> None:
    """Remove the least recently used staged slides until ``need`` more bytes fit the budget."""
    slides = sorted((e.stat().st_mtime_ns, e.stat().st_size, e.path) for e in os.scandir(folder)
                    if e.is_file() and not e.name.endswith(".lock") and ".part-" not in e.name)
    used = sum(size for _, size, _ in slides)
    budget = (shutil.disk_usage(folder).free + used) // 2
    for _, size, path in slides:
        if used + need <= budget:
            break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        used -= size
    if used + need > budget:
        log.warning("staging %d bytes leaves less than half of the free disk in %s", need, folder)


def remove_stage(stage: str, root: str = STAGE_ROOT) -> None:
    """Delete this node's staging folder of a run (what :func:`local_slide` wrote, nothing else)."""
    shutil.rmtree(os.path.join(root, stage), ignore_errors=True)
