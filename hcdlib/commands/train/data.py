"""Training data: the sources, the validation split by slide groups, the datasets, what could not be decoded."""

from __future__ import annotations

import hashlib
import logging
import random

import pyarrow as pa
import pyarrow.compute as pc

from hcdlib.commands.train.loop import TRAIN, VAL
from hcdlib.config import TrainConfig
from hcdlib.errors import UserError
from hcdlib.raykit.pipeline import decoded_dataset, labelled_ok, patch_bytes, skipped_rows
from hcdlib.sources.base import PatchSource
from hcdlib.sources.chunks import Chunk
from hcdlib.sources.factory import open_source
from hcdlib.sources.files import FileSource
from hcdlib.sources.labels import check_labelled
from hcdlib.storage import uri as urimod
from hcdlib.storage.listing import SourceError

log = logging.getLogger(__name__)


def split_by_group(src: PatchSource, fraction: float) -> tuple[PatchSource, PatchSource]:
    """Hold out ``fraction`` of the *groups* (slide, duplicate group, else patch) for validation.

    Patches of one slide (or pixel-identical duplicates) are never on both sides, so the
    validation AUC is not inflated by near-copies of training patches.
    """
    if not isinstance(src, FileSource):  # shards and HDF5 files hold no slide groups to split by
        fix = ("camelyonpatch_level_2_split_valid_x.h5, PCam's validation split" if src.layout == "pcam_h5"
               else "the validation set packed separately")
        raise UserError(f"{src.uri}: a validation split of {src.layout.replace('_', ' ')} needs --val-data ({fix})")
    groups = sorted(set(src.items["group"].to_pylist()),
                    key=lambda g: hashlib.sha1(g.encode()).hexdigest())  # stable on every run and machine
    if len(groups) < 2:
        raise UserError(f"{src.uri}: one group only ({groups}); a grouped validation split needs --val-data")
    if src.items["slide_id"].null_count == src.items.num_rows:
        # Kaggle's train_labels.csv has no slides: neighbours of one slide land on both sides.
        log.warning("%s: no slide ids (a slide_id column in the labels CSV), so validation holds out single "
                    "patches, not slides, and its AUC is optimistic; give --val-data from other slides",
                    src.uri)
    n_val = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    mask = pc.is_in(src.items["group"], value_set=pa.array(groups[:n_val], pa.string()))
    val, train = src.items.filter(mask), src.items.filter(pc.invert(mask))
    return src.with_items(train), src.with_items(val)


def _shuffled_chunks(src: PatchSource, chunk_size: int, seed: int) -> list[Chunk]:
    """Training chunks with patches shuffled first: listings are sorted (class folders by label).

    Shards keep their row groups whole (each is one chunk); only the chunks' order is shuffled.
    """
    if isinstance(src, FileSource):
        order = list(range(src.items.num_rows))
        random.Random(seed).shuffle(order)
        src = src.with_items(src.items.take(pa.array(order)))
    chunks = src.chunks(chunk_size)
    random.Random(seed + 1).shuffle(chunks)
    return chunks


def open_sources(cfg: TrainConfig) -> tuple[PatchSource, PatchSource]:
    """The training and validation sources, listed and checked (every patch labelled 0 or 1)."""
    # require_label: a labels CSV without a label column is refused (labels not 0/1, repeated ids always are)
    src = open_source(cfg.data, cfg.labels, require_label=True)
    if cfg.val_data:
        train_src, val_src = src, open_source(cfg.val_data, cfg.val_labels, require_label=True)
    else:
        train_src, val_src = split_by_group(src, cfg.val_fraction)
    check_split((train_src, check_labelled(train_src, "training")),
                (val_src, check_labelled(val_src, "validation")), held_out=not cfg.val_data)
    log.info("train: %d patches, validation: %d patches", train_src.num_patches, val_src.num_patches)
    return train_src, val_src


def check_split(train: tuple[PatchSource, pa.Table], val: tuple[PatchSource, pa.Table], *, held_out: bool) -> None:
    """Refuse a split that holds one class only, or that validates on training patches.

    ``train`` and ``val``: each source with its ``id, label`` table (:func:`check_labelled`).
    Either misuse would run the whole budget for nothing the user can trust: an AUC over one
    class is undefined (the run used to end in a traceback after training), and an AUC over
    patches the model learnt is optimistic without a word, and it picks the exported epoch.
    ``held_out``: the validation patches are slide groups held out of ``--data``.
    """
    for (src, t), what in ((train, "training"), (val, "validation")):
        if not t.num_rows:
            raise SourceError(f"{src.uri}: no {what} patches")
        tumour = pc.sum(t["label"]).as_py()
        if tumour in (0, t.num_rows):
            fix = ("hold out more slide groups (--val-fraction) or give --val-data" if what == "validation" and held_out
                   else f"give {what} patches of both classes")
            raise SourceError(f"{src.uri}: all {t.num_rows} {what} patches are labelled {1 if tumour else 0} "
                              f"({'tumour' if tumour else 'normal'}); training and its validation AUC need both "
                              f"normal (0) and tumour (1) patches: {fix}")
    (train_src, train_t), (val_src, val_t) = train, val
    if same := _overlap(val_t["id"], train_t["id"]):
        raise SourceError(f"{val_src.uri}: {same[0]} of its {val_t.num_rows} validation patches have ids that are also "
                          f"training patches in {train_src.uri} (e.g. {same[1]}), so the validation AUC would count "
                          "patches the model learnt; validate on patches kept out of --data, or leave out --val-data "
                          "to hold out slide groups of --data")
    if held_out:  # split_by_group kept every slide and duplicate group on one side
        return
    # Pixel-identical copies (one duplicate group of a labels CSV, no slide to tell) are the same
    # patch under two ids: as above, refused.
    dup = _overlap(_dup_groups(val_src), _dup_groups(train_src))
    if dup:
        raise SourceError(f"{val_src.uri}: {dup[0]} of its {val_t.num_rows} validation patches are in duplicate "
                          f"groups (dup_group) that training patches in {train_src.uri} are in too (e.g. group "
                          f"{dup[1]}), so the validation AUC would count copies of patches the model learnt; keep "
                          "each duplicate group on one side")
    # Patches of one slide on both sides: allowed (some data sets cannot be split otherwise), said.
    slides = _overlap(val_t["slide_id"], pc.drop_null(train_t["slide_id"]))
    if slides:
        log.warning("%s: %d of its %d validation patches come from slides that training patches come from too "
                    "(e.g. slide %s): the validation AUC, which picks the exported epoch, is optimistic; validate on "
                    "other slides", val_src.uri, slides[0], val_t.num_rows, slides[1])


def _dup_groups(src: PatchSource) -> pa.ChunkedArray:
    """Each patch's duplicate group, where it has one and no slide (``group`` is then that group or the id)."""
    items = src.items
    if "group" not in items.column_names:  # shards carry no groups
        return pa.chunked_array([], pa.string())
    mine = pc.and_(items["slide_id"].is_null(), pc.not_equal(items["group"], items["id"]))
    return pc.filter(items["group"], mine)


def _overlap(values: pa.ChunkedArray, others: pa.ChunkedArray) -> tuple[int, str] | None:
    """How many of ``values`` (nulls never) are among ``others``, and the first; None when none."""
    shared = pc.fill_null(pc.is_in(values, value_set=others.combine_chunks()), False)
    n = pc.sum(shared).as_py() or 0
    return (n, values[pc.index(shared, True).as_py()].as_py()) if n else None


# Of Ray's object store, what decoded training + validation patches may fill under --cache auto.
# The rest stays for what is in flight (Ray Train's batches, checkpoints).
CACHE_STORE_FRACTION = 0.5


def caches_decoded(cfg: TrainConfig, patches: int, object_store_bytes: float) -> bool:
    """Whether to decode the data once into Ray's object store (``--cache``) rather than every epoch.

    Re-reading costs every epoch the same reads and decodes: on 2 cores, Ray Data's read tasks
    took 0.17 of a core beside the train worker. Kept, the epochs after the first read blocks
    from memory. Only what fits comfortably: a larger archive streams as before.
    """
    if cfg.cache != "auto":
        return cfg.cache == "on"
    return patch_bytes(patches) <= CACHE_STORE_FRACTION * object_store_bytes


def build_datasets(cfg: TrainConfig, train_src: PatchSource, val_src: PatchSource, *,
                   cache: bool = False) -> dict:
    """The train/val Ray Datasets, keyed by :data:`TRAIN` / :data:`VAL`; decoded now with ``cache``."""
    from ray.data import RandomSeedConfig  # Ray only where a job runs


    datasets = {}
    for key, s in ((TRAIN, train_src), (VAL, val_src)):
        chunks = _shuffled_chunks(s, cfg.chunk_size, cfg.seed) if key == TRAIN else s.chunks(cfg.chunk_size)
        # a folder per split: their chunks' keys (and so the record's file names) are alike
        ds = decoded_dataset(chunks).map_batches(labelled_ok, fn_kwargs={"skipped": urimod.join(cfg.out, SKIPPED, key)})
        if cache:
            ds = ds.materialize()
        if cache and key == TRAIN:  # kept blocks would come back in one order every epoch: a new order
            # each epoch, reproducible from --seed (a reorder of references, no data moves)
            ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True))
        datasets[key] = ds
    return datasets


# Where the patches that training left out (could not be decoded) are recorded, in --out.
SKIPPED = "skipped"


SPLIT_NAMES = {TRAIN: "training", VAL: "validation"}


def report_skipped(cfg: TrainConfig, listed: dict[str, int]) -> int:
    """Say how many listed patches training leaves out, with an example; return the count.

    A patch that cannot be decoded cannot train; it is recorded in ``<out>/skipped/`` (id and
    reason) by the read stage, and said here, never dropped without a word. ``listed``: the
    patches listed per split. A split that lost every patch is refused: with no training patch the
    run ended in a traceback, and with no validation patch no epoch could be chosen.
    """
    per = {key: skipped_rows(urimod.join(cfg.out, SKIPPED, key)) for key in (TRAIN, VAL)}
    t = pa.concat_tables(per.values())
    if not t.num_rows:
        return 0
    for key, rows in per.items():
        if rows.num_rows and rows.num_rows >= listed[key]:
            raise UserError(f"none of the {listed[key]} {SPLIT_NAMES[key]} patches could be decoded (e.g. "
                            f"{rows['id'][0].as_py()}: {rows['error'][0].as_py()}); each is listed in "
                            f"{urimod.join(cfg.out, SKIPPED, key)}; hcd trains on 96x96 RGB patches (tif, png or "
                            "jpg): convert them")
    example = f"{t['id'][0].as_py()}: {t['error'][0].as_py()}"
    log.warning("%d of the %d listed training and validation patches could not be decoded and are left out "
                "(e.g. %s); each is listed in %s", t.num_rows, sum(listed.values()), example,
                urimod.join(cfg.out, SKIPPED))
    return t.num_rows
