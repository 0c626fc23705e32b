"""Chunk assembly: rows arrive from the model actors in any order, and a chunk is complete exactly once."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)


class ChunkAssembler:
    """Gathers each chunk's rows from batches that arrive in any order, in pieces, maybe repeated.

    Ray retries a failed task or a lost actor's batch, so a row can arrive twice, and batches of
    one chunk interleave with others. Rows carry ``chunk`` (key) and ``row`` (index in the
    chunk); :meth:`add` returns each chunk once, when every row is in: one row per input, in
    input order. That is what makes the committed output exactly once.
    """

    def __init__(self, expected: dict[str, int]):
        self.expected = expected
        self._pending: dict[str, list[pa.Table]] = {}
        self._seen: dict[str, set[int]] = {}
        self.done: set[str] = set()

    def add(self, batch: pa.Table) -> list[tuple[str, pa.Table]]:
        """Take one batch; return ``(key, rows)`` for every chunk it completed."""
        complete = []
        for key in pc.unique(batch["chunk"]).to_pylist():
            if key in self.done:  # a retry repeated rows of a chunk already handed back
                continue
            part = batch.filter(pc.equal(batch["chunk"], key))
            self._pending.setdefault(key, []).append(part)
            seen = self._seen.setdefault(key, set())
            seen.update(part["row"].to_pylist())
            if len(seen) == self.expected[key]:
                rows = pa.concat_tables(self._pending.pop(key)).sort_by("row")
                _, first = np.unique(rows["row"].to_numpy(), return_index=True)
                complete.append((key, rows.take(pa.array(first))))
                self.done.add(key)
                del self._seen[key]
        return complete
