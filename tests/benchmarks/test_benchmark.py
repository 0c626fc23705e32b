"""The benchmarks' own data handling (no Ray): what they cache must be what they claim to time."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from benchmarks.config import BenchCoverageConfig, BenchScoreConfig
from benchmarks.coverage import measure, visible_in_slide
from benchmarks.data import ensure_data, packed_by_this_hcd, pixels_codec, replicated
from hcdlib.commands.synth_slides import synth_tissue_pixels, visible_tissue, write_slide_tiff
from hcdlib.errors import UserError
from hcdlib.sources.chunks import ROW_SCHEMA
from hcdlib.sources.decode import PCAM_MPP


def _make_old_format(folder: Path) -> None:
    """Rewrite every shard as an older hcd pack stored them: encoded files only, no decoded pixels."""
    for f in folder.rglob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["pixels", "note"]), f)


def _make_old_codec(folder: Path) -> None:
    """Rewrite every shard as an older hcd pack stored them: the same columns, pixels in zstd."""
    for f in folder.rglob("*.parquet"):
        pq.write_table(pq.read_table(f), f, row_group_size=1024, compression="zstd", compression_level=1)


def _codec(folder: Path) -> str:
    return pixels_codec(next(folder.rglob("*.parquet")))


def test_cached_shards_from_an_older_pack_are_rebuilt_not_timed(tmp_path):
    cfg = BenchScoreConfig(work=str(tmp_path), n=40)
    tif, shards = ensure_data(cfg, cfg.n, "n40")
    copies = Path(replicated(shards, 3, str(tmp_path / "x3")))
    assert packed_by_this_hcd(shards) and packed_by_this_hcd(str(copies))
    assert pq.read_table(copies).num_rows == 120
    # The copies are in the pack's own codecs: T(N) and T(5N) must time the same format (they
    # were snappy beside zstd shards, and the difference of the two timed the codecs).
    assert _codec(copies) == _codec(Path(shards)) == "LZ4"
    assert not packed_by_this_hcd(str(tmp_path / "absent"))

    _make_old_format(Path(shards))
    _make_old_format(copies)
    assert not packed_by_this_hcd(shards) and not packed_by_this_hcd(str(copies))

    # The next benchmark run packs again and replaces the copies: it times this hcd's format.
    assert ensure_data(cfg, cfg.n, "n40") == (tif, shards)
    assert replicated(shards, 3, str(copies)) == str(copies)
    for folder in (Path(shards), copies):
        assert pq.read_schema(next(folder.rglob("*.parquet"))).names == ROW_SCHEMA.names
    assert pq.read_table(copies).num_rows == 120


def test_cached_shards_in_an_older_codec_are_rebuilt(tmp_path):
    cfg = BenchScoreConfig(work=str(tmp_path), n=40)
    _, shards = ensure_data(cfg, cfg.n, "n40")
    copies = Path(replicated(shards, 2, str(tmp_path / "x2")))
    _make_old_codec(Path(shards))
    _make_old_codec(copies)
    assert _codec(copies) == "ZSTD"
    assert not packed_by_this_hcd(shards) and not packed_by_this_hcd(str(copies))
    ensure_data(cfg, cfg.n, "n40")
    replicated(shards, 2, str(copies))
    assert _codec(Path(shards)) == _codec(copies) == "LZ4"
    assert pq.read_table(copies).num_rows == 80


def test_steady_state_starts_ray_and_warms_up_before_it_times_n(monkeypatch):
    """If the run at N started Ray, T(N) would hold Ray's start and T(5N) not: the rate came out 1.75x too high."""
    import benchmarks.pipeline as bp

    calls = []
    monkeypatch.setattr(bp, "init_ray", lambda *a, **k: calls.append("init_ray"))
    times = {"small": (10.0, 100), "big": (30.0, 500)}
    monkeypatch.setattr(bp, "_timed", lambda m, src, out, **k: calls.append(src) or (*times[src], (1, 1)))
    r = bp._steady("model", "small", "big", "out")
    assert calls == ["init_ray", "small", "small", "big"]  # N once untimed: Ray Data's actors start there
    assert r["steady"] == 20.0 and r["startup_in_process"] == 5.0


def test_model_only_rows_run_where_the_scoring_actors_run():
    """The model-only row ran in the driver: on a GPU cluster it timed the driver's CPU."""
    from benchmarks.scoring import where_actors_run

    assert where_actors_run({"CPU": 16, "GPU": 4})["num_gpus"] == 1
    assert where_actors_run({"CPU": 2})["num_gpus"] == 0


def test_a_benchmark_replaces_its_own_table_in_the_performance_doc(tmp_path):
    from benchmarks.doc import publish

    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nIntro kept.\n")
    cfg = BenchScoreConfig(n=40, pipeline_only=True, markdown=str(doc))
    publish(str(doc), "pipeline", "The pipeline alone", "| a |\n|---|\n| 1 |", job="bench_score", cfg=cfg)
    publish(str(doc), "other", "Other", "| b |\n|---|\n| 2 |", job="bench_score", cfg=cfg)
    publish(str(doc), "pipeline", "The pipeline alone", "| a |\n|---|\n| 3 |", job="bench_score", cfg=cfg)
    text = doc.read_text()
    assert "Intro kept." in text and text.count("### The pipeline alone") == 1 and "| 1 |" not in text
    assert "| 3 |" in text and "| 2 |" in text
    assert "Command: `python jobs/bench_score.py --n 40 --pipeline-only`" in text  # --markdown left out
    assert "Machine: " in text and " cores, native bf16: " in text and "Commit: " in text


def test_the_constant_actor_takes_every_argument_the_scoring_actor_does():
    """Hcd score builds its actor with the scoring actor's arguments; the pipeline benchmark's stands in for it."""
    import inspect

    from benchmarks.pipeline import ConstantScorer
    from hcdlib.commands.score.actor import Scorer

    params = [list(inspect.signature(c.__init__).parameters) for c in (ConstantScorer, Scorer)]
    assert params[0] == params[1]


def test_visible_tissue_of_a_real_slide_is_read_from_its_pyramid_in_strips(tmp_path):
    """The real-slide coverage measure sees what the synthetic one sees in the full image, every 8th pixel."""
    img = synth_tissue_pixels(1024, 768, seed=1)
    write_slide_tiff(str(tmp_path / "a.tif"), img, mpp=PCAM_MPP)
    (tmp_path / "notes.txt").write_text("not a slide")
    got = visible_in_slide(str(tmp_path / "a.tif"), strip=16)
    assert got.shape == visible_tissue(img).shape
    assert (got == visible_tissue(img)).all() and 0.2 < got.mean() < 0.9
    rows = measure(BenchCoverageConfig(slides_dir=str(tmp_path), thresholds="0.25", work=str(tmp_path / "w")))
    assert len(rows[0]["coverage"]) == 1 and rows[0]["coverage"][0] > 0.9


def test_a_slides_dir_without_slides_is_refused_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("not a slide")
    for folder in (tmp_path, tmp_path / "absent"):
        with pytest.raises(UserError, match="--slides-dir"):
            measure(BenchCoverageConfig(slides_dir=str(folder), work=str(tmp_path / "w")))
