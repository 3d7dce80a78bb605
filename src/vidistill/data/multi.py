"""Several datasets for multi-dataset methods (JEDI): the experts' cached embeddings and `EmbeddingSet`.

`vidistill experts` (`vidistill.stages.experts`) prepares every dataset with prep, trains one expert per
dataset and then calls `cache_embeddings`: every frozen expert runs once over every dataset's clips (train
and test split, in eval mode, no augmentation, as JEDI does, sec. 3.3 and 4.3) and the embeddings are
written to disk. A method then trains on them through `EmbeddingSet` without running an encoder again.

The experts folder (`experts.out`):

* `manifest.json`: `format`, `main` (the main dataset's name; its expert's student is the product), then
  one entry per dataset in order (expert i belongs to dataset i, the main one first): `name`, `clips`
  (its prep output), `data_hash` (of those clips), `classes`, `expert` (its `model.pt`, relative to the
  folder), `preset`, `feature_dim` d_i, `splits` (per split: `clips` and the embedding file), and the
  expert's own `top1`, `top5`, `mAP` on its test split; `encoder_clips` (clips each encoder ran on).
* `<name>/model.pt`: the expert (an encoder with its linear head) and its training outputs.
* `embeddings/<name>/<split>.npz`: `e<j>` `(N, d_j)` float32 for every expert j, `labels` `(N,)` (the
  dataset's own label space) and `video_ids` `(N,)`; for every split of the dataset's prep output
  (`train`, `test`, and `val` where `holdout_split` made one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from vidistill.errors import ConfigError

FORMAT = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")  # val: only in a prep output made by `holdout_split`


def read_experts(folder: str | Path) -> dict[str, Any]:
    """The experts manifest of `folder` (see the module docstring).

    Raises:
        ConfigError: no manifest (the stage did not run, or ran without a multi-dataset method), or one
            without datasets.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{path} not found: run `vidistill experts` first (it trains one expert per dataset)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); rerun `vidistill experts`") from None
    if manifest.get("format") != FORMAT or len(manifest.get("datasets") or []) < 2:
        raise ConfigError(f"{path} holds no experts of several datasets (the experts stage skipped its work: no method "
                          "in pipeline.methods needs them); rerun `vidistill experts`")
    return manifest


@torch.no_grad()
def embed(encoders: Sequence[nn.Module], dataset: Dataset, *, batch_size: int = 32,
          device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Every encoder's embedding of every clip of `dataset`, each encoder run once per clip.

    Args:
        encoders: zoo models returning `(logits, features (B, d))`; run in eval mode, without gradients.
        dataset: items with `rgb` `(3, T, H, W)` in [0, 1], read in index order without augmentation.
        batch_size: clips per batch.
        device: where the encoders run.

    Returns:
        One float32 array `(N, d_j)` per encoder.
    """
    from vidistill.train.loop import scan

    for enc in encoders:
        enc.to(device).eval()
    out: list[list[np.ndarray]] = [[] for _ in encoders]
    for batch in scan(dataset, batch_size=batch_size, device=device):
        for j, enc in enumerate(encoders):
            _, features = enc(batch["rgb"])  # (B, d_j)
            out[j].append(features.float().cpu().numpy())
    return [np.concatenate(parts) if parts else np.zeros((0, enc.feature_dim), np.float32)
            for parts, enc in zip(out, encoders)]


def cache_embeddings(folder: str | Path, *, names: Sequence[str], datasets: Sequence[dict[str, Dataset]],
                     encoders: Sequence[nn.Module], batch_size: int = 32,
                     device: torch.device | str = "cpu") -> dict[str, dict[str, Any]]:
    """Write `embeddings/<name>/<split>.npz` for every dataset and split (see the module docstring).

    Args:
        folder: the experts folder.
        names: dataset names, in expert order.
        datasets: per dataset, split -> items with `rgb`, `label`, `video_id` (e.g. `ClipDataset`).
        encoders: the frozen experts, expert j belonging to dataset j.
        batch_size: clips per batch.
        device: where the encoders run.

    Returns:
        name -> split -> `{"clips": N, "file": relative path}`.
    """
    folder = Path(folder)
    files: dict[str, dict[str, Any]] = {}
    for name, splits in zip(names, datasets, strict=True):
        files[name] = {}
        for split, ds in splits.items():
            arrays = {f"e{j}": e for j, e in enumerate(embed(encoders, ds, batch_size=batch_size, device=device))}
            labels = np.array([int(ds[i]["label"]) for i in range(len(ds))], dtype=np.int64) if not hasattr(ds, "labels") \
                else np.asarray(ds.labels, dtype=np.int64)
            videos = np.asarray(getattr(ds, "video_ids", np.arange(len(ds))), dtype=np.int64)
            rel = Path("embeddings") / name / f"{split}.npz"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            tmp = folder / rel.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, labels=labels, video_ids=videos, **arrays)
            os.replace(tmp, folder / rel)
            files[name][split] = {"clips": len(ds), "file": rel.as_posix()}
    return files


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest.json` atomically (last, so a folder with a manifest is complete)."""
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"format": FORMAT, **manifest}, indent=2))
    os.replace(tmp, path)
    return path


def holdout_mask(labels: np.ndarray, video_ids: np.ndarray, fraction: float, *, seed: int = 0) -> np.ndarray:
    """Boolean `(N,)`: the clips of a stratified, seeded `fraction` of each class's videos (at least one video
    of every class with two or more), e.g. JEDI's 15 % validation split of a training set (sec. 4.4)."""
    held = np.zeros(len(labels), dtype=bool)
    if fraction <= 0:
        return held
    rng = np.random.default_rng([seed, 15])
    for c in np.unique(labels):
        videos = np.unique(video_ids[labels == c])
        if len(videos) < 2:
            continue
        n = min(len(videos) - 1, max(1, round(fraction * len(videos))))
        held |= np.isin(video_ids, rng.choice(videos, size=n, replace=False)) & (labels == c)
    return held


def holdout_split(clips: str | Path, out: str | Path, fraction: float, *, seed: int = 0) -> Path:
    """A prep output with a validation split: `train` is `clips`' training set without a held-out `fraction`
    of each class's videos (`holdout_mask`), `val` is that held-out part and `test` is `clips`' test split.
    Experts and methods trained on `out` never see `val`, so hyperparameters can be chosen on it without
    the test split (JEDI chose its own on 15 % of every training set, sec. 4.4).

    The shards are not copied: every split's shard files link to `clips`' shards.

    Raises:
        ConfigError: `clips` is not a prep output.
    """
    src, out = Path(clips), Path(out)
    if not (src / "manifest.json").is_file():
        raise ConfigError(f"{src} is not a prep output (no manifest.json); run `vidistill prep` first")
    manifest = json.loads((src / "manifest.json").read_text())
    index = json.loads((src / "train" / "index.json").read_text())
    held = holdout_mask(np.array([e["label"] for e in index]), np.array([e["video_id"] for e in index]), fraction, seed=seed)
    parts = {"train": ("train", [e for e, h in zip(index, held) if not h]), "val": ("train", [e for e, h in zip(index, held) if h]),
             "test": ("test", json.loads((src / "test" / "index.json").read_text()))}
    for split, (origin, entries) in parts.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / split / "index.json").write_text(json.dumps(entries))
        for shard in {e["shard"] for e in entries}:
            link = out / split / f"clips-{shard:05d}.npy"
            link.unlink(missing_ok=True)
            link.symlink_to((src / origin / f"clips-{shard:05d}.npy").resolve())
    manifest["splits"] = {s: {"clips": len(e), "videos": len({x["video_id"] for x in e})} for s, (_, e) in parts.items()}
    manifest["hash"] = f"{manifest.get('hash', '')}-val{fraction:g}-{seed}"
    manifest["holdout"] = {"from": str(src), "fraction": fraction, "seed": seed}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


class RandomClips(Dataset):
    """`n` random RGB clips `(3, T, S, S)` in [0, 1] with labels cycling over `classes`, as `ClipDataset` gives
    them (for `random_experts`)."""

    def __init__(self, n: int, classes: Sequence[str], *, frames: int, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rgb = torch.rand(n, 3, frames, size, size, generator=g)
        self.classes = list(classes)
        self.labels = np.arange(n) % len(self.classes)
        self.video_ids = np.arange(n)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"rgb": self.rgb[i], "label": int(self.labels[i]), "index": i, "video_id": int(self.video_ids[i])}


def random_experts(folder: str | Path, *, classes: Sequence[Sequence[str]], frames: int, size: int,
                   preset: str = "r2plus1d_student", train: Sequence[int] = (), test: Sequence[int] = (),
                   seed: int = 0) -> tuple[Path, list[dict[str, RandomClips]]]:
    """An experts folder of untrained experts on random clips, one dataset per entry of `classes` (the first is
    the main one): for training-throughput benchmarks and tests of multi-dataset methods, which need the
    folder's shape, not trained experts.

    Each expert's BatchNorm statistics are those of its training clips (as training leaves them), so its
    eval-mode embeddings differ from clip to clip as a trained expert's do.

    Args:
        folder: where to write.
        classes: every dataset's class names.
        frames, size: T and H = W of the clips.
        preset: the experts' model preset.
        train, test: clips per dataset and split (default 2 per class and 1 per class).
        seed: clips and initialisation.

    Returns:
        The folder and every dataset's splits (`{"train", "test"}` -> `RandomClips`).
    """
    from vidistill.models import create_model
    from vidistill.train.artifacts import save_model

    folder = Path(folder)
    names = [f"d{i}" for i in range(len(classes))]
    train = list(train) or [2 * len(c) for c in classes]
    test = list(test) or [len(c) for c in classes]
    sets = [{"train": RandomClips(n, c, frames=frames, size=size, seed=seed + 10 * i),
             "test": RandomClips(m, c, frames=frames, size=size, seed=seed + 10 * i + 1)}
            for i, (c, n, m) in enumerate(zip(classes, train, test, strict=True))]
    encoders = []
    for i, (name, c) in enumerate(zip(names, classes)):
        torch.manual_seed(seed + i)
        model = create_model(preset, num_classes=len(c), frames=frames, size=size)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over one pass
        with torch.no_grad():
            model.train()(sets[i]["train"].rgb)
        for m in norms:
            m.momentum = 0.1
        save_model(folder / name / "model.pt", model, classes=list(c))
        encoders.append(model.eval())
    files = cache_embeddings(folder, names=names, datasets=sets, encoders=encoders, batch_size=8)
    entries = [{"name": n, "clips": "", "data_hash": "", "classes": list(c), "expert": f"{n}/model.pt", "preset": preset,
                "feature_dim": e.feature_dim, "splits": files[n], "top1": 0.0, "top5": 0.0, "mAP": 0.0}
               for n, c, e in zip(names, classes, encoders)]
    write_manifest(folder, {"main": names[0], "datasets": entries, "encoder_clips": sum(train) + sum(test)})
    return folder, sets


class EmbeddingSet(Dataset):
    """The cached embeddings of every dataset of an experts folder, as one training set (the union).

    Items: `emb` float32 `(D,)` (every expert's embedding of the clip, concatenated in expert order, D = Σ d_j),
    `dataset` (int, i of the clip's dataset D_i), `label` (int, in D_i's label space), `index`, `video_id`.

    Args:
        folder: the experts folder (`vidistill experts`).
        split: "train", "test", or "val" (for datasets prepared with `holdout_split`).

    Attributes:
        names: dataset names (expert order, the main one first).
        classes: the main dataset's classes (those of the exported student).
        dataset_classes: every dataset's classes.
        widths: `[d_0, ..., d_{n-1}]`, the experts' embedding widths.
        sizes: `[|D_0|, ..., |D_{n-1}|]`, clips of each dataset in this set (JEDI's eq. 2).
    """

    def __init__(self, folder: str | Path, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.folder = Path(folder)
        self.manifest = read_experts(folder)
        entries = self.manifest["datasets"]
        self.names = [d["name"] for d in entries]
        self.dataset_classes = [list(d["classes"]) for d in entries]
        self.classes = self.dataset_classes[0]
        self.num_classes = len(self.classes)
        self.widths = [int(d["feature_dim"]) for d in entries]
        embs, labels, datasets, videos = [], [], [], []
        for i, d in enumerate(entries):
            if split not in d["splits"]:
                raise ConfigError(f"dataset {d['name']} of {self.folder} has no {split!r} split (it has "
                                  f"{', '.join(d['splits'])})")
            with np.load(self.folder / d["splits"][split]["file"], allow_pickle=False) as z:
                e = np.concatenate([z[f"e{j}"] for j in range(len(entries))], axis=1)  # (N_i, D)
                y, v = z["labels"], z["video_ids"]
            embs.append(e)
            labels.append(y)
            videos.append(v)
            datasets.append(np.full(len(y), i, dtype=np.int64))
        self.emb = torch.from_numpy(np.concatenate(embs).astype(np.float32))  # (N, D)
        self.labels = np.concatenate(labels)
        self.video_ids = np.concatenate(videos)
        self.datasets = np.concatenate(datasets)
        self.sizes = [int((self.datasets == i).sum()) for i in range(len(entries))]
        empty = [n for n, s in zip(self.names, self.sizes) if s == 0]
        if empty:
            raise ConfigError(f"no {split} clips of dataset(s) {', '.join(empty)} in {self.folder}; rerun `vidistill experts`")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"emb": self.emb[i], "dataset": int(self.datasets[i]), "label": int(self.labels[i]), "index": i,
                "video_id": int(self.video_ids[i])}

    def of(self, i: int) -> dict[str, torch.Tensor]:
        """Dataset i's part as tensors: `emb` `(N_i, D)`, `label` `(N_i,)`, `video_id` `(N_i,)`."""
        rows = torch.from_numpy(np.flatnonzero(self.datasets == i))
        return {"emb": self.emb[rows], "label": torch.from_numpy(self.labels[rows.numpy()]),
                "video_id": torch.from_numpy(self.video_ids[rows.numpy()])}
