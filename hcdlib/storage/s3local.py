"""A local S3 server (moto) on 127.0.0.1, for the tests and the benchmarks: nothing leaves the machine.

with moto_server() as port, aws_env(f"http://127.0.0.1:{port}"):
...  # every S3 client (pyarrow, boto3, Ray workers started here) talks to it
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

# Dummy credentials: moto accepts any, and a real key must never be needed (or logged) here.
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(timeout_s: float = 30.0) -> Iterator[int]:
    """Moto's standalone S3 server in a subprocess on 127.0.0.1 (:func:`serve`); yields its port, stops it after."""
    port = free_port()
    fd, recording = tempfile.mkstemp(prefix="hcd-moto-requests-")  # moto's recorder, used by recorded()
    os.close(fd)
    proc = subprocess.Popen([sys.executable, "-c", f"from hcdlib.storage.s3local import serve; serve({port})"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MOTO_RECORDER_FILEPATH": recording})
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start (is moto[server] installed?)") from None
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        os.unlink(recording)


def serve(port: int) -> None:
    """Run moto's S3 server on 127.0.0.1:``port`` (in this process), serving ranged GETs as S3 does.

    Moto 5 answers a ranged GET by reading the whole object into memory and slicing the range out
    of it (``S3Response.get_object`` returns ``key.value``, ``_handle_range_header`` slices). S3
    reads only the range. Reading a 28 MB row group of a 280 MB shard, the benchmark's server
    copied 280 MB per request and took more of the two cores than hcd's readers: (g-S3) timed
    moto. Here a GET with one satisfiable byte range reads just that range from the object's
    buffer; every other request is moto's own code. :func:`whole_object_reads` turns moto's
    behaviour back on, so the benchmark can show both.
    """
    _read_ranges_only(_whole_object_flag(port))
    from moto.server import main

    main(["-H", "127.0.0.1", "-p", str(port)])


def _whole_object_flag(port: int) -> str:
    """The file whose presence makes the server at ``port`` read whole objects for ranged GETs (stock moto)."""
    return os.path.join(tempfile.gettempdir(), f"hcd-moto-{port}-whole-object-reads")


@contextlib.contextmanager
def whole_object_reads(port: int) -> Iterator[None]:
    """For the block, the :func:`moto_server` at ``port`` serves ranged GETs as stock moto does."""
    flag = _whole_object_flag(port)
    # Created, never opened if it exists: a name in a shared temporary folder may be anyone's link.
    os.close(os.open(flag, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        yield
    finally:
        os.unlink(flag)


# One byte range (RFC 9110): "bytes=first-last", "bytes=first-" or the suffix "bytes=-length".
_ONE_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _read_ranges_only(whole_object_flag: str) -> None:
    """Patch moto (in this process) so that a GET of one byte range reads only that range."""
    import threading

    from moto.s3.models import FakeKey
    from moto.s3.responses import S3Response

    stock_value, stock_get = FakeKey.value, S3Response.get_object
    if not isinstance(stock_value, property):  # a moto whose internals moved on: serve as it does
        return
    ranged = threading.local()  # moto's server is threaded: one flag per request's thread

    class _Range:
        """A key's body as moto's range handling uses it (its length, one slice), read on demand."""

        def __init__(self, key: FakeKey) -> None:
            self.key = key

        def __len__(self) -> int:
            return self.key.size

        def __getitem__(self, part: slice) -> bytes:
            start, stop, _ = part.indices(self.key.size)
            with self.key.lock:
                self.key._value_buffer.seek(start)
                return self.key._value_buffer.read(max(0, stop - start))

    def value(key: FakeKey) -> bytes | _Range:
        return _Range(key) if getattr(ranged, "on", False) else stock_value.fget(key)

    def get_object(self: S3Response) -> object:
        m = _ONE_RANGE.fullmatch(self.headers.get("range") or "")
        # Only where moto's _handle_range_header is sure to slice: one range, first <= last.
        ranged.on = bool(self.method == "GET" and m and (m[1] or m[2]) and not (m[1] and m[2] and int(m[1]) > int(m[2]))
                         and "partNumber" not in self.querystring and not os.path.exists(whole_object_flag))
        try:
            return stock_get(self)
        finally:
            ranged.on = False

    FakeKey.value = property(value, stock_value.fset)
    S3Response.get_object = get_object


@contextlib.contextmanager
def aws_env(endpoint: str) -> Iterator[None]:
    """Point the standard AWS environment at ``endpoint`` for the block, then restore it exactly."""
    env = {"AWS_ENDPOINT_URL": endpoint, **DUMMY_AWS}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # Ray workers started inside the block inherit it too
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def recorded(endpoint: str) -> Iterator[dict[str, int]]:
    """Count the bytes the S3 server at ``endpoint`` (a :func:`moto_server`) sends per object in the block.

    Counted on the server, from moto's request recorder: every GET of an object is its Range,
    or the whole object without one. Yields a dict filled on exit, ``"<bucket>/<key>": bytes``.
    """
    import json
    from urllib.parse import unquote, urlparse

    import boto3
    import requests

    requests.post(f"{endpoint}/moto-api/recorder/reset-recording", timeout=30).raise_for_status()
    requests.post(f"{endpoint}/moto-api/recorder/start-recording", timeout=30).raise_for_status()
    sent: dict[str, int] = {}
    try:
        yield sent
    finally:
        requests.post(f"{endpoint}/moto-api/recorder/stop-recording", timeout=30).raise_for_status()
    s3, sizes = boto3.client("s3", endpoint_url=endpoint), {}
    reply = requests.get(f"{endpoint}/moto-api/recorder/download-recording", timeout=300)
    reply.raise_for_status()
    for entry in map(json.loads, reply.text.splitlines()):
        if entry["method"] != "GET":
            continue
        key = unquote(urlparse(entry["url"]).path).lstrip("/")
        bucket, _, name = key.partition("/")
        if not name:
            continue  # a listing, not an object
        if key not in sizes:
            sizes[key] = s3.head_object(Bucket=bucket, Key=name)["ContentLength"]
        rng = {k.lower(): v for k, v in entry["headers"].items()}.get("range")
        if rng:
            first, _, last = rng.removeprefix("bytes=").partition("-")
            if not first:  # a suffix range: the last N bytes
                n = min(int(last), sizes[key])
            else:
                n = min(int(last) if last else sizes[key] - 1, sizes[key] - 1) - int(first) + 1
        else:
            n = sizes[key]
        sent[key] = sent.get(key, 0) + n
