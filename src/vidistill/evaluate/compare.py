"""`vidistill bench methods`: the methods compared over several seeds, and D3D's inference cost.

Claims tested (on the synthetic motion data, whose classes differ only by motion):
* D3D beats the RGB-only student (`none`) and approaches the two-stream ensemble of the teachers;
* SD (self-distillation guided fine-tuning) beats plain fine-tuning of the same pre-trained encoder (SD with λ = 0);
* KD is the vanilla baseline.
Every number is a mean ± std over seeds; the same data (deterministic generation) is used for all.
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
    from vidistill import stages

    paths = {}
    for name, domain, seed in (("target", 0, 0), ("source", 1, 1)):
        synth = SynthConfig(out=str(work / f"raw_{name}"), domain=domain, seed=seed, videos_per_class=videos_per_class)
        cfg = PrepConfig(dataset="synthetic", root=synth.out, out=str(work / f"clips_{name}"), synth=synth)
        if not (Path(cfg.out) / "manifest.json").exists():
            stages.prep(cfg, progress=False, track=False)
        paths[name] = cfg.out
    flow = FlowConfig(clips=paths["target"], out=str(work / "flow"))
    if not (Path(flow.out) / "manifest.json").exists():
        stages.flow(flow, progress=False, track=False)
    paths["flow"] = flow.out
    return paths


def run_seed(work: Path, paths: dict[str, str], seed: int, *, teacher_epochs: int, student_epochs: int,
             methods: list[str], sd_lambdas: list[float]) -> list[dict[str, Any]]:
    """Teachers, then every method, for one seed; returns one row per method."""
    from vidistill import stages

    run = work / f"seed{seed}"
    t_train = TrainConfig(epochs=teacher_epochs, seed=seed)
    s_train = TrainConfig(epochs=student_epochs, seed=seed)
    rows: list[dict[str, Any]] = []

    def teacher(modality: str, clips: str, model: str, out: str) -> dict[str, Any]:
        cfg = TeachConfig(clips=clips, flow=paths["flow"], out=str(run / out), modality=modality, model=model, train=t_train)
        return stages.teach(cfg, progress=False, track=False)

    rgb = teacher("rgb", paths["target"], "r2plus1d_teacher", "teacher_rgb")
    flow = teacher("flow", paths["target"], "r2plus1d_teacher", "teacher_flow")
    pre = teacher("rgb", paths["source"], "r2plus1d_student", "pretrain")
    two = stages.evaluate(EvaluateConfig(clips=paths["target"], flow=paths["flow"], out=str(run / "two_stream"),
                                         checkpoint=f"{rgb['model']},{flow['model']}"), track=False)
    for name, r in (("teacher rgb", rgb), ("teacher flow", flow), ("two-stream", two)):
        rows.append({"method": name, "seed": seed, **{k: r[k] for k in ("top1", "top5", "mAP")}})
    base = DistillConfig(clips=paths["target"], flow=paths["flow"], teacher_rgb=rgb["model"], teacher_flow=flow["model"],
                         pretrained=pre["model"], train=s_train)
    jobs: list[tuple[str, DistillConfig]] = []
    for m in methods:
        if m == "sd":
            for lam in sd_lambdas:
                label = "sd (λ=0, plain fine-tuning)" if lam == 0 else f"sd (λ={lam:g})"
                jobs.append((label, replace(base, method="sd", methods={"sd": {"lambda_": lam}})))
        else:
            jobs.append((m, replace(base, method=m)))
    for label, cfg in jobs:
        cfg = replace(cfg, out=str(run / "distill" / label.split()[0] / str(len(rows))))
        r = stages.distill(cfg, progress=False, track=False)
        rows.append({"method": label, "seed": seed, "train_seconds": r["train_seconds"],
                     **{k: r[k] for k in ("top1", "top5", "mAP")}})
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
        for k in ("top1", "top5", "mAP"):
            vals = np.array([r[k] for r in group], dtype=float)
            agg[k], agg[f"{k}_std"] = float(vals.mean()), float(vals.std())
        out.append(agg)
    return out


def inference_latency(teacher_rgb: str, teacher_flow: str, student: str, clips: str, *, repeats: int = 20) -> dict[str, Any]:
    """Per-clip latency (batch 1, CPU) of two-stream (TV-L1 on the clip + flow net + RGB net) vs the RGB-only student."""
    import torch

    from vidistill.data import ClipDataset
    from vidistill.flow import tvl1
    from vidistill.train import load_model

    rgb_net, _ = load_model(teacher_rgb)
    flow_net, _ = load_model(teacher_flow)
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


def bench_methods(*, work: str | Path = "outputs/bench_methods", seeds: int = 3, videos_per_class: int = 24,
                  teacher_epochs: int = 10, student_epochs: int = 10, methods: tuple[str, ...] = ("none", "kd", "d3d", "sd"),
                  sd_lambdas: tuple[float, ...] = (0.0, 100.0)) -> dict[str, Any]:
    """The comparison table (mean ± std over `seeds`) plus D3D's inference cost."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = _prepare_data(work, videos_per_class)
    rows: list[dict[str, Any]] = []
    for seed in range(seeds):
        rows += run_seed(work, paths, seed, teacher_epochs=teacher_epochs, student_epochs=student_epochs,
                         methods=list(methods), sd_lambdas=list(sd_lambdas))
        (work / "rows.json").write_text(json.dumps(rows, indent=2))
    table = aggregate(rows)
    d3d_model = next(Path(work / "seed0" / "distill" / "d3d").glob("*/model.pt"), None)
    latency = None
    if d3d_model is not None:
        latency = inference_latency(str(work / "seed0" / "teacher_rgb" / "model.pt"),
                                    str(work / "seed0" / "teacher_flow" / "model.pt"), str(d3d_model), paths["target"])
    from vidistill.evaluate.report import markdown_table

    result = {"rows": table, "per_seed": rows, "latency": latency, "seconds": time.perf_counter() - t0,
              "markdown": markdown_table(table),
              "settings": {"seeds": seeds, "videos_per_class": videos_per_class, "teacher_epochs": teacher_epochs,
                           "student_epochs": student_epochs}}
    (work / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result
