"""Figures (matplotlib, PNG) and the self-contained HTML report of ``hcd evaluate``."""

from __future__ import annotations

import base64
import html
import io
import os

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve, roc_curve

from hcdlib.sources.decode import decode_patch
from hcdlib.sources.sample import SAMPLE_DIR
from hcdlib.sources.slides.maps import HEATMAP_CAPTION
from hcdlib.storage import uri as urimod

REPORT = "report.html"
FIGURES = ("roc.png", "pr.png", "reliability.png", "histogram.png", "errors.png")
# What each figure shows and how to read it (the report's captions).
CAPTIONS = {
    "roc.png": "ROC curve: sensitivity against 1 - specificity as the threshold moves; the closer to the top-left "
               "corner, the better. Markers: the model's threshold and the one that reaches the target sensitivity.",
    "pr.png": "Precision-recall curve: of the patches called tumour, the fraction that are (precision), against the "
              "fraction of tumour patches found (recall). Useful when tumour is rare.",
    "reliability.png": "Reliability: for patches given probability p, how often they are tumour. On the diagonal, "
                       "the probabilities can be read as frequencies; above it the model is under-confident.",
    "histogram.png": "Predicted probabilities of normal and tumour patches. Good separation: two humps at 0 and 1 "
                     "that barely overlap.",
    "errors.png": "The most confident mistakes: normal patches scored highest and tumour patches scored lowest "
                  "(probability above each). Look here for artefacts, stain or labels to check.",
    "froc.png": "FROC: the share of annotated lesions found against false positives per slide as the threshold "
                "moves; Camelyon16's score is the mean sensitivity at the marked 1/4 to 8 false positives per slide.",
}
FIG_SIZE_PX = (800, 600)  # every figure but the error grid
DPI = 100
# What each evaluated row can be (metrics.json's "unit"), and its plural for the report's words.
PLURAL = {"patch": "patches", "tile": "tiles", "slide": "slides"}


def unit_of(m: dict) -> str:
    """What each evaluated row is: ``patch``, ``tile`` (of a slide, against annotations), or ``slide``."""
    return m.get("unit", "patch")


def caption(name: str, m: dict) -> str:
    """The caption of figure ``name``, in the words of the evaluated unit (patches, tiles or slides)."""
    text, u = CAPTIONS.get(name, name), unit_of(m)
    return text.replace("patches", PLURAL[u]).replace("patch", u)


def png_data_uri(data: bytes) -> str:
    """An inline ``data:`` URI, so the HTML report needs no other file to render."""
    return "data:image/png;base64," + base64.b64encode(data).decode()


def escape(text: object) -> str:
    """HTML-escape any value."""
    return html.escape(str(text))


def figure(size_px=FIG_SIZE_PX):
    """A headless matplotlib figure of ``size_px`` and pyplot."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI), plt


def _roc(df, m) -> bytes:

    fig, plt = figure()
    fpr, tpr, _ = roc_curve(df["label"], df["prob"])
    ax = fig.add_subplot()
    lo, hi = m["patch"]["roc_auc_ci95"] or (float("nan"), float("nan"))
    ax.plot(fpr, tpr, label=f"AUC {m['patch']['roc_auc']:.3f} (95% CI {lo:.3f}-{hi:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    for key, marker in (("at_model_threshold", "o"), ("at_target_sensitivity", "s")):
        op = m["patch"][key]
        ax.plot(1 - op["specificity"], op["sensitivity"], marker, label=f"{key.replace('_', ' ')} "
                f"(t={op['threshold']:.2f})")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, {unit_of(m)} level")
    ax.legend(loc="lower right")
    return png_bytes(fig, plt)


def _pr(df, m) -> bytes:

    fig, plt = figure()
    prec, rec, _ = precision_recall_curve(df["label"], df["prob"])
    ax = fig.add_subplot()
    ax.plot(rec, prec, label=f"PR AUC {m['patch']['pr_auc']:.3f}")
    ax.axhline(df["label"].mean(), ls="--", color="grey", lw=1, label="prevalence")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title=f"Precision-recall, {unit_of(m)} level")
    ax.legend(loc="lower left")
    return png_bytes(fig, plt)


def _reliability(df, m) -> bytes:

    fig, plt = figure()
    frac, mean = calibration_curve(df["label"], df["prob"], n_bins=10)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    ax.plot(mean, frac, "o-", label=f"model (ECE {m['patch']['ece']:.3f}, Brier {m['patch']['brier']:.3f})")
    ax.set(xlabel="predicted P(tumour)", ylabel="observed fraction tumour", title="Reliability diagram")
    ax.legend(loc="upper left")
    return png_bytes(fig, plt)


def _histogram(df, m) -> bytes:
    fig, plt = figure()
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 41)
    for label, name in ((0, "normal (label 0)"), (1, "tumour (label 1)")):
        ax.hist(df.loc[df["label"] == label, "prob"], bins=bins, alpha=0.6, label=name)
    ax.axvline(m["patch"]["at_model_threshold"]["threshold"], color="k", lw=1, label="model threshold")
    ax.set(xlabel="predicted P(tumour)", ylabel=PLURAL[unit_of(m)], title="Probabilities per class", yscale="log")
    ax.legend()
    return png_bytes(fig, plt)


def _patch_pixels(source: str) -> np.ndarray:

    try:
        res = decode_patch(urimod.read_bytes(source))
    except OSError:
        res = None
    return res.pixels if res is not None and res.pixels is not None else np.full((96, 96, 3), 200, np.uint8)


def errors_size_px(grid: int) -> tuple[int, int]:
    """Pixel size of the error grid: ``grid`` columns, one row of false positives, one of false negatives."""
    return int(grid * 1.2 * DPI), int(2 * 1.5 * DPI)


def _errors(df, m, grid: int) -> bytes:
    t = m["patch"]["at_model_threshold"]["threshold"]
    fp = df[(df["label"] == 0) & (df["prob"] >= t)].nlargest(grid, "prob")
    fn = df[(df["label"] == 1) & (df["prob"] < t)].nsmallest(grid, "prob")
    fig, plt = figure(errors_size_px(grid))
    for row, (rows, name) in enumerate(((fp, "false positive"), (fn, "false negative"))):
        for col in range(grid):
            ax = fig.add_subplot(2, grid, row * grid + col + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(rows):
                r = rows.iloc[col]
                ax.imshow(_patch_pixels(r["source"]))
                ax.add_patch(plt.Rectangle((32, 32), 32, 32, fill=False, ec="yellow", lw=0.8))  # label region
                ax.set_title(f"p={r['prob']:.2f}", fontsize=7)
            if col == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle("Most confident errors (yellow: the centre 32x32 region that defines the label)", fontsize=8)
    return png_bytes(fig, plt)


def png_bytes(fig, plt) -> bytes:
    """The figure as PNG bytes, closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": keep the stated pixel size
    plt.close(fig)
    return buf.getvalue()


def write_figures(df: pd.DataFrame, metrics: dict, cfg) -> dict[str, bytes]:
    """Render every figure, write each as ``<out>/<name>.png`` and return them by file name."""
    figures = {
        "roc.png": _roc(df, metrics),
        "pr.png": _pr(df, metrics),
        "reliability.png": _reliability(df, metrics),
        "histogram.png": _histogram(df, metrics),
    }
    if unit_of(metrics) == "patch":  # a slide's pixels are its heatmap, in the slides section
        figures["errors.png"] = _errors(df, metrics, cfg.grid)
    for name, data in figures.items():
        urimod.write_bytes_atomic(urimod.join(cfg.out, name), data)
    return figures


def shown_path(uri: str) -> str:
    """A location as the report shows it: inside hcd's own package or the working folder, relatively.

    So a report (and its screenshot) names the sample that ships with hcd, or the user's own
    folders, without the install's or the machine's absolute paths.
    """
    if urimod.is_s3(uri) or not os.path.isabs(uri):
        return uri
    package = os.path.dirname(SAMPLE_DIR.parent)  # hcdlib/, wherever it is installed
    for base, shown in ((package, "hcdlib"), (os.getcwd(), ".")):
        if uri == base or uri.startswith(base + os.sep):
            return os.path.join(shown, os.path.relpath(uri, base))
    return uri


def _rows(pairs) -> str:
    return "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in pairs)


def _slides_html(slides: list[tuple[dict, bytes | None]]) -> str:
    """Per slide: the heatmap and its summary row (predictions made on whole-slide images).

    Slides whose PNG is None are listed in one table, with where their heatmap is, not embedded.
    """
    keys = ("tiles_scored", "tumour_tiles", "tumour_area_mm2", "max_prob", "topk_mean_prob", "mpp", "error")
    parts = []
    rest = [summary for summary, png in slides if png is None]
    for summary, png in slides:
        if png is None:
            continue
        rows = _rows([(k.replace("_", " "), summary.get(k)) for k in keys if summary.get(k) is not None])
        img = (f'<figure><img src="{png_data_uri(png)}" alt="heatmap of {escape(summary["slide_id"])}">'
               f"<figcaption>{escape(HEATMAP_CAPTION)}</figcaption></figure>") if png else ""
        parts.append(f"<h3>{escape(summary['slide_id'])}</h3><table>{rows}</table>{img}")
    if rest:  # a report of every heatmap would not open: the others are files beside the predictions
        head = "".join(f"<th>{escape(k.replace('_', ' '))}</th>" for k in ("slide_id", *keys[:4], "heatmap"))
        body = "".join("<tr>" + "".join(f"<td>{escape(s.get(k, ''))}</td>" for k in ("slide_id", *keys[:4], "heatmap"))
                       + "</tr>" for s in rest)
        parts.append(f"<h3>{len(rest)} more slides, by highest tile probability (their heatmaps are files beside "
                     f"the predictions, not embedded)</h3><table><tr>{head}</tr>{body}</table>")
    return "<h2>Slides</h2>" + "".join(parts)


def write_html(metrics: dict, figures: dict[str, bytes], out: str, *,
               slides: list[tuple[dict, bytes]] | None = None, extra_html: str = "") -> str:
    """One self-contained page: the figures are embedded, so it opens offline and can be mailed.

    ``extra_html``: a section shown after the slide level (the lesion level against annotations).
    ``slides`` (summary row, heatmap PNG) adds a section per whole-slide image.
    """
    p = metrics["patch"]
    ci = p["roc_auc_ci95"]
    fmt = "{:.4f}".format
    ops = []
    for key in ("at_model_threshold", "at_target_sensitivity"):
        op = p[key]
        cm = op["confusion_matrix"]
        ops.append((key.replace("_", " "), f"threshold {op['threshold']:.3f}: sensitivity {fmt(op['sensitivity'])}, "
                    f"specificity {fmt(op['specificity'])}, accuracy {fmt(op['accuracy'])}; "
                    f"TP {cm['tp']} FP {cm['fp']} TN {cm['tn']} FN {cm['fn']}"))
    u = unit_of(metrics)
    table = _rows([(f"{PLURAL[u]} evaluated", p["n"]), (f"tumour {PLURAL[u]}", p["positives"]),
                   ("ROC AUC", f"{fmt(p['roc_auc'])} (95% CI {fmt(ci[0])}-{fmt(ci[1])})" if ci else fmt(p["roc_auc"])),
                   ("PR AUC", fmt(p["pr_auc"])), ("Brier score", fmt(p["brier"])), ("ECE", fmt(p["ece"])), *ops])
    join = metrics["join"]
    join_rows = _rows([(k.replace("_", " "), v) for k, v in join.items() if k != "missing_examples"])
    slide = metrics["slide"]
    slide_html = "<p>No slide ids in the predictions or labels.</p>"
    if slide:
        why = slide.get("auc_note") or ""
        slide_html = "<table>" + _rows([("slides", slide["slides"]), ("tumour slides", slide["positive_slides"]),
                                         ("AUC (max tile probability)", slide["auc_max"] if why == "" else why),
                                         (f"AUC (top-{slide['top_k']} mean)",
                                          slide["auc_topk_mean"] if why == "" else why)]) + "</table>"
    imgs = "".join(f'<figure><img src="{png_data_uri(data)}" data-file="{escape(name)}" alt="{escape(name)}">'
                   f"<figcaption>{escape(caption(name, metrics))}</figcaption></figure>"
                   for name, data in figures.items())
    slides_html = _slides_html(slides) if slides else ""
    heading = {"slide": "Slide level: each slide scored by its highest tile probability, against the labels per slide",
               "tile": "Tile level: each scored tile against the annotated tumour under its centre",
               }.get(u, "Patch level")
    truth = " ".join(f"{k} <code>{escape(shown_path(metrics['inputs'][k]))}</code>"
                     for k in ("labels", "annotations") if metrics["inputs"].get(k))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hcd evaluation report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
figure{{margin:1em 0}}img{{max-width:100%}}</style></head><body>
<h1>hcd evaluation report</h1>
<p>Model <code>{escape(metrics['inputs']['model'])}</code>; predictions
<code>{escape(shown_path(metrics['inputs']['predictions']))}</code>; {truth}.</p>
<h2>{heading}</h2><table>{table}</table>
<h2>Inputs joined</h2><table>{join_rows}</table>
<h2>{"Slide level" if u == "patch" else "Slide scores: the highest tile and the mean of the top tiles"}</h2>
{slide_html}
{extra_html}
<h2>Figures</h2>{imgs}
{slides_html}
</body></html>"""
    target = urimod.join(out, REPORT)
    urimod.write_bytes_atomic(target, page.encode())
    return target
