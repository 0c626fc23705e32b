"""Lesion-level FROC and the ranking metrics, against cases computed by hand and scikit-learn."""

import numpy as np
import pytest
import shapely
from sklearn.metrics import average_precision_score, roc_auc_score

from hcdlib.commands.evaluate import froc
from hcdlib.commands.evaluate.ranking import Ranking, bootstrap


def test_froc_matches_the_challenge_computation_by_hand():
    # Slide A (tumour): lesion 1 found at 0.9 (and again at 0.6), lesion 2 at 0.3, an ITC at 0.7
    # (ignored), a false positive at 0.8. Slide B (normal): false positives at 0.5, 0.2 and 0.1.
    # Thresholds 0.1 .. 0.9 give FP/slide 2, 1.5, 1, 1, 0.5, 0 and sensitivity 1, 1, 1, .5, .5, .5.
    fps = [np.array([0.8]), np.array([0.5, 0.2, 0.1])]
    tps = [np.array([0.9, 0.3, 0.0]), np.array([])]
    curve = froc.froc(fps, tps, lesion_count=2)
    assert curve["fp_per_slide"] == [2.0, 1.5, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert curve["sensitivity"] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.0]
    assert list(curve["at_fp_rates"].values()) == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert curve["score"] == pytest.approx(5 / 6)
    assert froc.froc(fps, [np.zeros(0)] * 2, lesion_count=0) is None  # no lesion: undefined, not 0


def test_lesions_are_dilated_merged_and_small_ones_are_itc():
    mpp = 0.25  # 8 um raster: 32 level-0 px a pixel
    um = 1 / mpp
    big = shapely.box(1000, 1000, 1000 + 1000 * um, 1000 + 500 * um)  # 1 x 0.5 mm
    near = shapely.box(1000 + 1030 * um, 1000, 1000 + 1400 * um, 1000 + 300 * um)  # 30 um to its right: merged
    itc = shapely.box(30000, 30000, 30000 + 100 * um, 30000 + 100 * um)  # 0.1 mm: isolated tumour cells
    les = froc.lesions(shapely.union_all([big, near, itc]), width=40000, height=40000, mpp=mpp)
    assert les.labels.max() == 2 and les.count == 1 and les.itc[1:].sum() == 1
    # One detection in the merged lesion (the best counts), one in the ITC (ignored), one outside.
    found = np.array([[0.4, 2000, 2000], [0.7, 1000 + 1200 * um, 1100], [0.9, 30200, 30200], [0.6, 20000, 5000]])
    fp, tp = froc.hits(found, les)
    assert fp.tolist() == [0.6] and sorted(tp.tolist()) == [0.0, 0.7]
    empty = froc.lesions(shapely.Polygon(), width=4000, height=4000, mpp=mpp)
    assert empty.count == 0 and froc.hits(found, empty)[0].tolist() == [0.4, 0.7, 0.9, 0.6]


def test_detections_are_local_maxima_one_per_plateau_at_tile_centres():
    edge = 100
    p = np.array([[0.1, 0.2, 0.1, 0.0, 0.0],
                  [0.2, 0.9, 0.3, 0.0, 0.7],
                  [0.1, 0.3, 0.2, 0.0, 0.7]])
    rows, cols = np.nonzero(np.ones_like(p))
    keep = ~((rows == 0) & (cols == 4))  # a tile not scored (no tissue)
    d = froc.detections(cols[keep] * edge * 1.0, rows[keep] * edge * 1.0, np.full(keep.sum(), edge * 1.0),
                        p[rows[keep], cols[keep]])
    got = sorted(map(tuple, d.tolist()))
    assert got == [(0.7, 450.0, 150.0), (0.9, 150.0, 150.0)]  # the 0.7 plateau gives one detection


def test_ranking_matches_scikit_learn_with_weights_and_the_bootstrap_redraws_groups():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.round(rng.random(400) * (0.6 + 0.4 * y), 2)  # ties included
    w = rng.integers(0, 3, 400)
    r = Ranking(y, p)
    assert r.scores() == pytest.approx((roc_auc_score(y, p), average_precision_score(y, p)))
    weighted = roc_auc_score(y, p, sample_weight=w), average_precision_score(y, p, sample_weight=w)
    assert r.scores(w) == pytest.approx(weighted)
    rows = bootstrap(y, p, reps=200, seed=0)
    lo, hi = rows["roc_auc_ci95"]
    assert lo < roc_auc_score(y, p) < hi and rows["pr_auc_ci95"][0] < rows["pr_auc_ci95"][1]
    # Rows that move together (4 groups of 100): redrawn whole, the interval is wider.
    g = np.repeat(np.arange(4), 100)
    p2 = np.clip(p + 0.3 * (g[:, None] == 0).ravel(), 0, 1)
    wide, narrow = bootstrap(y, p2, reps=200, seed=0, groups=g), bootstrap(y, p2, reps=200, seed=0)
    assert np.diff(wide["roc_auc_ci95"]) > np.diff(narrow["roc_auc_ci95"])
    assert bootstrap(np.ones(5), np.ones(5), reps=10, seed=0) == {"roc_auc_ci95": None, "pr_auc_ci95": None}
