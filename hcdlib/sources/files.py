"""Folders of patch files: Kaggle's layout (labels from a CSV) and class folders."""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from hcdlib.sources.base import CLASS_FOLDERS, IMAGE_EXTS, KAGGLE, PatchSource
from hcdlib.sources.chunks import Chunk, FilesChunk
from hcdlib.sources.labels import CLASS_NAMES, LABEL_COLUMNS, first_true, read_labels
from hcdlib.sources.slides.plan import slide_like
from hcdlib.storage import uri as urimod
from hcdlib.storage.listing import Listing, SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileSource(PatchSource):
    """A folder of patch files: Kaggle-style (labels from a CSV) or class folders (``<label>/``).

    ``items``: id, source, label, slide_id, group, error (set: listed, never read).
    """

    kind: str = KAGGLE  # KAGGLE or CLASS_FOLDERS

    @property
    def layout(self) -> str:
        """``kaggle`` or ``class_folders``."""
        return self.kind

    def chunks(self, chunk_size: int = 1024) -> list[Chunk]:
        """Slices of ``chunk_size`` files in listing order."""
        cols = [self.items[c].to_pylist() for c in ("id", "source", "label", "slide_id", "error")]
        return [FilesChunk(f"files-{i:06d}", min(chunk_size, self.items.num_rows - a),
                           *(tuple(v[a:a + chunk_size]) for v in cols))
                for i, a in enumerate(range(0, self.items.num_rows, chunk_size))]

    def label_table(self) -> pa.Table:
        """From the listing: no file is read."""
        return self.items.select(LABEL_COLUMNS.names)

    def has_labels(self) -> bool:
        """Class folders always; a Kaggle folder where its labels CSV labels any patch."""
        return self.kind == CLASS_FOLDERS or self.items["label"].null_count < self.items.num_rows

    def with_items(self, items: pa.Table) -> FileSource:
        """The same source over other rows of its listing (a split, a shuffled order)."""
        return dataclasses.replace(self, items=items)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


# Files beside patches that are not patches and go without a word: labels and notes of a data
# set, hidden files, hcd's own markers, what Windows leaves in a folder of images.
_NOT_PATCHES = (".csv", ".txt", ".md", ".json", ".db", ".ini")


def warn_unread(uri: str, files: list[str]) -> None:
    """Say which files of a patch folder are not read: a .bmp or .webp patch was skipped without a word."""
    def quiet(p: str) -> bool:
        name = p.rsplit("/", 1)[-1]
        return name.startswith((".", "_")) or name.lower().endswith(_NOT_PATCHES)

    other = [p for p in files if not p.lower().endswith(IMAGE_EXTS) and not quiet(p)]
    if other:
        log.warning("%s: %d files are not patches and are not read (e.g. %s); hcd reads %s patches: convert the "
                    "others to one of these", uri, len(other), other[0], "/".join(e[1:] for e in IMAGE_EXTS))


def file_items(listing: Listing, images: list[str], refused: list[tuple[str, str]],
                labels: pa.Table | None, labels_uri: str | None) -> tuple[str, pa.Table]:
    """One row per image file; refused entries (links outside the root, pipes) come as error rows."""
    entries = sorted([(p, None) for p in images] + refused)
    paths = [p for p, _ in entries]
    parents = [os.path.basename(os.path.dirname(p)) for p in paths]
    is_class = (all(p.isdigit() or p.lower() in CLASS_NAMES for p in parents)
                and os.path.dirname(paths[0]) != listing.root)
    if is_class:
        _warn_splits(listing.root, paths)
    table = pa.table({
        "id": pa.array([_stem(p) for p in paths], pa.string()),
        "source": pa.array([urimod.to_uri(listing.fs, p) for p in paths], pa.string()),
        "folder_label": pa.array([int(p) if p.isdigit() else CLASS_NAMES[p.lower()] for p in parents] if is_class
                                 else [None] * len(paths), pa.int64()),
        "error": pa.array([e for _, e in entries], pa.string()),
        "pos": pa.array(range(len(paths)), pa.int64()),
    })
    if labels is not None:
        if labels.num_rows and not pc.any(pc.is_in(table["id"], value_set=labels["id"])).as_py():
            # every patch unlabelled: training refused "no label" without saying why, and scoring lost the slide ids
            raise SourceError(f"{labels_uri}: none of its {labels.num_rows} ids names a patch of the input (e.g. "
                              f"{labels['id'][0].as_py()!r} in the CSV, {table['id'][0].as_py()!r} from "
                              f"{table['source'][0].as_py()}); an id is the patch's file name without its extension")
        keep = [c for c in ("id", "label", "slide_id", "dup_group") if c in labels.column_names]
        table = table.join(labels.select(keep), "id", join_type="left outer")
        # join() does not keep order; restore the listing order so chunks are stable.
        table = table.sort_by("pos")
    names = table.column_names
    null_str = pa.nulls(table.num_rows, pa.string())
    if is_class and "label" in names:
        _check_folder_labels(table, labels_uri)
    label = table["folder_label"] if is_class or "label" not in names else table["label"]
    slide = table["slide_id"] if "slide_id" in names else null_str
    dup = table["dup_group"] if "dup_group" in names else null_str
    # The group that a train/validation split must keep on one side: slide, else duplicate
    # group, else the patch itself.
    group = pc.coalesce(slide, dup, table["id"])
    items = pa.table({"id": table["id"], "source": table["source"], "label": label,
                      "slide_id": slide, "group": group, "error": table["error"]})
    return (CLASS_FOLDERS if is_class else KAGGLE), items


def _warn_splits(root: str, paths: list[str]) -> None:
    """Say when class folders lie under several folders (``train/0``, ``valid/0``): all are one source.

    Pointing ``hcd train --data`` at a data set's root (PCam's ``train/`` and ``valid/``) trained
    on its validation split too, without a word.
    """
    splits = sorted({os.path.dirname(os.path.dirname(p)) for p in paths})
    if len(splits) > 1:
        names = ", ".join(posixpath.relpath(s, root) + "/" for s in splits[:4])
        log.warning("%s: class folders under %d folders (%s) are read as one source; pass one of them to use one "
                    "split alone", root, len(splits), names)


def _parent(path: str) -> str:
    return posixpath.basename(posixpath.dirname(path))


def _check_folder_labels(table: pa.Table, labels_uri: str | None) -> None:
    """Refuse class folders that a labels CSV contradicts (``1/abc.jpg``, and ``abc,0`` in the CSV).

    The folder name is the label; the CSV's label was dropped without a word, so whichever of
    the two the user meant, some patches could be trained or evaluated under the other.
    """
    clash = pc.fill_null(pc.not_equal(table["folder_label"], table["label"]), False)
    n = pc.sum(clash).as_py() or 0
    if n:
        i = first_true(clash)
        source = table["source"][i].as_py()
        raise SourceError(f"{labels_uri}: {n} patches have a label other than their class folder's, e.g. {source} is "
                          f"in folder {_parent(source)}/ (label {table['folder_label'][i].as_py()}) and the CSV says "
                          f"{table['label'][i].as_py()}; move the files to the right folder, or drop the CSV's label "
                          "column")


# A folder of at most this many .tif files is looked at for whole-slide images given as patches.
SLIDE_CHECK_FILES = 1024


def refuse_tif_slides(uri: str, listing: Listing, images: list[str], *, tiles: bool) -> None:
    """Refuse .tif whole-slide images given as patches (``tiles``: the job scores slides with ``--slides``).

    A .tif is a patch unless ``--slides`` says otherwise (Kaggle's patches are .tif), and
    CAMELYON16's slides are .tif too: each became an error row ("larger than 64 MiB"), so
    `hcd score` ended with exit code 0 and nothing scored, and `hcd train` read them all before it
    refused. Looked at only when the first file is a slide (one header read for an archive of
    patches), and refused only when every file is one.
    """
    if not images or len(images) > SLIDE_CHECK_FILES or not all(p.lower().endswith((".tif", ".tiff")) for p in images):
        return
    images = sorted(images)
    first = slide_like(listing.fs, images[0])
    if first is None or any(slide_like(listing.fs, p) is None for p in images[1:]):
        return
    example = urimod.to_uri(listing.fs, images[0])
    what = (f"its {len(images)} .tif files are whole-slide images, not patches (e.g. {example}: {first})"
            if len(images) > 1 else f"a whole-slide image, not a patch ({first})")
    if tiles:
        raise SourceError(f"{uri}: {what}; pass --slides to tile and score {'them' if len(images) > 1 else 'it'}")
    raise SourceError(f"{uri}: {what}; hcd score --slides tiles and scores slides, but this command takes patches "
                      "(96x96 files or Parquet shards)")


def open_files(uri: str, listing: Listing, labels: str | None, *, require_label: bool, tiles: bool) -> FileSource:
    """The file source of a listing: its labels CSV (given, or ``labels.csv`` inside), .tif slides refused."""
    files = listing.files
    images = [p for p in files if p.lower().endswith(IMAGE_EXTS)]
    refused = [(p, why) for p, why in listing.refused if p.lower().endswith(IMAGE_EXTS)]
    warn_unread(uri, files)
    if labels is None and f"{listing.root}/labels.csv" in files:
        labels = urimod.to_uri(listing.fs, f"{listing.root}/labels.csv")
    table = read_labels(labels, require_label=require_label) if labels else None
    refuse_tif_slides(uri, listing, images, tiles=tiles)
    kind, items = file_items(listing, images, refused, table, labels)
    return FileSource(uri, items, 0.0, kind=kind)
