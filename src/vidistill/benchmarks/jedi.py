"""`vidistill bench jedi`: JEDI's claims on our data, over several seeds.

The paper's claims (Bicsi et al.): the students beat the initial experts (Table 2, e.g. HMDB51 73.60 -> 75.32,
UCF101 94.63 -> 95.97 top-1), and distilling on all datasets beats no distillation and single-dataset
distillation (Table 3). Here, on synthetic motion data:

* **datasets**: synthetic domains `domains` (default 0, 1, 2: 8, 6 and 6 classes, related motions, other
  looks), `videos_per_class` each, prepared once; domain `domains[0]` is the main dataset. Every training
  set is split once (`vidistill.data.multi.holdout_split`): `val_fraction` (15 %, the paper's) of each
  class's videos is a validation split that neither the experts nor JEDI train on;
* **experts**: `vidistill experts` trains one `expert_model` per dataset (cross-entropy, `expert_epochs`) on
  the other 85 % and caches the embeddings of every split. As the paper's experts (pre-trained, then fine-tuned
  with augmentation), every expert's encoder starts from a pace-pre-trained encoder of another synthetic domain
  (`expert_init: pace`, `pace_domain`) and trains with flips and crops (`expert_hflip`, `expert_crop_scale`);
  `expert_init=scratch expert_hflip=false expert_crop_scale=1` are the experts before issue 26. `expert_sets` sets of experts (seeds 0, 1, ...);
  seed s of the arms uses set `s % expert_sets`, so with one set (the default, as the paper's fixed
  experts) the seeds vary JEDI's own initialisation, dropout and batch order only;
* **learning rate**: chosen, as the paper chose its hyperparameters, on the validation split: JEDI (seed 0)
  with every value of `lrs`; the best mean student top-1 over the datasets wins and is recorded. The test
  splits are never used for it (`--set lr=...` skips the search);
* **arms** (every one on the same experts): the initial experts; `jedi` (the paper's model);
  `no_distillation` (γ = 0); `single_dataset` (each student distils on its own dataset only); `base_features`
  (the teachers read the unadjusted embeddings, Table 3's "base features").

Rows: per arm, dataset and role (student, teacher, expert), top-1 and mAP on the dataset's test split (mean ±
std over seeds). `verdict`: for every dataset, whether the JEDI student beats the initial expert and the
no-distillation student by more than the seed spread, and is at least the single-dataset student.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vidistill.errors import ConfigError

ARMS: dict[str, dict[str, Any]] = {
    "jedi": {},
    "no_distillation": {"gamma": 0.0},
    "single_dataset": {"kd_data": "own"},
    "base_features": {"ensemble_input": "base"},
}


def _prepare(work: Path, domains: Sequence[int], videos_per_class: int, val_fraction: float) -> list[str]:
    """Prep every domain once (8×56×56 clips, the `bench methods` geometry) and split off its validation part;
    returns the split prep outputs (train / val / test)."""
    from vidistill import stages
    from vidistill.config import PrepConfig, SynthConfig
    from vidistill.data.multi import holdout_split

    out = []
    for domain in domains:
        synth = SynthConfig(out=str(work / f"raw_d{domain}_{videos_per_class}"), domain=domain, seed=domain,
                            videos_per_class=videos_per_class)
        cfg = PrepConfig(dataset="synthetic", root=synth.out, out=str(work / f"clips_d{domain}_{videos_per_class}"),
                         frames=8, stride=2, synth=synth)
        if not (Path(cfg.out) / "manifest.json").exists():
            stages.prep(cfg, progress=False, track=False)
        out.append(str(holdout_split(cfg.out, work / f"clips_d{domain}_{videos_per_class}_val{val_fraction:g}", val_fraction)))
    return out


def _pace_encoder(work: Path, *, domain: int, videos_per_class: int, model: str, epochs: int) -> str:
    """The encoder JEDI's experts start from (the paper's are pre-trained on K400/IN-22K): `model` pre-trained by
    pace prediction (no labels) on the training videos of synthetic `domain`, one none of the JEDI datasets is,
    as whole 24-frame clips (the pretext samples 8 frames at 1x-3x speed), as `bench methods`' source encoder.
    Reused when it exists."""
    from vidistill import stages
    from vidistill.config import PrepConfig, SynthConfig, TeachConfig, TrainConfig

    synth = SynthConfig(out=str(work / f"raw_pace_d{domain}_{videos_per_class}"), domain=domain, seed=domain,
                        videos_per_class=videos_per_class)
    prep = PrepConfig(dataset="synthetic", root=synth.out, out=str(work / f"clips_pace_d{domain}_{videos_per_class}"),
                      frames=24, stride=1, synth=synth)
    if not (Path(prep.out) / "manifest.json").exists():
        stages.prep(prep, progress=False, track=False)
    out = work / f"pace_d{domain}_{videos_per_class}_{model}_{epochs}"
    if not (out / "model.pt").exists():
        stages.teach(TeachConfig(clips=prep.out, out=str(out), model=model, pretext="pace",
                                 train=TrainConfig(epochs=epochs, seed=0)), progress=False, track=False)
    return str(out / "model.pt")


def _experts(folder: Path, clips: Sequence[str], names: Sequence[str], *, model: str, epochs: int, seed: int,
             batch_size: int, pretrained: str = "", hflip: bool = False, crop_scale: float = 1.0) -> dict[str, Any]:
    """`vidistill experts` on already prepared datasets (reused when its manifest is there), the experts'
    encoders initialised from `pretrained` when given, trained with the views `hflip`, `crop_scale`."""
    from vidistill import stages
    from vidistill.config import ExpertsConfig, TrainConfig
    from vidistill.data.multi import read_experts

    if (folder / "manifest.json").exists():
        return read_experts(folder)
    cfg = ExpertsConfig(clips=clips[0], name=names[0], out=str(folder), model=model, pretrained=pretrained,
                        datasets=[{"name": n, "clips": c} for n, c in zip(names[1:], clips[1:])],
                        train=TrainConfig(epochs=epochs, seed=seed, batch_size=batch_size, hflip=hflip,
                                          crop_scale=crop_scale))
    return stages.experts(cfg, progress=False, track=False)


def _context(folder: Path) -> Any:
    from vidistill.data.multi import read_experts
    from vidistill.distill import DistillContext

    main = read_experts(folder)["datasets"][0]
    clips = json.loads((Path(main["clips"]) / "manifest.json").read_text())
    return DistillContext(num_classes=len(main["classes"]), classes=main["classes"], frames=clips["frames"],
                          size=clips["size"], experts=str(folder))


def _score(probs: np.ndarray, labels: np.ndarray, videos: np.ndarray, classes: list[str]) -> dict[str, float]:
    from vidistill.evaluate.runner import score

    s = score(probs, labels, videos, classes)
    return {"top1": float(s["top1"]), "mAP": float(s["mAP"])}


def expert_scores(folder: Path, split: str = "test") -> dict[str, dict[str, float]]:
    """The initial experts on their own `split`, from the cached embeddings and their heads (= the expert)."""
    import torch

    from vidistill.data.multi import EmbeddingSet, read_experts
    from vidistill.evaluate.metrics import softmax
    from vidistill.train import load_model

    manifest = read_experts(folder)
    test = EmbeddingSet(folder, split)
    out = {}
    for i, entry in enumerate(manifest["datasets"]):
        expert, _ = load_model(folder / entry["expert"])
        part = test.of(i)
        e = part["emb"].split(test.widths, dim=1)[i]
        with torch.no_grad():
            probs = softmax(expert.head(e).numpy())
        out[entry["name"]] = _score(probs, part["label"].numpy(), part["video_id"].numpy(), entry["classes"])
    return out


def train_arm(folder: Path, out: Path, hp: dict[str, Any], *, seed: int, batch_size: int,
              split: str = "test") -> tuple[dict[str, Any], Any]:
    """JEDI with hyperparameters `hp` on the experts of `folder`, through the method's own `train_config`,
    `train_dataset` and the training loop; returns per dataset `{"student": scores, "teacher": scores}` on the
    folder's `split` ("test" or "val"), and the history. A finished arm in `out` (same `hp`) is reused."""
    import torch

    from vidistill.config import TrainConfig
    from vidistill.data.multi import EmbeddingSet
    from vidistill.distill import get_method, method_params
    from vidistill.train import fit

    done = out / f"scores_{split}.json"
    if done.exists() and json.loads(done.read_text()).get("hp") == hp:  # an earlier, interrupted bench got this far
        saved = json.loads(done.read_text())
        return saved["scores"], saved["history"]
    cls = get_method("jedi")
    params = method_params("jedi", hp)
    ctx = _context(folder)
    train_cfg = cls.train_config(params, TrainConfig(batch_size=batch_size, seed=seed, device="cpu"))
    torch.manual_seed(seed)
    task = cls(cls.build_student(params, ctx, default=""), params, ctx)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is faster than two on a shared 2-core machine
    try:
        history = fit(task, task.train_dataset(None), train_cfg, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    result = {}
    for name, s in task.scores(EmbeddingSet(folder, split)).items():
        classes = task.entries[task.names.index(name)]["classes"]
        result[name] = {who: _score(s[who], s["labels"], s["video_ids"], classes) for who in ("student", "teacher")}
    done.write_text(json.dumps({"hp": hp, "scores": result, "history": history}))
    return result, history


def choose_lr(folder: Path, work: Path, lrs: Sequence[float], *, epochs: int, burn_in: int, batch_size: int) -> dict[str, Any]:
    """The learning rate with the best mean student top-1 over the datasets' validation splits (which neither the
    experts nor JEDI train on), JEDI seed 0 on the experts of `folder`; ties go to the smaller value."""
    trials = []
    for lr in sorted(lrs):
        scores, history = train_arm(folder, work / f"lr{lr:g}", {"lr": lr, "epochs": epochs, "burn_in": burn_in}, seed=0,
                                    batch_size=batch_size, split="val")
        trials.append({"lr": lr, "val_student_top1": float(np.mean([s["student"]["top1"] for s in scores.values()])),
                       **{f"val_{n}_{who}_top1": s[who]["top1"] for n, s in scores.items() for who in ("student", "teacher")},
                       "train_acc": history[-1].get("train_acc")})
    best = max(trials, key=lambda t: (t["val_student_top1"], -t["lr"]))
    return {"lr": best["lr"], "trials": trials, "experts_val": expert_scores(folder, "val")}


def _aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys: list[tuple[str, str, str]] = []
    for r in rows:
        k = (r["arm"], r["dataset"], r["role"])
        if k not in keys:
            keys.append(k)
    out = []
    for arm, dataset, role in keys:
        group = [r for r in rows if (r["arm"], r["dataset"], r["role"]) == (arm, dataset, role)]
        agg: dict[str, Any] = {"arm": arm, "dataset": dataset, "role": role, "seeds": len(group)}
        for m in ("top1", "mAP"):
            vals = np.array([r[m] for r in group])
            agg[m], agg[f"{m}_std"] = float(vals.mean()), float(vals.std())
        out.append(agg)
    return out


def verdict(table: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per dataset: JEDI's student against the initial expert, no distillation and single-dataset KD (top-1)."""
    get = {(r["arm"], r["dataset"], r["role"]): r for r in table}
    out = {}
    for (arm, dataset, role), r in get.items():
        if (arm, role) != ("jedi", "student"):
            continue
        v: dict[str, Any] = {"jedi_student_top1": r["top1"]}
        for other, role_other, key in (("experts", "expert", "beats_experts"), ("no_distillation", "student", "beats_no_distillation")):
            o = get.get((other, dataset, role_other))
            if o:
                spread = max(r["top1_std"], o["top1_std"])
                v[key] = bool(r["top1"] - o["top1"] > spread)
                v[f"{key}_by"] = r["top1"] - o["top1"]
        single = get.get(("single_dataset", dataset, "student"))
        if single:
            v["at_least_single_dataset"] = bool(r["top1"] >= single["top1"])
        out[dataset] = v
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| arm | dataset | role | top1 | mAP | seeds |", "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['arm']} | {r['dataset']} | {r['role']} | {r['top1']:.3f} ± {r['top1_std']:.3f} | "
                     f"{r['mAP']:.3f} ± {r['mAP_std']:.3f} | {r['seeds']} |")
    return "\n".join(lines)


def bench_jedi(*, work: str | Path = "outputs/bench_jedi", seeds: int = 3, videos_per_class: int = 24,
               domains: tuple[int, ...] = (0, 1, 2), expert_model: str = "r2plus1d_student", expert_epochs: int = 15,
               expert_sets: int = 1, epochs: int = 500, burn_in: int = 25, lrs: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2),
               lr: float = 0.0, val_fraction: float = 0.15, batch_size: int = 32, expert_batch_size: int = 16,
               arms: tuple[str, ...] = ("jedi", "no_distillation", "single_dataset", "base_features"),
               expert_init: str = "pace", pace_domain: int = 3, pace_epochs: int = 30, expert_hflip: bool = True,
               expert_crop_scale: float = 0.5) -> dict[str, Any]:
    """The JEDI comparison (see the module docstring).

    Args:
        work: where data, experts, runs and `result.json` go (data, experts and finished arms are reused).
        seeds: seeds of the arms (the data is the same for all).
        videos_per_class: synthetic videos per class of every domain.
        domains: the synthetic domains, the main one first.
        expert_model: every expert's preset.
        expert_epochs: epochs of every expert.
        expert_sets: sets of experts (seeds 0..expert_sets-1); arm seed s uses set s % expert_sets.
        epochs: JEDI's epochs (the paper's 500).
        burn_in: epochs without the KD term (the paper's 25).
        lrs: the learning rates tried on the validation split.
        lr: > 0: use it and skip the search.
        val_fraction: the validation part of every training set (the paper's 15 %).
        batch_size: embeddings per JEDI step (the paper does not give its batch size).
        expert_batch_size: clips per step of the experts' training.
        arms: which of `ARMS` to train besides the initial experts.
        expert_init: "pace": every expert's encoder starts from a pace-pre-trained encoder (`_pace_encoder`, the
            paper's experts are pre-trained); "scratch": random (the runs before issue 26, whose experts memorised
            their training clips).
        pace_domain: the synthetic domain of the pace pre-training (none of `domains`).
        pace_epochs: epochs of the pace pre-training.
        expert_hflip, expert_crop_scale: the experts' training views (the paper fine-tunes them with
            augmentation; JEDI itself trains on embeddings cached without).

    Raises:
        ConfigError: a bad setting, refused before any work.
    """
    from vidistill.config import TeachConfig, TrainConfig
    from vidistill.distill import method_params

    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ConfigError(f"unknown arm(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(ARMS)}")
    if len(set(domains)) < 2 or min(domains) < 0:
        raise ConfigError(f"domains must name at least two different synthetic domains >= 0, got {domains}")
    if min(seeds, expert_sets, expert_epochs) < 1 or videos_per_class < 4:
        raise ConfigError(f"seeds, expert_sets and expert_epochs must be >= 1 and videos_per_class >= 4, got {seeds}, "
                          f"{expert_sets}, {expert_epochs}, {videos_per_class}")
    if not 0 < val_fraction < 0.5:
        raise ConfigError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    if lr <= 0 and not lrs:
        raise ConfigError("give learning rates to try (lrs=1e-4,1e-3) or one to use (lr=1e-3)")
    if expert_init not in ("pace", "scratch"):
        raise ConfigError(f"expert_init must be 'pace' or 'scratch', got {expert_init!r}")
    if expert_init == "pace" and (pace_domain in domains or pace_domain < 0 or pace_epochs < 1):
        raise ConfigError(f"pace_domain must be a synthetic domain >= 0 that is not one of the JEDI datasets {domains} "
                          f"and pace_epochs >= 1, got {pace_domain}, {pace_epochs}")
    TrainConfig(hflip=expert_hflip, crop_scale=expert_crop_scale).validate()
    for value in (lr,) if lr > 0 else lrs:
        for arm in arms:
            method_params("jedi", {**ARMS[arm], "lr": value, "epochs": epochs, "burn_in": burn_in})
    TeachConfig(model=expert_model, train=TrainConfig(epochs=expert_epochs, batch_size=expert_batch_size)).validate()
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    names = [f"d{d}" for d in domains]
    clips = _prepare(work, domains, videos_per_class, val_fraction)
    pretrained = _pace_encoder(work, domain=pace_domain, videos_per_class=videos_per_class, model=expert_model,
                               epochs=pace_epochs) if expert_init == "pace" else ""
    variant = "" if expert_init == "scratch" and not expert_hflip and expert_crop_scale == 1 else \
        f"_{expert_init}{'_flip' if expert_hflip else ''}_crop{expert_crop_scale:g}"  # scratch, no views: the old folders
    folders = [work / f"experts{e}{variant}" for e in range(expert_sets)]
    for e, folder in enumerate(folders):
        _experts(folder, clips, names, model=expert_model, epochs=expert_epochs, seed=e, batch_size=expert_batch_size,
                 pretrained=pretrained, hflip=expert_hflip, crop_scale=expert_crop_scale)
    seconds = {"data_and_experts": time.perf_counter() - t0}
    search = None
    if lr <= 0:
        t = time.perf_counter()
        search = choose_lr(folders[0], work / "lr_search", lrs, epochs=epochs, burn_in=burn_in, batch_size=batch_size)
        lr = search["lr"]
        seconds["lr_search"] = time.perf_counter() - t
    rows: list[dict[str, Any]] = []
    arm_seconds: dict[str, list[float]] = {}
    for seed in range(seeds):
        folder = folders[seed % expert_sets]
        for name, s in expert_scores(folder).items():
            rows.append({"arm": "experts", "dataset": name, "role": "expert", "seed": seed, **s})
        for arm in arms:
            t = time.perf_counter()
            hp = {**ARMS[arm], "lr": lr, "epochs": epochs, "burn_in": burn_in}
            scores, _ = train_arm(folder, work / f"seed{seed}" / arm, hp, seed=seed, batch_size=batch_size)
            arm_seconds.setdefault(arm, []).append(time.perf_counter() - t)
            for name, s in scores.items():
                rows += [{"arm": arm, "dataset": name, "role": role, "seed": seed, **s[role]} for role in ("student", "teacher")]
        (work / "rows.json").write_text(json.dumps(rows, indent=2))
    table = _aggregate(rows)
    seconds["arms"] = sum(sum(v) for v in arm_seconds.values())
    result = {"rows": table, "per_seed": rows, "lr": lr, "lr_search": search, "verdict": verdict(table),
              "arm_seconds": {a: float(np.mean(v)) for a, v in arm_seconds.items()}, "stage_seconds": seconds,
              "seconds": time.perf_counter() - t0, "markdown": markdown(table),
              "settings": {"seeds": seeds, "videos_per_class": videos_per_class, "domains": list(domains),
                           "expert_model": expert_model, "expert_epochs": expert_epochs, "expert_sets": expert_sets,
                           "epochs": epochs, "burn_in": burn_in, "lrs": list(lrs), "val_fraction": val_fraction,
                           "batch_size": batch_size, "expert_batch_size": expert_batch_size, "arms": list(arms),
                           "expert_init": expert_init, "pace_domain": pace_domain, "pace_epochs": pace_epochs,
                           "expert_hflip": expert_hflip, "expert_crop_scale": expert_crop_scale}}
    (work / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result
