"""Cut the sample that ships inside hcd from a PatchCamelyon release (a maintainer's command).

    python -c "from hcdlib.commands.sample import build_sample; build_sample('../shared/data/pcam-real')"

The splits and sizes are :data:`hcdlib.sources.sample.SPLITS`; see that module for what each is for.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hcdlib.commands.pack import PackConfig, pack, shard_options
from hcdlib.sources.sample import SAMPLE_DIR, SPLITS

log = logging.getLogger(__name__)


def build_sample(pcam_real: str, out: str | os.PathLike = SAMPLE_DIR, *, seed: int = 0) -> dict[str, int]:
    """Cut the sample from a PCam release laid out as ``<split>/<label>/<id>.jpg``; returns rows per split."""
    rng = random.Random(seed)
    taken: set[str] = set()
    counts = {}
    for name, (split, n) in SPLITS.items():
        with tempfile.TemporaryDirectory() as tmp:
            for label in (0, 1):
                files = sorted(p for p in (Path(pcam_real) / split / str(label)).glob("*.jpg") if p.name not in taken)
                for p in rng.sample(files, n // 2):
                    taken.add(p.name)
                    (Path(tmp) / str(label)).mkdir(exist_ok=True)
                    shutil.copy(p, Path(tmp) / str(label) / p.name)
            target = Path(out) / name
            if target.exists() and not (target / "_SUCCESS").exists():
                raise FileExistsError(f"{target} exists and is not a sample this function wrote; choose another out")
            for old in [*target.glob("part-*.parquet"), target / "_SUCCESS"]:  # only what a build wrote
                old.unlink(missing_ok=True)
            manifest = pack(PackConfig(input=tmp, out=str(target), rows_per_file=n))
            # Provenance instead of the temporary folder: the path inside the PCam release.
            for f in manifest["files"]:
                t = pq.read_table(target / f["path"])
                rel = [f"pcam-real/{split}/{lab}/{i}.jpg" for i, lab in zip(t["id"].to_pylist(),
                                                                               t["label"].to_pylist(), strict=True)]
                t = t.set_column(t.schema.get_field_index("source"), "source", pa.array(rel, pa.string()))
                pq.write_table(t, target / f["path"], **shard_options(1024))
            manifest["input"] = f"pcam-real/{split} (see ../README.md)"  # not the temporary folder
            (target / "_SUCCESS").write_text(json.dumps(manifest, indent=1))
            counts[name] = manifest["rows"]
    log.info("sample written to %s: %s", out, counts)
    return counts
