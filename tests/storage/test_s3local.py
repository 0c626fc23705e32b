"""The local S3 server of the tests and benchmarks (moto): ranged GETs answered as S3 answers them."""

from __future__ import annotations

import contextlib
import os

import pytest

from hcdlib.storage.s3local import DUMMY_AWS, _read_ranges_only, aws_env, moto_server, whole_object_reads

# Over moto's 5 MiB in-memory buffer, so the object lives in a temporary file, as a shard does.
SIZE = 6 * 2**20 + 123


def _ranges(data: bytes) -> dict[str, bytes]:
    n = len(data)
    return {"bytes=0-0": data[:1], "bytes=10-99": data[10:100], "bytes=5000000-": data[5_000_000:],
            "bytes=-1000": data[-1000:], f"bytes=0-{n + 50}": data, f"bytes={n - 1}-{n - 1}": data[-1:],
            "bytes=100-10": data,  # first > last: S3 (and moto) ignore the range and send the object
            "bytes=0-9,20-29": data}  # several ranges: moto sends the whole object


def test_ranged_gets_send_the_same_bytes_whether_the_server_reads_the_range_or_the_object():
    """Every range form gives the bytes S3 gives, with the range-only reads and with moto's own."""
    import boto3
    from botocore.exceptions import ClientError

    data = os.urandom(SIZE)
    with moto_server() as port, aws_env(f"http://127.0.0.1:{port}"):
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="hcd-ranges")
        s3.put_object(Bucket="hcd-ranges", Key="k", Body=data)
        for mode in (contextlib.nullcontext(), whole_object_reads(port)):
            with mode:
                for rng, want in _ranges(data).items():
                    got = s3.get_object(Bucket="hcd-ranges", Key="k", Range=rng)
                    assert got["Body"].read() == want, rng
                    assert got["ContentLength"] == len(want), rng
                with pytest.raises(ClientError, match="InvalidRange"):
                    s3.get_object(Bucket="hcd-ranges", Key="k", Range=f"bytes={SIZE}-")
                assert s3.get_object(Bucket="hcd-ranges", Key="k")["Body"].read() == data


def test_a_ranged_get_reads_only_its_range_unless_whole_object_reads_are_asked(monkeypatch, tmp_path):
    """The patch is what makes the server cheap: no read of the whole object for one range."""
    import boto3
    from moto import mock_aws
    from moto.s3.models import FakeKey
    from moto.s3.responses import S3Response

    whole: list[str] = []  # keys whose whole body moto read
    stock = FakeKey.value
    # monkeypatch records the originals first, so both classes are restored after the test.
    monkeypatch.setattr(FakeKey, "value", property(lambda k: whole.append(k.name) or stock.fget(k), stock.fset))
    monkeypatch.setattr(S3Response, "get_object", S3Response.get_object)
    flag = tmp_path / "whole-object-reads"
    _read_ranges_only(str(flag))
    for k, v in DUMMY_AWS.items():  # moto's dummy credentials
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # in-process mock, not a server
    data = os.urandom(SIZE)
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="hcd-ranges")
        s3.put_object(Bucket="hcd-ranges", Key="k", Body=data)
        whole.clear()
        got = s3.get_object(Bucket="hcd-ranges", Key="k", Range="bytes=4000000-4999999")["Body"].read()
        assert got == data[4_000_000:5_000_000]
        assert s3.get_object(Bucket="hcd-ranges", Key="k", Range="bytes=-10")["Body"].read() == data[-10:]
        assert whole == []
        flag.touch()
        assert s3.get_object(Bucket="hcd-ranges", Key="k", Range="bytes=10-19")["Body"].read() == data[10:20]
        assert whole == ["k"]
        flag.unlink()
        assert s3.get_object(Bucket="hcd-ranges", Key="k")["Body"].read() == data  # no range: moto's own read
        assert whole == ["k", "k"]
