"""One storage layer: every input and output location is a URI.

A URI is a local path, ``file:///abs/path`` or ``s3://bucket/prefix``. ``resolve`` turns it
into a pyarrow filesystem plus a path on it, so the rest of hcd never branches on storage.

S3 settings come only from the standard AWS environment and config files (credentials
chain, ``AWS_REGION``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``), never from command-line
flags, so secrets never land in shell history or job specs, and nothing here logs them.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

from hcdlib.errors import UserError

S3_PREFIX = "s3://"

# Storage errors worth retrying (substrings of the message): an object store that blinks, a
# connection dropped mid-read. Anything else (a missing object, a denied request) is final.
TRANSIENT_ERRORS = ["NETWORK_CONNECTION", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
                    "Connection reset", "Connection refused", "timed out"]


def is_s3(uri: str) -> bool:
    """Whether ``uri`` names an S3 location."""
    return uri.startswith(S3_PREFIX)


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the standard AWS environment.

    Without an explicit endpoint pyarrow would first ask the real AWS endpoint for the
    bucket's region, which fails slowly on S3-compatible servers; so the endpoint and region
    are passed through when set.
    """
    kwargs: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path, ``file://`` URI or ``s3://`` URI."""
    if is_s3(uri):
        return s3_filesystem(), uri[len(S3_PREFIX):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def absolute(uri: str | None) -> str | None:
    """``uri`` with a local path made absolute (S3 URIs as they are; None stays None).

    Done on the driver for every location the user gave: Ray workers, actors and jobs do not
    share the driver's working directory, so a relative path would point elsewhere there.
    """
    if uri is None or is_s3(uri):
        return uri
    prefix = "file://" if uri.startswith("file://") else ""
    return prefix + os.path.abspath(os.path.expanduser(uri[len(prefix):]))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI without touching its scheme."""
    if is_s3(uri):
        return S3_PREFIX + posixpath.join(uri[len(S3_PREFIX):].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The URI of ``path`` on ``fs`` (inverse of :func:`resolve`)."""
    return S3_PREFIX + path if isinstance(fs, pafs.S3FileSystem) else path


def exists(uri: str) -> bool:
    """Whether a file or directory exists at ``uri``."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    """Whether a file (not a directory) is at ``uri``."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(uri: str) -> bytes:
    """Read a whole object."""
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole object.

    An S3 PUT is atomic by itself; on a local disk we write a temporary file in the same
    directory and rename it, which POSIX makes atomic.
    """
    fs, path = resolve(uri)
    parent = posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path)
    fs.create_dir(parent, recursive=True)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    # fsync before rename: after a power cut the name must not point at blocks never written
    # (a zero-byte or truncated "complete" file); then fsync the directory that holds the name.
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def within(child: str, parent: str) -> bool:
    """Whether the location ``child`` is ``parent`` or lies below it (same storage only).

    Local paths are compared after resolving symlinks, so ``proj/../proj/slides`` and a link to
    it count as inside ``proj``.
    """
    if is_s3(child) != is_s3(parent):
        return False
    if is_s3(child):
        c, p = resolve(child)[1].rstrip("/"), resolve(parent)[1].rstrip("/")
    else:
        c, p = os.path.realpath(resolve(child)[1]), os.path.realpath(resolve(parent)[1])
    return c == p or c.startswith(p.rstrip("/") + "/")


def check_outside(out: str, inputs: list[tuple[str, str | None]]) -> None:
    """Refuse an ``--out`` that is, or lies inside, one of ``inputs`` (``(flag, uri)`` pairs).

    What a job writes there would be read as input by the next run over that input.
    """
    for flag, uri in inputs:
        if uri and within(out, uri):
            raise UserError(f"--out {out} is inside {flag} {uri}: its files would be read as input on the next "
                            "run; choose an --out outside the input")


# Where Ray runs a job's driver when `ray job submit --working-dir` is given: a temporary copy of
# that folder under the session's runtime_resources/, which Ray deletes once no job uses it.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the driver only
_RAY_COPY_MARK = f"{os.sep}runtime_resources{os.sep}"


def check_kept(uri: str, flag: str) -> None:
    """Refuse a relative output path in a Ray job whose working directory is Ray's temporary copy.

    ``ray job submit --working-dir . -- python jobs/score.py --out preds`` wrote the predictions
    into that copy, not beside the user's files, where Ray deletes them later without a word.
    """
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    if is_s3(uri) or os.path.isabs(os.path.expanduser(local)) or not os.environ.get(RAY_JOB_ENV):
        return
    cwd = os.getcwd()
    if _RAY_COPY_MARK in cwd + os.sep:
        raise UserError(f"{flag} {uri}: a relative path in a Ray job lies in the job's working directory, Ray's "
                        f"temporary copy of --working-dir ({cwd}), which Ray deletes after the job; give an "
                        "absolute path (on storage every node of the cluster sees) or an s3:// URI")


# Names of files, not folders: an --out ending so was meant as one file (a CSV of predictions, say).
FILE_SUFFIXES = (".csv", ".tsv", ".parquet", ".json", ".txt", ".xlsx", ".html", ".png", ".pt", ".pth",
                 ".safetensors", ".zip")


def check_folder(uri: str, flag: str = "--out") -> None:
    """Refuse an output folder below a local file, or in an S3 bucket that does not exist.

    Found here, it is one line naming the file or bucket; found by the first write, it was a
    pyarrow traceback.
    """
    suffix = os.path.splitext(uri.rstrip("/"))[1].lower()
    if suffix in FILE_SUFFIXES and not (not is_s3(uri) and os.path.exists(resolve(uri)[1])):
        # `--out preds.csv` made a folder of that name holding Parquet parts: not the file it names.
        # (An existing folder of that name is an earlier run's; an existing file is refused below.)
        raise UserError(f"{flag} {uri} names a {suffix} file, and {flag} is a folder that hcd writes several files "
                        "into; give a folder name" + (" (hcd submission --out writes one CSV)" * (suffix == ".csv")))
    if is_s3(uri):  # no folders to be in the way; but the bucket must be there (hcd creates none)
        fs, path = resolve(uri)
        bucket = path.split("/")[0]
        try:
            missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError:  # a policy that allows writes under a prefix, not HeadBucket: the writes decide
            return
        if missing:
            raise UserError(f"{flag} {uri}: bucket {bucket} does not exist; create it, or check the name")
        return
    path = os.path.abspath(resolve(uri)[1])
    while not os.path.exists(path):
        if os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise UserError(f"{flag} {uri}: {path} is a file, not a folder; choose another {flag}")


def delete(uri: str) -> None:
    """Delete a file or a directory tree; missing is fine."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
