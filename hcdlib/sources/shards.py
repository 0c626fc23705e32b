"""Parquet shards as ``hcd pack`` writes them (and Parquet parts from Spark or Hadoop)."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hcdlib.outputs.runfolder import PARTS, RUN_SPEC
from hcdlib.sources.base import PACK_MANIFEST, PARQUET, PatchSource
from hcdlib.sources.chunks import ROW_SCHEMA, Chunk, ShardChunk, footer_bytes
from hcdlib.sources.labels import LABEL_COLUMNS
from hcdlib.storage import uri as urimod
from hcdlib.storage.listing import Listing, SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSource(PatchSource):
    """Parquet shards (``hcd pack``'s output). ``items``: shard, row_group, num_rows.

    ``footers``: per shard, its footer (None when larger than :data:`FOOTER_CARRIED_BYTES`) and
    its size, as listed; each chunk carries them so that its read does not fetch the footer again.
    """

    footers: dict[str, tuple[bytes | None, int]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def layout(self) -> str:
        """``parquet``."""
        return PARQUET

    @property
    def num_patches(self) -> int:
        """The row groups' rows, from the shards' footers."""
        return int(pc.sum(self.items["num_rows"]).as_py() or 0)

    def chunks(self, chunk_size: int = 1024) -> list[Chunk]:
        """One chunk per row group (written at the packing's row-group size; ``chunk_size`` is not used)."""
        return [ShardChunk(f"rg-{i:06d}", n, s, rg, *self.footers.get(s, (None, None))) for i, (s, rg, n) in enumerate(
            zip(*(self.items[c].to_pylist() for c in ("shard", "row_group", "num_rows")), strict=True))]

    def label_table(self) -> pa.Table:
        """Those columns alone, read from every row group."""
        out = []
        for shard, rg in zip(self.items["shard"].to_pylist(), self.items["row_group"].to_pylist(), strict=True):
            fs, path = urimod.resolve(shard)
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                if "label" not in pf.schema_arrow.names:
                    raise SourceError(f"{shard}: Parquet shard has no 'label' column; pack it with --labels")
                cols = [c for c in LABEL_COLUMNS.names if c in pf.schema_arrow.names]
                t = pf.read_row_group(rg, columns=cols)
            out.append(pa.table([t[c] if c in cols else pa.nulls(t.num_rows, f.type) for c, f in
                                 zip(LABEL_COLUMNS.names, LABEL_COLUMNS, strict=True)], schema=LABEL_COLUMNS))
        return pa.concat_tables(out) if out else LABEL_COLUMNS.empty_table()

    def has_labels(self) -> bool:
        """Not known without reading the shards; a repack copies whatever labels they hold."""
        return False


def parquet_items(listing: Listing, root_uri: str) -> tuple[pa.Table, dict[str, tuple[bytes | None, int]]]:
    """One row per row group of every shard (shard, row_group, num_rows), and each shard's footer and size."""
    fs, root, files = listing.fs, listing.root, listing.files
    shards = [p for p in files if p.endswith(".parquet")]
    manifest_uri = urimod.to_uri(fs, f"{root}/{PACK_MANIFEST}")
    raw = urimod.read_bytes(manifest_uri) if f"{root}/{PACK_MANIFEST}" in files else None
    if raw and raw.strip():  # hcd pack's manifest: exactly the shards it committed
        try:
            listed = json.loads(raw)["files"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"{manifest_uri}: corrupt pack manifest ({exc}); rerun hcd pack to rewrite it") from exc
        shards = [f"{root}/{f['path']}" for f in listed]
        gone = sorted(set(shards) - set(files))
        if gone:  # removed or moved since the pack: read, they failed as "not a readable Parquet shard"
            raise SourceError(f"{root_uri}: {len(gone)} of the {len(shards)} shards its {PACK_MANIFEST} lists are "
                              f"missing (e.g. {urimod.to_uri(fs, gone[0])}); run the same hcd pack command again to "
                              "write them again (it keeps the shards that are there)")
    elif raw is None and files != [root]:  # a folder of shards without a manifest (one file given needs none)
        _check_finished(listing, root_uri)
        log.warning("%s: no %s manifest; reading every .parquet file found", root_uri, PACK_MANIFEST)
    # (An empty _SUCCESS is Spark's and Hadoop's marker beside their part files: every file is read.)
    rows: dict[str, list] = {"shard": [], "row_group": [], "num_rows": []}
    footers = {}
    # Footers are read concurrently: each is two round trips on S3, and an archive has thousands.
    with ThreadPoolExecutor(16, thread_name_prefix="hcd-footers") as pool:
        for shard, (md, size) in zip(shards, pool.map(lambda shard: _footer(fs, shard), shards), strict=True):
            uri = urimod.to_uri(fs, shard)
            _check_shard_schema(uri, md.schema.to_arrow_schema())
            rows["shard"] += [uri] * md.num_row_groups
            rows["row_group"] += list(range(md.num_row_groups))
            rows["num_rows"] += [md.row_group(rg).num_rows for rg in range(md.num_row_groups)]
            footers[uri] = (footer_bytes(md) if md.serialized_size <= FOOTER_CARRIED_BYTES else None, size)
    items = pa.table(rows, schema=pa.schema([("shard", pa.string()), ("row_group", pa.int64()),
                                             ("num_rows", pa.int64())]))
    return items, footers


def _check_finished(listing: Listing, root_uri: str) -> None:
    """Refuse the output of an hcd pack that never committed: its shards are only part of the input.

    ``hcd pack`` writes its run spec first and ``_SUCCESS`` last. Without ``_SUCCESS`` (the pack
    stopped, or is still running) the shards found are some of the patches, not all: read as they
    were, an interrupted pack was scored or trained on with one warning line. The same holds
    for ``--input <pack-out>/parts``.
    """
    fs, root = listing.fs, listing.root
    for folder in (root, root.rsplit("/", 1)[0] if root.rsplit("/", 1)[-1] == PARTS else None):
        spec = urimod.to_uri(fs, f"{folder}/{RUN_SPEC}") if folder else None
        if spec is None or not urimod.exists(spec) or run_job(spec) != "pack":  # predictions: the schema says
            continue
        if folder != root and urimod.exists(urimod.to_uri(fs, f"{folder}/{PACK_MANIFEST}")):
            return  # the parts of a committed pack
        raise SourceError(f"{root_uri}: the output of an hcd pack that has not finished ({urimod.to_uri(fs, folder)} "
                          f"has {RUN_SPEC} but no {PACK_MANIFEST}), so its shards hold only some of the patches; "
                          "run the same hcd pack command again to finish it (it keeps the shards already written)")


def run_job(spec_uri: str) -> str | None:
    """The ``job`` an hcd run spec names (``pack``), or None for one that names none or cannot be read."""
    try:
        spec = json.loads(urimod.read_bytes(spec_uri))
    except (OSError, ValueError):
        return None
    return spec.get("job") if isinstance(spec, dict) else None


def _check_shard_schema(uri: str, schema: pa.Schema) -> None:
    """Refuse a Parquet file whose columns are not a patch shard's (``hcd pack``'s :data:`ROW_SCHEMA`).

    Checked on the driver from the footer: a file without ids would be scored under null ids (the
    predictions could not be told apart), and a column of another type (a dataset's image struct)
    failed the read tasks mid-run with a traceback.
    """
    fix = "hcd reads the Parquet shards hcd pack writes: pack the patches with hcd pack"
    missing = [c for c in ("id",) if c not in schema.names]
    if "image" not in schema.names and "pixels" not in schema.names:
        missing.append("image (or pixels)")
    if missing:
        raise SourceError(f"{uri}: not a patch shard: no {' or '.join(missing)} column (it has "
                          f"{', '.join(schema.names[:8])}); {fix}")
    for want in ROW_SCHEMA:
        if want.name in schema.names:
            have = schema.field(want.name).type
            try:
                pa.array([], have).cast(want.type)
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
                raise SourceError(f"{uri}: column {want.name!r} is {have}, which hcd cannot read as {want.type}; "
                                  f"{fix}") from None


# Each chunk of a shard carries the shard's footer; beyond this size (a shard of very many row
# groups) the copies would add up, so each read fetches the footer itself instead.
FOOTER_CARRIED_BYTES = 64 * 1024


def _footer(fs: pafs.FileSystem, shard: str) -> tuple[pq.FileMetaData, int]:
    """One shard's Parquet footer and its size in bytes."""
    try:
        with fs.open_input_file(shard) as f:
            return pq.ParquetFile(f).metadata, f.size()
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"{urimod.to_uri(fs, shard)}: not a readable Parquet shard ({exc})") from exc


def open_shards(uri: str, listing: Listing, labels: str | None) -> ShardSource:
    """The shard source of a listing; a labels CSV is refused (shards carry the labels they were packed with)."""
    if labels:  # it was ignored: training then said the patches had no label, scoring kept the packed slide ids
        raise SourceError(f"{labels}: a labels CSV for {uri}, which holds Parquet shards; shards carry the labels "
                          "and slide ids hcd pack gave them: pack the patches again with --labels")
    items, footers = parquet_items(listing, uri)
    return ShardSource(uri, items, 0.0, footers=footers)
