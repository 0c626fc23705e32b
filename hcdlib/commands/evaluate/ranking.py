"""ROC AUC and average precision from one sort, and their bootstrap intervals.

Tiles of a slide number in the hundreds of thousands and a bootstrap redraws them 1,000 times:
scikit-learn sorts each redraw again. Here the scores are sorted once, and each redraw is a
vector of weights (how often each row was drawn) summed along that order, a few passes of O(n).
Redraws are of rows, or of whole groups (slides) where rows of a group are not independent.
"""

from __future__ import annotations

import numpy as np


class Ranking:
    """Labels ``y`` in descending order of score ``p``, grouped by tied scores."""

    def __init__(self, y: np.ndarray, p: np.ndarray):
        order = np.argsort(-np.asarray(p, dtype=float), kind="stable")
        self.order = order
        self.y = np.asarray(y, dtype=float)[order]
        ps = np.asarray(p, dtype=float)[order]
        self.starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # one threshold per distinct score

    def scores(self, weights: np.ndarray | None = None) -> tuple[float, float]:
        """(ROC AUC, average precision) with each row counted ``weights`` times (in the caller's order).

        Both match scikit-learn's ``roc_auc_score`` and ``average_precision_score`` with
        ``sample_weight``; NaN where one class is absent.
        """
        w = np.ones(len(self.y)) if weights is None else np.asarray(weights, dtype=float)[self.order]
        tp = np.cumsum(np.add.reduceat(w * self.y, self.starts)) if len(w) else np.zeros(0)
        fp = np.cumsum(np.add.reduceat(w * (1 - self.y), self.starts)) if len(w) else np.zeros(0)
        if not len(tp) or tp[-1] <= 0 or fp[-1] <= 0:
            return float("nan"), float("nan")
        tp0, fp0 = np.r_[0.0, tp], np.r_[0.0, fp]
        roc = float(np.sum(np.diff(fp0) * (tp0[1:] + tp0[:-1]) / 2) / (tp[-1] * fp[-1]))
        ap = float(np.sum(np.diff(tp0) / tp[-1] * tp / np.maximum(tp + fp, 1e-300)))
        return roc, ap


def bootstrap(y: np.ndarray, p: np.ndarray, *, reps: int, seed: int,
              groups: np.ndarray | None = None) -> dict[str, list[float] | None]:
    """95% percentile intervals of ROC AUC and average precision over ``reps`` redraws.

    ``groups`` (one code per row, e.g. the slide): whole groups are redrawn, for rows that are
    not independent. Redraws holding one class only are skipped; None when none is left.
    """
    rank = Ranking(y, p)
    rng = np.random.default_rng(seed)
    codes = None if groups is None else np.unique(groups, return_inverse=True)[1]
    n_groups = len(y) if codes is None else (int(codes.max()) + 1 if len(codes) else 0)
    rocs, aps = [], []
    for _ in range(reps if n_groups else 0):
        drawn = np.bincount(rng.integers(n_groups, size=n_groups), minlength=n_groups).astype(float)
        roc, ap = rank.scores(drawn if codes is None else drawn[codes])
        if not np.isnan(roc):
            rocs.append(roc)
            aps.append(ap)

    def interval(v: list[float]) -> list[float] | None:
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None

    return {"roc_auc_ci95": interval(rocs), "pr_auc_ci95": interval(aps)}
