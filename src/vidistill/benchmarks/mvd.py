"""`vidistill bench mvd`: MVD's claims on our motion-only (SSv2-like) synthetic data.

The paper (Wang et al., CVPR 2023, Tables 1-2) reports, for ViT-S on SSv2: MVD co-teaching 70.7 vs
the VideoMAE baseline 66.4 (C1), the video teacher 70.0 vs the image teacher 69.4 (C2), and
co-teaching above either single teacher (C3). This benchmark tests them at toy scale:

* **Unlabelled pool**: the train split of synthetic domain 0 (`videos_per_class` videos per class),
  labels never read, test videos never included (`vidistill.data.pool`).
* **Pre-training** (`vidistill teach`): an image ViT by MAE on the pool's frames, a video ViT by
  VideoMAE on the pool, and MVD students from them (co-teaching, image only, video only).
* **Fine-tuning** (`vidistill distill --method mvd`, one recipe for every arm): a labelled subset of
  the train split, `labelled_per_class` clips per class, evaluated on the whole test split.

Arms (`arms=`): `scratch` (the ViT from random weights), `videomae` (the VideoMAE video teacher
fine-tuned: the paper's baseline), `videomae_matched` (VideoMAE pre-trained for teacher + MVD epochs,
Table 7's equal-budget comparison; the wall times are reported beside it), `mvd_image`, `mvd_video`,
`mvd` (co-teaching), and `ref` (the R(2+1)D `none` student, 0.23 M parameters, same recipe).

The gate: VideoMAE must beat scratch, else masked pre-training at this budget teaches nothing and the
MVD comparisons are uninformative (the result says so). Pre-trained models are reused between calls
with the same settings (they are keyed by their settings under `work`); `pretrain_per_seed=false`
pre-trains once (seed 0) and fine-tunes with every seed, so the spread is the fine-tuning's only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from vidistill.config import DistillConfig, PrepConfig, SynthConfig, TeachConfig, TrainConfig
from vidistill.errors import ConfigError
from vidistill.train.pretext import PRETEXT_VIEWS

ARMS = ("scratch", "videomae", "videomae_matched", "mvd_image", "mvd_video", "mvd", "ref")
LABELS = {"scratch": "ViT from scratch", "videomae": "VideoMAE (fine-tuned video teacher)",
          "videomae_matched": "VideoMAE, matched epochs (teacher + MVD)", "mvd_image": "MVD, image teacher only",
          "mvd_video": "MVD, video teacher only", "mvd": "MVD co-teaching", "ref": "R(2+1)D `none` student (reference)"}
_INIT = {"scratch": "scratch", "videomae": "videomae", "videomae_matched": "videomae", "mvd_image": "mvd",
         "mvd_video": "mvd", "mvd": "mvd"}
_MVD_TEACHERS = {"mvd_image": "image", "mvd_video": "video", "mvd": "both"}


def labelled_subset(src: str | Path, dst: str | Path, per_class: int, *, seed: int = 0) -> str:
    """A prep output whose train split is `per_class` clips of each class of `src`'s train split (seeded
    choice) and whose test split is `src`'s: the small labelled fine-tuning set.

    Raises:
        ConfigError: a class of `src` has fewer than `per_class` training clips.
    """
    src, dst = Path(src), Path(dst)
    if (dst / "manifest.json").is_file():
        return str(dst)
    manifest = json.loads((src / "manifest.json").read_text())
    train = json.loads((src / "train" / "index.json").read_text())
    rng = np.random.default_rng(seed)
    keep: list[dict[str, Any]] = []
    for label in range(len(manifest["classes"])):
        rows = [e for e in train if e["label"] == label]
        if len(rows) < per_class:
            raise ConfigError(f"labelled_per_class={per_class} but class {manifest['classes'][label]!r} has "
                              f"{len(rows)} training clips; lower it or raise videos_per_class")
        keep += [rows[i] for i in sorted(rng.choice(len(rows), per_class, replace=False))]
    keep.sort(key=lambda e: (e["shard"], e["offset"]))
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)  # shards are shared by offset: the train shards stay whole, the index selects
    (tmp / "train" / "index.json").write_text(json.dumps(keep))
    manifest["splits"]["train"] = {**manifest["splits"].get("train", {}), "clips": len(keep)}
    manifest["hash"] = hashlib.sha256(f"{manifest.get('hash')}:labelled:{per_class}:{seed}".encode()).hexdigest()[:16]
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    tmp.rename(dst)
    return str(dst)


def _prepare(work: Path, videos_per_class: int, labelled_per_class: int) -> dict[str, str]:
    from vidistill import stages

    synth = SynthConfig(out=str(work / f"raw_{videos_per_class}"), domain=0, seed=0, videos_per_class=videos_per_class)
    prep = PrepConfig(dataset="synthetic", root=synth.out, out=str(work / f"clips_{videos_per_class}"), frames=8,
                      stride=2, synth=synth)
    if not (Path(prep.out) / "manifest.json").exists():
        stages.prep(prep, progress=False, track=False)
    labelled = labelled_subset(prep.out, work / f"labelled_{videos_per_class}_{labelled_per_class}", labelled_per_class)
    return {"pool": prep.out, "labelled": labelled}


def zero_prediction_loss(pool: str, pretext: str, mask_ratio: float) -> float:
    """The held-out loss of MAE/VideoMAE's trivial solution: predicting 0, the per-patch mean, for every
    masked patch (the same held-out items and fixed masks as `heldout_loss`).

    A pretext whose `heldout_loss` stays at this value has learnt nothing about the content of a patch.
    It is below 1 where the normalisation divides by more than the patch's biased standard deviation
    (VideoMAE's unbiased one: (n - 1) / n with n = 2·8·8 pixels per channel) and where patches are flat.

    Args:
        pool: a prep output (its test split is the held-out set).
        pretext: `mae` (frame `i % T` of each test clip, random masks) or `videomae` (tube masks).
        mask_ratio: the masked fraction.
    """
    import torch

    from vidistill.data import ClipDataset
    from vidistill.data.pool import FrameClips
    from vidistill.models import create_model
    from vidistill.train.loop import scan
    from vidistill.train.pretext import HELDOUT_SEED, MaskedPixels, at_masked, pixel_targets

    heldout = ClipDataset(pool, "test")
    model = "vit_video_tiny" if pretext == "videomae" else "vit_image_tiny"
    task = MaskedPixels(create_model(model, num_classes=heldout.num_classes, frames=heldout.frames, size=heldout.size),
                        mask_ratio=mask_ratio)  # only for its masks and patch size
    items = FrameClips(heldout, random_frame=False) if pretext == "mae" else heldout
    gen, total, count = torch.Generator().manual_seed(HELDOUT_SEED), 0.0, 0
    for batch in scan(items, batch_size=64, device=torch.device("cpu")):
        x = batch["rgb"]
        target = at_masked(pixel_targets(x, task.patch), task.make_mask(x.shape[0], generator=gen))
        total += float(target.pow(2).mean()) * x.shape[0]
        count += x.shape[0]
    return total / count


def _key(**settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


class _Pretrainer:
    """Runs (or reuses) the pretexts; every model lives under a directory keyed by its settings."""

    def __init__(self, work: Path, pool: str, *, lr: float, batch_size: int, warmup_fraction: float, mask: dict[str, float],
                 views: bool = True) -> None:
        self.work, self.pool, self.lr, self.batch, self.warmup, self.mask = work, pool, lr, batch_size, warmup_fraction, mask
        self.views = views
        self.log: dict[str, dict[str, Any]] = {}

    def run(self, pretext: str, model: str, epochs: int, seed: int, **extra: Any) -> dict[str, Any]:
        from vidistill import stages

        settings = {"pretext": pretext, "model": model, "epochs": epochs, "seed": seed, "lr": self.lr, "batch": self.batch,
                    "warmup": self.warmup, "mask": self.mask.get(pretext, 0.0), "pool": self.pool,
                    **({"views": PRETEXT_VIEWS[pretext]} if self.views else {}),
                    **{k: v for k, v in extra.items() if k != "image_teacher" and k != "video_teacher"},
                    **{k: Path(v).parent.name for k, v in extra.items() if k in ("image_teacher", "video_teacher")}}
        out = self.work / "pretrain" / f"{pretext}_{_key(**settings)}"
        done = out / "summary.json"
        if done.is_file():
            summary = json.loads(done.read_text())
        else:
            warmup = min(epochs - 1, round(self.warmup * epochs)) if epochs > 1 else 0
            views = PRETEXT_VIEWS[pretext] if self.views else {}
            train = TrainConfig(epochs=epochs, batch_size=self.batch, lr=self.lr, weight_decay=0.05, betas=[0.9, 0.95],
                                warmup_epochs=warmup, seed=seed, **views)
            cfg = TeachConfig(clips=self.pool, out=str(out), model=model, pretext=pretext,
                              mask_ratio=self.mask.get(pretext, 0.0), train=train, **extra)
            cfg.validate()
            r = stages.teach(cfg, progress=False, track=False)
            summary = {"model": r["model"], "seconds": r["train_seconds"], "heldout_loss": r["heldout_loss"],
                       "heldout_loss_init": r["heldout_loss_init"], "epochs": epochs, "settings": settings}
            done.write_text(json.dumps(summary, indent=2))
        self.log[out.name] = summary
        return summary


def bench_mvd(*, work: str | Path = "outputs/bench_mvd", seeds: int = 3, videos_per_class: int = 96,
              labelled_per_class: int = 17, teacher_epochs: int = 20, mvd_epochs: int = 20, finetune_epochs: int = 30,
              arms: tuple[str, ...] = ("scratch", "videomae", "mvd", "ref"), pretrain_lr: float = 1.5e-3,
              pretrain_batch: int = 32, warmup_fraction: float = 0.1, finetune_lr: float = 1e-3,
              finetune_batch: int = 16, mae_mask_ratio: float = 0.75, tube_mask_ratio: float = 0.9,
              pretrain_per_seed: bool = False, threads: int = 0, pretext_views: bool = True,
              decoder_recipe: str = "") -> dict[str, Any]:
    """The MVD comparison (mean ± std over `seeds` of top-1/top-5/mAP on the test split) and the wall times.

    Args:
        work: where data, models and `result.json` go (data and pre-trained models are reused).
        seeds: fine-tuning seeds (and pre-training seeds with `pretrain_per_seed`).
        videos_per_class: synthetic videos per class of the pool (domain 0).
        labelled_per_class: labelled training clips per class for fine-tuning (17 ≈ the 136 clips of
            the README's 24-videos-per-class table).
        teacher_epochs: MAE and VideoMAE pre-training epochs.
        mvd_epochs: MVD pre-training epochs.
        finetune_epochs: epochs of every fine-tuning run (and of `ref`).
        arms: which arms to run, of `ARMS`.
        pretrain_lr: AdamW learning rate of every pretext (β = (0.9, 0.95), weight decay 0.05, cosine).
        pretrain_batch: batch size of the pretexts.
        warmup_fraction: warm-up epochs of the pretexts as a fraction of their epochs.
        finetune_lr: AdamW learning rate of fine-tuning (cosine, weight decay 0.05, 1 warm-up epoch).
        finetune_batch: batch size of fine-tuning.
        mae_mask_ratio: MAE's random masking ratio.
        tube_mask_ratio: VideoMAE's and MVD's tube masking ratio.
        pretrain_per_seed: pre-train once per seed (True) or once for all seeds (False).
        threads: torch CPU threads (0: torch's default). On a shared, oversubscribed CPU one thread is
            faster: an MVD step of batch 32 took 3.4 s with 1 thread and 12.1 s with 2 on this 2-core VM
            at load average 11-13.
        pretext_views: the releases' pre-training views (`vidistill.train.pretext.PRETEXT_VIEWS`: MAE random
            resized crops from 20 % of the area and flips, VideoMAE/MVD multi-scale crops); False: none (the
            runs before issue 26).
        decoder_recipe: "" (2-block decoders of the encoder's width) or "release" (`teach.recipe`: each
            pretext's release decoder scaled to our widths). VideoMAE's small-data recipe is
            `decoder_recipe=release` with `tube_mask_ratio=0.75` (its decoder is the release's 4 blocks).

    Raises:
        ConfigError: an unknown arm or a bad setting, before any work.
    """
    from vidistill import stages

    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ConfigError(f"unknown arm(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARMS)}")
    if seeds < 1 or min(teacher_epochs, mvd_epochs, finetune_epochs) < 1 or labelled_per_class < 1:
        raise ConfigError("seeds, labelled_per_class and every epoch count must be >= 1")
    for ratio in (mae_mask_ratio, tube_mask_ratio):
        if not 0 < ratio < 1:
            raise ConfigError(f"mask ratios must be in (0, 1), got {ratio}")
    if threads < 0:
        raise ConfigError(f"threads must be >= 0 (0: torch's default), got {threads}")
    if decoder_recipe not in ("", "release"):
        raise ConfigError(f"decoder_recipe must be '' or 'release', got {decoder_recipe!r}")
    recipe = {"recipe": decoder_recipe} if decoder_recipe else {}
    finetune = TrainConfig(epochs=finetune_epochs, batch_size=finetune_batch, lr=finetune_lr, weight_decay=0.05)
    finetune.validate()
    TrainConfig(epochs=max(teacher_epochs, 2), batch_size=pretrain_batch, lr=pretrain_lr).validate()

    import torch

    if threads:
        torch.set_num_threads(threads)
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = _prepare(work, videos_per_class, labelled_per_class)
    pre = _Pretrainer(work, paths["pool"], lr=pretrain_lr, batch_size=pretrain_batch, warmup_fraction=warmup_fraction,
                      mask={"mae": mae_mask_ratio, "videomae": tube_mask_ratio, "mvd": tube_mask_ratio},
                      views=pretext_views)

    def encoder(arm: str, seed: int) -> tuple[str, float]:
        """The encoder file of an arm and the pre-training wall time that produced it (teachers included)."""
        s = seed if pretrain_per_seed else 0
        if arm == "scratch":
            return "", 0.0
        if arm == "videomae_matched":
            r = pre.run("videomae", "vit_video_tiny", teacher_epochs + mvd_epochs, s, **recipe)
            return r["model"], r["seconds"]
        video = pre.run("videomae", "vit_video_tiny", teacher_epochs, s, **recipe)
        if arm == "videomae":
            return video["model"], video["seconds"]
        image = pre.run("mae", "vit_image_tiny", teacher_epochs, s, **recipe)
        student = pre.run("mvd", "vit_video_tiny", mvd_epochs, s, **recipe, image_teacher=image["model"],
                          video_teacher=video["model"], mvd_teachers=_MVD_TEACHERS[arm])
        used = {"image": image["seconds"], "video": video["seconds"]}
        teachers = used.values() if arm == "mvd" else [used[_MVD_TEACHERS[arm]]]
        return student["model"], student["seconds"] + sum(teachers)

    rows: list[dict[str, Any]] = []
    for seed in range(seeds):
        for arm in arms:
            out = work / f"seed{seed}" / arm
            cfg = DistillConfig(clips=paths["labelled"], out=str(out), train=replace(finetune, seed=seed))
            if arm == "ref":
                cfg = replace(cfg, method="none", student="r2plus1d_student")
                pre_seconds = 0.0
            else:
                path, pre_seconds = encoder(arm, seed)
                cfg = replace(cfg, method="mvd", methods={"mvd": {"init": _INIT[arm]}}, mvd_encoder=path)
            r = stages.distill(cfg, progress=False, track=False)
            last = r["history"][-1]
            rows.append({"method": LABELS[arm], "arm": arm, "seed": seed, **{k: r[k] for k in ("top1", "top5", "mAP")},
                         "train_acc": last.get("train_acc"), "finetune_seconds": r["train_seconds"],
                         "pretrain_seconds": pre_seconds})
            (work / "rows.json").write_text(json.dumps(rows, indent=2))

    from vidistill.benchmarks.methods import aggregate
    from vidistill.evaluate.report import markdown_table

    table = aggregate([{k: v for k, v in r.items() if k != "arm"} for r in rows])
    top1 = {r["arm"]: float(np.mean([x["top1"] for x in rows if x["arm"] == r["arm"]])) for r in rows}
    zero = {p: zero_prediction_loss(paths["pool"], p, pre.mask[p]) for p in ("mae", "videomae")
            if any(s["settings"]["pretext"] == p for s in pre.log.values())}
    result: dict[str, Any] = {
        "rows": table, "per_seed": rows, "claims": claims(top1), "pretraining": pre.log,
        "heldout_loss_zero_prediction": zero,
        "markdown": markdown_table(table, extra_columns=("pretrain_seconds", "finetune_seconds")),
        "seconds": time.perf_counter() - t0,
        "settings": {"seeds": seeds, "videos_per_class": videos_per_class, "labelled_per_class": labelled_per_class,
                     "teacher_epochs": teacher_epochs, "mvd_epochs": mvd_epochs, "finetune_epochs": finetune_epochs,
                     "arms": list(arms), "pretrain_lr": pretrain_lr, "pretrain_batch": pretrain_batch,
                     "warmup_fraction": warmup_fraction, "finetune_lr": finetune_lr, "finetune_batch": finetune_batch,
                     "mae_mask_ratio": mae_mask_ratio, "tube_mask_ratio": tube_mask_ratio,
                     "pretrain_per_seed": pretrain_per_seed, "threads": torch.get_num_threads()}}
    (work / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def claims(top1: dict[str, float]) -> dict[str, Any]:
    """The gate and the paper's claims from the mean top-1 of each arm run (claims whose arms did not run are left out).

    * gate: VideoMAE > scratch (else the budget is too small to say anything about MVD);
    * C1: MVD co-teaching > VideoMAE; C2: video teacher only > image teacher only;
    * C3: co-teaching >= the better single teacher.
    """
    out: dict[str, Any] = {}

    def compare(name: str, a: str, b: str, *, at_least: bool = False) -> None:
        if a in top1 and b in top1:
            delta = top1[a] - top1[b]
            out[name] = {"holds": bool(delta >= 0 if at_least else delta > 0), "delta_top1": delta, a: top1[a], b: top1[b]}

    compare("gate: videomae > scratch", "videomae", "scratch")
    compare("C1: mvd > videomae", "mvd", "videomae")
    compare("C1 (matched epochs): mvd > videomae_matched", "mvd", "videomae_matched")
    compare("C2: mvd_video > mvd_image", "mvd_video", "mvd_image")
    if {"mvd", "mvd_image", "mvd_video"} <= set(top1):
        best = "mvd_video" if top1["mvd_video"] >= top1["mvd_image"] else "mvd_image"
        compare("C3: mvd >= best single teacher", "mvd", best, at_least=True)
    gate = out.get("gate: videomae > scratch")
    if gate is not None and not gate["holds"]:
        out["verdict"] = ("VideoMAE does not beat scratch: masked pre-training at this budget teaches the encoder "
                          "nothing the labels do not, so the MVD comparisons are uninformative; lengthen the pre-training")
    return out
