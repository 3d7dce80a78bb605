"""Playback-pace prediction: a self-supervised pretext task on unlabelled clips.

The encoder that `sd` fine-tunes is pre-trained in the SD paper with RSPNet (relative speed
perception, Chen et al., AAAI 2021), whose idea goes back to pace prediction (Wang, Jiao & Liu,
"Self-supervised Video Representation Learning by Pace Prediction", ECCV 2020): sample a clip at one of
several playback speeds and predict which. The labels of the videos are never read, so any prep output
serves as source data; predicting the speed needs the motion, which is what action classes hinge on.

`PaceClips` wraps the long clips written by prep (`prep.frames` ≥ (frames − 1) · paces + 1, e.g. 24 frames
at stride 1 for 8-frame clips at paces 1-3). Item `j` is clip `j // paces` sampled at stride
`j % paces + 1` from a random start (the centred one with `random_start=False`, for evaluation), so every
epoch shows every clip at every pace.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from vidistill.errors import ConfigError
from vidistill.data.dataset import ClipDataset


def pace_span(frames: int, paces: int) -> int:
    """Frames of the long clip that `frames` frames at the fastest pace cover."""
    return (frames - 1) * paces + 1


class PaceClips(Dataset):
    """The pace-prediction view of a prep split: `rgb` (3, frames, S, S) and `label` = pace index.

    Args:
        clips: the long clips (a `ClipDataset`).
        frames: frames per pretext clip.
        paces: number of playback speeds; pace k samples every (k+1)-th frame.
        random_start: a random start per item (training) or the centred window (evaluation).

    Raises:
        ConfigError: when the long clips are too short for `frames` frames at the fastest pace.
    """

    def __init__(self, clips: ClipDataset, *, frames: int, paces: int, random_start: bool = True) -> None:
        span = pace_span(frames, paces)
        if clips.frames < span:
            raise ConfigError(f"pace prediction with {frames} frames at up to {paces}x speed needs clips of >= {span} frames, "
                              f"but {clips.root} holds {clips.frames}; prep the source with --frames {span} --stride 1 "
                              "(or lower pretext_frames/paces)")
        self.clips, self.frames, self.paces, self.random_start = clips, frames, paces, random_start
        self.classes = [f"pace{k + 1}" for k in range(paces)]
        self.num_classes = paces
        self.size = clips.size

    def __len__(self) -> int:
        return len(self.clips) * self.paces

    def __getitem__(self, j: int) -> dict[str, Any]:
        i, pace = divmod(j, self.paces)
        item = self.clips[i]
        step = pace + 1
        span = pace_span(self.frames, step)
        room = item["rgb"].shape[1] - span
        start = int(torch.randint(0, room + 1, ())) if self.random_start else room // 2
        rgb = item["rgb"][:, start : start + span : step]  # (3, frames, S, S)
        return {"rgb": rgb, "label": torch.tensor(pace, dtype=torch.int64), "index": j, "video_id": j}
