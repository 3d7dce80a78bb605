"""One function per pipeline stage: a validated config in, files out, a summary dict back.

These are the single edge every runner calls: the `vidistill` CLI, the DVC stages and the Kubeflow
components. Tracking happens here (never inside models or losses).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vidistill.config import (
    DistillConfig,
    EvaluateConfig,
    ExportConfig,
    FlowConfig,
    PrepConfig,
    RegisterConfig,
    TeachConfig,
)


class _NoTracker:
    run_id = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def log_artifacts(self, path: str | Path) -> None:
        pass


@contextmanager
def tracked(stage: str, cfg: Any, *, tags: dict[str, str] | None = None, track: bool = True) -> Iterator[Any]:
    """An MLflow child run for `stage` (params, lineage tags); a no-op logger when `track` is off."""
    from vidistill.train.loop import is_main_process

    if not track or not is_main_process():  # under torchrun only rank 0 tracks
        yield _NoTracker()
        return
    from vidistill.registry.tracking import stage_run

    with stage_run(stage, params=asdict(cfg), tags=tags) as run:
        yield run


def _numeric(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


def _manifest_hash(clips_dir: str | Path) -> str:
    p = Path(clips_dir) / "manifest.json"
    return json.loads(p.read_text()).get("hash", "unknown") if p.exists() else "unknown"


# ----------------------------------------------------------------------------------------------


def prep(cfg: PrepConfig, *, progress: bool = True, track: bool = True) -> dict[str, Any]:
    """Decode videos into fixed-size uint8 clip shards (`vidistill prep`)."""
    cfg.validate()
    from vidistill.data import run_prep

    with tracked("prep", cfg, track=track) as run:
        summary = run_prep(cfg, progress=progress)
        run.log_metrics(_numeric({f"{s}_clips": v["clips"] for s, v in summary["splits"].items()} |
                                 {"skipped": len(summary["skipped"]), "frames_per_s": summary.get("frames_per_s", 0)}))
        run.log_artifact(Path(cfg.out) / "manifest.json")
    return summary


def flow(cfg: FlowConfig, *, progress: bool = True, track: bool = True) -> dict[str, Any]:
    """TV-L1 flow for every clip (`vidistill flow`)."""
    cfg.validate()
    from vidistill.flow.stage import run_flow

    with tracked("flow", cfg, tags={"data_hash": _manifest_hash(cfg.clips)}, track=track) as run:
        summary = run_flow(cfg, progress=progress)
        run.log_metrics(_numeric(summary))
    return summary


def _train_and_evaluate(task: Any, export_model: Any, *, train_set: Any, train_cfg: Any, out: Path, clips: str,
                        flow_dir: str, resume: bool, progress: bool, run: Any, stop_after_epochs: int | None,
                        extra: dict[str, Any], eval_set: Any = None) -> dict[str, Any]:
    """Shared by teach and distill: fit, save `model.pt` (the module `export_model()` returns after
    training, rebuilt later from its preset name and builder arguments), loss curves, evaluate on the
    test split (`clips`, or `eval_set` when the task is not the clips' labels)."""
    from vidistill.evaluate.runner import plot_curves
    from vidistill.train import fit, save_model
    from vidistill.train.loop import is_main_process

    t0 = time.perf_counter()
    history = fit(task, train_set, train_cfg, out, resume=resume, progress=progress, stop_after_epochs=stop_after_epochs,
                  on_epoch_end=lambda e, m: run.log_metrics(_numeric(m), step=e))
    if len(history) < train_cfg.epochs or not is_main_process():  # interrupted (tests), or a worker rank
        return {"epochs_done": len(history), "out": str(out)}
    seconds = time.perf_counter() - t0
    model = export_model()
    save_model(out / "model.pt", model, classes=train_set.classes, extra={**extra, "run_id": run.run_id})
    name = model.create_kwargs["name"]
    plot_curves(history, out / "loss_curves.png", title=f"{name} " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    run.log_artifact(out / "loss_curves.png")
    if eval_set is None:
        result = evaluate(EvaluateConfig(clips=clips, flow=flow_dir, checkpoint=str(out / "model.pt"),
                                         out=str(out / "eval"), device=train_cfg.device), track=False)
    else:
        from vidistill.evaluate.runner import predict, score, write_report
        from vidistill.train import resolve_device

        pred = predict([model], eval_set, device=resolve_device(train_cfg.device))
        result = score(pred["probs"][0], pred["labels"], pred["video_ids"], eval_set.classes)
        write_report(result, out / "eval", title=f"{name} ({extra.get('pretext', '')})")
    run.log_metrics(_numeric({k: result[k] for k in ("top1", "top5", "mAP", "mean_class_accuracy")}))
    run.log_artifacts(out / "eval")
    return {"out": str(out), "model": str(out / "model.pt"), "train_seconds": seconds, "history": history,
            "run_id": run.run_id, **{k: result[k] for k in ("top1", "top5", "mAP")}}


def _model_kwargs(train_set: Any, modality: str = "rgb") -> dict[str, Any]:
    return {"num_classes": train_set.num_classes, "frames": train_set.frames, "size": train_set.size, "modality": modality}


def teach(cfg: TeachConfig, *, progress: bool = True, track: bool = True,
          stop_after_epochs: int | None = None) -> dict[str, Any]:
    """Train a teacher (`vidistill teach`): RGB or flow stream, then evaluate it on the test split."""
    cfg.validate()
    from vidistill.data import ClipDataset
    from vidistill.models import create_model
    from vidistill.train import Supervised

    train_set = ClipDataset(cfg.clips, "train", flow_root=cfg.flow if cfg.modality == "flow" else None)
    eval_set, extra = None, {"modality": cfg.modality}
    if cfg.pretext == "pace":  # self-supervised: the clips' labels are never read
        from vidistill.data.pace import PaceClips

        pace = {"frames": cfg.pretext_frames, "paces": cfg.paces}
        train_set, eval_set = PaceClips(train_set, **pace), PaceClips(ClipDataset(cfg.clips, "test"), **pace, random_start=False)
        extra["pretext"] = "pace"
    torch_seed(cfg.train.seed)
    model = create_model(cfg.model, **_model_kwargs(train_set, cfg.modality))
    tags = {"data_hash": _manifest_hash(cfg.clips), "method": "pretext_pace" if cfg.pretext == "pace" else f"teacher_{cfg.modality}"}
    with tracked(f"teach_{cfg.modality}", cfg, tags=tags, track=track) as run:
        return _train_and_evaluate(Supervised(model, label_smoothing=cfg.train.label_smoothing), lambda: model,
                                   train_set=train_set, train_cfg=cfg.train, out=Path(cfg.out), clips=cfg.clips,
                                   flow_dir=cfg.flow, resume=cfg.resume, progress=progress, run=run,
                                   stop_after_epochs=stop_after_epochs, extra=extra, eval_set=eval_set)


def distill(cfg: DistillConfig, *, progress: bool = True, track: bool = True,
            stop_after_epochs: int | None = None) -> dict[str, Any]:
    """Train a student with a distillation method (`vidistill distill --method KEY`), then evaluate it.

    The method decides the student preset (`Distiller.student_name`), receives only the model files it
    `needs`, and decides what is saved as `model.pt` (`Distiller.export_model`).
    """
    cfg.validate()
    from vidistill.data import ClipDataset
    from vidistill.distill import DistillContext, get_method, method_params
    from vidistill.train.loop import load_checkpoint

    method = get_method(cfg.method)
    params = method_params(cfg.method, cfg.methods.get(cfg.method))
    train_cfg = method.train_config(params, cfg.train)
    train_set = ClipDataset(cfg.clips, "train", flow_root=cfg.flow if method.needs_flow else None,
                            videos_per_class=cfg.student_videos_per_class, subset_seed=cfg.student_subset_seed)
    files = {n: getattr(cfg, n) for n in method.needs}  # only what the method declares reaches it
    ctx = DistillContext(num_classes=train_set.num_classes, classes=train_set.classes, frames=train_set.frames,
                         size=train_set.size, label_smoothing=cfg.train.label_smoothing, **files)
    torch_seed(cfg.train.seed)
    task = method(method.build_student(params, ctx, default=cfg.student), params, ctx)
    teacher_run = ""
    for path in files.values():
        if path and Path(path).exists():
            teacher_run = load_checkpoint(path)["extra"].get("run_id") or teacher_run
    tags = {"data_hash": _manifest_hash(cfg.clips), "method": cfg.method,
            "teacher_run_id": teacher_run or "none"}
    with tracked(f"distill_{cfg.method}", cfg, tags=tags, track=track) as run:
        result = _train_and_evaluate(task, task.export_model, train_set=train_set, train_cfg=train_cfg,
                                     out=Path(cfg.out), clips=cfg.clips, flow_dir=cfg.flow, resume=cfg.resume,
                                     progress=progress, run=run, stop_after_epochs=stop_after_epochs,
                                     extra={"modality": "rgb", "method": cfg.method})
    result["method"] = cfg.method
    return result


def torch_seed(seed: int) -> None:
    """Seed model initialisation (the loop seeds its own shuffling)."""
    import torch

    torch.manual_seed(seed)


def evaluate(cfg: EvaluateConfig, *, track: bool = True) -> dict[str, Any]:
    """Evaluate one model, or the softmax average of several (comma-separated `checkpoint`: two-stream)."""
    cfg.validate()
    from vidistill.data import ClipDataset
    from vidistill.evaluate.runner import predict, score, write_report
    from vidistill.train import load_model, resolve_device

    device = resolve_device(cfg.device)
    paths = [p.strip() for p in cfg.checkpoint.split(",") if p.strip()]
    loaded = [load_model(p, device=str(device)) for p in paths]
    models = [m for m, _ in loaded]
    needs_flow = any(getattr(m, "modality", "rgb") == "flow" for m in models)
    dataset = ClipDataset(cfg.clips, cfg.split, flow_root=cfg.flow if needs_flow else None)
    for p, (_, info) in zip(paths, loaded):
        if info["classes"] != dataset.classes:
            raise ValueError(f"{p} was trained on classes {info['classes']} but {cfg.clips} has {dataset.classes}; "
                             "evaluate on the dataset the model was trained on")
    with tracked("evaluate", cfg, tags={"data_hash": _manifest_hash(cfg.clips)}, track=track) as run:
        pred = predict(models, dataset, batch_size=cfg.batch_size, device=device)
        probs = pred["probs"].mean(axis=0)  # ensemble = average of softmax
        metrics = score(probs, pred["labels"], pred["video_ids"], dataset.classes)
        if len(models) > 1:
            metrics["members"] = {p: score(pr, pred["labels"], pred["video_ids"], dataset.classes)["top1"]
                                  for p, pr in zip(paths, pred["probs"])}
        metrics["checkpoints"] = paths
        metrics["split"] = cfg.split
        metrics["data_hash"] = _manifest_hash(cfg.clips)
        title = " + ".join(info["name"] + f" ({info['extra'].get('modality', 'rgb')})" for _, info in loaded)
        files = write_report(metrics, cfg.out, title=title)
        run.log_metrics(_numeric({k: metrics[k] for k in ("top1", "top5", "mAP", "mean_class_accuracy")}))
        run.log_artifacts(cfg.out)
    metrics["files"] = {k: str(v) for k, v in files.items()}
    return metrics


def export(cfg: ExportConfig, *, track: bool = True) -> dict[str, Any]:
    """Student -> `model.onnx` (dynamic batch, fixed T), parity-checked on random and evaluation clips.

    Raises `ExportError` (nothing is registered) when ONNX Runtime and PyTorch disagree by more than
    `atol` or on any top-1 prediction.
    """
    cfg.validate()
    import torch

    from vidistill.data import ClipDataset
    from vidistill.export.onnx import ExportError, check_parity, export_onnx
    from vidistill.train import load_model

    model, info = load_model(cfg.model)
    test = ClipDataset(cfg.clips, "test")
    if test.classes != info["classes"]:
        raise ValueError(f"{cfg.model} was trained on {info['classes']} but {cfg.clips} has {test.classes}")
    pre = {k: test.manifest["params"][k] for k in ("frames", "stride", "short_side", "crop", "short_policy")
           if k in test.manifest["params"]}
    with tracked("export", cfg, tags={"data_hash": _manifest_hash(cfg.clips), "method": info["extra"].get("method", "")},
                 track=track) as run:
        path = export_onnx(model, cfg.out, opset=cfg.opset, classes=info["classes"], preprocess=pre, atol=cfg.atol)
        n = min(cfg.parity_clips, len(test))
        clips = torch.stack([test[i]["rgb"] for i in range(n)])  # (n, 3, T, H, W) real evaluation clips
        parity = check_parity(model, path, clips, atol=cfg.atol)
        parity["passed"] = bool(parity["passed"] and parity["top1_agreement"] == 1.0)
        parity["opset"] = cfg.opset
        (Path(cfg.out) / "parity.json").write_text(json.dumps(parity, indent=2))
        run.log_metrics(_numeric({"parity_max_abs_diff": parity["max_abs_diff"],
                                  "parity_top1_agreement": parity["top1_agreement"]}))
        run.log_artifact(Path(cfg.out) / "parity.json")
        if not parity["passed"]:
            raise ExportError(f"ONNX parity failed on {n} evaluation clips: max_abs_diff={parity['max_abs_diff']:.3g} "
                              f"(atol {cfg.atol:g}), top-1 agreement {parity['top1_agreement']:.3f}")
    return {"onnx": str(path), "parity": parity}


def register(cfg: RegisterConfig, *, track: bool = True) -> dict[str, Any]:
    """Register `model.onnx` as a new version of `model_name` and (optionally) run the promotion gate."""
    cfg.validate()
    from vidistill.registry.models import promote, register_onnx

    onnx_dir = Path(cfg.onnx)
    for need in (onnx_dir / "model.onnx", onnx_dir / "parity.json", Path(cfg.metrics)):
        if not need.exists():
            raise FileNotFoundError(f"{need} does not exist; run `vidistill export` / `vidistill evaluate` first")
    parity = json.loads((onnx_dir / "parity.json").read_text())
    metrics = json.loads(Path(cfg.metrics).read_text())
    with tracked("register", cfg, tags={"data_hash": metrics.get("data_hash", "unknown"), "method": cfg.method},
                 track=track) as run:
        version = register_onnx(onnx_dir / "model.onnx", model_name=cfg.model_name,
                                metrics=_numeric({k: metrics[k] for k in ("top1", "top5", "mAP") if k in metrics}),
                                parity=parity, data_hash=metrics.get("data_hash", "unknown"), method=cfg.method,
                                run_id=run.run_id, classes=metrics.get("classes"))
        decision = promote(cfg.model_name, version, margin=cfg.margin, metric=cfg.metric) if cfg.promote else None
    return {"model_name": cfg.model_name, "version": version, "decision": decision}


# stage name -> (config class, function); the CLI, DVC and Kubeflow components all go through here
STAGES: dict[str, tuple[type, Any]] = {
    "prep": (PrepConfig, prep),
    "flow": (FlowConfig, flow),
    "teach": (TeachConfig, teach),
    "distill": (DistillConfig, distill),
    "evaluate": (EvaluateConfig, evaluate),
    "export": (ExportConfig, export),
    "register": (RegisterConfig, register),
}


def run(stage: str, params: dict[str, Any] | None = None, *, parent_run_id: str = "", **overrides: Any) -> dict[str, Any]:
    """Run `stage` from a params.yaml section plus dotted overrides (e.g. paths chosen by an orchestrator).

    Example: `run("distill", params["distill"], method="d3d", out="/mnt/out", **{"train.epochs": 2})`.
    `parent_run_id` nests the stage's MLflow run under a pipeline run.
    """
    import copy
    import inspect
    import os

    if parent_run_id:
        os.environ["VIDISTILL_PARENT_RUN_ID"] = parent_run_id

    from vidistill.errors import ConfigError
    from vidistill.schema import from_dict, set_dotted

    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    cls, fn = STAGES[stage]
    data = copy.deepcopy(params or {})
    for key, value in overrides.items():
        set_dotted(data, key, value)
    cfg = from_dict(cls, data, where=f"{stage}.")
    kwargs = {"progress": False} if "progress" in inspect.signature(fn).parameters else {}
    return fn(cfg, **kwargs)
