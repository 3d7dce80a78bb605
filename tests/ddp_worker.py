"""Worker that `tests/test_distributed.py` launches under `torchrun` (2 CPU processes, gloo).

`train_and_record` trains a tiny 3-D conv net on learnable synthetic clips through
`vidistill.train.fit` with a `Supervised` task that also holds a frozen teacher (as a distiller does)
and writes `RESULTS/rank<r>.json` on every rank: the world size, a checksum of the trainable weights
(and buffers) this rank ends with, checksums of its teacher before and after training (each rank's
teacher is built differently on purpose, so a DDP broadcast or buffer sync of it would show), the
epochs this rank trained (so a resume shows where it started) and, on rank 0, the accuracy on a
held-out set. With
`bad_batch=N` it first checks that a global batch of `N` is refused with a ValueError. The test
also calls it in-process for the single-process run.

Run as `python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py --out OUT --results RES`.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from vidistill.config import TrainConfig
from vidistill.train import Supervised, fit
from vidistill.train.loop import trainable_state


class RampClips(Dataset):
    """Noise clips `(3, T, S, S)` with a brightness ramp over time; the class is the ramp's sign."""

    def __init__(self, n: int, *, seed: int, frames: int = 4, size: int = 8) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n,), generator=g)  # (N,)
        self.x = torch.rand(n, 3, frames, size, size, generator=g)  # (N, 3, T, S, S)
        ramp = torch.linspace(-0.25, 0.25, frames).view(1, frames, 1, 1)  # (1, T, 1, 1)
        self.x += torch.where(self.y.view(-1, 1, 1, 1, 1) == 1, ramp, -ramp)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"rgb": self.x[i], "label": int(self.y[i]), "index": i, "video_id": i}


class FeatureMean(nn.Module):
    """Identity that keeps a running mean of its input in a buffer, like BatchNorm's running_mean:
    under DDP each rank updates it from its own shard, so it tests that ranks end in agreement."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * x.mean(dim=0))
        return x


class TinyNet(nn.Module):
    """Conv3d -> ReLU -> global average pool -> linear; no dropout or batch norm in the gradient
    path, so the only difference between 1 and 2 processes is the floating-point summation order."""

    modality = "rgb"

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 6, 3, padding=1)
        self.stats = FeatureMean(6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.stats(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))  # (B, 6)
        return self.fc(f), f


class RecordingSupervised(Supervised):
    """`Supervised` that remembers which epochs this process trained, with a frozen teacher it runs in
    every step (its agreement with the student is logged, the loss does not use it)."""

    frozen_modules = ("teachers",)

    def __init__(self, model: nn.Module, teacher: nn.Module | None = None) -> None:
        super().__init__(model)
        self.epochs_started: list[int] = []
        self.teachers = nn.ModuleDict({"ref": teacher if teacher is not None else TinyNet()})
        for p in self.teachers.parameters():
            p.requires_grad_(False)
        self.teachers.eval()

    def train(self, mode: bool = True) -> "RecordingSupervised":
        super().train(mode)
        self.teachers.eval()
        return self

    def forward(self, batch: dict) -> dict:
        out = super().forward(batch)
        with torch.no_grad():
            t_logits, _ = self.teachers["ref"](batch["rgb"])  # (B, 2)
        out["teacher_agreement"] = (out["logits"].argmax(1) == t_logits.argmax(1)).float().mean()
        return out

    def on_epoch_start(self, epoch: int) -> None:
        self.epochs_started.append(epoch)


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and raw bytes of every tensor of a state dict (in key order)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_and_record(out: Path, results: Path, *, epochs: int = 6, batch_size: int = 16, seed: int = 0,
                     stop_after: int | None = None, resume: bool = False, bad_batch: int | None = None) -> dict:
    """Train through `fit` in this process (one rank of a torchrun job, or a single process) and
    write `results/rank<r>.json`; returns what was written."""
    rank = int(os.environ.get("RANK", "0"))
    results.mkdir(parents=True, exist_ok=True)
    record: dict = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1"))}
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=0.02, warmup_epochs=1, seed=seed, device="cpu",
                      hflip=False, grad_clip=5.0)
    train_set = RampClips(200, seed=1)

    if bad_batch is not None:
        bad = dataclasses.replace(cfg, batch_size=bad_batch)
        try:
            fit(RecordingSupervised(TinyNet()), train_set, bad, results / "bad_out", progress=False)
            record["bad_batch_error"] = None
        except ValueError as exc:
            record["bad_batch_error"] = str(exc)
        record["group_left_initialised"] = torch.distributed.is_initialized()

    torch.manual_seed(seed)  # same initial weights in every process and every run
    model = TinyNet()
    torch.manual_seed(100 + rank)  # a teacher that differs between ranks, with a rank-specific buffer
    teacher = TinyNet()
    teacher.stats.running_mean.fill_(float(rank))
    task = RecordingSupervised(model, teacher)
    record["teacher_at_start"] = state_checksum(teacher.state_dict())
    history = fit(task, train_set, cfg, out, resume=resume, progress=False, stop_after_epochs=stop_after)
    record.update(checksum=state_checksum(trainable_state(task)), epochs_started=task.epochs_started,
                  history_len=len(history), teacher_at_end=state_checksum(teacher.state_dict()))
    if rank == 0:
        test_set = RampClips(200, seed=2)
        model.eval()
        with torch.no_grad():
            logits, _ = model(test_set.x)  # (N, 2)
        record["test_acc"] = float((logits.argmax(1) == test_set.y).float().mean())
    (results / f"rank{rank}.json").write_text(json.dumps(record))
    return record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True, help="fit's out_dir")
    ap.add_argument("--results", type=Path, required=True, help="where each rank writes rank<r>.json")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--bad-batch", type=int, default=None)
    args = ap.parse_args()
    hang = float(os.environ.get("VIDISTILL_TEST_HANG_SECONDS", "0"))
    if hang > 0:  # a hung collective prints where every thread waits, instead of a silent kill by the test
        faulthandler.dump_traceback_later(hang, exit=True)
    torch.set_num_threads(1)  # 2 ranks on a 2-core machine: no oversubscription
    train_and_record(args.out, args.results, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                     stop_after=args.stop_after, resume=args.resume, bad_batch=args.bad_batch)


if __name__ == "__main__":
    main()
