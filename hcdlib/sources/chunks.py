"""Chunks: the unit of reading, scoring and resume.

A chunk is a small frozen description of some input rows (a slice of a file list, one Parquet
row group, a run of slide tiles) with a stable ``key`` and its ``num_rows``. It reads itself:
:meth:`Chunk.read` returns the rows decoded, in the batch format of
:func:`hcdlib.sources.decode.decode_batch`, so the Ray pipeline handles every layout the same way and
never asks what kind of chunk it holds. Sources (:mod:`hcdlib.sources.factory`, :mod:`hcdlib.sources.slides.source`)
make the chunks; the read tasks call ``read``.
"""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hcdlib.sources.decode import PIXEL_BYTES, decode_table, slide_hint
from hcdlib.storage import uri as urimod

# Schema of the rows every patch chunk yields (and of pack shards). A row holds its patch
# either encoded (``image``: the file's bytes) or decoded (``pixels``: 96x96x3 uint8, as hcd
# pack stores lossless patches, with decoding's ``note``); shards from before pixels read as
# image-only.
ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("pixels", pa.binary(PIXEL_BYTES)),
    ("note", pa.string()),
    ("label", pa.int64()),
    ("slide_id", pa.string()),
    ("source", pa.string()),
])

# A patch file is read whole into memory; nothing a patch can be (even a 4096x4096 tile that
# --resize accepts, uncompressed) is larger than this, and /dev/zero-like inputs stop here.
MAX_PATCH_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Chunk:
    """``num_rows`` input rows under a stable ``key`` (a part file's name on output)."""

    key: str
    num_rows: int

    def read(self, *, resize: bool = False) -> dict[str, np.ndarray]:
        """The chunk's rows, decoded: ``id, pixels, status, error, note, label, slide_id, source, ...``."""
        raise NotImplementedError

    def expected_ids(self) -> list[str] | None:
        """The ids the chunk holds where they are known without reading it (a file list), else None."""
        return None


@dataclass(frozen=True)
class PatchChunk(Chunk):
    """A chunk of patches: read as encoded rows (:data:`ROW_SCHEMA` + ``error``), then decoded."""

    def rows(self) -> pa.Table:
        """Rows ``id, image, pixels, note, label, slide_id, source, error``; nothing decoded yet.

        ``error`` is set where a file could not be read at all; decoding fills it in later for
        bytes that are not a valid patch.
        """
        raise NotImplementedError

    def read(self, *, resize: bool = False) -> dict[str, np.ndarray]:
        """The rows decoded (see :func:`hcdlib.sources.decode.decode_table`)."""
        return decode_table(self.rows(), resize=resize)


@dataclass(frozen=True)
class FilesChunk(PatchChunk):
    """A slice of a listed folder: one file per patch (``error``: refused at listing, never read)."""

    ids: tuple[str, ...]
    sources: tuple[str, ...]
    labels: tuple[int | None, ...]
    slide_ids: tuple[str | None, ...]
    errors: tuple[str | None, ...]

    def expected_ids(self) -> list[str]:
        """The file stems of this slice."""
        return list(self.ids)

    def rows(self) -> pa.Table:
        """Read every file of the slice (concurrently on S3, where each GET waits on the network)."""
        fs, _ = urimod.resolve(self.sources[0])
        todo = [(i, urimod.resolve(s)[1]) for i, s in enumerate(self.sources) if self.errors[i] is None]
        results: list[tuple[bytes | None, str | None]] = [(None, why) for why in self.errors]
        if isinstance(fs, pafs.S3FileSystem):
            with ThreadPoolExecutor(16) as pool:
                read = list(pool.map(lambda ip: read_patch_file(fs, ip[1]), todo))
        else:
            read = [read_patch_file(fs, p) for _, p in todo]
        for (i, _), r in zip(todo, read, strict=True):
            results[i] = r
        n = len(self.sources)
        return pa.table({
            "id": pa.array(self.ids, pa.string()),
            "image": pa.array([r[0] for r in results], pa.binary()),
            "pixels": pa.nulls(n, pa.binary(PIXEL_BYTES)),
            "note": pa.nulls(n, pa.string()),
            "label": pa.array(self.labels, pa.int64()),
            "slide_id": pa.array(self.slide_ids, pa.string()),
            "source": pa.array(self.sources, pa.string()),
            "error": pa.array([r[1] for r in results], pa.string()),
        })


@dataclass(frozen=True)
class ShardChunk(PatchChunk):
    """One row group of a Parquet shard (as ``hcd pack`` writes them).

    ``footer`` and ``shard_bytes``: the shard's Parquet footer and size as the listing read them.
    With the footer, a read is one ranged GET (the row group's columns, coalesced) after the
    open: on S3 it was three requests per chunk (the open, the footer, the row group). A shard
    whose size changed since the listing is refused rather than read with a stale footer.
    """

    shard: str
    row_group: int
    footer: bytes | None = None
    shard_bytes: int | None = None

    def rows(self) -> pa.Table:
        """The row group in :data:`ROW_SCHEMA` (columns a shard lacks come as nulls)."""
        fs, path = urimod.resolve(self.shard)
        with fs.open_input_file(path) as f:
            if self.shard_bytes is not None and f.size() != self.shard_bytes:
                raise OSError(f"{self.shard} changed since it was listed ({self.shard_bytes} bytes then, "
                              f"{f.size()} now); rerun to list the input again")
            meta = pq.read_metadata(pa.BufferReader(self.footer)) if self.footer else None
            t = pq.ParquetFile(f, metadata=meta, pre_buffer=True).read_row_group(self.row_group)
        t = t.select([c for c in ROW_SCHEMA.names if c in t.column_names])
        for field in ROW_SCHEMA:
            if field.name not in t.column_names:
                t = t.append_column(field, pa.nulls(t.num_rows, field.type))
        t = t.select(ROW_SCHEMA.names).cast(ROW_SCHEMA)
        return t.append_column("error", pa.nulls(t.num_rows, pa.string()))


def footer_bytes(meta: pq.FileMetaData) -> bytes:
    """A Parquet footer as a self-contained buffer (``pq.read_metadata`` reads it back)."""
    sink = pa.BufferOutputStream()
    meta.write_metadata_file(sink)
    return sink.getvalue().to_pybytes()


def read_patch_file(fs: pafs.FileSystem, path: str) -> tuple[bytes | None, str | None]:
    """``(bytes, None)`` of a regular file of at most :data:`MAX_PATCH_BYTES`, else ``(None, why)``."""
    too_big = f"file is larger than {MAX_PATCH_BYTES // 2**20} MiB: not a patch, not read" + (
        f" ({slide_hint('TIFF')})" if path.lower().endswith((".tif", ".tiff")) else "")
    if isinstance(fs, pafs.LocalFileSystem):
        # Checked on the open descriptor: a file swapped for a pipe after listing is not read,
        # and O_NONBLOCK keeps open() itself from waiting on one.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            return None, f"cannot read {path}: {exc.strerror or exc}"
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None, f"{path} is not a regular file; not read"
            if st.st_size > MAX_PATCH_BYTES:
                return None, too_big
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read(), None
        except OSError as exc:
            return None, f"cannot read {path}: {exc.strerror or exc}"
        finally:
            os.close(fd)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read(MAX_PATCH_BYTES + 1)
    except OSError as exc:
        return None, f"cannot read {path}: {exc}"
    return (None, too_big) if len(data) > MAX_PATCH_BYTES else (data, None)


def largest_chunk(chunks: list[Chunk]) -> int:
    """Rows in the largest chunk (Parquet row groups may exceed --chunk-size)."""
    return max((c.num_rows for c in chunks), default=1)
