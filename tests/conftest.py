"""Shared fixtures: one Ray per session, a real S3 server (moto) on 127.0.0.1, tiny data."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from hcdlib.storage.s3local import free_port

REPO = Path(__file__).resolve().parents[1]
PCAM_REAL = REPO.parent / "shared" / "data" / "pcam-real"

# A smaller hcdnet (four stages) than the default: the tests' model trains in seconds.
FOUR_STAGE_HCDNET = {"stem": 16, "widths": [32, 64, 128, 256]}


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole session (ray.init costs seconds), on 127.0.0.1 only.

    Started after the S3 server so that Ray's workers inherit its AWS_* settings.
    """
    import ray

    from hcdlib.raykit.cluster import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=2, dashboard=True)  # the training tests need it
    yield ray
    ray.shutdown()


class TcpRelay:
    """A TCP relay on 127.0.0.1 in front of a server, so a test can take the server away and back.

    ``stop()`` closes the listening socket and every open connection (clients see refused and
    reset connections, as when S3 goes down); ``start()`` listens again on the same port.
    """

    def __init__(self, target_port: int):
        self.target, self.port = target_port, free_port()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.start()

    def start(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def stop(self) -> None:
        for s in [self._server, *self._conns]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        with self._lock:
            self._conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                if server.fileno() == -1:
                    return
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="session")
def s3_server():
    """Moto's standalone S3 server in a subprocess on 127.0.0.1, configured via AWS_* env.

    Clients reach it through a :class:`TcpRelay` (the ``s3_relay`` fixture), so an outage can
    be staged without losing moto's in-memory buckets.
    """
    from hcdlib.storage.s3local import aws_env, moto_server

    with moto_server() as port:
        relay = TcpRelay(port)
        endpoint = f"http://127.0.0.1:{relay.port}"
        with aws_env(endpoint):  # Ray workers started after this inherit it too
            _RELAYS[endpoint] = relay
            yield endpoint
        relay.stop()


_RELAYS: dict[str, TcpRelay] = {}


@pytest.fixture()
def s3_relay(s3_server) -> TcpRelay:
    """The relay between every S3 client and the server: ``stop()`` is an S3 outage."""
    relay = _RELAYS[s3_server]
    yield relay
    with contextlib.suppress(OSError):
        relay.start()  # a test that left S3 down must not break the next one


@pytest.fixture()
def bucket(s3_server, request):
    """A fresh bucket per test; returns its s3:// URI."""
    import boto3

    name = "hcd-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def copy_patches(synth: Path, folder: Path, n: int) -> list[Path]:
    """Copy the first ``n`` patches of ``synth`` into a new ``folder``; return the originals."""
    folder.mkdir()
    picked = sorted(synth.glob("*.tif"))[:n]
    for p in picked:
        shutil.copy(p, folder / p.name)
    return picked


def upload_dir(local: Path, s3_uri: str) -> None:
    """Copy a local folder tree to S3 with pyarrow (the code path users take)."""
    import pyarrow.fs as pafs

    from hcdlib.storage.uri import resolve

    fs, path = resolve(s3_uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """300 synthetic patches, Kaggle layout with labels.csv."""
    from hcdlib.commands.synth import SynthConfig, write_synth

    out = tmp_path_factory.mktemp("synth") / "kaggle"
    write_synth(SynthConfig(out=str(out), n=300, slides=4, seed=7), processes=1)
    return out


@pytest.fixture(scope="session")
def any_model(tmp_path_factory) -> Path:
    """An exported, untrained four-stage hcdnet: for tests of refusals and plumbing, not of accuracy."""
    from hcdlib.model.architectures import build_model
    from hcdlib.model.artifact import export_model

    model, pre = build_model("hcdnet", arch_args=FOUR_STAGE_HCDNET)
    out = tmp_path_factory.mktemp("any-model") / "model"
    export_model(model.eval(), str(out), arch="hcdnet", preprocess=pre)
    return out


@pytest.fixture(scope="session")
def model_dir(synth_small, tmp_path_factory) -> Path:
    """A small hcdnet trained for a few seconds on the synthetic patches, exported as an artifact.

    Plain torch, not Ray Train, so scoring tests do not depend on the training pipeline. The
    four-stage shape: it separates these 300 patches in 3 epochs (the five-stage default needs
    more), and every scoring test then also loads a shape other than the default from the
    artifact's ``arch_args``.
    """
    import numpy as np
    import pyarrow.csv as pacsv
    import torch

    from hcdlib.model.architectures import build_model
    from hcdlib.model.artifact import export_model
    from hcdlib.model.transforms import to_input, train_preset
    from hcdlib.sources.decode import decode_patch

    torch.manual_seed(0)
    labels = pacsv.read_csv(synth_small / "labels.csv").to_pydict()
    x = np.stack([decode_patch((synth_small / f"{i}.tif").read_bytes()).pixels for i in labels["id"]])
    y = torch.tensor(labels["label"], dtype=torch.float32).view(-1, 1)
    model, pre = build_model("hcdnet", arch_args=FOUR_STAGE_HCDNET)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):
        for i in range(0, len(x), 32):
            batch = train_preset(to_input(torch.from_numpy(x[i:i + 32]), pre))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), y[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = tmp_path_factory.mktemp("model") / "model"
    export_model(model.eval(), str(out), arch="hcdnet", preprocess=pre)
    return out


def ray_worker_pids(marker: str) -> list[int]:
    """Pids of live Ray worker processes whose title (``ray::<class>...``) contains ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and marker in title:
            pids.append(int(proc.name))
    return pids


def pytest_collection_modifyitems(items):
    """Every test that needs a Ray cluster is end to end: marked ``slow`` (``pytest -m "not slow"``: the fast tier)."""
    for item in items:
        if {"ray_session", "two_nodes"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture()
def no_ray(monkeypatch):
    """Fail the test if anything tries to start or join Ray: refusals come before it."""
    import hcdlib.commands.demo
    import hcdlib.commands.score.run
    import hcdlib.commands.train.run
    import hcdlib.raykit.cluster

    def refuse(*_a, **_k):
        raise AssertionError("Ray was started before the input was checked")

    for module in (hcdlib.raykit.cluster, hcdlib.commands.score.run, hcdlib.commands.train.run, hcdlib.commands.demo):
        monkeypatch.setattr(module, "init_ray", refuse)


def one_line_exit_2(capsys, argv: list[str], *, expect: str) -> str:
    """Run ``hcd`` in-process; the user error must be one line naming ``expect``, with exit code 2."""
    from hcdlib import cli

    capsys.readouterr()
    t0 = time.perf_counter()
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and expect in lines[0], lines
    assert "Traceback" not in err
    assert time.perf_counter() - t0 < 20
    return lines[0]


@pytest.fixture()
def ten_patches(synth_small, tmp_path) -> tuple[Path, list[str]]:
    """Ten of the synthetic patches in a folder of their own, and their ids."""
    folder = tmp_path / "k"
    folder.mkdir()
    ids = sorted(p.stem for p in synth_small.glob("*.tif"))[:10]
    for i in ids:
        shutil.copy(synth_small / f"{i}.tif", folder / f"{i}.tif")
    return folder, ids


def csv_file(path: Path, text: str) -> str:
    """Write ``text`` to ``path``; its path as text."""
    path.write_text(text)
    return str(path)
