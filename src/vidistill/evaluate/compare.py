"""`vidistill bench methods`: the methods compared over several seeds, and D3D's inference cost.

Claims tested (on the synthetic motion data, whose classes differ only by motion):
* D3D beats the RGB-only student (`none`) and approaches the two-stream network of the same size
  (the RGB-only student and the temporal stream, softmax-averaged);
* SD (self-distillation guided fine-tuning) beats plain fine-tuning of the same pre-trained encoder (SD with λ = 0);
* KD is the vanilla baseline.
Every number is a mean ± std over seeds; the same data (deterministic generation) is used for all. Each
row also carries the last epoch's training accuracy, which tells under-fitting from over-fitting.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from vidistill.config import (
    DistillConfig,
    EvaluateConfig,
    FlowConfig,
    PrepConfig,
    SynthConfig,
    TeachConfig,
    TrainConfig,
)


def _prepare_data(work: Path, videos_per_class: int) -> dict[str, str]:
    """Target clips (domain 0) with their flow, and source clips (domain 1) as whole 24-frame videos, which
    the pace pretext samples at several speeds (the supervised source pre-training takes them as they are)."""
    from vidistill import stages

    paths = {}
    for name, domain, seed, frames, stride in (("target", 0, 0, 8, 2), ("source", 1, 1, 24, 1)):
        synth = SynthConfig(out=str(work / f"raw_{name}_{videos_per_class}"), domain=domain, seed=seed,
                            videos_per_class=videos_per_class)
        cfg = PrepConfig(dataset="synthetic", root=synth.out, out=str(work / f"clips_{name}_{videos_per_class}"),
                         frames=frames, stride=stride, synth=synth)
        if not (Path(cfg.out) / "manifest.json").exists():
            stages.prep(cfg, progress=False, track=False)
        paths[name] = cfg.out
    flow = FlowConfig(clips=paths["target"], out=str(work / f"flow_{videos_per_class}"))
    if not (Path(flow.out) / "manifest.json").exists():
        stages.flow(flow, progress=False, track=False)
    paths["flow"] = flow.out
    return paths


def _row(label: str, seed: int, result: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One table row: test metrics, plus the last epoch's training accuracy and loss terms when trained."""
    row = {"method": label, "seed": seed, **{k: result[k] for k in ("top1", "top5", "mAP")}, **extra}
    last = (result.get("history") or [{}])[-1]
    for k in ("train_acc", "distill", "sd"):
        if k in last:
            row[k] = last[k]
    return row


def method_jobs(methods: list[str], d3d_lambdas: list[float], sd_lambdas: list[float],
                sd_running_lambdas: list[float]) -> list[tuple[str, str, dict[str, Any]]]:
    """(row label, method key, its hyperparameters) for every student the comparison trains."""
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    for m in methods:
        if m == "d3d":
            jobs += [(f"d3d (λ={lam:g})", "d3d", {"lambda_": lam}) for lam in d3d_lambdas]
        elif m == "sd":
            jobs += [("sd (λ=0: plain fine-tuning)" if lam == 0 else f"sd (λ={lam:g})", "sd", {"lambda_": lam})
                     for lam in sd_lambdas]
            jobs += [(f"sd (λ={lam:g}, running-statistics snapshot)", "sd", {"lambda_": lam, "snapshot_norm": "running"})
                     for lam in sd_running_lambdas]
        else:
            jobs.append((m, m, {}))
    return jobs


def run_seed(work: Path, paths: dict[str, str], seed: int, *, teacher_epochs: int, student_epochs: int,
             rgb_teacher: str, flow_teacher: str, sd_pretext: str,
             jobs: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Teachers, then every student, for one seed; returns one row per model or ensemble."""
    from vidistill import stages

    run = work / f"seed{seed}"
    t_train = TrainConfig(epochs=teacher_epochs, seed=seed)
    s_train = TrainConfig(epochs=student_epochs, seed=seed)
    rows: list[dict[str, Any]] = []

    def teacher(modality: str, clips: str, model: str, out: str, pretext: str = "none") -> dict[str, Any]:
        cfg = TeachConfig(clips=clips, flow=paths["flow"], out=str(run / out), modality=modality, model=model,
                          pretext=pretext, train=t_train)
        return stages.teach(cfg, progress=False, track=False)

    def ensemble(label: str, models: list[str], out: str) -> None:
        r = stages.evaluate(EvaluateConfig(clips=paths["target"], flow=paths["flow"], out=str(run / out),
                                           checkpoint=",".join(models)), track=False)
        rows.append(_row(label, seed, r))

    rgb = teacher("rgb", paths["target"], rgb_teacher, "teacher_rgb")
    flow = teacher("flow", paths["target"], flow_teacher, "teacher_flow")
    pre = teacher("rgb", paths["source"], "r2plus1d_student", "pretrain", pretext=sd_pretext)
    rows.append(_row(f"teacher rgb ({rgb_teacher})", seed, rgb))
    rows.append(_row(f"teacher flow ({flow_teacher} on TV-L1)", seed, flow))
    rows.append(_row(f"sd's source encoder ({'pace prediction' if sd_pretext == 'pace' else 'source classes'}, "
                     "its own task on source test clips)", seed, pre))
    ensemble("two-stream: teacher rgb + teacher flow", [rgb["model"], flow["model"]], "two_stream_teachers")
    base = DistillConfig(clips=paths["target"], flow=paths["flow"], teacher_rgb=rgb["model"], teacher_flow=flow["model"],
                         pretrained=pre["model"], train=s_train)
    for i, (label, key, hp) in enumerate(jobs):
        cfg = replace(base, method=key, methods={key: hp} if hp else {}, out=str(run / "distill" / f"{i:02d}_{key}"))
        r = stages.distill(cfg, progress=False, track=False)
        rows.append(_row(label, seed, r, train_seconds=r["train_seconds"]))
        if key == "none":  # the two-stream network at the student's size: RGB-only student + flow stream
            ensemble("two-stream: none + teacher flow", [r["model"], flow["model"]], "two_stream_student")
    return rows


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std (population over seeds) per method, in first-seen order."""
    order: list[str] = []
    for r in rows:
        if r["method"] not in order:
            order.append(r["method"])
    out = []
    for m in order:
        group = [r for r in rows if r["method"] == m]
        agg: dict[str, Any] = {"method": m, "seeds": len(group)}
        for k in ("top1", "top5", "mAP", "train_acc"):
            vals = np.array([r[k] for r in group if k in r], dtype=float)
            if len(vals):
                agg[k], agg[f"{k}_std"] = float(vals.mean()), float(vals.std())
        out.append(agg)
    return out


def inference_latency(rgb_stream: str, flow_stream: str, student: str, clips: str, *, repeats: int = 20) -> dict[str, Any]:
    """Per-clip latency (batch 1, CPU) of two-stream (TV-L1 on the clip + flow net + RGB net) vs the RGB-only student."""
    import torch

    from vidistill.data import ClipDataset
    from vidistill.flow import tvl1
    from vidistill.train import load_model

    rgb_net, _ = load_model(rgb_stream)
    flow_net, _ = load_model(flow_stream)
    student_net, _ = load_model(student)
    clip = ClipDataset(clips, "test")[0]["rgb"]  # (3, T, H, W) in [0, 1]
    frames = (clip.permute(1, 2, 3, 0).numpy() * 255).astype(np.uint8)  # (T, H, W, 3)

    def two_stream() -> None:
        f = tvl1(frames[:-1], frames[1:])  # (T-1, 2, H, W)
        x_flow = torch.from_numpy(f).permute(1, 0, 2, 3)[None]  # (1, 2, T-1, H, W)
        with torch.no_grad():
            p = rgb_net(clip[None])[0].softmax(1) + flow_net(x_flow)[0].softmax(1)
        p.argmax(1)

    def rgb_only() -> None:
        with torch.no_grad():
            student_net(clip[None])[0].argmax(1)

    def timed(fn, n: int) -> float:
        fn()  # warm-up
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts))

    # interleave the two so machine noise hits both alike
    two_ts, stu_ts = [], []
    for _ in range(3):
        two_ts.append(timed(two_stream, max(1, repeats // 5)))
        stu_ts.append(timed(rgb_only, repeats))
    two_ms, stu_ms = 1000 * float(np.median(two_ts)), 1000 * float(np.median(stu_ts))
    return {"two_stream_ms": two_ms, "student_ms": stu_ms, "speedup": two_ms / stu_ms}


def bench_methods(*, work: str | Path = "outputs/bench_methods", seeds: int = 3, videos_per_class: int = 96,
                  teacher_epochs: int = 30, student_epochs: int = 30, rgb_teacher: str = "r2plus1d_teacher",
                  flow_teacher: str = "r2plus1d_student", methods: tuple[str, ...] = ("none", "kd", "d3d", "sd"),
                  d3d_lambdas: tuple[float, ...] = (1.0, 0.1), sd_lambdas: tuple[float, ...] = (0.0, 0.1, 100.0),
                  sd_running_lambdas: tuple[float, ...] = (100.0,), sd_pretext: str = "pace") -> dict[str, Any]:
    """The comparison table (mean ± std over `seeds`) plus D3D's inference cost.

    Args:
        work: where data, models and `result.json` go (data is reused across calls).
        seeds: training seeds (the data is the same for all).
        videos_per_class: synthetic videos per class of the target (domain 0) and source (domain 1) data.
        teacher_epochs: epochs of the teachers and of the source pre-training.
        student_epochs: epochs of every student.
        rgb_teacher: architecture of the RGB teacher (`kd`).
        flow_teacher: architecture of the temporal stream (`d3d`); D3D uses the student's own
            architecture for both streams (sec. 4).
        methods: distillation methods to train (`none` is the RGB-only baseline).
        d3d_lambdas: λ of eq. 1 to train `d3d` with.
        sd_lambdas: λ of eq. 3 to train `sd` with (0 = plain fine-tuning).
        sd_running_lambdas: λ to train `sd` with once more with a running-statistics snapshot (the
            variant whose loss diverged, `SDParams.snapshot_norm`).
        sd_pretext: how the encoder `sd` fine-tunes is pre-trained on the source videos: "pace"
            (self-supervised playback-speed prediction, as the paper's RSPNet) or "none" (their class labels).
    """
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    jobs = method_jobs(list(methods), list(d3d_lambdas), list(sd_lambdas), list(sd_running_lambdas))
    from vidistill.distill import method_params

    for _, key, hp in jobs:  # refuse a bad method or hyperparameter before any work
        method_params(key, hp)
    for modality, model, pretext in (("rgb", rgb_teacher, "none"), ("flow", flow_teacher, "none"), ("rgb", "r2plus1d_student", sd_pretext)):
        TeachConfig(modality=modality, model=model, pretext=pretext).validate()
    t0 = time.perf_counter()
    paths = _prepare_data(work, videos_per_class)
    rows: list[dict[str, Any]] = []
    for seed in range(seeds):
        rows += run_seed(work, paths, seed, teacher_epochs=teacher_epochs, student_epochs=student_epochs,
                         rgb_teacher=rgb_teacher, flow_teacher=flow_teacher, sd_pretext=sd_pretext, jobs=jobs)
        (work / "rows.json").write_text(json.dumps(rows, indent=2))
    table = aggregate(rows)
    seed0 = work / "seed0"
    d3d_model = next(iter(sorted((seed0 / "distill").glob("*_d3d/model.pt"))), None)
    none_model = next(iter(sorted((seed0 / "distill").glob("*_none/model.pt"))), None)
    latency = None
    if d3d_model is not None and none_model is not None:
        latency = inference_latency(str(none_model), str(seed0 / "teacher_flow" / "model.pt"), str(d3d_model), paths["target"])
        top1 = {r["method"]: r["top1"] for r in table}
        d3d_label = next(label for label, key, _ in jobs if key == "d3d")
        latency["accuracy_vs_two_stream"] = top1[d3d_label] / max(top1["two-stream: none + teacher flow"], 1e-9)
    from vidistill.evaluate.report import markdown_table

    result = {"rows": table, "per_seed": rows, "latency": latency, "seconds": time.perf_counter() - t0,
              "markdown": markdown_table(table),
              "settings": {"seeds": seeds, "videos_per_class": videos_per_class, "teacher_epochs": teacher_epochs,
                           "student_epochs": student_epochs, "rgb_teacher": rgb_teacher, "flow_teacher": flow_teacher,
                           "sd_pretext": sd_pretext}}
    (work / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result
