"""The GPU check's report as Markdown: one table per section, written beside its JSON."""

from __future__ import annotations

TITLES = {"environment": "Environment", "probes": "Device of Ray tasks asking for 0, 0.5 and 1 GPU",
          "models": "Model only (patches in memory)", "train": "hcd train under a time budget, resumed, exported",
          "score": "hcd score end to end (packed patches)"}


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "/")


def table(rows: list[dict]) -> str:
    """A Markdown table over the union of the rows' keys, in first-seen order."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """Every section of a :func:`benchmarks.gpu_check.run` report, with its time."""
    kind = "dry run: sizes too small to measure anything" if report["dry_run"] else "full check"
    out = [f"# hcd GPU check ({kind}), {report['started']}", ""]
    for key, title in TITLES.items():
        value = report.get(key)
        if value is None:
            continue
        took = f" ({report[key + '_seconds']} s)" if key + "_seconds" in report else ""
        out += [f"## {title}{took}", ""]
        if isinstance(value, list):
            out.append(table(value))
        else:
            out.append(table([{"what": k, "value": v} for k, v in value.items()]))
        out.append("")
    if report.get("failed_sections"):
        out.append(f"Failed sections: {', '.join(report['failed_sections'])} (see gpu_check.json and the log).")
    return "\n".join(out) + "\n"
