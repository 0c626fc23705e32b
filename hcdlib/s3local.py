"""A local S3 server (moto) on 127.0.0.1, for the tests and the benchmarks: nothing leaves the machine.

with moto_server() as port, aws_env(f"http://127.0.0.1:{port}"):
...  # every S3 client (pyarrow, boto3, Ray workers started here) talks to it
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

# Dummy credentials: moto accepts any, and a real key must never be needed (or logged) here.
_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(timeout_s: float = 30.0) -> Iterator[int]:
    """Moto's standalone S3 server in a subprocess on 127.0.0.1; yields its port, stops it after."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


@contextlib.contextmanager
def aws_env(endpoint: str) -> Iterator[None]:
    """Point the standard AWS environment at ``endpoint`` for the block, then restore it exactly."""
    env = {"AWS_ENDPOINT_URL": endpoint, **_AWS}
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
