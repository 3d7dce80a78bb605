"""The unlabelled pool of masked pre-training (MAE, VideoMAE, MVD) and its frame view.

The pool is the **train** split of a prep output, read without its labels. Pre-training on test
videos would be transductive, so `unlabelled_pool` refuses a prep output whose train split shares a
video (by its file or its id) with the test split.

The image teacher of MVD is pre-trained on images (MAE on ImageNet-1K in the paper, sec. 4.1); we
have only videos, so `FrameClips` serves the frames of the pool's clips as images (methods brief, 3.4
item 5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vidistill.data.dataset import ClipDataset, _read_json
from vidistill.errors import ConfigError


def assert_disjoint_from_test(pool: ClipDataset) -> None:
    """Refuse a pool that shares a video with the test split of the same prep output.

    Raises:
        ConfigError: a train clip comes from a test video (same file or same video id), or the pool
            is not the train split.
    """
    if pool.split != "train":
        raise ConfigError(f"the unlabelled pool must be the train split of {pool.root}, not {pool.split!r}: "
                          "pre-training on test videos would be transductive")
    test_index = pool.root / "test" / "index.json"
    if not test_index.is_file():
        return  # no test split to leak into
    test = _read_json(test_index, "the prep output is incomplete; rerun `vidistill prep`")
    files = {e["video"] for e in test}
    ids = {int(e["video_id"]) for e in test}
    shared = sorted({e["video"] for e in pool.index if e["video"] in files or int(e["video_id"]) in ids})
    if shared:
        raise ConfigError(f"the unlabelled pool {pool.root}/train shares {len(shared)} video(s) with its test split "
                          f"(e.g. {shared[0]}); pre-training on test videos would be transductive: rerun `vidistill prep`")


def unlabelled_pool(root: str | Path) -> ClipDataset:
    """The train split of prep output `root`, checked to hold no test video (its labels are never read
    by the masked pretexts).

    Raises:
        ConfigError: a missing prep output, or a train split that shares a video with the test split.
    """
    pool = ClipDataset(root, "train")
    assert_disjoint_from_test(pool)
    return pool


class FrameClips(Dataset):
    """The clips' frames as images, one item per clip: a random frame (training) or a fixed one (held out).

    With `random_frame`, item i is a frame of clip i drawn from torch's global RNG at each access (as
    `PaceClips` draws its windows), so an epoch sees every clip once, like an epoch of the video
    pretexts, and successive epochs see different frames; the draw is part of the run's RNG stream,
    so `--resume` stays exact. Without it, item i is frame `i % T` of clip i: fixed, spread over time.

    Items: `rgb` float32 `(3, S, S)` in [0, 1], `index`, `video_id` (of the clip's video) and the
    clip's `label` (kept for the collate; the masked pretexts never read it).

    Args:
        clips: the clips (a `ClipDataset`).
        random_frame: draw the frame at random (True) or take frame `i % T` (False).
    """

    def __init__(self, clips: ClipDataset, *, random_frame: bool) -> None:
        self.clips, self.random_frame = clips, random_frame
        self.frames = clips.frames
        self.classes, self.num_classes, self.size = clips.classes, clips.num_classes, clips.size

    def __len__(self) -> int:
        return len(self.clips)

    def frame_of(self, i: int) -> int:
        """The frame item i shows (a fresh draw when `random_frame`)."""
        return int(torch.randint(0, self.frames, ())) if self.random_frame else i % self.frames

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.clips[i]
        return {"rgb": item["rgb"][:, self.frame_of(i)].contiguous(), "label": item["label"], "index": i,
                "video_id": item["video_id"]}
