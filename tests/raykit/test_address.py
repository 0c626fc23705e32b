"""The Ray address: one that nothing listens at is refused at once."""

import time

import pytest

from hcdlib.errors import UserError


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_ray_address_where_nothing_listens_is_refused_at_once(any_model, synth_small, tmp_path):
    """``ray.init`` waited over two minutes, silently, at a closed port; hcd says so in a line."""
    import subprocess
    import sys

    address = f"127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "hcdlib.cli", "score", "--model", str(any_model), "--input",
                          str(synth_small), "--out", str(tmp_path / "o"), "--address", address],
                         capture_output=True, text=True, timeout=120)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and f"no Ray cluster answers at {address}" in lines[0], lines
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "o" / "parts").exists()


def test_check_address_passes_a_listening_port_and_ray_lookups():
    import socket

    from hcdlib.raykit.cluster import check_address

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_address(f"127.0.0.1:{s.getsockname()[1]}")
        check_address(f"ray://127.0.0.1:{s.getsockname()[1]}")
    for lookup in ("auto", "local"):
        check_address(lookup)
    with pytest.raises(UserError, match=r"no Ray cluster answers at ray://127\.0\.0\.1"):
        check_address(f"ray://127.0.0.1:{_closed_port()}")
