"""`vidistill bench train`: training throughput (clips/s) of teacher and student steps, per precision.

A step is what `vidistill.train.loop.fit` does per batch: the task's forward (`Supervised` for a
teacher, a registered distillation method for a student, frozen teachers included), backward,
gradient clipping and the optimizer step, with the project's builders (`create_model`,
`create_distiller`, `build_optimizer`). Mixed precision wraps that step in `torch.autocast`
(bf16; or fp16 with a `GradScaler`) inside this benchmark only: the loop itself has no AMP switch,
and these numbers tell whether it should get one. Data loading is left out (random clips already on
the device), so the numbers are what the model and optimizer cost, the upper bound of a real epoch.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_task(kind: str, *, teacher: str, student: str, num_classes: int, frames: int, size: int,
              workdir: Path) -> tuple[nn.Module, bool]:
    """The training task of a benchmark row, built as the pipeline builds it.

    Args:
        kind: "teacher" (`Supervised` on the teacher preset) or a distillation method key (its student,
            built as `vidistill distill` builds it, in the method's task; the files the method `needs` are fresh
            models saved under `workdir` with `save_model`: an RGB teacher of the `teacher` preset, a
            flow teacher and a pre-trained encoder of the `student` preset, as `bench methods` uses).
        teacher, student: model presets; num_classes, frames (T), size (H = W): the clips.
        workdir: where the needed model files go.

    Returns:
        (task, needs_flow): the `TrainTask` and whether its batch must carry `flow`.

    Raises:
        ValueError / ConfigError: an unknown preset or method key (the message lists the valid ones).
    """
    from vidistill.models import create_model
    from vidistill.train import Supervised

    shape = {"num_classes": num_classes, "frames": frames, "size": size}
    if kind == "teacher":
        return Supervised(create_model(teacher, **shape)), False
    from vidistill.distill import DistillContext, get_method, method_params
    from vidistill.train import save_model

    method = get_method(kind)
    params = method_params(kind, None)  # the method's defaults (the papers' values)
    classes = [f"c{i}" for i in range(num_classes)]
    files: dict[str, str] = {}
    own = method.student_name(params, student)  # mvd_encoder: the method's own student, as `teach --pretext mvd` tags it
    for need, (preset, modality, extra) in {"teacher_rgb": (teacher, "rgb", {}), "teacher_flow": (student, "flow", {}),
                                            "pretrained": (student, "rgb", {}),
                                            "mvd_encoder": (own, "rgb", {"pretext": "mvd"})}.items():
        if need in method.needs:
            kwargs = {**shape, "modality": modality}
            path = save_model(workdir / f"{need}.pt", create_model(preset, **kwargs), name=preset, kwargs=kwargs,
                              classes=classes, extra=extra)
            files[need] = str(path)
    ctx = DistillContext(num_classes=num_classes, classes=classes, frames=frames, size=size, **files)
    # as `vidistill distill` builds it: the method picks its student preset (`student` is the default)
    return method(method.build_student(params, ctx, default=student), params, ctx), bool(method.needs_flow)


def random_batch(batch_size: int, *, frames: int, size: int, num_classes: int, flow: bool, device: torch.device,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch as the loader makes it: `rgb` (B, 3, T, H, W) in [0, 1], `label` (B,), `index` (B,), and
    with `flow` a `flow` (B, 2, T-1, H, W) in pixels (|u| <= 20)."""
    g = torch.Generator().manual_seed(seed)
    batch = {"rgb": torch.rand(batch_size, 3, frames, size, size, generator=g),
             "label": torch.randint(0, num_classes, (batch_size,), generator=g),
             "index": torch.arange(batch_size)}
    if flow:
        batch["flow"] = (torch.rand(batch_size, 2, frames - 1, size, size, generator=g) - 0.5) * 40
    return {k: v.to(device) for k, v in batch.items()}


class TrainStep:
    """One optimisation step of `task` as the loop takes it, optionally under autocast.

    Args:
        task: the training task (moved to `device`, put in train mode, `on_epoch_start(0)` called).
        device: where it runs.
        precision: "fp32", "bf16" (autocast) or "fp16" (autocast and a `GradScaler`).
        lr, grad_clip: as `TrainConfig` (the loop's defaults).
    """

    def __init__(self, task: nn.Module, device: torch.device, precision: str = "fp32", *, lr: float = 3e-3,
                 grad_clip: float = 5.0) -> None:
        from vidistill.config import TrainConfig
        from vidistill.train.loop import build_optimizer

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.task = task.to(device)
        self.task.train()
        self.task.on_epoch_start(0)
        self.device, self.dtype, self.grad_clip = device, PRECISIONS[precision], grad_clip
        self.params = list(self.task.trainable_parameters())
        self.optimizer = build_optimizer(self.params, TrainConfig(lr=lr, grad_clip=grad_clip, device=str(device)))
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run one step on `batch`; returns the loss (a 0-d tensor, not synchronised)."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = self.task(batch)["loss"]
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(
    *,
    device: str = "auto",
    methods: Sequence[str] = (),
    teacher: str = "r2plus1d_teacher",
    student: str = "r2plus1d_student",
    precisions: Sequence[str] = ("fp32", "bf16", "fp16"),
    batch_size: int = 32,
    frames: int = 8,
    size: int = 56,
    num_classes: int = 10,
    steps: int = 20,
    warmup: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Clips/s of the teacher's and each method's student training step, per precision, in one run.

    Args:
        device: "auto" (CUDA when available), "cpu" or "cuda[:N]".
        methods: distillation method keys whose student step is timed (default: every registered
            one, `vidistill methods`).
        teacher, student: model presets.
        precisions: any of "fp32", "bf16", "fp16" (autocast; fp16 with loss scaling).
        batch_size: clips per step; frames (T), size (H = W), num_classes (K): the clips and head.
        steps: timed steps per row; warmup: untimed steps first (cuDNN algorithm choice, allocator).
        seed: model initialisation and data.

    Returns:
        {"rows": [...], "device", "errors": [...]}; a row per (task, precision): "task" ("teacher" or
        "student:<method>"), "model", "precision", "batch_size", "clips_per_s", "ms_per_step",
        "loss" (last step), "peak_mib" (CUDA: `torch.cuda.max_memory_allocated` of the row; None on
        CPU) and "speedup_vs_fp32" (clips/s over the same task's fp32 row). A row that failed has
        "error" instead, and the run goes on.

    Raises:
        ValueError: a bad precision, count, device, or an unknown preset or method (checked before
            any timing).
    """
    from vidistill.distill import get_method
    from vidistill.models import list_models
    from vidistill.train import resolve_device

    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ValueError(f"bench_train: precisions must be some of {', '.join(PRECISIONS)}, got {tuple(precisions)}")
    if min(batch_size, frames - 1, steps) < 1 or warmup < 0 or size < 8 or num_classes < 2:
        raise ValueError(f"bench_train: need batch_size >= 1, frames >= 2, size >= 8, num_classes >= 2, steps >= 1, warmup >= 0; "
                         f"got batch_size={batch_size}, frames={frames}, size={size}, num_classes={num_classes}, "
                         f"steps={steps}, warmup={warmup}")
    for preset in (teacher, student):
        if preset not in list_models():
            raise ValueError(f"bench_train: unknown model {preset!r}; choose one of: {', '.join(list_models())}")
    from vidistill.distill import list_methods

    methods = tuple(methods) or tuple(list_methods())
    for m in methods:
        get_method(m)  # ConfigError naming the valid keys
    dev = resolve_device(device)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    shape = {"num_classes": num_classes, "frames": frames, "size": size}
    with tempfile.TemporaryDirectory(prefix="vidistill-bench-train-") as tmp:
        for kind in ["teacher", *methods]:
            label = "teacher" if kind == "teacher" else f"student:{kind}"
            for precision in precisions:
                row: dict[str, Any] = {"task": label, "model": teacher if kind == "teacher" else student,
                                       "precision": precision, "batch_size": batch_size}
                try:
                    torch.manual_seed(seed)
                    task, needs_flow = make_task(kind, teacher=teacher, student=student, workdir=Path(tmp), **shape)
                    row["model"] = getattr(task.student, "create_kwargs", {}).get("name", row["model"])
                    batch = random_batch(batch_size, flow=needs_flow, device=dev, seed=seed, **shape)
                    step = TrainStep(task, dev, precision)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(dev)
                    for _ in range(warmup):
                        step(batch)
                    _sync(dev)
                    start = time.perf_counter()
                    for _ in range(steps):
                        loss = step(batch)
                    _sync(dev)
                    seconds = time.perf_counter() - start
                    value = float(loss)
                    if value != value or abs(value) == float("inf"):
                        raise FloatingPointError(f"loss became {value}")
                    row.update({"clips_per_s": round(batch_size * steps / seconds, 1),
                                "ms_per_step": round(1000 * seconds / steps, 2), "loss": round(value, 4),
                                "peak_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None})
                except Exception as e:  # noqa: BLE001 - one failing row must not hide the others
                    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    errors.append(f"{label} {precision}: {row['error']}")
                finally:
                    task = step = batch = None  # free the row's memory before the next one
                rows.append(row)
    fp32 = {r["task"]: r["clips_per_s"] for r in rows if r["precision"] == "fp32" and "clips_per_s" in r}
    for r in rows:
        if "clips_per_s" in r and r["task"] in fp32:
            r["speedup_vs_fp32"] = round(r["clips_per_s"] / fp32[r["task"]], 2)
    return {"rows": rows, "device": str(dev), "errors": errors}
