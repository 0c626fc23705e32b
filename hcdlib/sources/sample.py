"""The real PatchCamelyon sample shipped inside hcd (:mod:`hcdlib.commands.sample` cuts it).

``hcd demo`` trains and scores on it by default, so a first run sees real H&E tissue rather than
synthetic cartoons. Four splits in ``hcd pack`` format (Parquet shards + ``_SUCCESS``), images as
the release's original JPEG bytes (no re-encoding), balanced 50/50:

- ``train`` and ``val``: from PCam's *train* split (``val`` only picks the epoch to export);
- ``test`` and ``slide``: from PCam's *valid* split, whose patches come from other slides than
  its train split, so the demo's test AUC is measured on tissue the model never saw. ``slide``
  patches are assembled by the demo into a synthetic whole-slide image.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "pcam_sample"
# patches per split (half of each label); 1,540 JPEGs of ~4 KB: ~6.5 MB in the repository
SPLITS = {"train": ("train", 900), "val": ("train", 200), "test": ("valid", 300), "slide": ("valid", 140)}
MAX_BYTES = 8 * 2**20

def sample_uri(split: str) -> str:
    """Where the embedded split lives (a local folder of Parquet shards)."""
    if split not in SPLITS:
        raise ValueError(f"unknown sample split {split!r}; one of {', '.join(SPLITS)}")
    return str(SAMPLE_DIR / split)
