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
  dataset's own label space) and `video_ids` `(N,)`.
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
SPLITS = ("train", "test")


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
    """A prep output whose train split is `clips`' training set without a held-out `fraction` of each class's
    videos (`holdout_mask`), and whose test split is that held-out part: a validation split that neither the
    experts nor a method trained on `out` ever sees (JEDI chose its hyperparameters on 15 %, sec. 4.4).

    The shards are not copied: both splits' shard files link to `clips`' training shards.

    Raises:
        ConfigError: `clips` is not a prep output.
    """
    src, out = Path(clips), Path(out)
    manifest = json.loads((src / "manifest.json").read_text()) if (src / "manifest.json").is_file() else None
    if manifest is None:
        raise ConfigError(f"{src} is not a prep output (no manifest.json); run `vidistill prep` first")
    index = json.loads((src / "train" / "index.json").read_text())
    labels = np.array([e["label"] for e in index])
    held = holdout_mask(labels, np.array([e["video_id"] for e in index]), fraction, seed=seed)
    parts = {"train": [e for e, h in zip(index, held) if not h], "test": [e for e, h in zip(index, held) if h]}
    for split, entries in parts.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / split / "index.json").write_text(json.dumps(entries))
        for shard in {e["shard"] for e in entries}:
            link = out / split / f"clips-{shard:05d}.npy"
            link.unlink(missing_ok=True)
            link.symlink_to((src / "train" / f"clips-{shard:05d}.npy").resolve())
    manifest["splits"] = {s: {"clips": len(e), "videos": len({x["video_id"] for x in e})} for s, e in parts.items()}
    manifest["hash"] = f"{manifest.get('hash', '')}-holdout{fraction:g}-{seed}"
    manifest["holdout"] = {"from": str(src), "fraction": fraction, "seed": seed}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


class EmbeddingSet(Dataset):
    """The cached embeddings of every dataset of an experts folder, as one training set (the union).

    Items: `emb` float32 `(D,)` (every expert's embedding of the clip, concatenated in expert order, D = Σ d_j),
    `dataset` (int, i of the clip's dataset D_i), `label` (int, in D_i's label space), `index`, `video_id`.

    Args:
        folder: the experts folder (`vidistill experts`).
        split: "train" or "test".

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
