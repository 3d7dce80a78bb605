"""A tiny experts folder (`vidistill experts`' output) built in-process from random clips, for unit tests of
multi-dataset methods: untrained `r2plus1d_student` experts, their embeddings cached by the real
`vidistill.data.multi.cache_embeddings`, and the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vidistill.data.multi import cache_embeddings, write_manifest
from vidistill.models import create_model
from vidistill.train import save_model


class RandomClips(Dataset):
    """`n` random RGB clips `(3, T, S, S)` with labels `0..K-1` cycling, like `ClipDataset` items."""

    def __init__(self, n: int, classes: list[str], *, frames: int, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rgb = torch.rand(n, 3, frames, size, size, generator=g)
        self.classes = list(classes)
        self.labels = np.arange(n) % len(classes)
        self.video_ids = np.arange(n)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"rgb": self.rgb[i], "label": int(self.labels[i]), "index": i, "video_id": int(self.video_ids[i])}


def calibrate_batchnorm(model: torch.nn.Module, clips: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of `clips` (as training leaves them), so that the
    model's eval-mode features differ from clip to clip as a trained expert's do."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    model.train()
    model(clips)
    for m in norms:
        m.momentum = 0.1
    model.eval()


def tiny_experts(folder: str | Path, *, classes: tuple[list[str], ...] = (list("abc"), ["x", "y"]),
                 train: tuple[int, ...] = (12, 6), test: tuple[int, ...] = (6, 4), frames: int = 4, size: int = 32,
                 seed: int = 0) -> tuple[Path, list[dict[str, RandomClips]]]:
    """Write an experts folder of `len(classes)` datasets (dataset 0 is the main one) and return it with the
    datasets (split -> `RandomClips`)."""
    folder = Path(folder)
    names = [f"d{i}" for i in range(len(classes))]
    sets = [{"train": RandomClips(n, c, frames=frames, size=size, seed=seed + 10 * i),
             "test": RandomClips(m, c, frames=frames, size=size, seed=seed + 10 * i + 1)}
            for i, (c, n, m) in enumerate(zip(classes, train, test))]
    encoders = []
    for i, (name, c) in enumerate(zip(names, classes)):
        torch.manual_seed(seed + i)
        model = create_model("r2plus1d_student", num_classes=len(c), frames=frames, size=size)
        with torch.no_grad():  # a head that tells the classes apart a little, like a trained expert
            model.head.weight.normal_(0, 1.0)
            calibrate_batchnorm(model, sets[i]["train"].rgb)
        save_model(folder / name / "model.pt", model, classes=c)
        encoders.append(model.eval())
    files = cache_embeddings(folder, names=names, datasets=sets, encoders=encoders, batch_size=8)
    entries = [{"name": n, "clips": "", "data_hash": "", "classes": c, "expert": f"{n}/model.pt",
                "preset": "r2plus1d_student", "feature_dim": e.feature_dim, "splits": files[n], "top1": 0.0}
               for n, c, e in zip(names, classes, encoders)]
    write_manifest(folder, {"main": names[0], "datasets": entries, "encoder_clips": sum(train) + sum(test)})
    return folder, sets
