"""Comparison reports: the Markdown tables of the benchmarks, and the pipeline's report of students and teachers
(Markdown, and a self-contained HTML page rendered with Jinja2, figures with matplotlib)."""

from __future__ import annotations

import base64
import html
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
    extra = [k for k in ("seeds", "diverged", "latency_ms") if any(k in r for r in rows)]
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
    """Markdown and a minimal HTML page of a plain table of rows (`method`, top1, top5, mAP, ...), with
    the top-1 bar plot; the pipeline's full report is `render_report`."""
    if not rows:
        raise ValueError("nothing to compare: no results were given")
    md = f"# {title}\n\n" + markdown_table(rows)
    png = base64.b64encode(bar_plot_png(rows)).decode()
    body = "".join(
        "<tr>" + f"<td>{html.escape(str(r['method']))}</td>" + "".join(f"<td>{_cell(r, k)}</td>" for k in COLUMNS) + "</tr>"
        for r in rows)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h1>{html.escape(title)}</h1><table border='1' cellpadding='4'><tr><th>method</th>"
            + "".join(f"<th>{k}</th>" for k in COLUMNS) + f"</tr>{body}</table>"
            f"<p><img alt='top-1 per method' src='data:image/png;base64,{png}'></p></body></html>")
    return md, page


# ----------------------------------------------------------------------------------------------
# the pipeline's comparison report


TITLE = "vidistill: students and teachers compared"
# every field the template reads from a model, so a missing one renders as "–"
_MODEL_FIELDS: dict[str, Any] = {k: None for k in (
    "name", "role", "model", "modality", "method", "seeds", "top1", "top5", "mAP", "mean_class_accuracy", "params",
    "onnx_bytes", "latency_ms", "runtime", "latency_note", "error", "train_seconds", "history", "confusion", "classes",
    "settings", "n_test_videos", "iters", "threads", "source")}
_SKIP_CURVE_KEYS = {"epoch", "lr", "epoch_seconds", "epoch_start_seconds", "train_acc", "samples"}


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def top1_figure(models: list[dict[str, Any]], chance: float) -> str:
    """Bar chart of top-1 per model (error bars: the seed std where given), chance as a dashed line;
    base64 PNG."""
    plt = _pyplot()
    names = [m["name"] for m in models]
    values = [m.get("top1") or 0.0 for m in models]
    errors = [m.get("top1_std") or 0.0 for m in models]
    colours = ["tab:gray" if m.get("role") == "teacher" else "tab:blue" for m in models]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(models) + 2), 3.4))
    ax.bar(range(len(models)), values, yerr=errors, capsize=4, color=colours)
    ax.axhline(chance, color="tab:red", linestyle="--", linewidth=1, label=f"chance {chance:.3f}")
    ax.set_xticks(range(len(models)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return _png(fig)


def cost_figure(models: list[dict[str, Any]], chance: float) -> str:
    """Top-1 against latency per clip (log x), marker area by parameter count; base64 PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    biggest = max([m.get("params") or 1 for m in models] + [1])
    for m in models:
        if m.get("latency_ms") is None or m.get("top1") is None:
            continue
        size = 30 + 400 * (m.get("params") or 0) / biggest
        ax.scatter(m["latency_ms"], m["top1"], s=size, alpha=0.6,
                   color="tab:gray" if m.get("role") == "teacher" else "tab:blue")
        ax.annotate(m["name"], (m["latency_ms"], m["top1"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(chance, color="tab:red", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("latency per clip (ms, batch 1)")
    ax.set_ylabel("top-1")
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    return _png(fig)


def curves_figure(history: list[dict[str, float]], title: str) -> str:
    """Loss terms (left) and training accuracy (right) per epoch; base64 PNG."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(6.4, 2.8))
    epochs = [h.get("epoch", i) + 1 for i, h in enumerate(history)]
    terms = [k for k in history[0] if k not in _SKIP_CURVE_KEYS and isinstance(history[0][k], (int, float))]
    for k in terms:
        ax1.plot(epochs, [h.get(k) for h in history], marker="o", markersize=3, label=k)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    if terms:
        ax1.legend(fontsize=7)
    if "train_acc" in history[0]:
        ax2.plot(epochs, [h.get("train_acc") for h in history], marker="o", markersize=3, color="tab:green")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("training accuracy")
    ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def confusion_figure(cm: list[list[int]], classes: list[str], title: str) -> str:
    """Row-normalised confusion matrix with counts (`vidistill.evaluate.metrics.plot_confusion`); base64 PNG."""
    import tempfile
    from pathlib import Path

    from vidistill.evaluate.metrics import plot_confusion

    with tempfile.TemporaryDirectory() as tmp:
        path = plot_confusion(cm, classes, Path(tmp) / "cm.png", title=title)
        return base64.b64encode(path.read_bytes()).decode()


def _num(value: Any, fmt: str = "%.3f") -> str:
    return "–" if value is None else (fmt % value if isinstance(value, (int, float)) else str(value))


def _metric(row: dict[str, Any], key: str) -> str:
    if row.get(key) is None:
        return "–"
    std = row.get(f"{key}_std")
    return f"{row[key]:.3f} ± {std:.3f}" if std is not None and (row.get("seeds") or 1) > 1 else f"{row[key]:.3f}"


def _count(n: Any) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _size(n: Any) -> str:
    return "–" if not n else (f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB")


def _ms(v: Any) -> str:
    return "–" if v is None else (f"{v:.1f} ms" if v >= 10 else f"{v:.2f} ms")


def _seconds(v: Any) -> str:
    return "–" if v is None else f"{v:.0f} s"


def decision_text(decision: dict[str, Any] | None) -> str:
    """One paragraph: what was registered under which name and what the promotion gate decided, with its numbers."""
    if not decision:
        return "No registration decision."
    if not decision.get("registered"):
        return f"**Not registered**: {decision.get('reason', 'no reason given')}."
    d = decision.get("decision") or {}
    if "budget_ms" in d:  # the champion within a latency budget: the accuracy-latency table, champion marked
        from vidistill.registry.selection import frontier_markdown

        return (f"**{d.get('decision', '?')}** within {d['budget_ms']:g} ms per clip: `{decision.get('model_name')}` "
                f"version {decision.get('version')} registered (student {decision.get('method')}); champion "
                f"v{d.get('champion_version')}.\n\n{frontier_markdown(d)}")
    before = (f"against champion {_num(d.get('champion'))} (v{d.get('champion_version')})" if d.get("champion_version")
              else "with no champion before")
    numbers = f"{d.get('metric', 'top1')} {_num(d.get('candidate'))} {before}, margin {_num(d.get('margin'), '%g')}"
    return (f"**{d.get('decision', '?')}**: `{decision.get('model_name')}` version {decision.get('version')} "
            f"(student {decision.get('method')}); {numbers}. {d.get('reason', '')}")


def markdown_report(data: dict[str, Any], *, title: str = TITLE) -> str:
    """The report as Markdown: dataset, the results table with chance level, the decision (no images)."""
    ds, chance = data["dataset"], data["chance"]
    splits = "; ".join(f"{s} {v['clips']} clips / {v['videos']} videos" for s, v in ds.get("splits", {}).items())
    lines = [f"# {title}", "",
             f"Dataset **{ds['dataset']}**: {len(ds['classes'])} classes; {splits}; "
             f"{len(ds.get('skipped', []))} input(s) skipped.", "",
             "| model | top-1 | top-5 | mAP | params | ONNX | latency / clip |", "|---|---|---|---|---|---|---|"]
    for m in data["models"]:
        lines.append(f"| {m['name']} | {_metric(m, 'top1')} | {_metric(m, 'top5')} | {_metric(m, 'mAP')} | "
                     f"{_count(m.get('params'))} | {_size(m.get('onnx_bytes'))} | {_ms(m.get('latency_ms'))} |")
    lines += [f"| chance | {chance['top1']:.3f} | {chance['top5']:.3f} | | | | |", "",
              decision_text(data.get("decision")), ""]
    return "\n".join(lines)


def render_report(data: dict[str, Any], *, title: str = TITLE) -> tuple[str, str]:
    """Markdown and a self-contained HTML page (Jinja2 template `templates/report.html.j2`, figures as
    inline PNG) of the comparison a pipeline run made.

    Args:
        data: the pipeline's `comparison.json` (its comparison task), with `decision` and `export` added
            when it is published: `dataset` (classes, splits with per-class counts, skipped
            inputs, notes, data hash), `chance` (`top1`, `top5`, `classes`), `models` (one dict per
            teacher and student: name, role, top1/top5/mAP/mean_class_accuracy (optionally
            `<metric>_std` and `seeds`), params, onnx_bytes, latency_ms, runtime, history, confusion,
            classes, settings), `encoder`, `machine`.
        title: the page's title.

    Returns:
        `(markdown, html)`.

    Raises:
        ValueError: no models in `data`.
    """
    from jinja2 import Environment, PackageLoader, select_autoescape

    if not data.get("models"):
        raise ValueError("nothing to report: the comparison holds no models")
    models = [{**_MODEL_FIELDS, **m} for m in data["models"]]
    chance = data["chance"]
    figures = {"top1": top1_figure(models, chance["top1"]), "cost": cost_figure(models, chance["top1"]),
               "curves": [], "confusion": []}
    encoder = {**_MODEL_FIELDS, **data["encoder"]} if data.get("encoder") else None
    for m in [*models, *([encoder] if encoder else [])]:
        if m.get("history"):
            figures["curves"].append({"name": m["name"], "png": curves_figure(m["history"], m["name"])})
        if m.get("confusion") and m.get("classes"):
            figures["confusion"].append({"name": m["name"], "png": confusion_figure(m["confusion"], m["classes"], m["name"])})
    students = [m for m in models if m.get("role") == "student" and m.get("top1") is not None]
    best = max(students, key=lambda m: m["top1"]) if students else None
    seeds = max(int(m.get("seeds") or 1) for m in models)
    env = Environment(loader=PackageLoader("vidistill.evaluate", "templates"), autoescape=select_autoescape(["j2", "html"]))
    env.filters.update({"metric": _metric, "num": _num, "count": _count, "size": _size, "ms": _ms, "seconds": _seconds})
    timed = next((m for m in models if m.get("iters")), {})
    page = env.get_template("report.html.j2").render(
        title=title, dataset=data["dataset"], chance=chance, models=models, figures=figures, machine=data.get("machine", "?"),
        decision=data.get("decision"), export=data.get("export"), encoder=encoder,
        encoder_chance=1.0 / max(len((encoder or {}).get("classes") or []), 1),
        best_name=best["name"] if best else None, iters=timed.get("iters", "?"), threads=timed.get("threads", 1),
        best_note=f"Best student: {best['name']} (highlighted)." if best else "",
        seeds_note=("One seed per model in this run, so no seed spread: `vidistill bench methods` trains several seeds."
                    if seeds <= 1 else f"± is the standard deviation over {seeds} seeds."))
    return markdown_report(data, title=title), page
