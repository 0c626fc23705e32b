import csv
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import PCAM_REAL, copy_patches, upload_dir

from hcdlib.commands.pack import PackConfig, pack
from hcdlib.sources.base import CLASS_FOLDERS, KAGGLE, PARQUET
from hcdlib.sources.decode import decode_patch, decode_table
from hcdlib.sources.factory import open_source
from hcdlib.sources.labels import check_labelled
from hcdlib.storage.listing import SourceError


def _labels(folder: Path) -> dict[str, tuple[int, str]]:
    with open(folder / "labels.csv") as f:
        return {r["id"]: (int(r["label"]), r["slide_id"]) for r in csv.DictReader(f)}


def _read_all(src, chunk_size=64) -> pa.Table:
    return pa.concat_tables(c.rows() for c in src.chunks(chunk_size))


def _class_folders(synth: Path, root: Path, split: str | None = "train") -> Path:
    """Re-lay the synthetic set as <root>/<split>/<label>/<id>.png."""
    labels = _labels(synth)
    for pid, (label, _) in labels.items():
        d = root / (split or "") / str(label)
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(synth / f"{pid}.tif", d / f"{pid}.tif")
    return root


def _check_rows(rows: pa.Table, synth: Path, *, with_slides: bool) -> None:
    labels = _labels(synth)
    assert sorted(rows["id"].to_pylist()) == sorted(labels)
    for r in rows.to_pylist():
        assert r["label"] == labels[r["id"]][0]
        assert r["slide_id"] == (labels[r["id"]][1] if with_slides else None)
        assert r["source"].endswith(f"{r['id']}.tif")
        assert r["error"] is None
    # Whether a row holds the file's bytes or (packed) its pixels, it decodes to the file's pixels.
    first = decode_table(rows.slice(0, 3))
    for i, pid in enumerate(first["id"]):
        assert first["status"][i] == "ok"
        np.testing.assert_array_equal(first["pixels"][i], decode_patch((synth / f"{pid}.tif").read_bytes()).pixels)


def test_kaggle_layout_local(synth_small):
    src = open_source(str(synth_small))
    assert src.layout == KAGGLE and src.num_patches == 300
    _check_rows(_read_all(src), synth_small, with_slides=True)


def test_kaggle_layout_explicit_labels_csv(synth_small, tmp_path):
    folder = tmp_path / "test"
    folder.mkdir()
    for p in list(synth_small.glob("*.tif"))[:20]:
        shutil.copy(p, folder)
    kaggle_csv = tmp_path / "train_labels.csv"
    labels = _labels(synth_small)
    kaggle_csv.write_text("id,label\n" + "".join(f"{p.stem},{labels[p.stem][0]}\n" for p in folder.iterdir()))
    src = open_source(str(folder), labels=str(kaggle_csv))
    rows = _read_all(src)
    assert rows.num_rows == 20
    assert all(r["label"] == labels[r["id"]][0] for r in rows.to_pylist())
    # without labels the ids still come through, unlabelled (the Kaggle test set)
    unlabelled = _read_all(open_source(str(folder)))
    assert unlabelled["label"].null_count == 20
    # a CSV none of whose ids is a patch's (paths for ids) is refused with an example of each
    paths = tmp_path / "paths.csv"
    paths.write_text("id,label\n" + "".join(f"train/{p.stem},{labels[p.stem][0]}\n" for p in folder.iterdir()))
    with pytest.raises(SourceError, match=r"paths.csv: none of its 20 ids names a patch of the input \(e.g. "
                                          r"'train/\w+' in the CSV, '\w+' from .*\); an id is the patch's file name"):
        open_source(str(folder), labels=str(paths))


@pytest.mark.parametrize("split", ["train", None])
def test_class_folders_local(synth_small, tmp_path, split):
    root = _class_folders(synth_small, tmp_path / "cls", split)
    src = open_source(str(root))
    assert src.layout == CLASS_FOLDERS
    _check_rows(_read_all(src), synth_small, with_slides=False)


def test_class_folders_under_two_splits_are_said_to_be_one_source(synth_small, tmp_path, caplog):
    """A data set's root (train/0, valid/0, ...) given as --data trained on its validation split too, silently."""
    import logging

    for split in ("train", "valid"):
        _class_folders(synth_small, tmp_path / "root", split)
    caplog.set_level(logging.WARNING)
    assert open_source(str(tmp_path / "root")).num_patches == 600
    assert "class folders under 2 folders (train/, valid/) are read as one source; pass one of them" in caplog.text
    caplog.clear()
    assert open_source(str(tmp_path / "root" / "valid")).num_patches == 300 and not caplog.text


def test_class_folders_and_a_labels_csv_that_contradicts_them_are_refused(synth_small, tmp_path):
    root = _class_folders(synth_small, tmp_path / "cls", None)
    labels = _labels(synth_small)
    agree = tmp_path / "agree.csv"
    agree.write_text("id,label,slide_id\n" + "".join(f"{pid},{lab},{slide}\n" for pid, (lab, slide) in labels.items()))
    _check_rows(_read_all(open_source(str(root), labels=str(agree))), synth_small, with_slides=True)
    # one patch relabelled in the CSV: the folder's label used to win without a word
    flipped = next(pid for pid, (lab, _) in labels.items() if lab == 1)
    clash = tmp_path / "clash.csv"
    clash.write_text(agree.read_text().replace(f"{flipped},1,", f"{flipped},0,"))
    with pytest.raises(SourceError, match=rf"1 patches have a label other than their class folder's, e.g. "
                                          rf".*1/{flipped}.tif is in folder 1/ \(label 1\) and the CSV says 0"):
        open_source(str(root), labels=str(clash))


def test_class_folders_named_normal_and_tumor_are_labelled(synth_small, tmp_path):
    """normal/ and tumor/ (as CAMELYON-derived sets name them) were read as unlabelled patches: training refused."""
    from hcdlib.sources.labels import check_labelled

    labels = _labels(synth_small)
    root = tmp_path / "named"
    for n, (pid, (label, _)) in enumerate(labels.items()):
        d = root / (["Normal", "normal"][n % 2] if label == 0 else ["TUMOR", "tumour", "tumor"][n % 3])
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(synth_small / f"{pid}.tif", d / f"{pid}.tif")
    t = check_labelled(open_source(str(root)), "training")
    got = dict(zip(t["id"].to_pylist(), t["label"].to_pylist(), strict=True))
    assert got == {i: lab for i, (lab, _) in labels.items()}
    other = tmp_path / "other" / "tumour_cells"  # not a class name: unlabelled, and the fix names the folders
    other.mkdir(parents=True)
    shutil.copy(synth_small / f"{next(iter(labels))}.tif", other)
    with pytest.raises(SourceError, match=r"or put the patches in class folders 0/ and 1/ \(or normal/ and tumor/\)"):
        check_labelled(open_source(str(tmp_path / "other")), "training")


def test_one_id_naming_two_labelled_patches_is_said(synth_small, tmp_path, caplog):
    """Two images under one name (a/x.tif, b/x.tif) both took the CSV's one label for x without a word."""
    import logging

    for sub in ("a", "b"):
        copy_patches(synth_small, tmp_path / sub, 3 if sub == "a" else 5)
    caplog.set_level(logging.WARNING)
    t = check_labelled(open_source(str(tmp_path), labels=str(synth_small / "labels.csv")), "training")
    assert t.num_rows == 8
    assert "3 ids name more than one training patch (e.g. " in caplog.text
    caplog.clear()
    check_labelled(open_source(str(tmp_path / "b"), labels=str(synth_small / "labels.csv")), "training")
    assert "name more than one" not in caplog.text


def test_parquet_shards_local(synth_small, tmp_path):
    pack(PackConfig(input=str(synth_small), out=str(tmp_path / "shards"), rows_per_file=128,
                    row_group_size=50))
    # shards carry the labels hcd pack gave them: a labels CSV beside them was ignored without a word
    with pytest.raises(SourceError, match=r"labels.csv: a labels CSV for .*shards, which holds Parquet shards; "
                                          r"shards carry the labels and slide ids hcd pack gave them"):
        open_source(str(tmp_path / "shards"), labels=str(synth_small / "labels.csv"))
    src = open_source(str(tmp_path / "shards"))
    assert src.layout == PARQUET and src.num_patches == 300
    assert len(src.chunks()) == 3 + 3 + 1  # row groups of 50 in shards of 128, 128, 44
    _check_rows(_read_all(src), synth_small, with_slides=True)


@pytest.mark.slow  # every layout uploaded to the S3 server and read back: seconds
def test_every_layout_on_s3(synth_small, tmp_path, bucket):
    upload_dir(synth_small, f"{bucket}/kaggle")
    src = open_source(f"{bucket}/kaggle")
    assert src.layout == KAGGLE
    rows = _read_all(src)
    _check_rows(rows, synth_small, with_slides=True)
    assert rows["source"][0].as_py().startswith(f"{bucket}/kaggle/")

    upload_dir(_class_folders(synth_small, tmp_path / "cls"), f"{bucket}/cls")
    src = open_source(f"{bucket}/cls")
    assert src.layout == CLASS_FOLDERS
    _check_rows(_read_all(src), synth_small, with_slides=False)

    pack(PackConfig(input=f"{bucket}/kaggle", out=f"{bucket}/shards", rows_per_file=100))
    src = open_source(f"{bucket}/shards")
    assert src.layout == PARQUET
    _check_rows(_read_all(src), synth_small, with_slides=True)


@pytest.mark.slow
def test_a_shard_chunk_on_s3_fetches_its_bytes_once_and_refuses_a_changed_shard(synth_small, bucket, s3_server):
    """The listing's footer travels with each chunk: reading every chunk of a shard sends each byte once.

    Counted by the S3 server (moto's recorder). Before, every chunk fetched the footer again: a
    shard of two row groups cost its own size plus two footer reads.
    """
    from hcdlib.storage import uri as urimod
    from hcdlib.storage.s3local import recorded

    upload_dir(synth_small, f"{bucket}/kaggle")
    pack(PackConfig(input=f"{bucket}/kaggle", out=f"{bucket}/shards", rows_per_file=100, row_group_size=50))
    src = open_source(f"{bucket}/shards")
    chunks = src.chunks()
    assert len(chunks) == 6 and all(c.footer and c.shard_bytes for c in chunks)
    with recorded(s3_server) as sent:
        rows = pa.concat_tables(c.rows() for c in chunks)
    _check_rows(rows, synth_small, with_slides=True)
    for shard in {c.shard for c in chunks}:
        fs, path = urimod.resolve(shard)
        size = fs.get_file_info(path).size
        assert 0.9 * size < sent[shard[len("s3://"):]] <= size  # the row groups' columns, not the footer again

    # A shard rewritten after the listing is refused, not read with the old footer.
    victim = chunks[0]
    fs, path = urimod.resolve(victim.shard)
    with fs.open_output_stream(path) as f:
        f.write(b"PAR1" + b"\0" * 100 + b"PAR1")
    with pytest.raises(OSError, match="changed since it was listed"):
        victim.rows()


def test_a_shard_with_a_large_footer_is_read_without_carrying_it(synth_small, tmp_path, monkeypatch):
    """Past FOOTER_CARRIED_BYTES the chunks do not each carry a copy: each read fetches the footer."""
    import hcdlib.sources.shards as sources

    pack(PackConfig(input=str(synth_small), out=str(tmp_path / "shards"), rows_per_file=300, row_group_size=10))
    monkeypatch.setattr(sources, "FOOTER_CARRIED_BYTES", 1024)  # this shard's 30 row groups are past it
    src = open_source(str(tmp_path / "shards"))
    chunks = src.chunks()
    assert len(chunks) == 30 and all(c.footer is None and c.shard_bytes for c in chunks)
    _check_rows(_read_all(src), synth_small, with_slides=True)


def test_missing_and_empty_inputs_name_the_uri(tmp_path):
    with pytest.raises(SourceError, match=f"{tmp_path}/nope: no such file"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"no patch images \(.*\) or Parquet shards found$"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "empty" / "camelyonpatch_level_2_split_test_x.h5").write_bytes(b"\x89HDF")  # PCam's name, cut short
    with pytest.raises(SourceError, match=r"empty/camelyonpatch_level_2_split_test_x\.h5: not a readable HDF5 file"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "empty" / "camelyonpatch_level_2_split_test_x.h5").rename(tmp_path / "empty" / "other.txt")
    with pytest.raises(SourceError, match=r"no patch images .* found; it holds 1 other files, e.g. .*other.txt"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "train.zip").write_bytes(b"PK\x03\x04")  # Kaggle's download, passed as it came
    for uri in (tmp_path / "train.zip", tmp_path):
        with pytest.raises(SourceError, match=r"holds archives \(.*train.zip\), not patches; unpack them"):
            open_source(str(uri))


def test_unreadable_file_becomes_error_row(synth_small, tmp_path):
    folder = tmp_path / "k"
    shutil.copytree(synth_small, folder)
    src = open_source(str(folder))
    victim = folder / f"{src.items['id'][0].as_py()}.tif"
    victim.unlink()  # listed, then gone before it was read
    rows = src.chunks()[0].rows()
    assert rows["image"][0].as_py() is None
    assert "cannot read" in rows["error"][0].as_py()
    assert rows["error"].null_count == rows.num_rows - 1


@pytest.mark.skipif(not PCAM_REAL.exists(), reason="../shared/data/pcam-real not present")
def test_real_pcam_jpeg_class_folders(tmp_path):
    # 200 real patches: 100 per class from the valid split, copied into a small class-folder tree
    # (symlinks out of the input folder are refused, see test_listing_refuses_what_must_not_be_read).
    picked = []
    for label in (0, 1):
        for p in sorted((PCAM_REAL / "valid" / str(label)).glob("*.jpg"))[:100]:
            d = tmp_path / "valid" / str(label)
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, d / p.name)
            picked.append((p.stem, label))
    src = open_source(str(tmp_path), labels=str(PCAM_REAL / "labels.csv"))
    assert src.layout == CLASS_FOLDERS and src.num_patches == 200
    rows = _read_all(src)
    assert sorted(zip(rows["id"].to_pylist(), rows["label"].to_pylist(), strict=True)) == sorted(picked)
    for r in rows.slice(0, 10).to_pylist():
        res = decode_patch(r["image"])
        assert res.error is None and res.pixels.shape == (96, 96, 3)
    # the labels CSV agrees with the folder names for every picked patch
    with open(PCAM_REAL / "labels.csv") as f:
        csv_rows = {r["id"]: int(r["label"]) for r in csv.DictReader(f)}
    assert all(csv_rows[i] == lab for i, lab in picked)
    assert np.mean([lab for _, lab in picked]) == 0.5


def test_a_patch_run_lists_its_input_once(any_model, synth_small, tmp_path, monkeypatch):
    import hcdlib.commands.score.run
    import hcdlib.outputs.runfolder
    import hcdlib.sources.factory
    import hcdlib.storage.listing
    from hcdlib.commands.score.run import ScoreConfig, score

    calls = []
    real = hcdlib.storage.listing.list_files

    def counting(uri):
        calls.append(uri)
        return real(uri)

    for module in (hcdlib.storage.listing, hcdlib.sources.factory):
        monkeypatch.setattr(module, "list_files", counting)

    class Stop(Exception):
        pass

    def stop(*_a, **_k):  # everything up to the first read: listing, labels, run spec, chunks
        raise Stop

    monkeypatch.setattr(hcdlib.commands.score.run, "init_ray", lambda *_a, **_k: None)
    monkeypatch.setattr(hcdlib.outputs.runfolder.RunFolder, "done", stop)
    with pytest.raises(Stop):
        score(ScoreConfig(model=str(any_model), input=str(synth_small), out=str(tmp_path / "o")))
    assert calls == [str(synth_small)]


def test_every_chunk_reads_itself_the_same_way(synth_small, tmp_path):
    """Files, shards and bad slides: each chunk's read() gives decoded rows; the pipeline asks nothing else."""
    import pickle

    from hcdlib.sources.slides.read import SlideErrorChunk

    files = open_source(str(synth_small))
    pack(PackConfig(input=str(synth_small), out=str(tmp_path / "shards"), rows_per_file=100, row_group_size=100))
    shards = open_source(str(tmp_path / "shards"))
    a = files.chunks(100)
    b = shards.chunks()
    assert [c.num_rows for c in a] == [c.num_rows for c in b] == [100, 100, 100]
    for fc, sc in zip(a, b, strict=True):
        assert pickle.loads(pickle.dumps(fc)) == fc  # chunks travel to Ray tasks as themselves
        x, y = fc.read(), sc.read()
        assert list(x["id"]) == list(y["id"]) == fc.expected_ids() and sc.expected_ids() is None
        assert (x["status"] == "ok").all() and np.array_equal(x["pixels"], y["pixels"])
    bad = SlideErrorChunk("s-1234abcd-error", 1, "/x/s.svs", "s", "slide /x/s.svs: cannot read: truncated")
    row = bad.read()
    assert list(row["id"]) == ["s"] and list(row["status"]) == ["error"] and "truncated" in row["error"][0]
    assert row["pixels"].shape == (1, 96, 96, 3)


def test_read_tasks_yield_the_arrow_blocks_ray_data_would_build(synth_small, tmp_path):
    """The read task builds its blocks in C++; they must be what Ray Data's own conversion gives."""
    from ray.data.block import BlockAccessor

    from hcdlib.raykit.pipeline import read_decode
    from hcdlib.sources.slides.read import SlideErrorChunk

    pack(PackConfig(input=str(synth_small), out=str(tmp_path / "shards")))
    bad = SlideErrorChunk("s-1234abcd-error", 1, "/x/s.svs", "s", "slide /x/s.svs: cannot read: truncated")
    for chunk in (open_source(str(synth_small)).chunks(100)[0], open_source(str(tmp_path / "shards")).chunks()[0], bad):
        blocks = list(read_decode({"chunk": [chunk]}, block_rows=64))
        assert all(isinstance(b, pa.Table) for b in blocks) and blocks[0].num_rows == min(64, chunk.num_rows)
        out = chunk.read()
        out["chunk"] = np.full(chunk.num_rows, chunk.key, dtype=object)
        out["row"] = np.arange(chunk.num_rows, dtype=np.int64)
        theirs = BlockAccessor.batch_to_block(out)
        ours = pa.concat_tables(blocks)
        assert ours.schema == theirs.schema and ours.equals(theirs), type(chunk).__name__

    class Mixed:  # a column Arrow cannot type is left to Ray Data, not an error
        key, num_rows = "m", 2

        def read(self, resize=False):
            return {"id": np.array(["a", 1], dtype=object), "pixels": np.zeros((2, 96, 96, 3), np.uint8)}

    (block,) = read_decode({"chunk": [Mixed()]})
    assert isinstance(block, dict) and list(block["id"]) == ["a", 1]


def test_slides_are_a_source_only_where_slides_are_scored(tmp_path):
    """The one factory: slide formats give a slide source when a job can tile them, and a refusal elsewhere."""
    from hcdlib.sources.slides.source import SlideSource, SlideTiling

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "s1.svs").write_bytes(b"not opened until planning")
    with pytest.raises(SourceError, match="holds whole-slide images; hcd score tiles and scores them"):
        open_source(str(tmp_path / "a"))
    src = open_source(str(tmp_path / "a"), tiling=SlideTiling(out=str(tmp_path / "o")))
    assert isinstance(src, SlideSource) and [s["slide_id"] for s in src.slides] == ["s1"]
    assert len(src.fingerprint()) == 16
    (tmp_path / "l.csv").write_text("id,slide_id\nx,s1\n")
    with pytest.raises(SourceError, match="holds whole-slide images; a slide's tiles take its path below the input"):
        open_source(str(tmp_path / "a"), str(tmp_path / "l.csv"), tiling=SlideTiling(out=str(tmp_path / "o")))
    # a .tif is a patch unless --slides says the folder holds slides
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "s2.tif").write_bytes(b"II*\x00")
    assert open_source(str(tmp_path / "b")).layout == KAGGLE
    forced = open_source(str(tmp_path / "b"), tiling=SlideTiling(out=str(tmp_path / "o"), force=True))
    assert isinstance(forced, SlideSource) and [s["slide_id"] for s in forced.slides] == ["s2"]
    # --slides over a folder with no slide is refused before any work (it started Ray and committed nothing)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "region.png").write_bytes(b"\x89PNG")
    with pytest.raises(SourceError, match=r"no whole-slide images \(.*\.svs.*\) to tile; it holds 1 other images "
                                          r"\(e.g. .*region.png\): patches are scored without --slides"):
        open_source(str(tmp_path / "c"), tiling=SlideTiling(out=str(tmp_path / "o"), force=True))


def test_tif_slides_given_as_patches_are_refused_with_the_flag_that_tiles_them(synth_small, tmp_path):
    """A folder of .tif slides given as patches is refused before any work, with the fix for the command.

    CAMELYON16's slides are .tif, like Kaggle's patches: each was an error row ("larger than
    64 MiB") and the run ended with exit code 0 and nothing scored.
    """
    import os
    import shutil

    from PIL import Image

    from hcdlib.commands.synth_slides import write_slide_tiff
    from hcdlib.sources.slides.source import SlideSource, SlideTiling

    tiling, forced = SlideTiling(out=str(tmp_path / "o")), SlideTiling(out=str(tmp_path / "o"), force=True)
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a.tif", "b.tif"):  # small slides (a few MB): told by their header, more pixels than --resize takes
        write_slide_tiff(str(slides / name), np.full((4100, 4200, 3), 230, np.uint8), mpp=0.5)
    with pytest.raises(SourceError, match=r"slides: its 2 .tif files are whole-slide images, not patches "
                                          r"\(e.g. .*a.tif: 4200x4100 px\); pass --slides to tile and score them"):
        open_source(str(slides), tiling=tiling)
    assert isinstance(open_source(str(slides), tiling=forced), SlideSource)
    with pytest.raises(SourceError, match=r"slides: its 2 .tif files are whole-slide images, not patches .*; hcd "
                                          r"score --slides tiles and scores slides, but this command takes patches"):
        open_source(str(slides))  # train, pack: they read them all before they refused
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "tumor_001.tif", "wb") as f:  # told by its size: not opened
        f.truncate(65 * 2**20)
    with pytest.raises(SourceError, match=r"tumor_001.tif: a whole-slide image, not a patch \(65 MiB\); pass "
                                          r"--slides to tile and score it"):
        open_source(str(big / "tumor_001.tif"), tiling=tiling)
    # tiles of 1,000-4,096 px are not refused: --resize scales them (each is an error row naming it otherwise)
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    Image.fromarray(np.full((1024, 1024, 3), 200, np.uint8)).save(tiles / "t.tif")
    assert open_source(str(tiles), tiling=tiling).num_patches == 1
    # patches beside a slide: scored as patches, the slide an error row (nothing refused)
    patch = sorted(synth_small.glob("*.tif"))[0]
    shutil.copy(patch, slides / patch.name)
    assert open_source(str(slides), tiling=tiling).num_patches == 3
    os.remove(slides / "a.tif")
    os.remove(slides / "b.tif")
    assert open_source(str(slides), tiling=tiling).num_patches == 1


def test_a_mixed_input_never_leaves_one_kind_unscored_without_a_word(synth_small, tmp_path, caplog):
    """Shards beside patch images used to be skipped silently; images beside slides were not mentioned."""
    import logging
    import shutil

    from hcdlib.sources.slides.source import SlideSource, SlideTiling

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in sorted(synth_small.glob("*.tif"))[:3]:
        shutil.copy(p, mixed / p.name)
    (mixed / "old").mkdir()
    (mixed / "old" / "part-00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(SourceError, match=r"holds both Parquet shards \(1, e.g. .*part-00000.parquet\) and patch "
                                          r"images \(3\); give each kind its own --input"):
        open_source(str(mixed))
    caplog.set_level(logging.WARNING)
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "s1.svs").write_bytes(b"not opened until planning")
    (scans / "s1_macro.jpg").write_bytes(b"a photo of the glass slide")
    src = open_source(str(scans), tiling=SlideTiling(out=str(tmp_path / "o")))
    assert isinstance(src, SlideSource) and [s["slide_id"] for s in src.slides] == ["s1"]
    assert "1 files that are not slides are not scored (e.g. " in caplog.text and "s1_macro.jpg" in caplog.text
    # Patches in a format hcd does not read (.bmp, .webp) beside .tif ones used to be skipped without a word;
    # a data set's labels, notes and hidden files are not mentioned.
    caplog.clear()
    other = tmp_path / "other"
    copy_patches(synth_small, other, 2)
    for name in ("x.bmp", "y.webp", "notes.csv", "README.md", ".DS_Store", "Thumbs.db"):
        (other / name).write_bytes(b"x")
    assert open_source(str(other)).num_patches == 2
    assert "2 files are not patches and are not read (e.g. " in caplog.text and "x.bmp" in caplog.text


def test_macos_metadata_files_are_not_read_as_patches(synth_small, tmp_path, caplog):
    """A folder copied from a Mac holds ._<id>.tif beside each <id>.tif: they were error rows under unknown ids."""
    import logging

    folder = tmp_path / "copied"
    kept = copy_patches(synth_small, folder, 3)
    for p in kept:
        (folder / f"._{p.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4000))
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "x.tif").write_bytes(b"\x00\x05\x16\x07")
    caplog.set_level(logging.WARNING)
    src = open_source(str(folder))
    assert src.layout == KAGGLE and sorted(_read_all(src)["id"].to_pylist()) == sorted(p.stem for p in kept)
    assert "4 macOS metadata files (._name, written beside files copied from a Mac) are not read" in caplog.text


def test_parquet_that_is_not_a_patch_shard_is_refused_at_listing(synth_small, tmp_path):
    """No id column: scored under null ids; an image struct (a dataset's export): a traceback mid-run."""
    import pyarrow.parquet as pq

    png = (synth_small / sorted(p.name for p in synth_small.glob("*.tif"))[0]).read_bytes()
    cases = {
        "no-id": (pa.table({"image": [png], "label": [1]}), r"not a patch shard: no id column \(it has image, label\)"),
        "no-image": (pa.table({"id": ["a"], "label": [1]}), "no image \\(or pixels\\) column"),
        "struct": (pa.table({"id": ["a"], "image": [{"bytes": png, "path": "a.tif"}]}),
                   r"column 'image' is struct<bytes: binary, path: string>, which hcd cannot read as binary"),
    }
    for name, (table, message) in cases.items():
        (tmp_path / name).mkdir()
        pq.write_table(table, tmp_path / name / "data.parquet")
        with pytest.raises(SourceError, match=rf"{name}/data.parquet: .*{message}.*pack the patches with hcd pack"):
            open_source(str(tmp_path / name))
