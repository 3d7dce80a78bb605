"""`ClipDataset`: the clips written by prep (and optionally their flow) as a torch Dataset.

Shards are memory-mapped (`np.load(mmap_mode="r")`) on first use in each process, so the dataset
pickles cheaply into DataLoader workers and only the rows read are paged in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vidistill.data.augment import mirror_label_map
from vidistill.errors import ConfigError

FLOW_BOUND = 20.0  # pixels; the flow manifest's "bound" overrides it


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path} not found: {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); {what}") from None


def video_subset(index: list[dict[str, Any]], classes: list[str], per_class: int, *, seed: int, where: str = "") -> list[int]:
    """Positions in `index` of every clip of `per_class` videos per class, drawn without replacement.

    For each class in label order, its distinct video ids (sorted) are permuted by a NumPy generator
    seeded with `(seed, label)` and the first `per_class` are kept, so a class's draw depends on its own
    videos only. Clips keep their order in `index`.

    Args:
        index: a split's clip entries (`label`, `video_id`).
        classes: class names in label order (for the message).
        per_class: videos to keep per class, >= 1.
        seed: seed of the draw.
        where: names the data in the message.

    Raises:
        ConfigError: a class with fewer than `per_class` videos (the message names it and the largest
            value that works).
    """
    videos: dict[int, set[int]] = {k: set() for k in range(len(classes))}
    for e in index:
        videos[int(e["label"])].add(int(e["video_id"]))
    fewest = min(len(v) for v in videos.values())
    if per_class > fewest:
        short = [f"{classes[k]!r} has {len(v)}" for k, v in videos.items() if len(v) < per_class]
        raise ConfigError(f"student_videos_per_class = {per_class}, but in {where or 'the split'} "
                          f"{', '.join(short[:3])}{' ...' if len(short) > 3 else ''} video(s); use at most {fewest}, "
                          f"or prepare more videos per class")
    keep: set[int] = set()
    for k, ids in videos.items():
        order = np.random.default_rng([seed, k]).permutation(sorted(ids))
        keep.update(int(v) for v in order[:per_class])
    return [i for i, e in enumerate(index) if int(e["video_id"]) in keep]


class ClipDataset(Dataset):
    """Clips of one split of a prep output.

    Items are dicts: `rgb` float32 `(3, T, S, S)` in [0, 1]; `label` int64; `index` (clip index in
    the split); `video_id`; and with `flow_root`, `flow` float32 `(2, T-1, S, S)` in pixels
    (channel 0 horizontal, 1 vertical). `hflip_label_map[k]` is the label of a mirrored clip of class `k`
    (`vidistill.data.augment.mirror_label_map`), which the training loop's flips apply.

    Args:
        root: the prep output directory (holds `manifest.json`).
        split: `"train"` or `"test"`.
        flow_root: the flow output directory of the same clips (`vidistill flow`), or None.
        videos_per_class: keep only this many videos of each class (all their clips), drawn without
            replacement by `subset_seed`, independently per class (stratified); 0 keeps every video.
            The benchmark regime's student sees such a subset of the labelled pool its teacher trains on.
        subset_seed: seed of that draw (the same seed and data give the same videos on every machine).

    Raises:
        ConfigError: a missing or unreadable prep/flow output, an unknown split, flow computed for
            other clips, or a class with fewer than `videos_per_class` videos in the split.
    """

    def __init__(self, root: str | Path, split: str, *, flow_root: str | Path | None = None, videos_per_class: int = 0,
                 subset_seed: int = 0) -> None:
        self.root = Path(root)
        self.split = split
        self.manifest: dict[str, Any] = _read_json(self.root / "manifest.json", "run `vidistill prep` first")
        if split not in self.manifest.get("splits", {}):
            raise ConfigError(f"split {split!r} is not in {self.root / 'manifest.json'}; "
                              f"choose one of: {', '.join(self.manifest.get('splits', {}))}")
        self.index: list[dict[str, Any]] = _read_json(self.root / split / "index.json",
                                                      "the prep output is incomplete; rerun `vidistill prep`")
        self.classes: list[str] = list(self.manifest["classes"])
        self.num_classes = len(self.classes)
        self.frames: int = int(self.manifest["frames"])
        self.size: int = int(self.manifest["size"])
        self.hflip_label_map = mirror_label_map(self.classes)  # the class a mirrored clip shows (training flips)
        if videos_per_class:
            self.index = [self.index[i] for i in video_subset(self.index, self.classes, videos_per_class, seed=subset_seed,
                                                              where=f"{self.root} ({split} split)")]
        self.labels = np.array([e["label"] for e in self.index], dtype=np.int64)  # (N,)
        self.video_ids = np.array([e["video_id"] for e in self.index], dtype=np.int64)  # (N,)
        shards = sorted({e["shard"] for e in self.index})
        self._clip_files = {s: self.root / split / f"clips-{s:05d}.npy" for s in shards}
        self.flow_root = Path(flow_root) if flow_root is not None else None
        self.flow_bound = FLOW_BOUND
        self._flow_files: dict[int, Path] = {}
        if self.flow_root is not None:
            fm = _read_json(self.flow_root / "manifest.json", "run `vidistill flow` first")
            if fm.get("clips_hash") != self.manifest.get("hash"):
                raise ConfigError(f"flow in {self.flow_root} was computed for other clips (clips_hash "
                                  f"{fm.get('clips_hash')!r} != {self.manifest.get('hash')!r}); rerun `vidistill flow`")
            self.flow_bound = float(fm.get("bound", FLOW_BOUND))
            self._flow_files = {s: self.flow_root / split / f"flow-{s:05d}.npy" for s in shards}
        missing = [str(p) for p in [*self._clip_files.values(), *self._flow_files.values()] if not p.is_file()]
        if missing:
            raise ConfigError(f"missing shard file(s): {', '.join(missing[:3])}; rerun the stage that writes them")
        self._open: dict[tuple[str, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = {}  # memory maps are reopened in each worker process
        return state

    def _shard(self, kind: str, shard: int) -> np.ndarray:
        key = (kind, shard)
        if key not in self._open:
            path = (self._clip_files if kind == "clips" else self._flow_files)[shard]
            self._open[key] = np.load(path, mmap_mode="r")
        return self._open[key]

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.index[i]
        clip = np.array(self._shard("clips", e["shard"])[e["offset"]])  # (T, S, S, 3) uint8
        rgb = torch.from_numpy(clip).permute(3, 0, 1, 2).float().div_(255.0)  # (3, T, S, S)
        item = {"rgb": rgb, "label": torch.tensor(e["label"], dtype=torch.int64), "index": i, "video_id": e["video_id"]}
        if self.flow_root is not None:
            code = np.array(self._shard("flow", e["shard"])[e["offset"]])  # (T-1, S, S, 2) uint8
            flow = torch.from_numpy(code).permute(3, 0, 1, 2).float()  # (2, T-1, S, S)
            item["flow"] = flow.mul_(2 * self.flow_bound / 255.0).sub_(self.flow_bound)
        return item
