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
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterator

import pyarrow.fs as pafs

from hcdlib.storage import uri as urimod

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
    ext = os.path.splitext(slide_uri)[1]
    if stage is None:
        with tempfile.TemporaryDirectory(prefix="hcd-slide-") as private:
            path = os.path.join(private, "slide" + ext)
            _stage(slide_uri, path, _data_files(slide_uri))
            yield path
        return
    folder = os.path.join(root, stage)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, hashlib.sha1(slide_uri.encode()).hexdigest()[:20] + ext)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per slide and node; the others wait for it
        try:
            if not os.path.exists(path):
                fs, remote = urimod.resolve(slide_uri)
                data = _data_files(slide_uri)
                _make_room(folder, fs.get_file_info(remote).size + sum(size for _, _, size in data))
                _stage(slide_uri, path, data)
            now = time.time_ns()  # most recently used (the clock's ns, not the file system's coarser tick)
            os.utime(path, ns=(now, now))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    # Evicted while open (another task needing room) is harmless: an open file outlives its name.
    # (Not a MIRAX slide's data files, which OpenSlide opens as it reads: those tiles are error rows.)
    yield path


def _data_files(slide_uri: str) -> list[tuple[str, str, int]]:
    """``(uri, path below the data folder, size)`` of each file a multi-file slide keeps beside it.

    A MIRAX slide is ``s.mrxs`` plus a folder ``s/`` (``Slidedat.ini`` and the data files) that
    OpenSlide finds by the slide's name: staged alone, the .mrxs could not be opened.
    """
    base, ext = posixpath.splitext(slide_uri)
    if ext.lower() != ".mrxs":
        return []
    fs, folder = urimod.resolve(base)
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
    return [(urimod.to_uri(fs, i.path), posixpath.relpath(i.path, folder), i.size)
            for i in infos if i.type == pafs.FileType.File]


def _stage(slide_uri: str, path: str, data: list[tuple[str, str, int]]) -> None:
    """Download the slide to ``path`` and its data files into the folder OpenSlide looks for beside it.

    The slide file comes last, by rename: a crash mid-download leaves ``.part`` names, never a
    short slide or a slide without its data.
    """
    pid = os.getpid()
    if data:
        folder = os.path.splitext(path)[0]
        tmp_folder = f"{folder}.part-{pid}"
        for uri, rel, _ in data:
            dest = os.path.join(tmp_folder, *rel.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            _download(uri, dest)
        shutil.rmtree(folder, ignore_errors=True)  # what a crashed staging left
        os.replace(tmp_folder, folder)
    tmp = f"{path}.part-{pid}"
    _download(slide_uri, tmp)
    os.replace(tmp, path)


def _download(slide_uri: str, dest: str) -> None:
    fs, path = urimod.resolve(slide_uri)
    with fs.open_input_stream(path) as src, open(dest, "wb") as out:
        while block := src.read(_BLOCK):
            out.write(block)
    log.debug("staged %s (%d bytes)", slide_uri, os.path.getsize(dest))


def _make_room(folder: str, need: int) -> None:
    """Remove the least recently used staged slides (with their data folders) until ``need`` more bytes fit."""
    slides = sorted((e.stat().st_mtime_ns, e.stat().st_size + _tree_size(os.path.splitext(e.path)[0]), e.path)
                    for e in os.scandir(folder)
                    if e.is_file() and not e.name.endswith(".lock") and ".part-" not in e.name)
    used = sum(size for _, size, _ in slides)
    budget = (shutil.disk_usage(folder).free + used) // 2
    for _, size, path in slides:
        if used + need <= budget:
            break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the slide first: a task that finds its name finds its data too
        shutil.rmtree(os.path.splitext(path)[0], ignore_errors=True)
        used -= size
    if used + need > budget:
        log.warning("staging %d bytes leaves less than half of the free disk in %s", need, folder)


def _tree_size(folder: str) -> int:
    """Bytes of the files below ``folder`` (0 when there is none)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def remove_stage(stage: str, root: str = STAGE_ROOT) -> None:
    """Delete this node's staging folder of a run (what :func:`local_slide` wrote, nothing else)."""
    shutil.rmtree(os.path.join(root, stage), ignore_errors=True)
