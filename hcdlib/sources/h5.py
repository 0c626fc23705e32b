"""PatchCamelyon's own release: HDF5 files of patches, read in chunks without loading a file.

    camelyonpatch_level_2_split_train_x.h5   dataset "x": (N, 96, 96, 3) uint8
    camelyonpatch_level_2_split_train_y.h5   dataset "y": (N, 1, 1, 1) uint8, 1 = tumour in the centre

A folder holding such files (every split it holds), or one ``_x.h5`` file, is a patch source
like any other: ``hcd pack``, ``hcd train`` and ``hcd score`` take it. Patch ids are
``<split>-<index>`` (``train-0`` ... ``train-262143``), the row's position in the file; labels
come from the ``_y`` file beside it, where there is one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from hcdlib.sources.base import PatchSource
from hcdlib.sources.chunks import ROW_SCHEMA, PatchChunk
from hcdlib.sources.decode import PATCH_SIZE, PIXEL_BYTES
from hcdlib.sources.labels import LABEL_COLUMNS
from hcdlib.storage import uri as urimod
from hcdlib.storage.listing import SourceError

# The release's file names; the split is what the ids start with.
X_FILE = re.compile(r"(?:^|/)camelyonpatch_level_2_split_(?P<split>[a-z]+)_x\.h5$")
LAYOUT = "pcam_h5"


def y_path(x_path: str) -> str:
    """The labels file beside an ``_x.h5`` file."""
    return x_path[: -len("_x.h5")] + "_y.h5"


def is_h5_source(files: list[str]) -> bool:
    """Whether a listing holds PCam's HDF5 patch files."""
    return any(X_FILE.search(p) for p in files)


@contextlib.contextmanager
def _dataset(uri: str, name: str) -> Iterator:
    """Dataset ``name`` of the HDF5 file at ``uri`` (local or S3), open for slicing."""
    fs, path = urimod.resolve(uri)
    with contextlib.ExitStack() as stack:
        if isinstance(fs, pafs.LocalFileSystem):
            h5 = stack.enter_context(h5py.File(path, "r"))
        else:  # h5py reads a Python file object: ranged reads of what a slice needs
            h5 = stack.enter_context(h5py.File(stack.enter_context(fs.open_input_file(path)), "r"))
        if name not in h5:
            raise SourceError(f"{uri}: no dataset '{name}' (PatchCamelyon's files hold 'x' or 'y'); "
                              f"it holds {', '.join(h5.keys()) or 'nothing'}")
        yield h5[name]


def _length(uri: str, name: str, shape: tuple[int, ...]) -> int:
    """Rows of dataset ``name``, after checking its shape and type; a file that cannot be opened is refused."""
    try:
        with _dataset(uri, name) as ds:
            if ds.dtype != np.uint8 or tuple(ds.shape[1:]) != shape:
                raise SourceError(f"{uri}: dataset '{name}' is {ds.dtype} {tuple(ds.shape)}; PatchCamelyon's is "
                                  f"uint8 (N, {', '.join(map(str, shape))})")
            return int(ds.shape[0])
    except OSError as exc:  # a truncated or damaged file: h5py cannot read its structure
        raise SourceError(f"{uri}: not a readable HDF5 file ({' '.join(str(exc).split())[:200]}); "
                          "download it again (a .h5.gz must be unpacked with gunzip first)") from None


@dataclass(frozen=True)
class H5Chunk(PatchChunk):
    """Rows ``start`` .. ``start + num_rows`` of one split's ``_x`` file (and ``_y``, where given)."""

    x_uri: str
    y_uri: str | None
    split: str
    start: int

    def rows(self) -> pa.Table:
        """The slice's pixels as stored rows (no decoding), labels from ``_y``; a read that fails is error rows."""
        n, stop = self.num_rows, self.start + self.num_rows
        ids = [f"{self.split}-{i}" for i in range(self.start, stop)]
        pixels, labels, error = None, [None] * n, None
        try:
            with _dataset(self.x_uri, "x") as ds:
                pixels = np.ascontiguousarray(ds[self.start:stop], dtype=np.uint8)
            if self.y_uri is not None:
                with _dataset(self.y_uri, "y") as ds:
                    labels = ds[self.start:stop].reshape(-1).astype(np.int64).tolist()
        except (OSError, SourceError) as exc:  # a file damaged after listing: each row says so
            error = f"cannot read rows {self.start}-{stop - 1} of {self.x_uri}: {' '.join(str(exc).split())[:200]}"
            pixels = None
        flat = (pa.FixedSizeBinaryArray.from_buffers(pa.binary(PIXEL_BYTES), n, [None, pa.py_buffer(pixels)])
                if pixels is not None else pa.nulls(n, pa.binary(PIXEL_BYTES)))
        return pa.table({
            "id": pa.array(ids, pa.string()),
            "image": pa.nulls(n, pa.binary()),
            "pixels": flat,
            "note": pa.nulls(n, pa.string()),
            "label": pa.array(labels, pa.int64()),
            "slide_id": pa.nulls(n, pa.string()),
            "source": pa.array([f"{self.x_uri}#{i}" for i in range(self.start, stop)], pa.string()),
            "error": pa.array([error] * n, pa.string()),
        }, schema=ROW_SCHEMA.append(pa.field("error", pa.string())))


def h5_items(root_uri: str, files: list[str], fs: pafs.FileSystem) -> pa.Table:
    """One row per split: ``split, x, y, num_rows``, each x/y pair checked; refusals name the files."""
    rows = []
    for path in files:
        m = X_FILE.search(path)
        if not m:
            continue
        x = urimod.to_uri(fs, path)
        n = _length(x, "x", (PATCH_SIZE, PATCH_SIZE, 3))
        beside = y_path(path) in files or fs.get_file_info(y_path(path)).type == pafs.FileType.File  # one x file given
        y = urimod.to_uri(fs, y_path(path)) if beside else None
        if y is not None and (ny := _length(y, "y", (1, 1, 1))) != n:
            raise SourceError(f"{x} holds {n} patches and {y} {ny} labels: the pair must be of one split and "
                              "equal length; download them again")
        rows.append({"split": m["split"], "x": x, "y": y, "num_rows": n})
    splits = [r["split"] for r in rows]
    if len(set(splits)) < len(splits):
        raise SourceError(f"{root_uri}: holds the '{splits[0]}' split more than once; give one folder per copy")
    return pa.Table.from_pylist(rows, schema=pa.schema([("split", pa.string()), ("x", pa.string()),
                                                        ("y", pa.string()), ("num_rows", pa.int64())]))


@dataclass(frozen=True)
class H5Source(PatchSource):
    """PatchCamelyon's HDF5 files. ``items``: split, x, y, num_rows (one row per split)."""

    @property
    def layout(self) -> str:
        """``pcam_h5``."""
        return LAYOUT

    @property
    def num_patches(self) -> int:
        """The splits' rows, from the files' headers."""
        return int(sum(self.items["num_rows"].to_pylist()))

    def fingerprint(self) -> str:
        """The files and their lengths."""
        return hashlib.sha256(json.dumps(self.items.to_pylist(), sort_keys=True).encode()).hexdigest()[:16]

    def chunks(self, chunk_size: int = 1024) -> list[H5Chunk]:
        """Each split cut into runs of ``chunk_size`` rows."""
        out = []
        for r in self.items.to_pylist():
            for start in range(0, r["num_rows"], chunk_size):
                n = min(chunk_size, r["num_rows"] - start)
                out.append(H5Chunk(f"h5-{r['split']}-{start // chunk_size:06d}", n, r["x"], r["y"], r["split"],
                                   start))
        return out

    def label_table(self) -> pa.Table:
        """``id, label, slide_id`` of every patch, from the ``_y`` files (null labels where a split has none)."""
        ids, labels = [], []
        for r in self.items.to_pylist():
            ids += [f"{r['split']}-{i}" for i in range(r["num_rows"])]
            if r["y"] is None:
                labels += [None] * r["num_rows"]
                continue
            with _dataset(r["y"], "y") as ds:
                labels += ds[:].reshape(-1).astype(np.int64).tolist()
        return pa.table([pa.array(ids, pa.string()), pa.array(labels, pa.int64()), pa.nulls(len(ids), pa.string())],
                        schema=LABEL_COLUMNS)

    def has_labels(self) -> bool:
        """Where every split has its ``_y`` file."""
        return self.items["y"].null_count == 0 and self.items.num_rows > 0


def open_h5(uri: str, listing, labels: str | None) -> H5Source:
    """The HDF5 source of a listing; a labels CSV is refused (the labels are the ``_y`` files)."""
    if labels:
        raise SourceError(f"{labels}: a labels CSV for {uri}, which holds PatchCamelyon's HDF5 files; their "
                          "labels are the _y.h5 files beside them: drop --labels")
    return H5Source(uri, h5_items(uri, listing.files, listing.fs), 0.0)
