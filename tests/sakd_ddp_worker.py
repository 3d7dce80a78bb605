"""Worker that `tests/test_sakd.py` launches under `torchrun` (2 CPU processes, gloo) and calls in-process.

It trains `sakd` (r = 0.25, scoring batches of 6) for 2 epochs through `vidistill.train.fit` on a prep
output and writes `OUT/rank<r>.json`: the world size, how many clips this rank scored in each round,
a checksum of the per-sample state right after each round (before the loop's epoch-end buffer sync),
the selections and α after round 1.

Run as `python -m torch.distributed.run --standalone --nproc_per_node 2 tests/sakd_ddp_worker.py CLIPS TEACHER OUT`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from vidistill.config import TrainConfig
from vidistill.data import ClipDataset
from vidistill.distill import DistillContext, create_distiller
from vidistill.models import create_model
from vidistill.train import fit

STATE = ("alpha", "omega", "kd_score", "features", "selected", "rounds", "seed")


def _checksum(task) -> str:
    h = hashlib.sha256()
    for name in STATE:
        h.update(name.encode())
        h.update(getattr(task, name).detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(clips: str, teacher: str, out: Path) -> dict:
    """Train on this process's share and write `out/rank<r>.json`; returns what was written."""
    rank = int(os.environ.get("RANK", "0"))
    train_set = ClipDataset(clips, "train")
    ctx = DistillContext(num_classes=train_set.num_classes, classes=train_set.classes, frames=train_set.frames,
                         size=train_set.size, teacher_rgb=teacher)
    torch.manual_seed(0)  # the same initial student in every process and every run
    student = create_model("r2plus1d_student", num_classes=ctx.num_classes, frames=ctx.frames, size=ctx.size)
    task = create_distiller("sakd", student, ctx, {"r": 0.25, "score_batch": 6})
    record: dict = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), "scored": [], "state_after_round": []}
    scoring = {"on": False, "n": 0}

    def count(_m, args):
        if scoring["on"]:
            scoring["n"] += args[0].shape[0]

    task.teachers["rgb"].register_forward_pre_hook(count)
    start = task.on_epoch_start

    def on_epoch_start(epoch: int) -> None:
        scoring.update(on=True, n=0)
        start(epoch)
        scoring["on"] = False
        record["scored"].append(scoring["n"])
        record["state_after_round"].append(_checksum(task))
        if epoch == 0:
            record["alpha_round1"] = task.alpha.tolist()

    task.on_epoch_start = on_epoch_start
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.01, warmup_epochs=0, device="cpu", seed=0)
    fit(task, train_set, cfg, out / "fit", progress=False)
    record["selections"] = task.selections.tolist()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    return record


if __name__ == "__main__":
    torch.set_num_threads(1)  # 2 ranks on a 2-core machine
    run(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
