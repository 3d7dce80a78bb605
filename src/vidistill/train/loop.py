"""The training loop shared by teachers, students and pretext tasks.

A training job is a `TrainTask`: an `nn.Module` that owns the student (a plain model that exports
on its own), any frozen teachers and any extra trainable modules (decoders, adapters). The loop
calls the task's hooks in this order:

* `setup(train_set, epochs=E)`: once per `fit` call, before the first epoch (and before a resumed
  checkpoint is loaded): the task sees the training set and the epoch count, e.g. to allocate
  per-sample state (registered buffers are checkpointed) or to cache embeddings;
* `epoch_size(N) -> M`: how many samples every epoch trains on (default N), known before training so
  the learning-rate schedule counts `E · ceil(M / batch)` steps;
* per epoch `e` (0-based): `on_epoch_start(e)` (snapshots, sample scoring; it may run no-grad passes
  over the training set, see `scan`), then `epoch_indices(e)` (the M sample indices of the epoch, or
  None for all N), then one `forward(batch) -> {"loss", ["logits"], <named terms>}` per step, then
  `on_epoch_end(e) -> {name: value}` (extra metrics, e.g. a held-out reconstruction loss);
* `trainable_parameters()`: what the optimizer updates.

`logits` is optional: a task without it (a pretext task such as masked modelling) trains,
checkpoints and resumes the same way; `train_acc` is then not reported. Every scalar term a task
returns is averaged over the epoch and logged.

Frozen modules (`frozen_modules`, e.g. a distiller's teachers) are loaded from their own files by
the task's constructor: they are kept out of DistributedDataParallel and out of checkpoints, and a
resume reloads them from their files. Everything else in the task's state dict (the student, extra
trainable modules, buffers such as per-sample state) is checkpointed every epoch.

Determinism and resume: the shuffling order of epoch `e` depends only on `(seed, e)` and on the
epoch's indices, the global torch RNG state is saved in each per-epoch checkpoint, and the checkpoint
is written atomically, so `--resume` after an interruption reaches the same final weights as an
uninterrupted run with the same seed (on CPU; CUDA kernels may be non-deterministic), provided the
task's hooks depend only on its checkpointed state and the RNG.

Distributed data parallel: under `torchrun` (WORLD_SIZE > 1 in the environment) the task is wrapped
in `DistributedDataParallel` (NCCL on CUDA, gloo on CPU) with its frozen modules ignored, each rank
sees its shard of every epoch's permutation, the per-rank batch is `batch_size // world_size` (same
global batch), buffers (BatchNorm running statistics) are averaged over ranks at the end of every
epoch, and only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from vidistill.data.augment import augment_batch
from vidistill.errors import ResumeMismatchError, TrainingDivergedError
from vidistill.outputs import atomic_write_text
from vidistill.train.checkpoint import CHECKPOINT, atomic_save, load_checkpoint, setting_differences

if TYPE_CHECKING:
    from vidistill.config import TrainConfig

__all__ = ["CHECKPOINT", "EpochPermutation", "Supervised", "TrainTask", "atomic_save", "fit", "load_checkpoint",
           "model_input", "resolve_device", "scan", "supervised_loss"]


class TrainTask(nn.Module):
    """Base class of everything the loop trains (supervised teachers, distillation methods, pretexts).

    Attributes:
        student: the model that is trained and exported.
        frozen_modules: names of submodules loaded from files and never trained (teachers): kept out
            of DDP and checkpoints.
    """

    student: nn.Module
    frozen_modules: ClassVar[tuple[str, ...]] = ()

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimizer updates (default: all that require grad)."""
        return (p for p in self.parameters() if p.requires_grad)

    def setup(self, train_set: Dataset, *, epochs: int) -> None:
        """Called once per `fit` call before training (and before a checkpoint is restored).

        Args:
            train_set: the training set the loop draws from; items as `ClipDataset` returns them
                (`rgb` (3, T, H, W), `label`, `index`, ...). The task may keep it for no-grad passes.
            epochs: E, the number of epochs of the whole run (not only of this call).
        """

    def epoch_size(self, num_samples: int) -> int:
        """M, the number of samples every epoch trains on (default: all N); fixed for the run."""
        return num_samples

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (0-based), also on the first epoch after a resume; its time is part of
        the epoch and is also logged on its own (`epoch_start_seconds`)."""

    def epoch_indices(self, epoch: int) -> Sequence[int] | torch.Tensor | None:
        """The `epoch_size(N)` sample indices epoch `epoch` trains on (None: all N). Asked after
        `on_epoch_start`; the loop shuffles them with the (seed, epoch) permutation and shards them per rank."""
        return None

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Called after each epoch's steps on every rank; returns extra metrics to log (default none)."""
        return {}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def is_frozen_key(task: TrainTask, name: str) -> bool:
    """True when state-dict key or parameter name `name` belongs to one of `task.frozen_modules`."""
    return any(name == m or name.startswith(m + ".") for m in task.frozen_modules)


def trainable_state(task: TrainTask) -> dict[str, torch.Tensor]:
    """The task's state dict without its frozen modules: what a checkpoint holds."""
    return {k: v for k, v in task.state_dict().items() if not is_frozen_key(task, k)}


def load_trainable_state(task: TrainTask, state: dict[str, torch.Tensor], *, source: str = "the checkpoint") -> None:
    """Restore `trainable_state`; frozen modules keep what their files gave them.

    Raises:
        ValueError: the state does not fit the task (another method, architecture or data size).
    """
    state = {k: v for k, v in state.items() if not is_frozen_key(task, k)}  # older checkpoints held the teachers
    try:
        missing, unexpected = task.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise ValueError(f"{source} does not fit this task ({str(exc).splitlines()[0]}); start fresh without --resume") from None
    missing = [k for k in missing if not is_frozen_key(task, k)]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this task (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                         "start fresh without --resume")


def model_input(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The tensor a model reads from a batch: `flow` for flow-stream models, else `rgb`."""
    key = "flow" if getattr(model, "modality", "rgb") == "flow" else "rgb"
    if key not in batch:
        raise ValueError(f"model expects {key!r} input but the batch has only {sorted(batch)}; for flow models pass the flow directory")
    return batch[key]


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """The supervised term every task and method shares: cross-entropy with label smoothing.

    Args:
        logits: `(B, K)` pre-softmax outputs.
        labels: `(B,)` int64 class indices.
        label_smoothing: ε of Szegedy et al. 2016 (sec. 7): the target is (1 − ε)·one-hot + ε/K.
        weights: optional per-sample weights `(B,)`; the result is then Σ w_i·CE_i / B (e.g. SAKD's
            (1 − α_i), eq. 9).

    Returns:
        The scalar mean loss.
    """
    if weights is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    per_sample = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")  # (B,)
    return (weights.to(per_sample) * per_sample).sum() / per_sample.shape[0]


class Supervised(TrainTask):
    """Plain cross-entropy training (teachers; `supervised_loss` with label smoothing)."""

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.student = model
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """`batch["rgb"]` `(B, 3, T, H, W)` (or `flow` `(B, 2, T-1, H, W)` for flow models) and `label` `(B,)`
        -> `{"loss", "logits" (B, K), "ce"}`."""
        logits, _ = self.student(model_input(self.student, batch))
        ce = supervised_loss(logits, batch["label"], label_smoothing=self.label_smoothing)
        return {"loss": ce, "logits": logits, "ce": ce}


# ----------------------------------------------------------------------------------------------
# helpers


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> CUDA when available, else CPU; refuses a CUDA device that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return dev


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(False)


class EpochPermutation(Sampler[int]):
    """Shuffled indices whose order depends only on (seed, epoch) and the epoch's subset: resume-safe, rank-sharded.

    Args:
        n: N, the size of the dataset.
        seed: the run's seed.
        rank: this process's rank.
        world: the number of ranks; the epoch's indices are padded (repeating the first ones) so every
            rank gets the same count, then rank r takes positions r, r + world, ...
        size: M, the number of indices of every epoch (default N); `set_epoch(e, indices)` must then
            give exactly M indices.
    """

    def __init__(self, n: int, *, seed: int, rank: int = 0, world: int = 1, size: int | None = None) -> None:
        self.n, self.seed, self.rank, self.world, self.epoch = n, seed, rank, world, 0
        self.size = n if size is None else size
        if not 1 <= self.size:
            raise ValueError(f"an epoch must train on at least one sample, got epoch size {self.size}")
        self.subset: list[int] | None = None

    def set_epoch(self, epoch: int, indices: Sequence[int] | torch.Tensor | None = None) -> None:
        """Select epoch `epoch` and, optionally, the sample indices it trains on (None: all N).

        Raises:
            ValueError: `indices` does not hold exactly `size` indices in [0, N).
        """
        self.epoch = epoch
        if indices is None:
            if self.size != self.n:
                raise ValueError(f"epoch {epoch + 1}: the task declared {self.size} of {self.n} samples per epoch "
                                 "but epoch_indices() returned None; return the selected indices")
            self.subset = None
            return
        subset = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        if len(subset) != self.size:
            raise ValueError(f"epoch {epoch + 1}: epoch_indices() returned {len(subset)} indices but epoch_size() "
                             f"declared {self.size}; the size is fixed before training (the LR schedule counts it)")
        bad = [i for i in subset if not 0 <= i < self.n]
        if bad:
            raise ValueError(f"epoch {epoch + 1}: epoch_indices() returned indices outside [0, {self.n}): {bad[:5]}")
        self.subset = subset

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.subset is None:
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = [self.subset[i] for i in torch.randperm(len(self.subset), generator=g).tolist()]
        if self.world > 1:  # pad so every rank gets the same number of samples
            perm += perm[: (-len(perm)) % self.world]
            perm = perm[self.rank :: self.world]
        return perm

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return math.ceil(self.size / self.world)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into a batch (tensors stacked, ints to int64 tensors)."""
    out: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, float)):
            out[key] = torch.tensor(vals)
        else:
            out[key] = vals
    return out


def hflip_batch(batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
    """Random horizontal flip of whole clips; the flow of a flipped clip gets u -> -u."""
    rgb = batch["rgb"]
    flip = torch.rand(rgb.shape[0], generator=generator) < 0.5
    if not flip.any():
        return batch
    batch = dict(batch)
    batch["rgb"] = torch.where(flip.view(-1, 1, 1, 1, 1), rgb.flip(-1), rgb)
    if "flow" in batch:
        f = batch["flow"].flip(-1)
        f = torch.cat([-f[:, :1], f[:, 1:]], dim=1)
        batch["flow"] = torch.where(flip.view(-1, 1, 1, 1, 1), f, batch["flow"])
    return batch


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def scan(dataset: Dataset, *, batch_size: int, device: torch.device | str = "cpu",
         indices: Sequence[int] | None = None) -> Iterator[dict[str, Any]]:
    """Batches of `dataset` in index order, on `device`, without augmentation: for a task's no-grad passes
    over the training set (e.g. scoring every sample in `on_epoch_start`).

    Reads in the calling process and consumes no random numbers (a DataLoader iterator would draw its
    base seed from the global RNG), so it does not disturb the run's RNG stream: resume stays bit-exact.
    The caller chooses the mode (`eval()` leaves BatchNorm statistics untouched) and `torch.no_grad()`.

    Args:
        dataset: items as `ClipDataset` returns them.
        batch_size: samples per batch.
        device: where the batch tensors go.
        indices: which samples (default all, in order).

    Yields:
        Collated batches (`rgb` `(B, 3, T, H, W)`, `label` `(B,)`, `index` `(B,)`, ...).
    """
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    for start in range(0, len(order), batch_size):
        yield to_device(collate([dataset[i] for i in order[start:start + batch_size]]), torch.device(device))


def cosine_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 0, as a LambdaLR factor."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def constant_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up then a constant learning rate (e.g. JEDI, sec. 4.4), as a LambdaLR factor."""

    def f(step: int) -> float:
        return (step + 1) / warmup_steps if step < warmup_steps else 1.0

    return f


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # norms and biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def is_main_process() -> bool:
    """True except on the non-zero ranks of a `torchrun` launch (only rank 0 writes and logs)."""
    return int(os.environ.get("RANK", "0")) == 0


class _Dist:
    """The torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK), or a single process.

    The process group is started by `start()`, after the arguments are validated, so a refused
    `fit` call never leaves a process group behind.
    """

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        self.started = False
        if self.world > 1 and device.type == "cuda":
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)

    def start(self) -> None:
        """Join the process group (NCCL on CUDA, gloo on CPU) unless the caller already did."""
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.started = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def sync_buffers(self, buffers: Iterable[torch.Tensor]) -> None:
        """Give every rank the same buffers: float ones (BatchNorm running statistics, which each rank
        updates from its own shard) become the mean over ranks, the others rank 0's."""
        if self.world == 1:
            return
        for buf in buffers:
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(self.world)
            else:
                dist.broadcast(buf, src=0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group so that rank 0 goes last.

        Under torchrun, rank 0 hosts the store the group was built on; a rank still tearing down
        after rank 0 moved on (or exited) blocks on it until the timeout. So every rank checks out
        through the store after destroying the group, and rank 0 waits for all of them first.
        """
        if not self.started:
            return
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
        dist.barrier()
        dist.destroy_process_group()
        left = store.add("vidistill/left", 1)
        if self.rank == 0:
            deadline = time.monotonic() + 120
            while left < self.world and time.monotonic() < deadline:
                time.sleep(0.05)
                left = store.add("vidistill/left", 0)


# ----------------------------------------------------------------------------------------------
# the loop


def _diverged(result: dict[str, Any], epoch: int, step: int, cfg: TrainConfig, *, ckpt: Path) -> TrainingDivergedError:
    """The one-line error for a non-finite loss: where, which terms, and what to do."""
    terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in result.items()
                      if k != "logits" and isinstance(v, torch.Tensor) and v.ndim == 0)
    kept = f"the checkpoint of epoch {epoch} in {ckpt} is kept" if epoch > 0 else "no epoch finished, nothing was saved"
    return TrainingDivergedError(f"the loss became non-finite at epoch {epoch + 1}, step {step} ({terms}); {kept}. "
                                 f"Lower the learning rate (lr {cfg.lr:g}) or check the inputs, then start fresh")


def _batch_len(batch: dict[str, Any]) -> int:
    """The number of samples in a batch (its `index`, else its first tensor)."""
    if isinstance(batch.get("index"), torch.Tensor):
        return int(batch["index"].shape[0])
    return next(int(v.shape[0]) for v in batch.values() if isinstance(v, torch.Tensor))


def fit(
    task: TrainTask,
    dataset: Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    stop_after_epochs: int | None = None,
    fingerprint: dict[str, Any] | None = None,
    on_resume: Callable[[list[dict[str, float]]], None] | None = None,
) -> list[dict[str, float]]:
    """Train `task` on `dataset`; return the per-epoch history.

    Each history entry holds the epoch mean of every scalar term the task returns (`loss`, `ce`, ...),
    `train_acc` when the task returns `logits` and the batch has `label`, the task's `on_epoch_end`
    metrics, `lr`, `epoch_start_seconds` (the `on_epoch_start` hook), `epoch_seconds` (the whole
    epoch, hook included), `samples` (trained this epoch, all ranks) and `epoch` (1-based).

    Args:
        task: the training task (student, teachers, losses).
        dataset: items as `vidistill.data.ClipDataset` returns them.
        cfg: optimisation settings.
        out_dir: where `checkpoints/last.pt` and `history.json` go.
        resume: continue from `out_dir/checkpoints/last.pt` if it exists.
        progress: show a progress bar.
        on_epoch_end: called (rank 0 only) with the epoch number and its metrics, e.g. to log to MLflow.
        stop_after_epochs: stop after this many epochs of this call (simulates an interruption in tests).
        fingerprint: what the run is made of (data hash, classes, model, method, teachers, code; see
            `vidistill.train.checkpoint`), stored in every checkpoint so a later resume can be checked
            (`plan_resume`) before it starts.
        on_resume: called (rank 0 only) with the history restored from the checkpoint, e.g. to log the
            epochs an interrupted run trained but did not log.

    Raises:
        ValueError: a bad setting, an empty training set, or a task whose `epoch_indices` break its
            `epoch_size` promise.
        vidistill.errors.ResumeMismatchError: the checkpoint does not fit the run (settings that change
            the weights, steps per epoch, the task's state).
        vidistill.errors.CheckpointError: the checkpoint cannot be read (empty, truncated, corrupt).
        vidistill.errors.OutputError: a checkpoint could not be written (full disk, file-size limit).
        vidistill.errors.TrainingDivergedError: the loss became NaN or infinite (a `FloatingPointError`).
    """
    cfg.validate()
    out = Path(out_dir)
    ckpt_path = out / "checkpoints" / CHECKPOINT
    ddp = _Dist(resolve_device(cfg.device))
    device = ddp.device
    seed_everything(cfg.seed)
    if len(dataset) == 0:
        raise ValueError("the training set is empty: run `vidistill prep` first and check its summary")
    if cfg.batch_size % ddp.world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the world size {ddp.world}; the global batch is split across ranks")

    task.to(device)
    task.setup(dataset, epochs=cfg.epochs)
    task.to(device)  # anything setup created
    optimizer = build_optimizer(task.trainable_parameters(), cfg)
    epoch_size = int(task.epoch_size(len(dataset)))
    sampler = EpochPermutation(len(dataset), seed=cfg.seed, rank=ddp.rank, world=ddp.world, size=epoch_size)
    per_rank_batch = cfg.batch_size // ddp.world
    loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=collate, drop_last=len(sampler) >= 2 * per_rank_batch,
                        persistent_workers=cfg.num_workers > 0)
    steps_per_epoch = len(loader)
    schedule = cosine_lambda if getattr(cfg, "schedule", "cosine") == "cosine" else constant_lambda
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, schedule(cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch))
    flip_gen = torch.Generator()

    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        changed = setting_differences(state["config"], asdict(cfg))  # workers and an equivalent device never block
        if changed:
            raise ResumeMismatchError(f"cannot resume from {ckpt_path}: training settings changed ({', '.join(changed)}); "
                                      "use the original settings or start fresh without --resume")
        if state.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
            raise ResumeMismatchError(f"cannot resume from {ckpt_path}: {state['steps_per_epoch']} steps per epoch then, "
                                      f"{steps_per_epoch} now (the data or the method's samples per epoch changed); "
                                      "start fresh without --resume")
        try:
            load_trainable_state(task, state["task"], source=str(ckpt_path))
        except ValueError as exc:
            raise ResumeMismatchError(str(exc)) from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        flip_gen.set_state(state["flip_rng"])
        history = list(json.loads(state["history"]))
        start_epoch = int(state["epoch"]) + 1
        if ddp.main:
            print(f"[train] resuming from {ckpt_path}: {start_epoch} of {cfg.epochs} epochs done")
            if on_resume is not None:
                on_resume(history)
    elif resume and ddp.main:
        print(f"[train] --resume: no checkpoint at {ckpt_path}, starting from scratch")
    else:
        flip_gen.manual_seed(cfg.seed + 1)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"), disable=not (progress and ddp.main))
    synced_buffers = [b for k, b in task.named_buffers() if not is_frozen_key(task, k)]
    epochs_run = 0
    ddp.start()
    try:
        model: nn.Module = task
        if ddp.world > 1:
            # DDP manages only what trains: frozen modules (teachers, loaded on every rank from their files)
            # are neither broadcast nor reduced. The setter is DDP's documented way to do so (pytorch#43690).
            frozen = [k for k, _ in [*task.named_parameters(), *task.named_buffers()] if is_frozen_key(task, k)]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(task, frozen)
            model = nn.parallel.DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None)
        with bar:
            for epoch in range(start_epoch, cfg.epochs):
                if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                    break
                t0 = time.perf_counter()
                task.on_epoch_start(epoch)
                start_seconds = time.perf_counter() - t0
                sampler.set_epoch(epoch, task.epoch_indices(epoch))
                model.train()
                sums: dict[str, float] = {}
                correct = labelled = seen = 0
                bar_task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, info="")
                for step, batch in enumerate(loader, 1):
                    batch = augment_batch(batch, flip_gen, hflip=cfg.hflip, crop_scale=cfg.crop_scale,
                                          label_map=getattr(dataset, "hflip_label_map", None) if cfg.hflip_labels == "mirror" else None)
                    batch = to_device(batch, device)
                    result = model(batch)
                    loss = result["loss"]
                    if not torch.isfinite(loss):
                        raise _diverged(result, epoch, step, cfg, ckpt=ckpt_path)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip > 0:
                        nn.utils.clip_grad_norm_(list(task.trainable_parameters()), cfg.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    n = _batch_len(batch)
                    for k, v in result.items():
                        if k != "logits" and isinstance(v, torch.Tensor) and v.ndim == 0:
                            sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
                    if "logits" in result and "label" in batch:  # pretext tasks have neither
                        correct += int((result["logits"].argmax(1) == batch["label"]).sum())
                        labelled += n
                    seen += n
                    bar.update(bar_task, advance=1, info=f"loss {float(loss.detach()):.3f}")
                metrics = {k: v / seen for k, v in sums.items()}
                if labelled:
                    metrics["train_acc"] = correct / labelled
                ddp.sync_buffers(synced_buffers)  # the checkpoint and every rank hold the same weights and statistics
                metrics.update(task.on_epoch_end(epoch))
                metrics = ddp.mean(metrics)
                metrics["samples"] = seen * ddp.world
                metrics["lr"] = optimizer.param_groups[0]["lr"]
                metrics["epoch_start_seconds"] = start_seconds
                metrics["epoch_seconds"] = time.perf_counter() - t0
                metrics["epoch"] = epoch + 1
                history.append(metrics)
                acc = f" acc {metrics['train_acc']:.3f}" if "train_acc" in metrics else ""
                bar.update(bar_task, info=f"loss {metrics['loss']:.3f}{acc}")
                if ddp.main:
                    atomic_save({
                        "epoch": epoch,
                        "task": trainable_state(task),  # frozen modules come back from their own files
                        "frozen_modules": list(task.frozen_modules),
                        "steps_per_epoch": steps_per_epoch,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": torch.get_rng_state(),
                        "flip_rng": flip_gen.get_state(),
                        "config": asdict(cfg),
                        "history": json.dumps(history),
                        "fingerprint": json.dumps(fingerprint or {}, sort_keys=True, default=str),
                    }, ckpt_path, advice="Free some space or choose another --out, then rerun" + (
                        f" with --resume: the checkpoint of epoch {epoch} is intact" if epoch > 0 else ""))
                    atomic_write_text(out / "history.json", json.dumps(history, indent=2))
                    if on_epoch_end is not None:
                        on_epoch_end(epoch + 1, metrics)
                ddp.barrier()
                epochs_run += 1
    finally:
        ddp.close()
    return history
