"""The report's lesion section against annotations: the FROC curve and one row per slide."""

from __future__ import annotations

import numpy as np

from hcdlib.commands.evaluate.froc import FP_RATES
from hcdlib.commands.evaluate.report import escape, figure, png_bytes

FROC_PNG = "froc.png"


def froc_png(curve: dict) -> bytes:
    """Sensitivity against false positives per slide (log scale), the challenge's six points marked."""
    fig, plt = figure()
    ax = fig.add_subplot()
    fp, sens = np.asarray(curve["fp_per_slide"]), np.asarray(curve["sensitivity"])
    shown = fp > 0  # the curve's (0, 0) end lies off a log axis
    ax.step(fp[shown], sens[shown], where="post", label=f"FROC score {curve['score']:.3f} ({curve['lesions']} lesions)")
    at = [curve["at_fp_rates"][str(r)] for r in FP_RATES]
    ax.plot(FP_RATES, at, "o", label="sensitivity at 1/4 to 8 FP per slide")
    ax.set_xscale("log")
    ax.set(xlabel="false positives per slide", ylabel="lesion sensitivity", ylim=(0, 1.02),
           xlim=(min(FP_RATES) / 2, max(max(FP_RATES) * 2, float(fp.max()) if len(fp) else 0)),
           title="FROC, lesion level (Camelyon16)")
    ax.legend(loc="lower right")
    return png_bytes(fig, plt)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt(x) for x in v)
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def lesion_html(slide: dict, lesion: dict) -> str:
    """The FROC numbers and the per-slide table (label, tiles, tile AUC, slide scores, lesions)."""
    curve = lesion["froc"]
    if curve:
        pts = "".join(f"<tr><th>{escape(r)} FP per slide</th><td>{curve['at_fp_rates'][r]:.3f}</td></tr>"
                      for r in curve["at_fp_rates"])
        head = (f"<table><tr><th>lesions (not ITC)</th><td>{curve['lesions']}</td></tr>{pts}"
                f"<tr><th>FROC score (mean)</th><td>{curve['score']:.3f}</td></tr></table>")
    else:
        head = f"<p>{escape(lesion['note'])}</p>"
    cols = ("slide_id", "label", "tiles", "tumour_tiles", "tile_roc_auc", "tile_roc_auc_ci95", "tile_pr_auc",
            "max_prob", "topk_mean_prob")
    extra = ("lesions", "itc", "detections")
    rows = "".join("<tr>" + "".join(f"<td>{escape(_fmt(s.get(k)))}</td>" for k in cols)
                   + "".join(f"<td>{lesion['per_slide'].get(s['slide_id'], {}).get(k, '-')}</td>" for k in extra)
                   + "</tr>" for s in slide["per_slide"])
    names = "".join(f"<th>{escape(k.replace('_', ' '))}</th>" for k in (*cols, *extra))
    return (f"<h2>Lesion level: FROC as Camelyon16 computes it</h2>{head}"
            f"<h3>Per slide</h3><table><tr>{names}</tr>{rows}</table>")
