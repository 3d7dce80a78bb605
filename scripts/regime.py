"""Explore the benchmark regime of issue #12: settings in which distillation can pay.

Each *cell* is one setting of the data and the training. For every seed it trains, through the stage
functions of `vidistill.stages` (the same code `vidistill prep|flow|teach|distill|evaluate` runs):

* `teacher_rgb`: the RGB teacher, trained on its own labelled pool (the same domain and classes,
  another synthetic seed, so other videos; `teacher_vpc` videos per class) or, with `teacher_vpc: 0`,
  on the student's training videos; evaluated on the student's test split;
* `flow`: the temporal stream (`flow_model` on TV-L1 of the student's training clips);
* `none`, `kd`, `d3d` (λ = 1 and 0.1): RGB students on the student's training clips;
* `two_stream`: `none` and `flow` softmax-averaged;
* `pretrain`, `sd_0`: SD's premise: the student architecture pre-trained by pace prediction on whole
  videos of domain 1 (`source_vpc` per class, labels unread), then fine-tuned on the student's clips
  (`sd` at λ = 0), against `none` (scratch).

Every number is on the student's test split, which no setting was chosen on beyond what this log
records. Each result is appended to `<work>/results.jsonl` with the cell's settings, the seed, the wall
time and the machine's load; a row already there is not trained again (an interrupted run resumes).

Usage:
    .venv/bin/python scripts/regime.py run NAME [--set key=value ...] [--seeds 0,1,2] [--rows none,kd,...]
    .venv/bin/python scripts/regime.py data [--set key=value ...]     # prepare the data of a cell only
    .venv/bin/python scripts/regime.py table [--cells A,B]              # mean ± std per cell and row

`REGIME_THREADS` sets torch's threads (1 is faster than 2 on a 2-core machine that other jobs share).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROWS = ("teacher_rgb", "flow", "none", "kd", "d3d_1", "d3d_0.1", "two_stream", "pretrain", "sd_0")


@dataclass
class Cell:
    """One setting of the regime (every key can be given with `--set key=value`)."""

    # student data: synthetic domain 0, seed 0
    student_vpc: int = 24  # videos per class of the student's prep, split into train and test
    student_test_fraction: float = 0.3  # 0.3: 17 train + 7 test videos per class at 24; 0.575 at 40: 17 + 23
    frames: int = 24  # frames per synthetic video
    clips_train: int = 1  # clips per training video (random temporal segments: temporal jitter)
    # the RGB teacher's labelled pool: domain 0, another synthetic seed
    teacher_vpc: int = 96  # 0: the teacher trains on the student's training clips
    pool_seed: int = 100
    teacher_seed: int = -1  # training seed of the RGB teacher; -1: the row's seed (>= 0: one teacher for every student seed)
    pool_test_fraction: float = 0.1
    # appearance nuisance (SynthConfig), the same for student data and pool
    colour_jitter: float = 0.0
    mixed_looks: bool = False
    hue_drift: float = 0.0
    distractors: int = 2
    distractor_speed: float = 1.5
    # training views (TrainConfig), for teachers and students alike
    hflip: bool = False
    hflip_labels: str = "mirror"  # a flipped left/right, cw/ccw clip takes its mirror class's label (TrainConfig.hflip_labels)
    crop_scale: float = 1.0
    # training
    teacher_model: str = "r2plus1d_student"  # the teacher knows more by its data; r2plus1d_teacher costs 3.6x per clip
    flow_model: str = "r2plus1d_student"
    teacher_epochs: int = 20  # on a pool of 4x the student's videos
    flow_epochs: int = 30
    student_epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 16
    kd_tau: float = 4.0
    kd_alpha: float = 0.5
    # sd's encoder: pace prediction on whole videos of domain 1 (no labels read), then plain fine-tuning (sd, λ = 0)
    source_vpc: int = 24
    pretrain_epochs: int = 30

    def synth(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("colour_jitter", "mixed_looks", "hue_drift", "distractors", "distractor_speed")}


def _key(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def prepare(cell: Cell, work: Path, need: tuple[str, ...] = ("pool",)) -> dict[str, str]:
    """Student clips with their flow, the teacher's pool clips and sd's source clips (as `need` asks;
    cached by their settings)."""
    from vidistill import stages
    from vidistill.config import FlowConfig, PrepConfig, SynthConfig

    paths: dict[str, str] = {}
    specs = [("student", dict(vpc=cell.student_vpc, seed=0, frames=cell.frames, clips=cell.clips_train,
                              test=cell.student_test_fraction))]
    if "source" in need:
        specs.append(("source", dict(vpc=cell.source_vpc, seed=1, frames=cell.frames, clips=1, test=0.3, domain=1, stride=1,
                                     clip_frames=cell.frames)))
    if cell.teacher_vpc and "pool" in need:
        specs.append(("pool", dict(vpc=cell.teacher_vpc, seed=cell.pool_seed, frames=cell.frames, clips=cell.clips_train,
                                   test=cell.pool_test_fraction)))
    for name, s in specs:
        d = {**s, **cell.synth()}
        root = work / "data" / f"{name}_{_key(d)}"
        synth = SynthConfig(out=str(root / "raw"), domain=s.get("domain", 0), seed=s["seed"], videos_per_class=s["vpc"],
                            frames=s["frames"], **cell.synth())
        prep = PrepConfig(dataset="synthetic", root=synth.out, out=str(root / "clips"), clips_per_video_train=s["clips"],
                          test_fraction=s["test"], frames=s.get("clip_frames", 8), stride=s.get("stride", 2), synth=synth)
        if not (root / "clips" / "manifest.json").exists():
            t0 = time.perf_counter()
            stages.prep(prep, progress=False, track=False)
            (root / "settings.json").write_text(json.dumps({**d, "prep_seconds": time.perf_counter() - t0}, indent=1))
        paths[name] = prep.out
        if name == "student":
            flow = FlowConfig(clips=prep.out, out=str(root / "flow"))
            if not (root / "flow" / "manifest.json").exists():
                t0 = time.perf_counter()
                stages.flow(flow, progress=False, track=False)
                info = json.loads((root / "settings.json").read_text())
                (root / "settings.json").write_text(json.dumps({**info, "flow_seconds": time.perf_counter() - t0}, indent=1))
            paths["flow"] = flow.out
    return paths


# the settings each row depends on: a row already trained with the same ones (in any cell) is reused
_DATA = ("student_vpc", "student_test_fraction", "frames", "clips_train", "colour_jitter", "mixed_looks", "hue_drift", "distractors",
         "distractor_speed")
_TRAIN = ("hflip", "crop_scale", "lr", "batch_size")
_DEPENDS = {
    "teacher_rgb": (*_DATA, *_TRAIN, "teacher_vpc", "pool_seed", "pool_test_fraction", "teacher_model", "teacher_epochs"),
    "flow": (*_DATA, *_TRAIN, "flow_model", "flow_epochs"),
    "none": (*_DATA, *_TRAIN, "student_epochs"),
}
_DEPENDS["kd"] = (*_DEPENDS["teacher_rgb"], "student_epochs", "kd_tau", "kd_alpha")
_DEPENDS["d3d_1"] = _DEPENDS["d3d_0.1"] = (*_DEPENDS["flow"], "student_epochs")
_DEPENDS["two_stream"] = tuple(dict.fromkeys((*_DEPENDS["flow"], *_DEPENDS["none"])))
_DEPENDS["pretrain"] = ("frames", "colour_jitter", "mixed_looks", "hue_drift", "distractors", "distractor_speed", *_TRAIN,
                        "source_vpc", "pretrain_epochs")
_DEPENDS["sd_0"] = tuple(dict.fromkeys((*_DEPENDS["pretrain"], *_DEPENDS["none"])))


# what a trained model depends on where it is not trained on the student's clips: reused across student data
_MODEL = {"teacher_rgb": ("frames", "clips_train", "colour_jitter", "mixed_looks", "hue_drift", "distractors", "distractor_speed",
                          *_TRAIN, "teacher_vpc", "pool_seed", "pool_test_fraction", "teacher_model", "teacher_epochs")}


def row_key(cell: Cell, row: str, seed: int) -> str:
    """What identifies a trained row: its settings and the seed."""
    extra = {"hflip_labels": cell.hflip_labels} if cell.hflip_labels != "mirror" else {}  # rows before the knob keep their keys
    if cell.teacher_seed >= 0 and row in ("teacher_rgb", "kd"):
        extra["teacher_seed"] = cell.teacher_seed
    return _key({"row": row, "seed": seed, **{k: getattr(cell, k) for k in _DEPENDS[row]}, **extra})


def _done(work: Path, cell: Cell, seed: int) -> dict[str, dict[str, Any]]:
    """Rows already recorded with this cell's settings (in this or another cell), by row."""
    out = {}
    results = work / "results.jsonl"
    if results.exists():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            if r["seed"] == seed and r.get("key") == row_key(cell, r["row"], seed):
                out[r["row"]] = r
    return out


def _record(work: Path, name: str, cell: Cell, seed: int, row: str, result: dict[str, Any], seconds: float) -> dict[str, Any]:
    last = (result.get("history") or [{}])[-1]
    rec = {"cell": name, "seed": seed, "row": row, "key": row_key(cell, row, seed), "top1": result["top1"], "top5": result["top5"], "mAP": result["mAP"],
           "train_acc": last.get("train_acc"), "seconds": round(seconds, 1), "threads": int(os.environ.get("REGIME_THREADS", 0)),
           "load1": round(os.getloadavg()[0], 2), "settings": dataclasses.asdict(cell), "model": result.get("model", ""),
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with (work / "results.jsonl").open("a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(f"[{name} seed {seed}] {row:12s} top1 {rec['top1']:.3f}  train_acc {rec['train_acc'] if rec['train_acc'] is None else round(rec['train_acc'], 3)}"
          f"  {seconds:.0f} s  (load {rec['load1']})", flush=True)
    return rec


def run_cell(name: str, cell: Cell, work: Path, seeds: list[int], rows: list[str]) -> None:
    """Train and evaluate the requested rows of `cell` for every seed; skip rows already recorded."""
    from vidistill import stages
    from vidistill.config import DistillConfig, EvaluateConfig, TeachConfig, TrainConfig

    paths = prepare(cell, work, tuple(n for n, r in (("pool", "teacher_rgb"), ("source", "pretrain")) if r in rows))
    for seed in seeds:
        run = work / "runs" / name / f"seed{seed}"
        done = _done(work, cell, seed)
        train = dict(lr=cell.lr, batch_size=cell.batch_size, seed=seed, hflip=cell.hflip, crop_scale=cell.crop_scale)
        if cell.hflip_labels != "mirror":  # keyed only when changed: rows recorded before the knob keep their keys
            train["hflip_labels"] = cell.hflip_labels

        def model_of(row: str) -> str:
            return done[row]["model"] if row in done else ""

        for row in rows:
            if row in done:
                if done[row]["cell"] != name:  # trained in another cell with the same settings: list it here too
                    with (work / "results.jsonl").open("a") as fh:
                        fh.write(json.dumps({**done[row], "cell": name, "reused_from": done[row]["cell"]}) + "\n")
                    done[row] = {**done[row], "cell": name}
                continue
            t0 = time.perf_counter()
            if row == "teacher_rgb" and cell.teacher_vpc:  # on its pool: one model for every student data set
                t_seed = seed if cell.teacher_seed < 0 else cell.teacher_seed
                out = work / "models" / f"teacher_rgb_{_key({'seed': t_seed, **{k: getattr(cell, k) for k in _MODEL[row]}})}"
                r = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else None
                if r is None:
                    r = stages.teach(TeachConfig(clips=paths["pool"], out=str(out), model=cell.teacher_model,
                                                 train=TrainConfig(epochs=cell.teacher_epochs, **{**train, "seed": t_seed})),
                                     progress=False, track=False)
                    (out / "result.json").write_text(json.dumps(r))
                ev = stages.evaluate(EvaluateConfig(clips=paths["student"], checkpoint=r["model"], out=str(run / row / "eval_student")),
                                     track=False)
                r = {**r, **{k: ev[k] for k in ("top1", "top5", "mAP")}}
            elif row == "teacher_rgb":
                r = stages.teach(TeachConfig(clips=paths["student"], out=str(run / row), model=cell.teacher_model,
                                             train=TrainConfig(epochs=cell.teacher_epochs, **train)), progress=False, track=False)
            elif row == "flow":
                r = stages.teach(TeachConfig(clips=paths["student"], flow=paths["flow"], out=str(run / row), modality="flow",
                                             model=cell.flow_model, train=TrainConfig(epochs=cell.flow_epochs, **train)),
                                 progress=False, track=False)
            elif row == "pretrain":
                r = stages.teach(TeachConfig(clips=paths["source"], out=str(run / row), model="r2plus1d_student", pretext="pace",
                                             train=TrainConfig(epochs=cell.pretrain_epochs, **train)), progress=False, track=False)
            elif row == "two_stream":
                if not (model_of("none") and model_of("flow")):
                    continue
                r = stages.evaluate(EvaluateConfig(clips=paths["student"], flow=paths["flow"], out=str(run / row),
                                                   checkpoint=f"{model_of('none')},{model_of('flow')}"), track=False)
            else:
                method, hp = {"none": ("none", {}), "kd": ("kd", {"tau": cell.kd_tau, "alpha": cell.kd_alpha}),
                              "d3d_1": ("d3d", {"lambda_": 1.0}), "d3d_0.1": ("d3d", {"lambda_": 0.1}),
                              "sd_0": ("sd", {"lambda_": 0.0})}[row]
                need = {"kd": "teacher_rgb", "d3d": "flow", "sd": "pretrain"}.get(method)
                if need and not model_of(need):
                    print(f"[{name} seed {seed}] {row}: needs {need} first; skipped", flush=True)
                    continue
                r = stages.distill(DistillConfig(clips=paths["student"], flow=paths["flow"], out=str(run / row), method=method,
                                                 teacher_rgb=model_of("teacher_rgb"), teacher_flow=model_of("flow"),
                                                 pretrained=model_of("pretrain"),
                                                 methods={method: hp} if hp else {},
                                                 train=TrainConfig(epochs=cell.student_epochs, **train)), progress=False, track=False)
            done[row] = _record(work, name, cell, seed, row, r, time.perf_counter() - t0)


def table(work: Path, cells: list[str] | None) -> str:
    """Markdown: one line per cell and row, mean ± std over its seeds, mean train_acc and wall time."""
    import numpy as np

    recs = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    order: list[tuple[str, str]] = []
    for r in recs:
        if (cells is None or r["cell"] in cells) and (r["cell"], r["row"]) not in order:
            order.append((r["cell"], r["row"]))
    lines = ["| cell | row | top1 | train_acc | seeds | s per run |", "|---|---|---|---|---|---|"]
    for cell, row in order:
        g = [r for r in recs if r["cell"] == cell and r["row"] == row]
        top1 = np.array([r["top1"] for r in g])
        acc = [r["train_acc"] for r in g if r["train_acc"] is not None]
        lines.append(f"| {cell} | {row} | {top1.mean():.3f}" + (f" ± {top1.std():.3f}" if len(g) > 1 else "") +
                     f" | {np.mean(acc):.3f} | {len(g)} | {np.mean([r['seconds'] for r in g]):.0f} |" if acc else
                     f"| {cell} | {row} | {top1.mean():.3f}" + (f" ± {top1.std():.3f}" if len(g) > 1 else "") +
                     f" | – | {len(g)} | {np.mean([r['seconds'] for r in g]):.0f} |")
    return "\n".join(lines)


def _cell_from(sets: list[str]) -> Cell:
    from vidistill.config import from_dict

    data: dict[str, Any] = {}
    for s in sets:
        if "=" not in s:
            sys.exit(f"--set {s!r}: use key=value")
        k, v = s.split("=", 1)
        data[k] = v
    return from_dict(Cell, data, where="cell.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["run", "data", "table"])
    p.add_argument("name", nargs="?", default="")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", default="0")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--cells", default="")
    p.add_argument("--work", default="outputs/regime")
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.command == "table":
        print(table(work, [c for c in args.cells.split(",") if c] or None))
        return
    import torch

    if os.environ.get("REGIME_THREADS"):
        torch.set_num_threads(int(os.environ["REGIME_THREADS"]))
    cell = _cell_from(args.set)
    if args.command == "data":
        print(prepare(cell, work))
        return
    if not args.name:
        sys.exit("run needs a cell NAME")
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        sys.exit(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    run_cell(args.name, cell, work, [int(s) for s in args.seeds.split(",")], rows)


if __name__ == "__main__":
    main()
