"""What every source is: the Source interface, the base of patch sources, and the layouts' names."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import pyarrow as pa

from hcdlib.outputs.runfolder import MANIFEST
from hcdlib.sources.chunks import Chunk

log = logging.getLogger(__name__)

IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
# A patch file's extension at the end of an id in a labels CSV (read_labels takes it off).
ID_EXTENSION = r"(?i)\.(?:" + "|".join(e[1:] for e in IMAGE_EXTS) + ")$"
# Archives hcd does not read inside: named in the refusal, so the fix is plain.
ARCHIVE_EXTS = (".zip", ".tar", ".tar.gz", ".tgz", ".7z", ".rar")
KAGGLE, CLASS_FOLDERS, PARQUET = "kaggle", "class_folders", "parquet"


# hcd pack commits its shards as hcd score commits its parts: a manifest written last.
PACK_MANIFEST = MANIFEST


@runtime_checkable
class Source(Protocol):
    """What every source answers, patches or slides, so a job never asks which kind it holds.

    :func:`hcdlib.sources.factory.open_source` returns one: :class:`PatchSource` (files, shards,
    HDF5) or :class:`hcdlib.sources.slides.source.SlideSource`. Each source refuses what it
    cannot read when it is made, before Ray starts.
    """

    uri: str
    list_seconds: float

    @property
    def layout(self) -> str:
        """The layout's name, for messages and manifests."""

    @property
    def num_patches(self) -> int:
        """Rows the source yields (patches, or tiles once slides are planned)."""

    def fingerprint(self) -> str:
        """A hash of what was listed, so a resumed run can tell the input has not changed."""

    def chunks(self, chunk_size: int = 1024) -> list[Chunk]:
        """The units of reading, scoring and resume; their keys are stable for one listing."""

    def describe(self) -> str:
        """One line for the log: what was found."""

    def finish(self, out: str, *, threshold: float) -> dict | None:
        """Outputs made from the committed rows after scoring (slides: heatmaps, GeoJSON, a summary)."""


@dataclass(frozen=True)
class PatchSource:
    """A listed source of patches (a :class:`Source`); the layouts subclass it.

    Every source answers the same questions (how many patches, a fingerprint for resume, its
    chunks, its labels), so a job handles each layout, slides included, the same way.
    """

    uri: str
    items: pa.Table  # one row per listed file (FileSource) or per Parquet row group (ShardSource)
    list_seconds: float

    @property
    def layout(self) -> str:
        """The layout's name, for messages and the pack manifest."""
        raise NotImplementedError

    @property
    def num_patches(self) -> int:
        """Number of patches in the source."""
        return self.items.num_rows

    def fingerprint(self) -> str:
        """A hash of what was listed, so a resumed run can tell the input has not changed."""
        h = hashlib.sha256(self.layout.encode())
        for col in self.items.columns[:2]:
            for v in col.to_pylist():
                h.update(str(v).encode())
                h.update(b"\0")
        return h.hexdigest()[:16]

    def chunks(self, chunk_size: int = 1024) -> list[Chunk]:
        """Cut the source into chunks, the units of reading, scoring and resume (keys stable per listing)."""
        raise NotImplementedError

    def label_table(self) -> pa.Table:
        """``id, label, slide_id`` of every patch."""
        raise NotImplementedError

    def has_labels(self) -> bool:
        """Whether any patch carries a label (then every one must: see :func:`check_labelled`)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the log: what was found."""
        return f"{self.num_patches} patches ({self.layout.replace('_', ' ')})"

    def finish(self, out: str, *, threshold: float) -> dict | None:
        """Outputs made from the committed rows after scoring (none for patches; see slides)."""
        return None
