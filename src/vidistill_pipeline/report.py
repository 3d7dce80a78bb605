"""The comparison report of a pipeline run: gathered from the tasks' artifacts, then published.

`build_comparison` (the cached `comparison` task) reads each model's folder as the teach and distill
tasks leave it (`model.pt`, `history.json`, `eval/metrics.json`), the prep manifest and the flow
stage's throughput, measures each model's cost (`vidistill.evaluate.cost`) and writes
`comparison.json`. `publish` (the uncached `publish-report` task) adds the registration decision,
renders Markdown and HTML (`vidistill.evaluate.report`) and attaches both to the MLflow parent run.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

ArtifactRef = tuple[str, dict[str, Any]]  # (local path, metadata) of a Kubeflow artifact

COMPARISON_FILE = "comparison.json"


def _read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def dataset_summary(clips_dir: str | Path) -> dict[str, Any]:
    """Classes, clips and videos per split and class, skipped inputs and notes, from a prep manifest."""
    m = _read_json(Path(clips_dir) / "manifest.json", {})
    return {"dataset": m.get("dataset", "?"), "root": m.get("root", ""), "classes": m.get("classes", []),
            "frames": m.get("frames"), "size": m.get("size"), "splits": m.get("splits", {}),
            "skipped": m.get("skipped", []), "notes": m.get("notes", []), "data_hash": m.get("hash", "unknown"),
            "sources": m.get("sources", {})}


def _model_row(name: str, role: str, ref: ArtifactRef, *, threads: int = 1) -> dict[str, Any]:
    """One model: its scores and confusion matrix on the test split, history, settings and cost."""
    from vidistill.evaluate.cost import model_cost
    from vidistill.train import load_model

    path, meta = Path(ref[0]), ref[1]
    ev = _read_json(path / "eval" / "metrics.json", {})
    model, info = load_model(path / "model.pt")
    row = {"name": name, "role": role, "model": info.get("name", type(model).__name__),
           "modality": info.get("extra", {}).get("modality", "rgb"), "method": meta.get("method"),
           "seeds": 1, "train_seconds": meta.get("train_seconds"),
           "history": _read_json(path / "history.json", []), "confusion": ev.get("confusion_matrix"),
           "classes": ev.get("classes", info.get("classes", [])), "n_test_videos": ev.get("n"),
           **{k: ev.get(k, meta.get(k)) for k in ("top1", "top5", "mAP", "mean_class_accuracy")}}
    row.update(model_cost(model, threads=threads))
    return row


def build_comparison(*, students: list[ArtifactRef], two_stream: ArtifactRef, teacher_rgb: ArtifactRef,
                     teacher_flow: ArtifactRef, encoder: ArtifactRef, clips: str, source_clips: str,
                     flow: ArtifactRef, out: str | Path, distill_params: dict[str, Any] | None = None) -> Path:
    """Write `<out>/comparison.json`: everything `vidistill.evaluate.report.render_report` shows.

    Args:
        students: each student's model folder and metadata (`method`, scores, `train_seconds`).
        two_stream: the two-stream evaluation folder (eval `metrics.json` at its top).
        teacher_rgb, teacher_flow, encoder: model folders of the teachers and the pre-trained encoder.
        clips, source_clips: prep output folders (their `manifest.json`).
        flow: the flow stage's folder and metadata (`pairs_per_s`: TV-L1 throughput on its node).
        out: folder to write.
        distill_params: the `distill` section, for each method's hyperparameters (defaults otherwise).

    Returns:
        The path of `comparison.json`.
    """
    from vidistill.distill import method_params

    dataset = dataset_summary(clips)
    rgb = _model_row("RGB teacher", "teacher", teacher_rgb)
    temporal = _model_row("flow teacher", "teacher", teacher_flow)
    ev = _read_json(Path(two_stream[0]) / "metrics.json", {})
    pairs_per_s = float(flow[1].get("pairs_per_s") or 0.0)
    pairs = max(int(dataset.get("frames") or 1) - 1, 1)  # TV-L1 pairs per clip
    flow_ms = 1000.0 * pairs / pairs_per_s if pairs_per_s > 0 else None
    both = {"name": "two-stream (RGB + flow teachers)", "role": "teacher", "model": f"{rgb['model']} × 2",
            "modality": "rgb+flow", "method": None, "seeds": 1, "history": [], "confusion": ev.get("confusion_matrix"),
            "classes": ev.get("classes", []), "n_test_videos": ev.get("n"),
            **{k: ev.get(k, two_stream[1].get(k)) for k in ("top1", "top5", "mAP", "mean_class_accuracy")},
            "params": rgb["params"] + temporal["params"],
            "onnx_bytes": (rgb["onnx_bytes"] or 0) + (temporal["onnx_bytes"] or 0) or None,
            "latency_ms": (rgb["latency_ms"] + temporal["latency_ms"] + flow_ms) if flow_ms is not None else None,
            "runtime": "TV-L1 + both teachers",
            "latency_note": (f"TV-L1 of {pairs} frame pairs at the flow stage's {pairs_per_s:.1f} pairs/s "
                             f"({flow_ms:.1f} ms) + RGB and flow teachers" if flow_ms is not None else
                             "the flow stage reported no throughput")}
    methods_cfg = (distill_params or {}).get("methods", {})
    rows = []
    for path, meta in students:
        row = _model_row(f"student: {meta['method']}", "student", (path, meta))
        try:
            from dataclasses import asdict

            row["settings"] = asdict(method_params(meta["method"], methods_cfg.get(meta["method"])))
        except Exception:  # noqa: BLE001 - a plugin method without a Params dataclass still reports
            row["settings"] = {}
        rows.append(row)
    pre = _model_row("pre-trained encoder (sd's source)", "encoder", encoder)
    pre["source"] = dataset_summary(source_clips)
    data = {"dataset": dataset, "chance": chance_level(len(dataset["classes"])), "models": [both, rgb, temporal, *rows],
            "encoder": pre, "machine": _machine(),
            "flow": {"pairs_per_s": pairs_per_s, "pairs_per_clip": pairs}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / COMPARISON_FILE
    path.write_text(json.dumps(data, indent=1, default=float))
    return path


def _machine() -> str:
    """Where the costs were measured: host, CPU, cores and the load average (a busy machine inflates latency)."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{platform.node() or 'unknown'} ({platform.processor() or platform.machine()}, {cpus} CPUs{load})"


def chance_level(num_classes: int) -> dict[str, float]:
    """Top-1 and top-5 of a classifier that guesses uniformly among `num_classes` classes."""
    k = max(num_classes, 1)
    return {"top1": 1.0 / k, "top5": min(5, k) / k, "classes": num_classes}


def publish(comparison_dir: str | Path, *, decision: dict[str, Any], onnx: ArtifactRef, model_name: str,
            markdown: str | Path, html: str | Path, parent_run_id: str = "") -> dict[str, Any]:
    """Render the report with the registration decision and attach it to the MLflow parent run.

    Args:
        comparison_dir: the `comparison` task's folder (`comparison.json`).
        decision: `register_op`'s or `not_registered_op`'s outcome.
        onnx: the exported student's folder (`model.onnx`) and metadata (method, parity).
        model_name: the registered model's name (`register.model_name`).
        markdown, html: files to write.
        parent_run_id: the pipeline's MLflow parent run ("" = do not log).

    Returns:
        The report data as rendered.
    """
    from vidistill.evaluate.report import render_report

    data = json.loads((Path(comparison_dir) / COMPARISON_FILE).read_text())
    onnx_file = Path(onnx[0]) / "model.onnx"
    data["export"] = {"method": onnx[1].get("method"), "onnx_bytes": onnx_file.stat().st_size if onnx_file.exists() else None,
                      **{k: onnx[1].get(k) for k in ("parity_passed", "parity_max_abs_diff", "parity_top1_agreement",
                                                     "opset", "top1")}}
    data["decision"] = {"model_name": model_name, **decision}
    md, page = render_report(data)
    Path(markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(markdown).write_text(md)
    Path(html).write_text(page)
    if parent_run_id:
        from vidistill_pipeline.tracking import log_report

        log_report(parent_run_id, markdown, html)
    return data
