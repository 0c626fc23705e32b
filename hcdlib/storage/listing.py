"""Listing an input: one pass over a folder or prefix, regular files only, refusals named.

Local folders are walked with ``scandir`` (the kind of each entry comes with the listing, no
stat per file); S3 prefixes are listed with ListObjectsV2 (pages of 1000 keys). What must not be
read (pipes, devices, symlinks out of the input, names that are not UTF-8) is returned with the
reason, so the caller can record it as an error row instead of hanging or crashing on it.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

import pyarrow.fs as pafs

from hcdlib.errors import UserError
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)


class SourceError(UserError, ValueError):
    """The input cannot be used as a patch source; the message names the URI and the problem."""


@dataclass(frozen=True)
class Listing:
    """What one listing pass found: regular files to read, and entries refused with the reason."""

    fs: pafs.FileSystem
    root: str
    files: list[str]
    refused: list[tuple[str, str]]  # (path as printable text, why it is not read)


def printable(path: str) -> str:
    """``path`` as valid UTF-8 text: bytes that are not UTF-8 shown as backslash-x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace") if _not_utf8(path) else path


def _not_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # os.walk keeps undecodable bytes as lone surrogates
        return True
    return False


def _walk_local(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Regular files below ``root``; everything that must not be read is refused with the reason.

    ``scandir``'s d_type tells the kind of each entry without a stat per file. A symlink is
    followed only to a regular file inside ``root``: a link to ``/etc/passwd`` or ``/dev/zero``
    is never opened. Pipes, sockets and devices are never opened either (a named pipe called
    ``x.tif`` would block the reader forever). Linked directories are not entered (no loops).
    """
    real_root = os.path.realpath(root)
    files, refused, stack = [], [], [root]
    while stack:
        folder = stack.pop()
        try:
            entries = os.scandir(folder)
        except OSError as exc:  # an unreadable sub-folder is named, the rest is still listed
            refused.append((printable(folder), f"folder cannot be listed ({exc.strerror}); its files are not read"))
            continue
        with entries:
            for e in entries:
                path = e.path
                if _not_utf8(path):
                    refused.append((printable(path), "file name is not valid UTF-8 (shown with \\x escapes); "
                                                     "rename the file to read it"))
                elif e.is_symlink():
                    why = _link_problem(path, real_root)
                    if why:
                        refused.append((path, why))
                    else:
                        files.append(path)
                elif e.is_dir(follow_symlinks=False):
                    stack.append(path)
                elif e.is_file(follow_symlinks=False):
                    files.append(path)
                else:
                    refused.append((path, "not a regular file (a pipe, socket or device); not read"))
    return files, refused


def _link_problem(path: str, real_root: str) -> str | None:
    """Why the symlink at ``path`` must not be read, or None when it names a regular file in the root."""
    target = os.path.realpath(path)
    if not (target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)):
        return f"symlink to {printable(target)}, outside the input folder; not read"
    try:
        mode = os.stat(target).st_mode
    except OSError:
        return "broken symlink; not read"
    if stat.S_ISDIR(mode):
        return "symlink to a folder; not followed"
    return None if stat.S_ISREG(mode) else "symlink to something that is not a regular file; not read"


def _is_apple_double(path: str) -> bool:
    """Whether ``path`` is a macOS metadata file: ``._<name>`` (AppleDouble), or anything under ``__MACOSX/``.

    macOS writes one beside every file it copies to a disk or archive without its metadata
    support. It is never an image: read as one, ``._<id>.tif`` was an error row under an id no
    labels CSV has (``evaluate`` then refused the join, and a Kaggle submission had an extra id).
    """
    name = path.rsplit("/", 1)[-1]
    return name.startswith("._") or "/__MACOSX/" in path


def list_files(root_uri: str) -> Listing:
    """Every regular file below ``root_uri`` with one listing pass (no stat per file)."""
    fs, root = urimod.resolve(root_uri)
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            st = os.stat(root)
        except FileNotFoundError:
            raise SourceError(f"{root_uri}: no such file or directory") from None
        except OSError as exc:
            raise SourceError(f"{root_uri}: cannot be read: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            files, refused = _walk_local(root)
        elif stat.S_ISREG(st.st_mode):
            files, refused = [root], []
        else:
            raise SourceError(f"{root_uri}: not a regular file or folder (a pipe, socket or device)")
    else:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"{root_uri}: no such file or directory")
        if info.type == pafs.FileType.File:
            files, refused = [root], []
        else:
            # S3: ListObjectsV2 pages of 1000 keys; keys are UTF-8 and objects are plain bytes.
            sel = pafs.FileSelector(root, recursive=True)
            files, refused = [i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File], []
    files.sort()
    refused.sort()
    apple = [p for p in files if _is_apple_double(p)]
    if apple:
        files = [p for p in files if not _is_apple_double(p)]
        log.warning("%s: %d macOS metadata files (._name, written beside files copied from a Mac) are not read, "
                    "e.g. %s", root_uri, len(apple), apple[0])
    if refused:
        log.warning("%s: %d entries not read, e.g. %s: %s", root_uri, len(refused), *refused[0])
    return Listing(fs, root, files, refused)
