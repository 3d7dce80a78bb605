"""Comparison report of methods and baselines: a Markdown table and an HTML page with a bar plot."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

COLUMNS = ("top1", "top5", "mAP")


def _cell(row: dict[str, Any], key: str, fmt: str = ".3f") -> str:
    value = row.get(key)
    if value is None:
        return "–"
    std = row.get(f"{key}_std")
    return f"{value:{fmt}} ± {std:{fmt}}" if std is not None else f"{value:{fmt}}"


def markdown_table(rows: list[dict[str, Any]], *, extra_columns: Sequence[str] = ()) -> str:
    """`| method | top1 | top5 | mAP |` with `mean ± std` where rows carry `<metric>_std` and `seeds`, a
    `train_acc` column (accuracy on the training clips in the last epoch) where rows carry it, and the
    `extra_columns` (e.g. loss terms `term:kd`, headed `kd`) as mean ± std."""
    metrics = [*COLUMNS, *(["train_acc"] if any("train_acc" in r for r in rows) else [])]
    extra = [k for k in ("seeds", "latency_ms") if any(k in r for r in rows)]
    head = ["method", *metrics, *(c.split(":", 1)[-1] for c in extra_columns), *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["method"]), *(_cell(r, k) for k in metrics), *(_cell(r, k, ".3g") for k in extra_columns)]
        cells += [f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "–")) for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_plot_png(rows: list[dict[str, Any]], metric: str = "top1") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(r["method"]) for r in rows]
    values = [r.get(metric) or 0.0 for r in rows]
    errors = [r.get(f"{metric}_std") or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(rows) + 2), 3.2))
    ax.bar(names, values, yerr=errors, capsize=4, color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_ylabel(metric)
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def comparison_report(rows: list[dict[str, Any]], *, title: str = "vidistill: method comparison") -> tuple[str, str]:
    """Markdown and HTML versions of the comparison (the HTML embeds the top-1 bar plot)."""
    if not rows:
        raise ValueError("nothing to compare: no results were given")
    md = f"# {title}\n\n" + markdown_table(rows)
    png = base64.b64encode(bar_plot_png(rows)).decode()
    body = "".join(
        "<tr>" + f"<td>{r['method']}</td>" + "".join(f"<td>{_cell(r, k)}</td>" for k in COLUMNS) + "</tr>" for r in rows)
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h1>{title}</h1><table border='1' cellpadding='4'><tr><th>method</th>"
            + "".join(f"<th>{k}</th>" for k in COLUMNS) + f"</tr>{body}</table>"
            f"<p><img alt='top-1 per method' src='data:image/png;base64,{png}'></p></body></html>")
    return md, html
