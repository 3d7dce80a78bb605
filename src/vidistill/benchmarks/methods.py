"""`vidistill bench methods`: the registered methods compared over several seeds, and the inference cost.

Every registered method (`vidistill.distill.list_methods()`, plugins included) is trained on the
same data, seed by seed, next to the reference rows the benchmark itself trains:

* the RGB teacher, the flow teacher (the temporal stream) and their two-stream ensemble;
* the source encoder the methods that need `pretrained` fine-tune (pace prediction on another domain);
* for a method that declares `bench_ensembles` (e.g. `none`: `("teacher_flow",)`), its student
  softmax-averaged with those teachers (the two-stream network at the student's size);
* for a method that declares `bench_latency` (e.g. `d3d`), the per-clip latency of its RGB-only
  student against the two-stream pipeline it replaces (TV-L1 + flow network + RGB network of the
  student's architecture), and its top-1 as a fraction of the two-stream reference row.

Which hyperparameters each method trains with: its `bench_variants` (default) or a grid given with
`--set sweep.<method>.<name>=v1,v2` (every combination of the listed values). Every row carries
top-1/top-5/mAP, the last epoch's training accuracy (which tells under-fitting from over-fitting)
and every loss term the method returns (last epoch); the table gives mean ± std over seeds. The data
is generated deterministically, so it is the same for every seed.
"""

from __future__ import annotations

import itertools
import keyword
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from types import MappingProxyType
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
from vidistill.errors import ConfigError, TrainingDivergedError

# what a row keeps from the last epoch besides the loss terms (bookkeeping of the loop is dropped)
_NOT_TERMS = {"lr", "epoch", "epoch_seconds", "epoch_start_seconds", "samples", "train_acc"}
# the model files the benchmark trains, by the DistillContext field a method names in `needs`
BENCH_FILES = ("teacher_rgb", "teacher_flow", "pretrained")


def _prepare_data(work: Path, videos_per_class: int, data_seed: int = 0) -> dict[str, str]:
    """Target clips (domain 0) with their flow, and source clips (domain 1) as whole 24-frame videos, which
    the pace pretext samples at several speeds (the supervised source pre-training takes them as they are).
    `data_seed` 0 draws the videos `make demo` trains on (synthetic seeds 0 and 1); another value draws
    other videos of the same classes (seeds 2·data_seed and 2·data_seed + 1)."""
    from vidistill import stages

    paths = {}
    tag = f"{videos_per_class}" if data_seed == 0 else f"{videos_per_class}_d{data_seed}"
    for name, domain, seed, frames, stride in (("target", 0, 2 * data_seed, 8, 2), ("source", 1, 2 * data_seed + 1, 24, 1)):
        synth = SynthConfig(out=str(work / f"raw_{name}_{tag}"), domain=domain, seed=seed,
                            videos_per_class=videos_per_class)
        cfg = PrepConfig(dataset="synthetic", root=synth.out, out=str(work / f"clips_{name}_{tag}"),
                         frames=frames, stride=stride, synth=synth)
        if not (Path(cfg.out) / "manifest.json").exists():
            stages.prep(cfg, progress=False, track=False)
        paths[name] = cfg.out
    flow = FlowConfig(clips=paths["target"], out=str(work / f"flow_{tag}"))
    if not (Path(flow.out) / "manifest.json").exists():
        stages.flow(flow, progress=False, track=False)
    paths["flow"] = flow.out
    return paths


def _progress(seed: int, label: str, result: dict[str, Any], seconds: float) -> None:
    """One line on stderr per trained model (the benchmark runs for about an hour)."""
    import sys

    what = f"diverged: {result['diverged']}" if "diverged" in result else f"top-1 {result['top1']:.3f}"
    print(f"[bench methods] seed {seed}: {label}: {what} ({seconds:.0f} s)", file=sys.stderr, flush=True)


def _row(label: str, seed: int, result: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One table row: test metrics, plus the last epoch's training accuracy and every loss term when trained."""
    row = {"method": label, "seed": seed, **{k: result[k] for k in ("top1", "top5", "mAP")}, **extra}
    last = (result.get("history") or [{}])[-1]
    if "train_acc" in last:
        row["train_acc"] = last["train_acc"]
    row.update({f"term:{k}": v for k, v in last.items() if k not in _NOT_TERMS})
    return row


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def job_label(key: str, hp: Mapping[str, Any]) -> str:
    """`"d3d (lambda_=0.1)"`; the bare key for the method's defaults."""
    return key if not hp else f"{key} ({', '.join(f'{k}={_fmt(v)}' for k, v in hp.items())})"


def sweep_grid(key: str, grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of `grid`'s values (`{"lambda_": ["1", "0.1"]}`), typed by `key`'s `Params`.

    Raises:
        ConfigError: an unknown method or hyperparameter (the message lists the valid ones), or a
            value that does not fit the hyperparameter's type.
    """
    from vidistill.distill import get_method
    from vidistill.schema import coerce, field_default

    defaults = {f.name: field_default(f) for f in fields(get_method(key).Params)}
    # a Python keyword is spelt with a trailing underscore in Params (PEP 8): sweep.sd.lambda means lambda_
    grid = {(f"{n}_" if keyword.iskeyword(n) and f"{n}_" in defaults else n): v for n, v in grid.items()}
    names = list(grid)
    for name in names:
        if name not in defaults:
            raise ConfigError(f"unknown hyperparameter sweep.{key}.{name}; {key}'s are: {', '.join(defaults) or 'none'}")
    typed = [[coerce(v, defaults[n], f"sweep.{key}.{n}") for v in (grid[n] if isinstance(grid[n], (list, tuple)) else [grid[n]])]
             for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*typed)]


def method_jobs(methods: Sequence[str], sweep: Mapping[str, Mapping[str, Sequence[Any]]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(row label, method key, its hyperparameters) for every student the comparison trains: each method's
    `bench_variants` (one run with its defaults when it has none), or the grid `sweep[key]` when given."""
    from vidistill.distill import get_method

    unknown = sorted(set(sweep) - set(methods))
    if unknown:
        raise ConfigError(f"sweep names method(s) {', '.join(unknown)} that this comparison does not train; "
                          f"methods: {', '.join(methods)}")
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    for key in methods:
        cls = get_method(key)
        variants = sweep_grid(key, sweep[key]) if key in sweep else [dict(v) for v in cls.bench_variants] or [{}]
        jobs += [(job_label(key, hp), key, hp) for hp in variants]
    return jobs


def run_seed(work: Path, paths: dict[str, str], seed: int, *, teacher_epochs: int, student_epochs: int,
             rgb_teacher: str, flow_teacher: str, source_pretext: str,
             jobs: list[tuple[str, str, dict[str, Any]]], student_videos_per_class: int = 0,
             hflip: bool = False, crop_scale: float = 1.0) -> list[dict[str, Any]]:
    """Teachers, then every student, for one seed; returns one row per model or ensemble.

    The seed sets the training seed of every network and the draw of the students' video subset
    (`student_subset_seed`), so the spread over seeds covers which videos a student is labelled with.
    The training views (`hflip`, `crop_scale`) apply to the teachers and the students alike; the source
    encoder's pretext pre-training takes none."""
    from vidistill import stages
    from vidistill.distill import get_method

    run = work / f"seed{seed}"
    views = {"hflip": hflip, "crop_scale": crop_scale}
    t_train = TrainConfig(epochs=teacher_epochs, seed=seed, **views)
    s_train = TrainConfig(epochs=student_epochs, seed=seed, **views)
    pre_train = TrainConfig(epochs=teacher_epochs, seed=seed)
    rows: list[dict[str, Any]] = []

    def teacher(modality: str, clips: str, model: str, out: str, pretext: str = "none") -> dict[str, Any]:
        cfg = TeachConfig(clips=clips, flow=paths["flow"], out=str(run / out), modality=modality, model=model,
                          pretext=pretext, train=t_train if pretext == "none" else pre_train)
        t0 = time.perf_counter()
        result = stages.teach(cfg, progress=False, track=False)
        _progress(seed, out, result, time.perf_counter() - t0)
        return result

    def ensemble(label: str, models: list[str], out: str) -> None:
        r = stages.evaluate(EvaluateConfig(clips=paths["target"], flow=paths["flow"], out=str(run / out),
                                           checkpoint=",".join(models)), track=False)
        rows.append(_row(label, seed, r))

    rgb = teacher("rgb", paths["target"], rgb_teacher, "teacher_rgb")
    flow = teacher("flow", paths["target"], flow_teacher, "teacher_flow")
    pre = teacher("rgb", paths["source"], "r2plus1d_student", "pretrain", pretext=source_pretext)
    files = {"teacher_rgb": rgb["model"], "teacher_flow": flow["model"], "pretrained": pre["model"]}
    rows.append(_row(f"teacher rgb ({rgb_teacher})", seed, rgb))
    rows.append(_row(f"teacher flow ({flow_teacher} on TV-L1)", seed, flow))
    rows.append(_row(f"source encoder ({'pace prediction' if source_pretext == 'pace' else 'source classes'}, "
                     "its own task on source test clips)", seed, pre))
    ensemble("two-stream: teacher rgb + teacher flow", [rgb["model"], flow["model"]], "two_stream_teachers")
    base = DistillConfig(clips=paths["target"], flow=paths["flow"], train=s_train,
                         student_videos_per_class=student_videos_per_class, student_subset_seed=seed, **files)
    for i, (label, key, hp) in enumerate(jobs):
        cfg = replace(base, method=key, methods={key: hp} if hp else {}, out=str(run / "distill" / f"{i:02d}_{key}"))
        t0 = time.perf_counter()
        try:
            r = stages.distill(cfg, progress=False, track=False)
        except TrainingDivergedError as e:  # a finding, not a crash: the row says where the loss broke
            rows.append({"method": label, "seed": seed, "diverged": str(e).splitlines()[0]})
            _progress(seed, label, rows[-1], time.perf_counter() - t0)
            continue
        _progress(seed, label, r, time.perf_counter() - t0)
        rows.append(_row(label, seed, r, train_seconds=r["train_seconds"], model=r["model"]))
        with_teachers = get_method(key).bench_ensembles
        if with_teachers:  # e.g. the RGB-only student + the flow stream: the two-stream network at the student's size
            kind = "two-stream" if "teacher_flow" in with_teachers else "ensemble"
            names = " + ".join(t.replace("_", " ") for t in with_teachers)
            ensemble(f"{kind}: {label} + {names}", [r["model"], *(files[t] for t in with_teachers)],
                     f"ensemble_{i:02d}_{key}")
    return rows


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std (population over seeds) of every number per method (metrics, loss terms, seconds),
    in first-seen order; `seeds` counts the seeds that trained, `diverged` those whose loss became NaN/inf
    (a method that diverged on every seed has no metrics)."""
    order: list[str] = []
    for r in rows:
        if r["method"] not in order:
            order.append(r["method"])
    out = []
    for m in order:
        group = [r for r in rows if r["method"] == m and "diverged" not in r]
        agg: dict[str, Any] = {"method": m, "seeds": len(group)}
        diverged = sum(1 for r in rows if r["method"] == m and "diverged" in r)
        if diverged:  # the seeds whose loss became NaN/inf are counted, not averaged
            agg["diverged"] = diverged
        keys = dict.fromkeys(k for r in group for k, v in r.items()
                             if k != "seed" and isinstance(v, (int, float)) and not isinstance(v, bool))
        for k in keys:
            vals = np.array([r[k] for r in group if k in r], dtype=float)
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


GATE_MARGIN = 0.10  # top-1 a teacher must have over `none` before distilling from it can pay (issue #12)


def regime_gates(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The regime's gates from the aggregated rows: can distillation pay in this setting at all?

    * KD family: RGB teacher top-1 >= `none` + 0.10 (the teacher knows more than the student);
    * D3D: flow teacher (temporal stream) top-1 >= `none` + 0.10;
    * SD: the fine-tuned pre-trained encoder (`sd` at λ = 0) >= `none` (scratch).

    A gate whose rows were not trained is reported with `passed` None, never dropped.

    Returns:
        One dict per gate: `gate`, `lhs`/`rhs` (row names), `lhs_top1`, `rhs_top1` (means over seeds),
        `margin` (required), `slack` (lhs − rhs − margin; >= 0 passes) and `passed`.
    """
    top1 = {r["method"]: r["top1"] for r in table if "top1" in r}

    def find(pred) -> str | None:
        return next((m for m in top1 if pred(m)), None)

    none = find(lambda m: m == "none")
    specs = (("KD family: teacher rgb >= none + 0.10", find(lambda m: m.startswith("teacher rgb")), GATE_MARGIN),
             ("D3D: flow stream >= none + 0.10", find(lambda m: m.startswith("teacher flow")), GATE_MARGIN),
             ("SD: fine-tuned >= scratch", find(lambda m: m == "sd (lambda_=0)" or m.startswith("sd (lambda_=0,")), 0.0))
    out = []
    for gate, lhs, margin in specs:
        g: dict[str, Any] = {"gate": gate, "lhs": lhs, "rhs": none, "margin": margin, "passed": None}
        if lhs is not None and none is not None:
            slack = top1[lhs] - top1[none] - margin
            g.update(lhs_top1=top1[lhs], rhs_top1=top1[none], slack=slack, passed=bool(slack >= -1e-12))
        out.append(g)
    return out


def gates_markdown(gates: list[dict[str, Any]]) -> str:
    """The gates as a Markdown table (printed before the method rows)."""
    lines = ["| gate | top-1 | against | slack | verdict |", "|---|---|---|---|---|"]
    for g in gates:
        if g["passed"] is None:
            missing = " and ".join(n for n, v in (("its row", g["lhs"]), ("none", g["rhs"])) if v is None)
            lines.append(f"| {g['gate']} | – | – | – | not measured ({missing} not trained) |")
        else:
            lines.append(f"| {g['gate']} | {g['lhs']}: {g['lhs_top1']:.3f} | {g['rhs']}: {g['rhs_top1']:.3f} | "
                         f"{g['slack']:+.3f} | {'pass' if g['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def _latency_rows(jobs: list[tuple[str, str, dict[str, Any]]]) -> list[tuple[int, str, str]]:
    """(job number, label, key) of the first job of every method that declares `bench_latency`."""
    from vidistill.distill import get_method

    seen: set[str] = set()
    out = []
    for i, (label, key, _) in enumerate(jobs):
        if get_method(key).bench_latency and key not in seen:
            seen.add(key)
            out.append((i, label, key))
    return out


def bench_methods(*, work: str | Path = "outputs/bench_methods", seeds: int = 3, videos_per_class: int = 40,
                  teacher_epochs: int = 30, student_epochs: int = 60, rgb_teacher: str = "r2plus1d_student",
                  flow_teacher: str = "r2plus1d_student", methods: tuple[str, ...] = (),
                  sweep: Mapping[str, Mapping[str, Sequence[Any]]] = MappingProxyType({}),
                  source_pretext: str = "pace", student_videos_per_class: int = 10, hflip: bool = True,
                  crop_scale: float = 0.5, data_seed: int = 0) -> dict[str, Any]:
    """The comparison table (mean ± std over `seeds`) plus the inference cost of the `bench_latency` methods.

    The defaults are the benchmark regime of issue #12, the setting `make demo` runs (params.yaml): 40
    videos per class prepared (28 training videos per class for the teachers, 12 test), the students
    labelled with 10 of them per class, teachers of the student's size (what the RGB teacher knows more
    is data), flips with mirrored labels and random resized crops for every network. The earlier
    settings are `--set videos_per_class=96 --set student_videos_per_class=0 --set hflip=false
    --set crop_scale=1 --set rgb_teacher=r2plus1d_teacher --set student_epochs=30` (README).

    Args:
        work: where data, models and `result.json` go (data is reused across calls).
        seeds: training seeds (the data is the same for all).
        videos_per_class: synthetic videos per class of the target (domain 0) and source (domain 1) data.
        teacher_epochs: epochs of the teachers and of the source pre-training.
        student_epochs: epochs of every student.
        rgb_teacher: architecture of the RGB teacher (`teacher_rgb`).
        flow_teacher: architecture of the temporal stream (`teacher_flow`); D3D uses the student's own
            architecture for both streams (sec. 4).
        methods: the methods to train (default: every registered method whose `needs` the benchmark
            provides: `teacher_rgb`, `teacher_flow`, `pretrained`; the others are listed as skipped).
        sweep: per method, hyperparameter -> values; the method trains every combination instead of its
            `bench_variants`. From the command line: `--set sweep.d3d.lambda_=1,0.1`.
        source_pretext: how the `pretrained` encoder is pre-trained on the source videos: "pace"
            (self-supervised playback-speed prediction, as SD's RSPNet) or "none" (their class labels).
        student_videos_per_class: the students' labelled videos per class, a stratified subset of the
            target's training videos, which the teachers train on in full (`distill.student_videos_per_class`,
            the benchmark regime: the teacher knows more than the student); 0: students see them all.
            Drawn per seed (`student_subset_seed` = the seed).
        hflip: random horizontal flips (mirrored labels for direction classes) for teachers and students
            (`TrainConfig.hflip`).
        crop_scale: random resized crops with at least this fraction of the area (`TrainConfig.crop_scale`;
            1 = off).
        data_seed: 0: the synthetic videos `make demo` trains and tests on; another value: other videos of
            the same classes (a check, on data no setting was chosen on, of what the demo's data showed).

    Raises:
        ConfigError: an unknown method, hyperparameter or value, or a method whose needs the benchmark
            cannot provide, refused before any work.
    """
    from vidistill.distill import get_method, list_methods, method_params

    work = Path(work).resolve()
    sweep = {k: dict(v) for k, v in sweep.items()}
    skipped: list[str] = []
    if methods:
        for key in methods:
            missing = [n for n in get_method(key).needs if n not in BENCH_FILES]
            if missing:
                raise ConfigError(f"bench methods cannot provide {', '.join(missing)} for {key!r}; it trains "
                                  f"{', '.join(BENCH_FILES)}; leave {key} out of --set methods=...")
    else:
        methods = tuple(k for k in list_methods() if all(n in BENCH_FILES for n in get_method(k).needs))
        skipped = [k for k in list_methods() if k not in methods]
    jobs = method_jobs(list(methods), sweep)
    for _, key, hp in jobs:  # refuse a bad method or hyperparameter before any work
        method_params(key, hp)
    if data_seed < 0:
        raise ConfigError(f"data_seed must be >= 0 (0 = the demo's videos), got {data_seed}")
    if student_videos_per_class < 0:
        raise ConfigError(f"student_videos_per_class must be >= 0 (0 = every training video), got {student_videos_per_class}")
    for modality, model, pretext in (("rgb", rgb_teacher, "none"), ("flow", flow_teacher, "none"), ("rgb", "r2plus1d_student", source_pretext)):
        TeachConfig(modality=modality, model=model, pretext=pretext).validate()
    TrainConfig(hflip=hflip, crop_scale=crop_scale).validate()
    if student_videos_per_class:  # the largest subset the data has: refused now, not after the teachers' training
        from vidistill.data.layouts import test_videos

        train_videos = videos_per_class - test_videos(videos_per_class, PrepConfig().test_fraction)
        if student_videos_per_class > train_videos:
            raise ConfigError(f"student_videos_per_class={student_videos_per_class} is more than the {train_videos} "
                              f"training videos per class that videos_per_class={videos_per_class} gives; lower it "
                              f"or raise videos_per_class (0 = every training video)")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = _prepare_data(work, videos_per_class, data_seed)
    rows: list[dict[str, Any]] = []
    for seed in range(seeds):
        rows += run_seed(work, paths, seed, teacher_epochs=teacher_epochs, student_epochs=student_epochs,
                         rgb_teacher=rgb_teacher, flow_teacher=flow_teacher, source_pretext=source_pretext, jobs=jobs,
                         student_videos_per_class=student_videos_per_class, hflip=hflip, crop_scale=crop_scale)
        (work / "rows.json").write_text(json.dumps(rows, indent=2))
    table = aggregate(rows)
    top1 = {r["method"]: r["top1"] for r in table if "top1" in r}
    reference = next((r["method"] for r in table if r["method"].startswith("two-stream: ")
                      and r["method"] != "two-stream: teacher rgb + teacher flow"), None)
    latency = []
    for i, label, key in _latency_rows(jobs):
        student = next((r["model"] for r in rows if r["method"] == label and "model" in r), None)
        if student is None:  # diverged on every seed
            continue
        cost = inference_latency(student, str(work / "seed0" / "teacher_flow" / "model.pt"), student, paths["target"])
        cost["method"] = label
        if reference is not None and label in top1:
            cost["two_stream_row"] = reference
            cost["accuracy_vs_two_stream"] = top1[label] / max(top1[reference], 1e-9)
        latency.append(cost)
    from vidistill.evaluate.report import markdown_table

    terms = sorted({k for r in table for k in r if k.startswith("term:") and not k.endswith("_std")})
    gates = regime_gates(table)
    result = {"rows": table, "per_seed": rows, "latency": latency, "seconds": time.perf_counter() - t0, "gates": gates,
              "skipped_methods": skipped,
              "markdown": gates_markdown(gates) + "\n\n" + markdown_table(table, extra_columns=terms),
              "settings": {"seeds": seeds, "videos_per_class": videos_per_class, "teacher_epochs": teacher_epochs,
                           "student_epochs": student_epochs, "rgb_teacher": rgb_teacher, "flow_teacher": flow_teacher,
                           "methods": list(methods), "sweep": sweep, "source_pretext": source_pretext,
                           "student_videos_per_class": student_videos_per_class, "hflip": hflip,
                           "crop_scale": crop_scale, "data_seed": data_seed}}
    (work / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result
