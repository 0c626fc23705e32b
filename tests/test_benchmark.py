"""The benchmarks' own data handling (no Ray): what they cache must be what they claim to time."""

from pathlib import Path

import pyarrow.parquet as pq

from hcdlib.benchmark_score import _ensure_data, _packed_by_this_hcd, _replicated
from hcdlib.chunks import ROW_SCHEMA
from hcdlib.config import BenchScoreConfig


def _make_old_format(folder: Path) -> None:
    """Rewrite every shard as an older hcd pack stored them: encoded files only, no decoded pixels."""
    for f in folder.rglob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["pixels", "note"]), f)


def test_cached_shards_from_an_older_pack_are_rebuilt_not_timed(tmp_path):
    cfg = BenchScoreConfig(work=str(tmp_path), n=40)
    tif, shards = _ensure_data(cfg, cfg.n, "n40")
    copies = Path(_replicated(shards, 3, str(tmp_path / "x3")))
    assert _packed_by_this_hcd(shards) and _packed_by_this_hcd(str(copies))
    assert pq.read_table(copies).num_rows == 120
    assert not _packed_by_this_hcd(str(tmp_path / "absent"))

    _make_old_format(Path(shards))
    _make_old_format(copies)
    assert not _packed_by_this_hcd(shards) and not _packed_by_this_hcd(str(copies))

    # The next benchmark run packs again and replaces the copies: it times this hcd's format.
    assert _ensure_data(cfg, cfg.n, "n40") == (tif, shards)
    assert _replicated(shards, 3, str(copies)) == str(copies)
    for folder in (Path(shards), copies):
        assert pq.read_schema(next(folder.rglob("*.parquet"))).names == ROW_SCHEMA.names
    assert pq.read_table(copies).num_rows == 120
