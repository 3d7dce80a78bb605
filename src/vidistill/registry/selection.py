"""A champion within a latency budget: the most accurate registered student whose measured latency fits.

`vidistill register --latency-budget-ms B` measures the registered model's latency (`measure_latency`:
ONNX Runtime on this machine, batch 1, `--latency-threads` threads; the p50 in ms per clip, tagged
`latency_ms` on the version) and then, instead of the margin gate, calls `select_champion`: among the
versions of the model that passed parity (and, for int8 versions, their accuracy gate), evaluated on
the same data set as the newest one, the most accurate whose `latency_ms` <= B becomes `champion`.
Measure every version on the serving hardware's profile (same CPU, same thread count): latencies from
different machines do not compare.

`frontier_markdown` and `plot_frontier` show the accuracy-latency frontier with the champion marked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LATENCY_TAG = "latency_ms"  # p50 ms per clip, batch 1
THREADS_TAG = "latency_threads"
PRECISION_TAG = "precision"  # "fp32" | "int8"


def measure_latency(onnx_path: str | Path, *, threads: int = 1, iters: int = 50, warmup: int = 5) -> float:
    """p50 latency of one clip (batch 1) through ONNX Runtime on CPU, in milliseconds.

    Args:
        onnx_path: an exported student (float32 input (B, 3, T, H, W); T, H, W read from the graph).
        threads: ONNX Runtime intra-op threads (the serving profile: `vidistill serve --threads`).
        iters: timed runs (>= 1); warmup: untimed runs first (>= 0).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: threads < 1, iters < 1 or warmup < 0.
    """
    import statistics
    import time

    import numpy as np

    from vidistill.export.runtime import make_session

    if threads < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"measure_latency needs threads >= 1, iters >= 1, warmup >= 0; got {threads}, {iters}, {warmup}")
    session = make_session(onnx_path, threads=threads, providers=["cpu"])
    inp = session.get_inputs()[0]
    shape = [1] + [int(d) for d in inp.shape[1:]]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(warmup):
        session.run(None, {inp.name: x})
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        session.run(None, {inp.name: x})
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))


def pick_within_budget(candidates: Sequence[dict[str, Any]], budget_ms: float) -> dict[str, Any] | None:
    """The most accurate candidate whose `latency_ms` <= `budget_ms` (ties: faster, then newer version).

    Args:
        candidates: dicts with "version" (str of an int), "accuracy" (higher is better) and "latency_ms".
        budget_ms: largest allowed latency, ms per clip (> 0).

    Returns:
        The chosen candidate, or None when none fits the budget.

    Raises:
        ValueError: a budget that is not a positive finite number of ms.
    """
    if not (isinstance(budget_ms, (int, float)) and math.isfinite(budget_ms) and budget_ms > 0):
        raise ValueError(f"latency budget must be a positive number of ms per clip, got {budget_ms!r}")
    fits = [c for c in candidates if c["latency_ms"] <= budget_ms]
    if not fits:
        return None
    return max(fits, key=lambda c: (c["accuracy"], -c["latency_ms"], int(c["version"])))


def frontier(candidates: Sequence[dict[str, Any]]) -> list[str]:
    """Versions on the accuracy-latency Pareto frontier (no other version is both faster and as accurate), fastest first."""
    out, best = [], -math.inf
    for c in sorted(candidates, key=lambda c: (c["latency_ms"], -c["accuracy"])):
        if c["accuracy"] > best:
            out.append(str(c["version"]))
            best = c["accuracy"]
    return out


def _candidates(c: Any, model_name: str, metric: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Eligible versions as candidates, and one line per excluded version with the reason."""
    versions = sorted(c.search_model_versions(f"name = '{model_name}'"), key=lambda v: int(v.version))
    out, excluded = [], []
    data_hash = versions[-1].tags.get("data_hash") if versions else None
    for v in versions:
        t = v.tags
        why = None
        if t.get("parity_passed") != "true":
            why = "ONNX parity failed"
        elif t.get(PRECISION_TAG) == "int8" and t.get("int8_gate_passed") != "true":
            why = "int8 accuracy gate failed"
        elif LATENCY_TAG not in t:
            why = f"no {LATENCY_TAG} tag (registered without a latency measurement)"
        elif metric not in t:
            why = f"no {metric} tag"
        elif t.get("data_hash") != data_hash:
            why = f"evaluated on data_hash {t.get('data_hash')!r}, not the newest version's {data_hash!r}"
        if why:
            excluded.append(f"v{v.version}: {why}")
            continue
        out.append({"version": str(v.version), "accuracy": float(t[metric]), "latency_ms": float(t[LATENCY_TAG]),
                    "precision": t.get(PRECISION_TAG, "fp32"), "method": t.get("method", ""),
                    "threads": t.get(THREADS_TAG, "")})
    return out, excluded


def select_champion(model_name: str, budget_ms: float, *, metric: str = "top1") -> dict[str, Any]:
    """Make the most accurate eligible version within `budget_ms` the `champion` of `model_name`.

    Eligible: parity passed; int8 versions also passed their accuracy gate; tagged with `latency_ms`
    and `metric`; evaluated on the newest version's data set. With none within the budget the
    champion is left as it is (decision "none_within_budget").

    Returns:
        `{"model_name", "decision" ("champion" | "none_within_budget"), "champion_version",
        "previous_champion", "budget_ms", "metric", "candidates": [{"version", "accuracy",
        "latency_ms", "precision", "method", "within_budget", "on_frontier"}], "excluded": [str], "reason"}`.

    Raises:
        ValueError: a non-positive budget, or an unknown model (one line, naming what exists).
    """
    from vidistill.registry.models import CHAMPION, HISTORY_TAG, _champion, _history, _registered
    from vidistill.registry.tracking import client

    pick_within_budget([], budget_ms)  # validates the budget before any registry call
    c = client()
    _registered(c, model_name)
    cands, excluded = _candidates(c, model_name, metric)
    chosen = pick_within_budget(cands, budget_ms)
    front = set(frontier(cands))
    for cand in cands:
        cand["within_budget"] = cand["latency_ms"] <= budget_ms
        cand["on_frontier"] = cand["version"] in front
    current = _champion(c, model_name)
    previous = str(current.version) if current is not None else None
    if chosen is None:
        fastest = min((x["latency_ms"] for x in cands), default=None)
        reason = (f"no eligible version runs within {budget_ms:g} ms per clip (fastest: "
                  f"{'none' if fastest is None else f'{fastest:.3g} ms'}); champion left at {previous or 'none'}")
        decision, version = "none_within_budget", previous
    else:
        version = chosen["version"]
        decision = CHAMPION
        over = [x for x in cands if x["accuracy"] > chosen["accuracy"] and not x["within_budget"]]
        over_text = ", ".join("v{} ({:.3g} ms)".format(x["version"], x["latency_ms"]) for x in over)
        reason = (f"v{version}: {metric} {chosen['accuracy']:.4f} at {chosen['latency_ms']:.3g} ms per clip is the most "
                  f"accurate within {budget_ms:g} ms" + (f"; more accurate but over budget: {over_text}" if over else ""))
        if version != previous:
            c.set_registered_model_alias(model_name, CHAMPION, version)
            c.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(_history(c, model_name) + [version]))
        for key, value in {"promotion.decision": CHAMPION, "promotion.reason": reason,
                           "promotion.latency_budget_ms": repr(float(budget_ms))}.items():
            c.set_model_version_tag(model_name, version, key, value)
    return {"model_name": model_name, "decision": decision, "champion_version": version, "previous_champion": previous,
            "budget_ms": float(budget_ms), "metric": metric, "candidates": cands, "excluded": excluded, "reason": reason}


def frontier_markdown(selection: dict[str, Any]) -> str:
    """A Markdown table of `select_champion`'s candidates, fastest first: frontier and champion marked."""
    rows = ["| version | method | precision | " + selection["metric"] + " | ms per clip | within budget | frontier | champion |",
            "|---|---|---|---:|---:|---|---|---|"]
    for x in sorted(selection["candidates"], key=lambda x: x["latency_ms"]):
        rows.append(f"| v{x['version']} | {x['method']} | {x['precision']} | {x['accuracy']:.4f} | {x['latency_ms']:.3f} | "
                    f"{'yes' if x['within_budget'] else 'no'} | {'yes' if x['on_frontier'] else ''} | "
                    f"{'**champion**' if x['version'] == selection['champion_version'] else ''} |")
    return f"Latency budget {selection['budget_ms']:g} ms per clip. {selection['reason']}\n\n" + "\n".join(rows) + "\n"


def plot_frontier(selection: dict[str, Any], path: str | Path) -> Path:
    """Accuracy (y) vs ms per clip (x) of every candidate, the frontier as a step line, the budget as a
    vertical line and the champion as a star; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = selection["candidates"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter([x["latency_ms"] for x in cands], [x["accuracy"] for x in cands], color="tab:blue", label="versions")
    for x in cands:
        ax.annotate(f"v{x['version']} {x['precision']}", (x["latency_ms"], x["accuracy"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    front = sorted((x for x in cands if x["on_frontier"]), key=lambda x: x["latency_ms"])
    if front:
        ax.step([x["latency_ms"] for x in front], [x["accuracy"] for x in front], where="post", color="tab:gray",
                label="frontier")
    ax.axvline(selection["budget_ms"], color="tab:red", linestyle="--", label=f"budget {selection['budget_ms']:g} ms")
    champ = [x for x in cands if x["version"] == selection["champion_version"]]
    if champ:
        ax.scatter([champ[0]["latency_ms"]], [champ[0]["accuracy"]], marker="*", s=200, color="tab:orange", label="champion")
    ax.set_xlabel("ms per clip (batch 1)")
    ax.set_ylabel(selection["metric"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def deployment_tags(onnx_dir: str | Path, precision: str, scores: dict[str, float], *,
                    threads: int = 1) -> tuple[Path, dict[str, float], dict[str, str]]:
    """The model file to register from an export folder, its scores and its deployment tags.

    fp32: `<onnx_dir>/model.onnx` with `scores` as they are. int8: `<onnx_dir>/int8/model.onnx`, only
    when its accuracy gate passed; its `top1` is the float model's minus the gate's clip-level drop
    (never raised when int8 happens to do better). Tags: `precision`, `latency_ms` (measured here, see
    `measure_latency`), `latency_threads`, and for int8 the gate's `int8_gate_passed`,
    `int8_top1_drop_points`, `int8_top1_agreement`.

    Raises:
        FileNotFoundError: no int8 model or gate in `onnx_dir` (export with `--int8`).
        ValueError: an unknown precision, or an int8 model that failed its gate (one line with the numbers).
    """
    from vidistill.export.quantize import INT8_DIR, read_gate
    from vidistill.export.runtime import MODEL_FILE

    onnx_dir = Path(onnx_dir)
    scores = dict(scores)
    tags = {PRECISION_TAG: precision, THREADS_TAG: str(threads)}
    if precision == "fp32":
        model_file = onnx_dir / MODEL_FILE
    elif precision == "int8":
        gate = read_gate(onnx_dir)
        if not gate["passed"]:
            raise ValueError(f"the int8 model in {onnx_dir / INT8_DIR} failed its accuracy gate (top-1 drop "
                             f"{gate['drop_points']:.2f} points > {gate['max_drop_points']:g}); register precision fp32 instead")
        model_file = onnx_dir / INT8_DIR / MODEL_FILE
        if "top1" in scores:
            scores["top1"] -= max(gate["drop_points"], 0.0) / 100.0
        tags.update({"int8_gate_passed": "true", "int8_top1_drop_points": repr(float(gate["drop_points"])),
                     "int8_top1_agreement": repr(float(gate["top1_agreement"]))})
    else:
        raise ValueError(f"precision must be fp32 or int8, got {precision!r}")
    tags[LATENCY_TAG] = repr(measure_latency(model_file, threads=threads))
    return model_file, scores, tags
