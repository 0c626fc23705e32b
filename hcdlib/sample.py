"""The real PatchCamelyon sample shipped inside hcd, and how it was cut from the public release.

    python -c "from hcdlib.sample import build_sample; build_sample('../shared/data/pcam-real')"

``hcd demo`` trains and scores on it by default, so a first run sees real H&E tissue rather than
synthetic cartoons. Four splits in ``hcd pack`` format (Parquet shards + ``_SUCCESS``), images as
the release's original JPEG bytes (no re-encoding), balanced 50/50:

- ``train`` and ``val``: from PCam's *train* split (``val`` only picks the epoch to export);
- ``test`` and ``slide``: from PCam's *valid* split, whose patches come from other slides than
  its train split, so the demo's test AUC is measured on tissue the model never saw. ``slide``
  patches are assembled by the demo into a synthetic whole-slide image.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).parent / "data" / "pcam_sample"
# patches per split (half of each label); 1,540 JPEGs of ~4 KB: ~6.5 MB in the repository
SPLITS = {"train": ("train", 900), "val": ("train", 200), "test": ("valid", 300), "slide": ("valid", 140)}
MAX_BYTES = 8 * 2**20


def sample_uri(split: str) -> str:
    """Where the embedded split lives (a local folder of Parquet shards)."""
    if split not in SPLITS:
        raise ValueError(f"unknown sample split {split!r}; one of {', '.join(SPLITS)}")
    return str(SAMPLE_DIR / split)


def build_sample(pcam_real: str, out: str | os.PathLike = SAMPLE_DIR, *, seed: int = 0) -> dict[str, int]:
    """Cut the sample from a PCam release laid out as ``<split>/<label>/<id>.jpg``; returns rows per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hcdlib.pack import PackConfig, pack, shard_options

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
