"""One function per pipeline stage: a validated config in, files out, a summary dict back.

These are the single edge every runner calls: the `vidistill` CLI, the DVC stages and the Kubeflow
components. Tracking happens here (never inside models or losses).

Before any work, every stage checks that it can write its output folder and takes the folder's lock
(`vidistill.outputs`): a read-only location is refused in a second, and a second process writing the
same folder is refused instead of racing the first. `teach` and `distill` also check a checkpoint
they would resume (`vidistill.train.checkpoint.plan_resume`: data, classes, model, method, teachers,
settings) before opening their MLflow run, and a resume continues the MLflow run the checkpoint was
made by (recorded in `checkpoints/run.json`), so one run holds every epoch.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vidistill.config import (
    DistillConfig,
    EvaluateConfig,
    ExpertsConfig,
    ExportConfig,
    FlowConfig,
    PrepConfig,
    RegisterConfig,
    TeachConfig,
)
from vidistill.outputs import atomic_write_text, check_writable, output_lock

RUN_RECORD = "run.json"  # in <out>/checkpoints: the MLflow run a checkpoint belongs to


class _NoTracker:
    run_id = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def log_artifacts(self, path: str | Path) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass


@contextmanager
def tracked(stage: str, cfg: Any, *, tags: dict[str, str] | None = None, track: bool = True,
            resume_run_id: str | None = None) -> Iterator[Any]:
    """An MLflow child run for `stage` (params, lineage tags); a no-op logger when `track` is off.
    `resume_run_id` continues that run (see `vidistill.registry.tracking.stage_run`)."""
    from vidistill.train.loop import is_main_process

    if not track or not is_main_process():  # under torchrun only rank 0 tracks
        yield _NoTracker()
        return
    from vidistill.registry.tracking import stage_run

    with stage_run(stage, params=asdict(cfg), tags=tags, resume_run_id=resume_run_id) as run:
        yield run


def _writing(out: str | Path, key: str) -> Any:
    """Check `out` is writable and hold its lock (rank 0 only: the other ranks of a torchrun job write nothing)."""
    from vidistill.train.loop import is_main_process

    if not is_main_process():
        return nullcontext()
    check_writable(out, key=key)
    return output_lock(out, key=key)


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

    out = Path(cfg.out)
    check_writable(out.parent, key="prep.out")  # prep writes beside the folder, then renames
    with output_lock(out, key="prep.out"), tracked("prep", cfg, track=track) as run:
        summary = run_prep(cfg, progress=progress)
        balance = summary.get("balance", {})
        run.log_metrics(_numeric({f"{s}_clips": v["clips"] for s, v in summary["splits"].items()} |
                                 {"skipped": len(summary["skipped"]), "frames_per_s": summary.get("frames_per_s", 0),
                                  "classes_without_test": len(balance.get("without_test", [])),
                                  "train_imbalance_ratio": balance.get("train_ratio", 1.0)}))
        if summary.get("warnings"):
            run.set_tags({"vidistill.warnings": " | ".join(summary["warnings"])[:5000]})
        run.log_artifact(out / "manifest.json")
    return summary


def flow(cfg: FlowConfig, *, progress: bool = True, track: bool = True) -> dict[str, Any]:
    """TV-L1 flow for every clip (`vidistill flow`)."""
    cfg.validate()
    from vidistill.flow.stage import run_flow

    with _writing(cfg.out, "flow.out"), tracked("flow", cfg, tags={"data_hash": _manifest_hash(cfg.clips)}, track=track) as run:
        summary = run_flow(cfg, progress=progress)
        run.log_metrics(_numeric(summary))
    return summary


def _train_and_evaluate(task: Any, export_model: Any, *, train_set: Any, train_cfg: Any, out: Path, clips: str,
                        flow_dir: str, resume: bool, progress: bool, run: Any, stop_after_epochs: int | None,
                        extra: dict[str, Any], eval_set: Any = None, fingerprint: dict[str, Any] | None = None,
                        heldout_loss: bool = False) -> dict[str, Any]:
    """Shared by teach and distill: fit, save `model.pt` (the module `export_model()` returns after
    training, rebuilt later from its preset name and builder arguments), loss curves, evaluate on the
    test split (`clips`, or `eval_set` when the task is not the clips' labels, or, with `heldout_loss`,
    the masked pretexts' held-out reconstruction loss instead of a classification)."""
    from vidistill.evaluate.runner import plot_curves
    from vidistill.train import fit, save_model
    from vidistill.train.loop import is_main_process

    t0 = time.perf_counter()
    history = fit(task, train_set, train_cfg, out, resume=resume, progress=progress, stop_after_epochs=stop_after_epochs,
                  on_epoch_end=lambda e, m: run.log_metrics(_numeric(m), step=e), fingerprint=fingerprint,
                  on_resume=lambda restored: _log_missing_epochs(run, restored))
    if len(history) < train_cfg.epochs or not is_main_process():  # interrupted (tests), or a worker rank
        return {"epochs_done": len(history), "out": str(out)}
    seconds = time.perf_counter() - t0
    model = export_model()
    save_model(out / "model.pt", model, classes=train_set.classes, extra={**extra, "run_id": run.run_id})
    name = model.create_kwargs["name"]
    plot_curves(history, out / "loss_curves.png", title=f"{name} " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    run.log_artifact(out / "loss_curves.png")
    if heldout_loss:  # masked pretexts: no classifier to evaluate
        return _heldout_report(task, history, out=out, run=run, seconds=seconds)
    if eval_set is None:
        result = evaluate(EvaluateConfig(clips=clips, flow=flow_dir, checkpoint=str(out / "model.pt"),
                                         out=str(out / "eval"), device=train_cfg.device), track=False)
    else:
        from vidistill.evaluate.runner import predict, score, write_report
        from vidistill.train import resolve_device

        pred = predict([model], eval_set, device=resolve_device(train_cfg.device))
        result = score(pred["probs"][0], pred["labels"], pred["video_ids"], eval_set.classes)
        write_report(result, out / "eval", title=f"{name} ({extra.get('pretext', '')})")
    run.log_metrics(_numeric({k: result[k] for k in SUMMARY_METRICS}))
    run.log_artifacts(out / "eval")
    return {"out": str(out), "model": str(out / "model.pt"), "train_seconds": seconds, "history": history,
            "run_id": run.run_id, **{k: result[k] for k in SUMMARY_METRICS}}


# what every evaluation summary shows: top-1 with mean class accuracy beside it (top-1 alone hides a model
# that always answers the majority class), top-5 and mAP
SUMMARY_METRICS = ("top1", "mean_class_accuracy", "top5", "mAP")


def _log_missing_epochs(run: Any, history: list[dict[str, float]]) -> None:
    """On resume: log the epochs the checkpoint holds but its MLflow run lacks (killed between the two writes)."""
    if run.run_id is None:
        return
    logged = {m.step for m in run.client.get_metric_history(run.run_id, "loss")}
    for entry in history:
        if int(entry["epoch"]) not in logged:
            run.log_metrics(_numeric(entry), step=int(entry["epoch"]))


def _fingerprint(train_set: Any, model: Any, clips: str, *, flow: str | None = None,
                 files: dict[str, str] | None = None, **settings: Any) -> dict[str, Any]:
    """What a training run is made of, for the resume check (`vidistill.train.checkpoint`): the data's
    content hash, the classes, the model preset with its builder arguments, the flow's settings when
    read, the content hash of each model file read (teachers, encoders), the method or task settings,
    and the library's code version."""
    from vidistill.train.checkpoint import file_sha256, library_version

    fp: dict[str, Any] = {"data_hash": _manifest_hash(clips), "classes": list(getattr(train_set, "classes", [])),
                          "model": getattr(model, "create_kwargs", {"name": type(model).__name__}), **settings}
    if flow:
        manifest = Path(flow) / "manifest.json"
        fm = json.loads(manifest.read_text()) if manifest.is_file() else {}
        fp["flow"] = {k: fm.get(k) for k in ("format", "clips_hash", "bound", "params")}
    for name, path in (files or {}).items():
        if path and Path(path).is_file():
            fp[f"{name}_sha256"] = file_sha256(path)
    fp["code"] = library_version()
    return json.loads(json.dumps(fp, sort_keys=True, default=str))  # as it reads back from the checkpoint


@contextmanager
def _training_run(stage: str, cfg: Any, *, tags: dict[str, str], track: bool,
                  fingerprint: dict[str, Any]) -> Iterator[tuple[Any, bool]]:
    """Lock `cfg.out`, decide the resume before anything starts, and open the MLflow run: the one the
    checkpoint was made by when resuming, else a new one (closing a run this folder's last writer left
    RUNNING). Yields `(run, resume)`."""
    from vidistill.train.checkpoint import CHECKPOINT, plan_resume
    from vidistill.train.loop import is_main_process

    out = Path(cfg.out)
    with _writing(out, f"{stage.split('_')[0]}.out"):
        plan = plan_resume(out / "checkpoints" / CHECKPOINT, cfg.train, fingerprint, resume=cfg.resume,
                           restart_if_stale=cfg.restart_if_stale)
        if plan.reason and is_main_process():
            print(f"[train] {plan.reason}")
        record_path = out / "checkpoints" / RUN_RECORD
        record = _read_json(record_path) if is_main_process() else {}
        resume_run = None
        if track and record.get("run_id"):
            from vidistill.registry.tracking import run_status, tracking_uri

            if record.get("tracking_uri") == tracking_uri():
                if plan.resume:
                    resume_run = record["run_id"]
                elif run_status(record["run_id"]) == "RUNNING":  # its writer is gone: this process holds the lock
                    from vidistill.registry.tracking import KILLED_TAG, client

                    client().set_tag(record["run_id"], KILLED_TAG, "a new run started in its output folder")
                    client().set_terminated(record["run_id"], status="KILLED")
        with tracked(stage, cfg, tags=tags, track=track, resume_run_id=resume_run) as run:
            if run.run_id and is_main_process():
                from vidistill.registry.tracking import tracking_uri

                atomic_write_text(record_path, json.dumps({"run_id": run.run_id, "tracking_uri": tracking_uri()}))
            yield run, plan.resume


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _heldout_report(task: Any, history: list[dict[str, float]], *, out: Path, run: Any, seconds: float) -> dict[str, Any]:
    """`eval/metrics.json` of a masked pretext: its held-out masked-reconstruction loss before and after training."""
    last = history[-1]
    result = {"heldout_loss": last["heldout_loss"], "heldout_loss_init": task.heldout_init,
              "heldout_loss_by_epoch": [h["heldout_loss"] for h in history]}
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "metrics.json").write_text(json.dumps(result, indent=2))
    run.log_metrics(_numeric({k: result[k] for k in ("heldout_loss", "heldout_loss_init")}))
    run.log_artifacts(out / "eval")
    return {"out": str(out), "model": str(out / "model.pt"), "train_seconds": seconds, "history": history,
            "run_id": run.run_id, **{k: result[k] for k in ("heldout_loss", "heldout_loss_init")}}


def _teach_masked(cfg: TeachConfig, *, progress: bool, track: bool, stop_after_epochs: int | None) -> dict[str, Any]:
    """`teach --pretext mae|videomae|mvd`: masked pre-training on the unlabelled pool (the train split, checked
    to hold no test video; labels never read), evaluated by the held-out reconstruction loss on the test split."""
    from vidistill.data import ClipDataset
    from vidistill.data.pool import FrameClips, unlabelled_pool
    from vidistill.models import create_model
    from vidistill.train.pretext import build_masked_task

    pool, heldout = unlabelled_pool(cfg.clips), ClipDataset(cfg.clips, "test")
    if cfg.pretext == "mae":  # the image teacher learns from the pool's frames: a random one of each clip per epoch
        pool, heldout = FrameClips(pool, random_frame=True), FrameClips(heldout, random_frame=False)
    torch_seed(cfg.train.seed)
    model = create_model(cfg.model, **_model_kwargs(pool))
    decoder = (cfg.decoder_depth, cfg.decoder_dim, cfg.decoder_heads)
    if cfg.recipe:  # the release's decoder (VideoMAE's small-data recipe has the same), scaled to our widths
        from vidistill.train.pretext import recipe_decoder

        decoder = recipe_decoder(cfg.pretext, model.feature_dim, model.blocks[0].attn.heads)
    task = build_masked_task(cfg.pretext, model, mask_ratio=cfg.mask_ratio, decoder_depth=decoder[0],
                             decoder_dim=decoder[1], decoder_heads=decoder[2],
                             image_teacher=cfg.image_teacher, video_teacher=cfg.video_teacher, teachers=cfg.mvd_teachers,
                             image_weight=cfg.image_weight, video_weight=cfg.video_weight, heldout=heldout,
                             eval_batch=max(cfg.train.batch_size, 32))
    extra: dict[str, Any] = {"modality": "rgb", "pretext": cfg.pretext, "mask_ratio": cfg.mask_ratio, "decoder": list(decoder),
                             "recipe": cfg.recipe}
    if cfg.pretext == "mvd":
        extra["mvd_teachers"] = cfg.mvd_teachers
    settings = {"pretext": cfg.pretext, "mask_ratio": cfg.mask_ratio, "decoder": list(decoder)}
    files = {}
    if cfg.pretext == "mvd":
        settings |= {"mvd_teachers": cfg.mvd_teachers, "weights": [cfg.image_weight, cfg.video_weight]}
        files = {"image_teacher": cfg.image_teacher, "video_teacher": cfg.video_teacher}
    fingerprint = _fingerprint(pool, model, cfg.clips, files=files, modality="rgb", **settings)
    tags = {"data_hash": _manifest_hash(cfg.clips), "method": f"pretext_{cfg.pretext}"}
    with _training_run(f"teach_{cfg.pretext}", cfg, tags=tags, track=track, fingerprint=fingerprint) as (run, resume):
        return _train_and_evaluate(task, lambda: model, train_set=pool, train_cfg=cfg.train, out=Path(cfg.out),
                                   clips=cfg.clips, flow_dir=cfg.flow, resume=resume, progress=progress, run=run,
                                   stop_after_epochs=stop_after_epochs, extra=extra, fingerprint=fingerprint,
                                   heldout_loss=True)


def _model_kwargs(train_set: Any, modality: str = "rgb") -> dict[str, Any]:
    return {"num_classes": train_set.num_classes, "frames": train_set.frames, "size": train_set.size, "modality": modality}


def teach(cfg: TeachConfig, *, progress: bool = True, track: bool = True,
          stop_after_epochs: int | None = None) -> dict[str, Any]:
    """Train a teacher (`vidistill teach`): RGB or flow stream, then evaluate it on the test split; or pre-train an
    encoder without labels (`pretext`: pace, or the masked pretexts mae, videomae and mvd, see `_teach_masked`)."""
    cfg.validate()
    from vidistill.data import ClipDataset
    from vidistill.models import create_model
    from vidistill.train import Supervised
    from vidistill.train.pretext import MASKED_PRETEXTS

    if cfg.pretext in MASKED_PRETEXTS:
        return _teach_masked(cfg, progress=progress, track=track, stop_after_epochs=stop_after_epochs)
    train_set = ClipDataset(cfg.clips, "train", flow_root=cfg.flow if cfg.modality == "flow" else None)
    eval_set, extra = None, {"modality": cfg.modality}
    if cfg.pretext == "pace":  # self-supervised: the clips' labels are never read
        from vidistill.data.pace import PaceClips

        pace = {"frames": cfg.pretext_frames, "paces": cfg.paces}
        train_set, eval_set = PaceClips(train_set, **pace), PaceClips(ClipDataset(cfg.clips, "test"), **pace, random_start=False)
        extra["pretext"] = "pace"
    torch_seed(cfg.train.seed)
    model = create_model(cfg.model, **_model_kwargs(train_set, cfg.modality))
    if cfg.init:  # a pre-trained encoder (e.g. the pace one); the head stays new
        from vidistill.train.artifacts import load_encoder

        load_encoder(model, cfg.init)
        extra["init"] = cfg.init
    tags = {"data_hash": _manifest_hash(cfg.clips), "method": "pretext_pace" if cfg.pretext == "pace" else f"teacher_{cfg.modality}"}
    fingerprint = _fingerprint(train_set, model, cfg.clips, flow=cfg.flow if cfg.modality == "flow" else None,
                               files={"init": cfg.init}, modality=cfg.modality, pretext=cfg.pretext,
                               **({"paces": cfg.paces, "pretext_frames": cfg.pretext_frames} if cfg.pretext == "pace" else {}))
    with _training_run(f"teach_{cfg.modality}", cfg, tags=tags, track=track, fingerprint=fingerprint) as (run, resume):
        return _train_and_evaluate(Supervised(model, label_smoothing=cfg.train.label_smoothing), lambda: model,
                                   train_set=train_set, train_cfg=cfg.train, out=Path(cfg.out), clips=cfg.clips,
                                   flow_dir=cfg.flow, resume=resume, progress=progress, run=run,
                                   stop_after_epochs=stop_after_epochs, extra=extra, eval_set=eval_set,
                                   fingerprint=fingerprint)


def _folder_hashes(files: dict[str, str]) -> dict[str, str]:
    """Content hash of the manifest of each folder a method reads (e.g. JEDI's experts folder), for the
    resume check: `_fingerprint` hashes model files only."""
    from vidistill.train.checkpoint import file_sha256

    return {f"{name}_manifest_sha256": file_sha256(Path(path) / "manifest.json") for name, path in files.items()
            if path and (Path(path) / "manifest.json").is_file()}


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
    train_set = ClipDataset(cfg.clips, "train", flow_root=cfg.flow if method.reads_flow(params) else None,
                            videos_per_class=cfg.student_videos_per_class, subset_seed=cfg.student_subset_seed)
    files = {n: getattr(cfg, n) for n in method.needed_files(params)}  # only what the method reads reaches it
    ctx = DistillContext(num_classes=train_set.num_classes, classes=train_set.classes, frames=train_set.frames,
                         size=train_set.size, label_smoothing=cfg.train.label_smoothing, **files)
    torch_seed(cfg.train.seed)
    task = method(method.build_student(params, ctx, default=cfg.student), params, ctx)
    train_set = task.train_dataset(train_set)
    teacher_run = ""
    for path in files.values():
        if path and Path(path).is_file():
            teacher_run = load_checkpoint(path)["extra"].get("run_id") or teacher_run
    tags = {"data_hash": _manifest_hash(cfg.clips), "method": cfg.method,
            "teacher_run_id": teacher_run or "none"}
    fingerprint = _fingerprint(train_set, task.student, cfg.clips, flow=cfg.flow if method.reads_flow(params) else None,
                               files=files, method=cfg.method, method_params=asdict(params),
                               student_videos=[cfg.student_videos_per_class, cfg.student_subset_seed],
                               **_folder_hashes(files))
    with _training_run(f"distill_{cfg.method}", cfg, tags=tags, track=track, fingerprint=fingerprint) as (run, resume):
        result = _train_and_evaluate(task, task.export_model, train_set=train_set, train_cfg=train_cfg,
                                     out=Path(cfg.out), clips=cfg.clips, flow_dir=cfg.flow, resume=resume,
                                     progress=progress, run=run, stop_after_epochs=stop_after_epochs,
                                     extra={"modality": "rgb", "method": cfg.method}, fingerprint=fingerprint)
    result["method"] = cfg.method
    return result


def experts(cfg: ExpertsConfig, *, progress: bool = True, track: bool = True) -> dict[str, Any]:
    """One expert per dataset, frozen, and every expert's cached embeddings of every dataset (`vidistill experts`).

    Prepares every dataset of `cfg.datasets` with prep, in the main dataset's clip geometry, and stops with
    a message naming a dataset without usable videos before anything trains; trains one expert per dataset
    (`teach`: `cfg.model` with cross-entropy on that dataset, the main one on `cfg.clips`, its encoder initialised
    from `cfg.pretrained` when set, with `cfg.train`'s views: flips and crops); then runs every
    expert once over every dataset's train and test clips and writes the experts folder
    (`vidistill.data.multi`). Returns its manifest.
    """
    cfg.validate()
    from vidistill.config import TeachConfig, dataset_prep
    from vidistill.data import ClipDataset
    from vidistill.data.multi import MANIFEST, cache_embeddings, write_manifest
    from vidistill.errors import ConfigError
    from vidistill.train import load_model, resolve_device

    out = Path(cfg.out)
    if cfg.pretrained and not Path(cfg.pretrained).is_file():  # before any work
        raise ConfigError(f"experts.pretrained {cfg.pretrained} does not exist: pre-train the encoder the experts start from "
                          "(`vidistill teach --section pretrain`), or set experts.pretrained to \"\" to train them from scratch")
    (out / MANIFEST).unlink(missing_ok=True)  # a folder with a manifest is complete
    main = ClipDataset(cfg.clips, "train")  # the main dataset exists
    names, clips = [cfg.name], [cfg.clips]
    with tracked("experts", cfg, tags={"data_hash": _manifest_hash(cfg.clips)}, track=track) as run:
        for i, entry in enumerate(cfg.datasets):
            if "clips" in entry:  # already prepared: same geometry as the main dataset
                data = ClipDataset(entry["clips"], "train")
                if (data.frames, data.size) != (main.frames, main.size):
                    raise ConfigError(f"experts.datasets[{i}] ({entry['name']}): clips {entry['clips']} are "
                                      f"{data.frames}x{data.size}px, the main dataset's {main.frames}x{main.size}px; "
                                      "prepare both with the same frames and crop")
            else:
                pcfg = dataset_prep(cfg, i, main.manifest["params"])
                try:
                    prep(pcfg, progress=progress, track=False)
                except ConfigError as exc:  # e.g. no usable videos: stop before any expert trains
                    raise ConfigError(f"experts.datasets[{i}] ({entry['name']}, {pcfg.dataset} at {pcfg.root}): {exc}") from None
            names.append(entry["name"])
            clips.append(entry.get("clips") or pcfg.out)
        scores = {}
        for name, data in zip(names, clips):
            r = teach(TeachConfig(clips=data, out=str(out / name), model=cfg.model, init=cfg.pretrained, resume=cfg.resume,
                                  train=cfg.train), progress=progress, track=False)
            scores[name] = {k: r[k] for k in ("top1", "top5", "mAP")}
        device = resolve_device(cfg.train.device)
        encoders = [load_model(out / name / "model.pt", device=str(device))[0] for name in names]
        splits = [ClipDataset(data, "train").manifest["splits"] for data in clips]  # train, test (and val)
        sets = [{split: ClipDataset(data, split) for split in available} for data, available in zip(clips, splits)]
        files = cache_embeddings(out, names=names, datasets=sets, encoders=encoders, batch_size=cfg.embed_batch_size,
                                 device=device)
        entries = [{"name": name, "clips": str(data), "data_hash": _manifest_hash(data), "classes": s["train"].classes,
                    "expert": f"{name}/model.pt", "preset": cfg.model, "feature_dim": enc.feature_dim, "splits": files[name],
                    **scores[name]} for name, data, s, enc in zip(names, clips, sets, encoders)]
        manifest = {"main": cfg.name, "datasets": entries, "expert_init": cfg.pretrained or "scratch",
                    "expert_views": {"hflip": cfg.train.hflip, "crop_scale": cfg.train.crop_scale},
                    "encoder_clips": sum(len(ds) for s in sets for ds in s.values())}
        write_manifest(out, manifest)
        run.log_metrics(_numeric({f"{n}_expert_{k}": v for n, s in scores.items() for k, v in s.items()}))
        run.log_artifact(out / MANIFEST)
    return manifest


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
    from vidistill.train.checkpoint import file_sha256

    with _writing(cfg.out, "evaluate.out"), \
            tracked("evaluate", cfg, tags={"data_hash": _manifest_hash(cfg.clips)}, track=track) as run:
        pred = predict(models, dataset, batch_size=cfg.batch_size, device=device)
        probs = pred["probs"].mean(axis=0)  # ensemble = average of softmax
        metrics = score(probs, pred["labels"], pred["video_ids"], dataset.classes)
        if len(models) > 1:
            metrics["members"] = {p: score(pr, pred["labels"], pred["video_ids"], dataset.classes)["top1"]
                                  for p, pr in zip(paths, pred["probs"])}
        metrics["checkpoints"] = paths
        metrics["checkpoint_sha256"] = {p: file_sha256(p) for p in paths}  # which model files these numbers belong to
        metrics["split"] = cfg.split
        metrics["data_hash"] = _manifest_hash(cfg.clips)
        title = " + ".join(info["name"] + f" ({info['extra'].get('modality', 'rgb')})" for _, info in loaded)
        files = write_report(metrics, cfg.out, title=title)
        run.log_metrics(_numeric({k: metrics[k] for k in SUMMARY_METRICS}))
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
    with _writing(cfg.out, "export.out"), \
            tracked("export", cfg, tags={"data_hash": _manifest_hash(cfg.clips), "method": info["extra"].get("method", "")},
                    track=track) as run:
        path = export_onnx(model, cfg.out, opset=cfg.opset, classes=info["classes"], preprocess=pre, atol=cfg.atol)
        n = min(cfg.parity_clips, len(test))
        clips = torch.stack([test[i]["rgb"] for i in range(n)])  # (n, 3, T, H, W) real evaluation clips
        parity = check_parity(model, path, clips, atol=cfg.atol)
        parity["passed"] = bool(parity["passed"] and parity["top1_agreement"] == 1.0)
        parity["opset"] = cfg.opset
        atomic_write_text(Path(cfg.out) / "parity.json", json.dumps(parity, indent=2))
        run.log_metrics(_numeric({"parity_max_abs_diff": parity["max_abs_diff"],
                                  "parity_top1_agreement": parity["top1_agreement"]}))
        run.log_artifact(Path(cfg.out) / "parity.json")
        if not parity["passed"]:
            raise ExportError(f"ONNX parity failed on {n} evaluation clips: max_abs_diff={parity['max_abs_diff']:.3g} "
                              f"(atol {cfg.atol:g}), top-1 agreement {parity['top1_agreement']:.3f}")
        from vidistill.export.deploy import export_deployables

        extra = export_deployables(cfg, path, test, run)  # int8 + its gate, the Triton/KServe model repository
    return {"onnx": str(path), "parity": parity, **extra}


def register(cfg: RegisterConfig, *, track: bool = True) -> dict[str, Any]:
    """Register `model.onnx` (or, with `precision: int8`, the gated `int8/model.onnx`) as a new version of
    `model_name`, tagged with its measured latency, and (optionally) run the promotion gate: the margin
    gate, or with `latency_budget_ms` > 0 the most accurate version within the budget (issue 29)."""
    cfg.validate()
    from vidistill.registry.models import promote, register_onnx
    from vidistill.registry.selection import deployment_tags, select_champion

    onnx_dir = Path(cfg.onnx)
    for need in (onnx_dir / "model.onnx", onnx_dir / "parity.json", Path(cfg.metrics)):
        if not need.exists():
            raise FileNotFoundError(f"{need} does not exist; run `vidistill export` / `vidistill evaluate` first")
    parity = json.loads((onnx_dir / "parity.json").read_text())
    metrics = json.loads(Path(cfg.metrics).read_text())
    scores = _numeric({k: metrics[k] for k in ("top1", "top5", "mAP") if k in metrics})
    model_file, scores, tags = deployment_tags(onnx_dir, cfg.precision, scores, threads=cfg.latency_threads)
    with tracked("register", cfg, tags={"data_hash": metrics.get("data_hash", "unknown"), "method": cfg.method},
                 track=track) as run:
        version = register_onnx(model_file, model_name=cfg.model_name, metrics=scores,
                                parity=parity, data_hash=metrics.get("data_hash", "unknown"), method=cfg.method,
                                run_id=run.run_id, classes=metrics.get("classes"), extra_tags=tags)
        if not cfg.promote:
            decision = None
        elif cfg.latency_budget_ms > 0:
            decision = select_champion(cfg.model_name, cfg.latency_budget_ms, metric=cfg.metric)
            _log_frontier(decision, run)
        else:
            decision = promote(cfg.model_name, version, margin=cfg.margin, metric=cfg.metric)
    return {"model_name": cfg.model_name, "version": version, "decision": decision, "latency_ms": float(tags["latency_ms"])}


def _log_frontier(selection: dict[str, Any], run: Any) -> None:
    """The accuracy-latency frontier of a budgeted selection as register-run artifacts (frontier.md, frontier.png)."""
    import tempfile

    from vidistill.registry.selection import frontier_markdown, plot_frontier

    with tempfile.TemporaryDirectory(prefix="vidistill-frontier-") as tmp:
        atomic_write_text(Path(tmp) / "frontier.md", frontier_markdown(selection))
        plot_frontier(selection, Path(tmp) / "frontier.png")
        run.log_artifacts(tmp)


# stage name -> (config class, function); the CLI, DVC and Kubeflow components all go through here
STAGES: dict[str, tuple[type, Any]] = {
    "prep": (PrepConfig, prep),
    "flow": (FlowConfig, flow),
    "teach": (TeachConfig, teach),
    "experts": (ExpertsConfig, experts),
    "distill": (DistillConfig, distill),
    "evaluate": (EvaluateConfig, evaluate),
    "export": (ExportConfig, export),
    "register": (RegisterConfig, register),
}


def run(stage: str, params: dict[str, Any] | None = None, *, parent_run_id: str = "", progress: bool = False,
        **overrides: Any) -> dict[str, Any]:
    """Run `stage` from a params.yaml section plus dotted overrides (e.g. paths chosen by an orchestrator).

    Example: `run("distill", params["distill"], method="d3d", out="/mnt/out", **{"train.epochs": 2})`.
    `parent_run_id` nests the stage's MLflow run under a pipeline run.
    `progress` shows the stage's progress bars (off by default: an orchestrator logs its tasks' output).
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
    kwargs = {"progress": progress} if "progress" in inspect.signature(fn).parameters else {}
    return fn(cfg, **kwargs)
