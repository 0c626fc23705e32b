"""The commit protocol of every job that writes an output folder (``hcd score``, ``hcd pack``).

1. :meth:`RunFolder.claim` writes the run spec (``_RUN.json``) first: a rerun with the same spec
   resumes, another is refused, and ``--overwrite`` clears only files hcd wrote.
2. Parts are written atomically under ``<out>/parts/`` (:func:`write_table_atomic`), one per
   chunk; :meth:`RunFolder.done` tells a rerun which chunks are complete.
3. ``<out>/_SUCCESS`` (JSON) is written last and lists the parts (:meth:`RunFolder.commit`).
   Readers take only what it lists, so a crashed or running job is never read half-done.

With pandas: ``hcdlib.read_predictions(out).to_pandas()``.
"""

from __future__ import annotations

import io
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hcdlib.errors import UserError
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)

MANIFEST = "_SUCCESS"
RUN_SPEC = "_RUN.json"
RUN_FORMAT = "hcd-run/1"  # every run spec says it; a spec of another (or none) is another run
PARTS = "parts"

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prob", pa.float32()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("note", pa.string()),
    ("source", pa.string()),
    ("slide_id", pa.string()),
    ("x", pa.int64()),
    ("y", pa.int64()),
    ("tile_size", pa.int64()),  # slides: tile edge in level-0 px; null for plain patches
    ("model", pa.string()),
])


class NotCommittedError(UserError, FileNotFoundError):
    """The output has no manifest: the job did not finish (or is still running)."""


class CorruptOutputError(UserError):
    """A committed file is not what the manifest promises (replaced, truncated, damaged)."""


def read_manifest(out: str) -> dict:
    """The committed manifest of ``out``; :class:`NotCommittedError` if absent, named if corrupt."""
    target = urimod.join(out, MANIFEST)
    try:
        data = urimod.read_bytes(target)
    except FileNotFoundError:
        if not urimod.exists(urimod.join(out, RUN_SPEC)):  # no run ever started there: the wrong folder
            raise NotCommittedError(f"{out}: not the output of an hcd run (no {MANIFEST} or {RUN_SPEC}); pass the "
                                    "--out of hcd score") from None
        raise NotCommittedError(f"{out}: no {MANIFEST} manifest; the run did not finish "
                                "(rerun the same command to resume it)") from None
    try:
        manifest = json.loads(data)
        if not isinstance(manifest.get("files"), list):
            raise ValueError("no 'files' list")
    except (ValueError, AttributeError) as exc:
        raise CorruptOutputError(f"{target}: corrupt manifest ({len(data)} bytes: {exc}); rerun the same "
                                 "hcd score command to rewrite it") from exc
    return manifest


def read_part(part_uri: str, columns: list[str] | None = None, *, expect_rows: int | None = None,
              expect_bytes: int | None = None) -> pa.Table:
    """Read one part file, refusing one that differs from what the manifest recorded."""
    fs, path = urimod.resolve(part_uri)
    fix = "the output was changed after it was committed; rerun hcd score with --overwrite"
    try:
        with fs.open_input_file(path) as f:
            if expect_bytes is not None and f.size() != expect_bytes:
                raise CorruptOutputError(f"{part_uri}: {f.size()} bytes, the manifest recorded {expect_bytes}; {fix}")
            table = pq.read_table(f, columns=columns)
    except FileNotFoundError:
        raise CorruptOutputError(f"{part_uri}: listed in the manifest but missing; {fix}") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise CorruptOutputError(f"{part_uri}: unreadable ({exc}); {fix}") from exc
    if expect_rows is not None and table.num_rows != expect_rows:
        raise CorruptOutputError(f"{part_uri}: {table.num_rows} rows, the manifest recorded {expect_rows}; {fix}")
    return table


# Everything hcd score and hcd pack write in --out, and how to recognise its files there: --overwrite
# deletes these and nothing else (--out may hold the user's own files, even their input).
OWNED = (MANIFEST, RUN_SPEC, PARTS, "slides")
_PART_RE = re.compile(r"^part-.+\.parquet(\.tmp-[0-9a-f]{32})?$")
_SLIDE_FILE_RE = re.compile(r"^(.+-[0-9a-f]{8}\.(thumbnail\.png|tissue\.png|heatmap\.png|geojson)|summary\.csv)"
                            r"(\.tmp-[0-9a-f]{32})?$")


def part_name(key: str) -> str:
    """The file name of the part that holds chunk ``key``."""
    return f"part-{key}.parquet"


def _files(uri: str) -> list[pafs.FileInfo]:
    fs, root = urimod.resolve(uri)
    return [i for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
            if i.type == pafs.FileType.File]


# What a run spec's less plain keys mean, in a refusal: a hash alone did not say what changed.
_SPEC_MEANS = {f"{k}_fingerprint": f": files of {flag} were added, removed or changed in size since"
               for k, flag in (("input", "--input"), ("train", "--data"), ("val", "the validation data"))}


def spec_differences(old: object, spec: dict) -> list[str]:
    """The keys of ``spec`` whose value the run spec ``old`` (as read from its file) does not share."""
    return [k for k in spec if not isinstance(old, dict) or old.get(k) != spec[k]]


@dataclass(frozen=True)
class RunFolder:
    """One output folder's whole life, the same for ``score``, ``pack`` and ``train``.

    :meth:`claim` writes the run spec first (``spec_name``): a rerun with the same spec resumes,
    another is refused, and ``--overwrite`` clears only what an earlier hcd run wrote. Parts are
    written atomically under ``parts/``, one per chunk, and :meth:`done` tells a rerun which are
    complete. :meth:`commit` writes the manifest last. The run spec is read here and nowhere else.
    """

    out: str
    spec_name: str = RUN_SPEC

    def uri(self, *names: str) -> str:
        """A path inside the folder."""
        return urimod.join(self.out, *names)

    def read_spec(self, *, fix: str) -> dict | None:
        """The run spec the folder holds (None where it holds none); a corrupt one is refused with ``fix``."""
        target = self.uri(self.spec_name)
        if not urimod.exists(target):
            return None
        try:
            return json.loads(urimod.read_bytes(target))
        except ValueError as exc:
            raise CorruptOutputError(f"{target}: corrupt run spec ({exc}); {fix}") from exc

    def check(self, spec: dict, *, fix: str) -> bool:
        """Whether the folder holds a run spec; refuse it when it differs from ``spec``.

        A rerun continues only the run it is: another input, model or setting in the same folder
        would mix two runs into one result that claims to be the second. ``fix``: what to do instead.
        A spec of another format (another hcd's) is refused naming it.
        """
        old = self.read_spec(fix=fix)
        if old is None:
            return False
        spec = {"format": RUN_FORMAT, **spec}
        if not isinstance(old, dict) or old.get("format") != RUN_FORMAT:
            raise UserError(f"{self.uri(self.spec_name)}: a run of format "
                            f"{old.get('format') if isinstance(old, dict) else None!r}, and this hcd continues "
                            f"{RUN_FORMAT} runs only; {fix}")
        diff = spec_differences(old, spec)
        if diff:
            said = ", ".join(f"{k} ({old.get(k)!r} there, {spec[k]!r} now{_SPEC_MEANS.get(k, '')})" for k in diff)
            raise UserError(f"{self.out} holds a run with a different {said}; {fix}")
        return True

    def write_spec(self, spec: dict) -> None:
        """Write the run spec (before any part: its presence says hcd owns what is beside it)."""
        body = json.dumps({"format": RUN_FORMAT, **spec}, indent=1).encode()
        urimod.write_bytes_atomic(self.uri(self.spec_name), body)

    def still_ours(self, spec: dict) -> bool:
        """Whether the run spec is still ``spec``: not removed or replaced by another run since it was claimed."""
        try:
            return not spec_differences(self.read_spec(fix=""), {"format": RUN_FORMAT, **spec})
        except (OSError, CorruptOutputError):  # removed, or half-written by another run
            return False

    def claim(self, spec: dict, *, overwrite: bool) -> None:
        """Make the folder this run's: resume the same run, refuse another, or (``overwrite``) clear hcd's old one.

        Without a run spec, a ``parts/`` folder or manifest is somebody else's and is never touched.
        """
        if not overwrite and self.check(spec, fix="use another --out or pass --overwrite"):
            return
        if urimod.exists(self.uri(self.spec_name)):
            self.clear()
        else:
            foreign = [n for n in (MANIFEST, PARTS) if urimod.exists(self.uri(n))]
            if foreign:
                raise UserError(f"{self.out} holds {' and '.join(foreign)} that hcd did not write (no "
                                f"{self.spec_name}); choose another --out")
        self.write_spec(spec)

    def clear(self) -> None:
        """Delete the files an earlier run wrote here (by hcd's own names), the run spec last."""
        urimod.delete(self.uri(MANIFEST))
        for folder, pattern in ((PARTS, _PART_RE), ("slides", _SLIDE_FILE_RE)):
            for info in _files(self.uri(folder)):
                if pattern.match(info.base_name):
                    urimod.delete(self.uri(folder, info.base_name))
        urimod.delete(self.uri(self.spec_name))

    def part_uri(self, key: str) -> str:
        """Where chunk ``key``'s part lives."""
        return self.uri(PARTS, part_name(key))

    def done(self, expected: dict[str, int], *, verify: bool = True) -> dict[str, int]:
        """Chunks of ``expected`` (key -> rows) whose part is complete, with the part's bytes.

        With ``verify`` each part's footer is read: a zero-byte, unreadable or short part (a crash,
        a disk that filled up) is named in a warning and not counted, so its chunk is done again.
        """
        sizes = {i.base_name: i.size for i in _files(self.uri(PARTS))}
        found = {k: sizes[part_name(k)] for k in expected if part_name(k) in sizes}
        if not verify:
            return found

        def problem(key: str) -> str | None:
            if not found[key]:
                return "empty (0 bytes)"
            fs, path = urimod.resolve(self.part_uri(key))
            try:
                with fs.open_input_file(path) as f:
                    rows = pq.ParquetFile(f).metadata.num_rows
            except (OSError, pa.ArrowInvalid) as exc:
                return f"unreadable ({exc})"
            return None if rows == expected[key] else f"{rows} rows, expected {expected[key]}"

        with ThreadPoolExecutor(16 if urimod.is_s3(self.out) else 2) as pool:
            problems = dict(zip(found, pool.map(problem, found), strict=True))
        for key, why in problems.items():
            if why:
                log.warning("%s: %s; its chunk is scored again", self.part_uri(key), why)
                del found[key]
        return found

    def commit(self, manifest: dict) -> str:
        """Write the manifest last, atomically: from then on readers see exactly the parts it lists."""
        target = self.uri(MANIFEST)
        urimod.write_bytes_atomic(target, json.dumps(manifest, indent=1).encode())
        return target


def write_part(part_uri: str, table: pa.Table) -> None:
    """Write one prediction part atomically (columns in :data:`SCHEMA` order; absent ones null)."""
    cols = [table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in SCHEMA]
    write_table_atomic(part_uri, pa.table(cols, names=SCHEMA.names).cast(SCHEMA), compression="zstd")


def write_table_atomic(uri: str, table: pa.Table, **parquet_options) -> int:
    """Write a Parquet file in one piece (temp + rename locally, one PUT on S3); return its bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, **parquet_options)
    urimod.write_bytes_atomic(uri, buf.getvalue())
    return buf.tell()
