"""One factory picks the source from what is at the URI (as timm's reader factory picks a reader).

Layouts (docs/inputs.md):
- ``kaggle``: a folder of ``<id>.tif`` (or .png/.jpg), labels from an optional CSV
  (``id,label[,slide_id]``; ``labels.csv`` inside the folder is used when present);
- ``class_folders``: ``<root>/[split/]<label>/*.{tif,png,jpg}``, label = folder name;
- ``parquet``: shards written by ``hcd pack`` (columns id, image, label, slide_id, source);
- ``pcam_h5``: PatchCamelyon's HDF5 files (:mod:`hcdlib.sources.h5`).

- whole-slide images (``.svs``, ``.ndpi``, ..., or ``.tif`` with ``--slides``): scored as
  tissue tiles, see :class:`hcdlib.sources.slides.source.SlideSource`.

A source is *listed* once on the driver (one recursive listing through the filesystem's own
listing call, never a stat per file) and then cut into chunks (:mod:`hcdlib.sources.chunks`): the
units of reading, scoring and resuming, each of which reads itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from hcdlib.outputs.runfolder import RUN_SPEC
from hcdlib.sources import h5
from hcdlib.sources.base import ARCHIVE_EXTS, IMAGE_EXTS, PARQUET, PatchSource, Source
from hcdlib.sources.files import open_files
from hcdlib.sources.shards import open_shards, run_job
from hcdlib.sources.slides.plan import is_slide_source
from hcdlib.sources.slides.source import SlideSource, SlideTiling, open_slides
from hcdlib.storage import uri as urimod
from hcdlib.storage.listing import Listing, SourceError, list_files

log = logging.getLogger(__name__)


def open_source(uri: str, labels: str | None = None, *, listing: Listing | None = None,
                require_label: bool = False, tiling: SlideTiling | None = None) -> Source:
    """List the source at ``uri`` (or take ``listing``, already made) and open the source its layout is.

    ``require_label``: a ``--labels`` CSV must have a label column (training), not only slide ids.
    ``tiling``: how to cut whole-slide images (scoring); without it, slides are refused (patches
    only: training, packing). Slide-only formats (.svs, .ndpi, ...) make a slide source, and so
    does any .tif with ``tiling.force`` (``--slides``). Each source refuses what it cannot take.
    """
    t0 = time.perf_counter()
    listing = listing or list_files(uri)
    kind = layout_of(uri, listing, slides=tiling is not None and tiling.force)
    if kind == SlideSource.layout:
        return open_slides(uri, listing, labels, tiling, list_seconds=time.perf_counter() - t0)
    if kind == h5.LAYOUT:
        src: PatchSource = h5.open_h5(uri, listing, labels)
    elif kind == PARQUET:
        src = open_shards(uri, listing, labels)
    else:
        src = open_files(uri, listing, labels, require_label=require_label, tiles=tiling is not None)
    src = dataclasses.replace(src, list_seconds=time.perf_counter() - t0)
    log.debug("listed %s: layout %s, %d entries in %.2fs", uri, src.layout, src.items.num_rows, src.list_seconds)
    return src


def layout_of(uri: str, listing: Listing, *, slides: bool) -> str:
    """Which kind of source the listing holds (``slides``: ``--slides`` was given); a mix or nothing is refused."""
    files = listing.files
    if is_slide_source(files) or slides:
        return SlideSource.layout
    parquet = [p for p in files if p.endswith(".parquet")]
    images = [p for p in files if p.lower().endswith(IMAGE_EXTS)]
    refused = [p for p, _ in listing.refused if p.lower().endswith(IMAGE_EXTS)]
    if h5.is_h5_source(files):
        if parquet or images:
            other = (parquet or images)[0]
            raise SourceError(f"{uri}: holds PatchCamelyon's HDF5 files and other patches (e.g. {other}); give each "
                              "kind its own --input")
        return h5.LAYOUT
    if parquet and (images or refused):  # either kind alone would leave the other unscored without a word
        raise SourceError(f"{uri}: holds both Parquet shards ({len(parquet)}, e.g. {parquet[0]}) and patch images "
                          f"({len(images) + len(refused)}); give each kind its own --input")
    # a pack whose shards are all gone is a pack still: its manifest names what is missing
    if parquet or (not images and f"{listing.root}/{RUN_SPEC}" in files
                   and run_job(urimod.to_uri(listing.fs, f"{listing.root}/{RUN_SPEC}")) == "pack"):
        return PARQUET
    if images or refused:
        return "files"
    if any(p.lower().endswith(ARCHIVE_EXTS) for p in files):  # Kaggle's download is train.zip
        raise SourceError(f"{uri}: holds archives ({next(p for p in files if p.lower().endswith(ARCHIVE_EXTS))}), "
                          "not patches; unpack them and pass the folder")
    if any(p.endswith((".h5.gz", ".h5")) for p in files):
        raise SourceError(f"{uri}: holds {next(p for p in files if p.endswith(('.h5.gz', '.h5')))}; hcd reads "
                          "PatchCamelyon's HDF5 files unpacked and under their release names "
                          "(camelyonpatch_level_2_split_<split>_x.h5, gunzip the .gz files)")
    there = f"; it holds {len(files)} other files, e.g. {files[0]}" if files else ""
    raise SourceError(f"{uri}: no patch images ({', '.join(IMAGE_EXTS)}) or Parquet shards found{there}")
