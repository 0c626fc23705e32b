"""Whole-slide images: plan tissue tiles at PCam resolution, read them, map the results.

    hcd score --model runs/pcam/model --input s3://bucket/slides --out s3://bucket/slide-preds --slides

Slides are read with OpenSlide (Aperio .svs, generic tiled TIFF, Hamamatsu .ndpi, MIRAX .mrxs,
...). PCam patches are 96x96 px at about 0.97 um/px (10x); from the slide's microns per pixel we
pick the pyramid level and read size that give that resolution and resample to 96x96. Tissue is
found with Otsu's threshold on the saturation of a thumbnail, and only tiles with enough tissue
are scored. Planning and reading run in Ray tasks; a slide on S3 is staged to local disk once per
node and run (:mod:`hcdlib.storage.staging`), not once per task. Tiles never travel as files: a task reads
many tiles of one slide with one open handle and hands decoded pixels to the model actors.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace

from hcdlib.config import TISSUE_THRESHOLD
from hcdlib.sources.base import IMAGE_EXTS
from hcdlib.sources.chunks import Chunk
from hcdlib.sources.decode import PATCH_SIZE, PCAM_MPP
from hcdlib.sources.slides.maps import slide_outputs, write_summary
from hcdlib.sources.slides.plan import SLIDE_EXTS, PlannedSlide, plan_slides, slide_inputs
from hcdlib.sources.slides.read import tile_chunks
from hcdlib.storage import uri as urimod
from hcdlib.storage.listing import Listing, SourceError
from hcdlib.storage.staging import remove_stage, stage_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideTiling:
    """How a scoring job cuts slides: the model's resolution and patch, the flags, where thumbnails go."""

    out: str
    target_mpp: float = PCAM_MPP
    patch: int = PATCH_SIZE
    mpp: float | None = None  # --mpp: the slides' resolution where their metadata has none
    tissue_threshold: float = TISSUE_THRESHOLD
    force: bool = False  # --slides: .tif/.tiff files are slides, not patches


class SlideSource:
    """Whole-slide images at a URI, cut into tissue tiles; made by :func:`hcdlib.sources.factory.open_source`.

    Planning (open each slide, find tissue, grid it) runs in Ray tasks when :meth:`chunks` is
    first called; :meth:`finish` turns the committed tile rows into heatmaps, GeoJSON and a summary.
    """

    layout = "slides"

    def __init__(self, uri: str, slides: list[dict], refused: list[PlannedSlide], tiling: SlideTiling,
                 list_seconds: float):
        self.uri, self.slides, self.refused, self.tiling = uri, slides, refused, tiling
        self.list_seconds = list_seconds
        self.planned: list[PlannedSlide] | None = None
        self._chunks: list[Chunk] = []

    @classmethod
    def from_listing(cls, uri: str, listing, tiling: SlideTiling, *, list_seconds: float) -> SlideSource:
        """The slides of a listing (refused entries become error rows)."""
        slides, refused = slide_inputs(listing)
        return cls(uri, slides, refused, tiling, list_seconds)

    def fingerprint(self) -> str:
        """A hash of the slides found, so a resumed run can tell the input has not changed."""
        uris = [s["slide"] for s in self.slides] + [r.slide for r in self.refused]
        return hashlib.sha256("\n".join(uris).encode()).hexdigest()[:16]

    def chunks(self, chunk_size: int = 1024) -> list[Chunk]:
        """Plan every slide (once; needs Ray), then cut its tissue tiles into chunks."""
        if self.planned is None:
            t = self.tiling
            self.planned = plan_slides(self.slides, out=t.out, mpp=t.mpp, tissue_threshold=t.tissue_threshold,
                                       target_mpp=t.target_mpp, patch=t.patch, stage=self.stage) + self.refused
            self._chunks = [c for p in self.planned for c in tile_chunks(p, chunk_size, stage=self.stage)]
        return self._chunks

    @property
    def num_patches(self) -> int:
        """Tissue tiles (and one row per bad slide), once planned."""
        return sum(c.num_rows for c in self._chunks)

    def describe(self) -> str:
        """One line for the log."""
        return f"{len(self.planned or [])} slides, {self.num_patches} tissue tiles"

    @property
    def stage(self) -> str | None:
        """The staging folder of this run's slides on S3 (one download per slide and node), if any."""
        if not any(urimod.is_s3(s["slide"]) for s in self.slides):
            return None
        return stage_key(self.tiling.out, self.fingerprint())

    def finish(self, out: str, *, threshold: float) -> dict:
        """Per-slide heatmaps, GeoJSON and ``slides/summary.csv`` from the committed tile rows.

        The staged copies of slides on S3 are removed first, on every node.
        """
        if self.stage:
            _on_every_node(remove_stage, self.stage)

        import ray  # Ray only where a job runs


        # One task per slide, across the cluster: drawn one after another on the driver, a
        # heatmap and GeoJSON cost ~1 s per slide, i.e. a tail of hours at archive scale.
        # A whole CPU each: a fractional request would start 4 processes per core, each with
        # matplotlib loaded, on a 64-core node.
        task = ray.remote(num_cpus=1)(slide_outputs)
        keys: dict[str, list[str]] = {}
        for c in self._chunks:
            keys.setdefault(c.slide, []).append(c.key)
        # A slide that failed planning is only its summary row: no task (and no CPU) for it.
        jobs = [slide_outputs(out, p, [], threshold=threshold) if p.error else
                task.remote(out, replace(p, xs=[], ys=[]), keys.get(p.slide, []), threshold=threshold)
                for p in self.planned or []]
        summary = [ray.get(j) if isinstance(j, ray.ObjectRef) else j for j in jobs]
        write_summary(out, summary)
        return {"summary": "slides/summary.csv", "per_slide": summary}


def _on_every_node(fn, *args) -> None:
    """Run ``fn(*args)`` once on every live node of the cluster (node-local clean-up)."""
    import ray  # Ray only where a job runs
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # Ray only where a job runs

    task = ray.remote(num_cpus=0)(fn)
    ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
             for n in ray.nodes() if n["Alive"]])


def open_slides(uri: str, listing: Listing, labels: str | None, tiling: SlideTiling | None, *,
                list_seconds: float) -> SlideSource:
    """The slide source of a listing, refusing what slides cannot take (no tiling: a patch command)."""
    files = listing.files
    if tiling is None:
        raise SourceError(f"{uri}: holds whole-slide images; hcd score tiles and scores them, but this "
                          "command takes patches (96x96 files or Parquet shards)")
    if labels:
        raise SourceError(f"{labels}: a labels CSV for {uri}, which holds whole-slide images; a slide's tiles "
                          "take its path below the input as slide id: drop --labels")
    # Slide folders often keep label and macro images beside the scans: not scored, but said.
    other = [p for p in files if p.lower().endswith(IMAGE_EXTS) and not p.lower().endswith(SLIDE_EXTS)]
    other += [p for p in files if p.endswith(".parquet")]
    if not any(p.lower().endswith(SLIDE_EXTS) for p in files + [p for p, _ in listing.refused]):
        raise SourceError(f"{uri}: no whole-slide images ({', '.join(SLIDE_EXTS)}) to tile"
                          + (f"; it holds {len(other)} other images (e.g. {other[0]}): patches are scored "
                             "without --slides, and a large image is tiled once saved as a tiled TIFF"
                             if other else ""))
    if other:
        log.warning("%s: %d files that are not slides are not scored (e.g. %s); patches go in their own --input",
                    uri, len(other), other[0])
    return SlideSource.from_listing(uri, listing, tiling, list_seconds=list_seconds)
