"""`make demo`: the main job on this machine, end to end on the synthetic motion dataset."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vidistill.config import EvaluateConfig, PrepConfig, SynthConfig, TeachConfig, TrainConfig

# profile -> sizes. `demo` finishes in a few minutes on 2 CPU cores; `large` is for a GPU machine.
PROFILES: dict[str, dict[str, Any]] = {
    "tiny": {"videos_per_class": 6, "teacher_epochs": 2},
    "demo": {"videos_per_class": 24, "teacher_epochs": 10},
    "large": {"videos_per_class": 80, "teacher_epochs": 30},
}


def run_demo(*, profile: str = "demo", workdir: Path = Path("."), track: bool = True) -> dict[str, Any]:
    """Synthetic videos -> prep -> RGB teacher -> evaluation, with a printed summary."""
    from vidistill import stages

    p = PROFILES[profile]
    data = workdir / "data"
    runs = workdir / "runs"
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        print(f"\n== {name}")
        result = fn(*args, **kwargs)
        timings[name] = time.perf_counter() - t
        return result

    synth = SynthConfig(out=str(data / "raw" / "synthetic"), videos_per_class=p["videos_per_class"])
    prep_cfg = PrepConfig(dataset="synthetic", root=synth.out, out=str(data / "clips"), synth=synth)
    prep = timed("prep", stages.prep, prep_cfg, track=track)
    teach_cfg = TeachConfig(clips=prep_cfg.out, out=str(runs / "teacher_rgb"),
                            train=TrainConfig(epochs=p["teacher_epochs"]))
    teacher = timed("teach rgb", stages.teach, teach_cfg, track=track)
    ev = timed("evaluate", stages.evaluate, EvaluateConfig(clips=prep_cfg.out, checkpoint=teacher["model"],
                                                          out=str(runs / "teacher_rgb" / "eval")), track=track)
    total = time.perf_counter() - t0

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vidistill demo ({profile} profile, {total:.0f} s)")
    for col in ("stage", "result", "seconds"):
        table.add_column(col)
    splits = ", ".join(f"{k} {v['clips']} clips" for k, v in prep["splits"].items())
    table.add_row("prep", f"{splits}; {len(prep['skipped'])} skipped", f"{timings['prep']:.1f}")
    table.add_row("teach rgb", f"train acc {teacher['history'][-1]['train_acc']:.3f}", f"{timings['teach rgb']:.1f}")
    table.add_row("evaluate", f"top1 {ev['top1']:.3f}  top5 {ev['top5']:.3f}  mAP {ev['mAP']:.3f}",
                  f"{timings['evaluate']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"metrics: {ev['files']['metrics']}\nconfusion matrix: {ev['files']['confusion']}")
    if track:
        console.print("runs recorded in MLflow: `.venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db` "
                      "then open http://127.0.0.1:5000")
    summary = {"profile": profile, "seconds": total, "timings": timings, "top1": ev["top1"], "top5": ev["top5"],
               "mAP": ev["mAP"]}
    (runs / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
