"""Class balance is visible (issue #21, kind 6): prep warns about classes without test clips and about
strong imbalance; every evaluation summary shows mean class accuracy beside top-1."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_video import moving_frames, write_video

from vidistill import cli, stages
from vidistill.config import TeachConfig, from_dict
from vidistill.data.prep import IMBALANCE_WARN, class_balance
from vidistill.evaluate.metrics import classification_metrics

# 12 / 2 / 1 videos; the seeded split (test_fraction 0.3) gives 8/4, 1/1 and 1/0 train/test videos
COUNTS = {"common": 12, "rare": 2, "single": 1}


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    root = tmp_path_factory.mktemp("balance")
    for cls, n in COUNTS.items():
        for i in range(n):
            dx = {"common": 2, "rare": -2, "single": 0}[cls]
            write_video(root / "videos" / cls / f"{cls}{i}.mp4", moving_frames(8, height=24, width=32, seed=i, dx=dx))
    return root


def test_prep_warns_about_classes_without_test_clips_and_strong_imbalance(imbalanced, capsys):
    out = imbalanced / "clips"
    code = cli.main(["prep", "--quiet", "--no-track", "--params", str(imbalanced / "none.yaml"), "--dataset", "folder",
                     "--root", str(imbalanced / "videos"), "--out", str(out), "--frames", "4", "--short-side", "16",
                     "--crop", "16", "--workers", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    warnings = [line for line in printed.splitlines() if line.startswith("prep: warning: ")]
    assert any("'single' have no test clip" in w for w in warnings), printed
    train = next(w for w in warnings if w.startswith("prep: warning: train split is imbalanced"))
    assert "8 clips of 'common' against 1 of" in train and "(8.0:1)" in train and "top-1 0.800" in train, train
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["warnings"] == [w.removeprefix("prep: warning: ") for w in warnings]
    assert manifest["balance"]["without_test"] == ["single"] and manifest["balance"]["train_ratio"] == 8.0


def test_balanced_splits_give_no_warning():
    splits = {"train": {"per_class": {"a": 10, "b": 8, "c": 12}}, "test": {"per_class": {"a": 4, "b": 3, "c": 5}}}
    balance, warnings = class_balance(splits)
    assert warnings == [] and balance["without_test"] == [] and balance["train_ratio"] == 1.5
    splits["train"]["per_class"]["c"] = int(8 * IMBALANCE_WARN)
    assert len(class_balance(splits)[1]) == 1


def test_an_always_majority_model_reads_well_on_top1_and_badly_on_mean_class_accuracy():
    """The control for the summaries: top-1 alone hides a model that always answers the majority class."""
    labels = np.array([0] * 6 + [1])  # 6 clips of the majority class, 1 of the other
    scores = np.tile([1.0, 0.0], (7, 1))  # always class 0
    m = classification_metrics(scores, labels, ["common", "rare"])
    assert m["top1"] == pytest.approx(6 / 7) and m["mean_class_accuracy"] == pytest.approx(0.5)


def test_summaries_show_mean_class_accuracy_beside_top1(imbalanced, capsys):
    out = imbalanced / "clips"
    if not (out / "manifest.json").exists():
        test_prep_warns_about_classes_without_test_clips_and_strong_imbalance(imbalanced, capsys)
    cfg = from_dict(TeachConfig, {"clips": str(out), "out": str(imbalanced / "teacher"), "model": "r2plus1d_student",
                                  "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0, "device": "cpu"}})
    cfg.validate()
    result = stages.teach(cfg, progress=False, track=False)
    assert {"top1", "mean_class_accuracy"} <= set(result)
    capsys.readouterr()
    code = cli.main(["evaluate", "--no-track", "--clips", str(out), "--checkpoint", result["model"], "--out",
                     str(imbalanced / "eval")])
    printed = capsys.readouterr().out
    metrics = json.loads((imbalanced / "eval" / "metrics.json").read_text())
    assert code == 0 and f"top1 {metrics['top1']:.3f} (mean class {metrics['mean_class_accuracy']:.3f})" in printed
    assert metrics["per_class_accuracy"]["single"] is None  # no test clip: not a zero in the mean
