"""Pace prediction: the pretext view of prep clips, and `teach --pretext pace` on real encoded videos."""

from __future__ import annotations

import pytest
import torch

from vidistill import stages
from vidistill.config import ConfigError, PrepConfig, SynthConfig, TeachConfig, TrainConfig
from vidistill.data import ClipDataset, PaceClips
from vidistill.train import load_model

FRAMES, PACES = 4, 3  # pretext clips of 4 frames at 1x..3x need long clips of (4 - 1) * 3 + 1 = 10 frames


@pytest.fixture(scope="module")
def long_clips(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pace")
    synth = SynthConfig(out=str(root / "raw"), domain=1, videos_per_class=3, frames=12, width=48, height=48, seed=2)
    cfg = PrepConfig(dataset="synthetic", root=synth.out, out=str(root / "clips"), frames=10, stride=1, short_side=32,
                     crop=32, test_fraction=0.34, synth=synth)
    stages.prep(cfg, progress=False, track=False)
    return cfg.out


def test_items_are_the_long_clip_at_each_pace(long_clips):
    base = ClipDataset(long_clips, "train")
    pace = PaceClips(base, frames=FRAMES, paces=PACES, random_start=False)
    assert len(pace) == PACES * len(base) and pace.classes == ["pace1", "pace2", "pace3"]
    long = base[1]["rgb"]  # (3, 10, S, S)
    for k in range(PACES):
        item = pace[PACES * 1 + k]
        step, span = k + 1, (FRAMES - 1) * (k + 1) + 1
        start = (10 - span) // 2  # centred window
        assert int(item["label"]) == k and item["rgb"].shape == (3, FRAMES, 32, 32)
        torch.testing.assert_close(item["rgb"], long[:, start : start + span : step])
    torch.manual_seed(0)
    random = PaceClips(base, frames=FRAMES, paces=PACES)
    starts = set()
    for _ in range(20):  # pace 1 has 7 possible starts: random windows move
        item = random[PACES * 1]
        starts.add(next(s for s in range(7) if torch.equal(item["rgb"], long[:, s : s + FRAMES])))
    assert len(starts) > 1


def test_too_short_clips_are_refused_with_the_fix(long_clips):
    with pytest.raises(ConfigError, match=r"needs clips of >= 13 frames.*--frames 13 --stride 1"):
        PaceClips(ClipDataset(long_clips, "train"), frames=FRAMES, paces=4)


def test_teach_pace_pretext_ignores_labels_and_saves_an_encoder(long_clips, tmp_path):
    cfg = TeachConfig(clips=long_clips, out=str(tmp_path / "pre"), model="r2plus1d_student", pretext="pace", paces=PACES,
                      pretext_frames=FRAMES, train=TrainConfig(epochs=1, batch_size=4, device="cpu"))
    cfg.validate()
    result = stages.teach(cfg, progress=False, track=False)
    model, info = load_model(result["model"])
    assert info["classes"] == ["pace1", "pace2", "pace3"] and model.num_classes == PACES and model.frames == FRAMES
    assert info["extra"]["pretext"] == "pace" and 0.0 <= result["top1"] <= 1.0
    assert (tmp_path / "pre" / "eval" / "metrics.json").is_file()


def test_pace_pretext_parameters_are_checked():
    for kw, message in (({"pretext": "jigsaw"}, "teach.pretext must be"), ({"pretext": "pace", "modality": "flow"}, "RGB encoder"),
                        ({"pretext": "pace", "paces": 1}, "teach.paces must be >= 2")):
        with pytest.raises(ConfigError, match=message):
            TeachConfig(model="r2plus1d_student", **kw).validate()
