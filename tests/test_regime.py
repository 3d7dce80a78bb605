"""The benchmark regime in the product: students see a stratified subset of the labelled videos their
teachers train on (`distill.student_videos_per_class`), and `bench methods` reports the regime's gates."""

from __future__ import annotations

import json

import pytest

from vidistill import stages
from vidistill.benchmarks.methods import gates_markdown, regime_gates
from vidistill.config import DistillConfig, PrepConfig, SynthConfig, TrainConfig
from vidistill.data import ClipDataset
from vidistill.data.dataset import video_subset
from vidistill.errors import ConfigError


def _index(videos_per_class=(5, 4, 6), clips=2):
    return [{"label": k, "video_id": 100 * k + v, "clip": c} for k, n in enumerate(videos_per_class)
            for v in range(n) for c in range(clips)]


def test_video_subset_is_stratified_deterministic_and_keeps_whole_videos():
    index = _index()
    keep = video_subset(index, ["a", "b", "c"], 3, seed=7)
    assert keep == sorted(keep)  # clips keep their order
    picked = [index[i] for i in keep]
    for k in range(3):
        vids = {e["video_id"] for e in picked if e["label"] == k}
        assert len(vids) == 3
        assert sum(e["label"] == k for e in picked) == 6  # both clips of each chosen video
    assert keep == video_subset(index, ["a", "b", "c"], 3, seed=7)
    assert keep != video_subset(index, ["a", "b", "c"], 3, seed=8)
    # a class's draw depends on its own videos only: adding videos to class c leaves a and b's draw alone
    more = video_subset(_index((5, 4, 9)), ["a", "b", "c"], 3, seed=7)
    first_two = {index[i]["video_id"] for i in keep if index[i]["label"] < 2}
    assert first_two == {_index((5, 4, 9))[i]["video_id"] for i in more if _index((5, 4, 9))[i]["label"] < 2}


def test_video_subset_refuses_more_videos_than_a_class_has():
    with pytest.raises(ConfigError, match=r"student_videos_per_class = 5, but in pool 'b' has 4 video\(s\); use at most 4"):
        video_subset(_index(), ["a", "b", "c"], 5, seed=0, where="pool")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("regime")
    synth = SynthConfig(out=str(root / "raw"), videos_per_class=4, frames=8, width=48, height=36, seed=0)
    prep = PrepConfig(dataset="synthetic", root=synth.out, out=str(root / "clips"), frames=4, stride=2, short_side=32,
                      crop=32, synth=synth, test_fraction=0.25)
    stages.prep(prep, progress=False, track=False)
    return prep.out


def test_students_train_on_the_subset_teachers_on_everything(clips, tmp_path):
    full = ClipDataset(clips, "train")
    per_class = {k: len(set(full.video_ids[full.labels == k])) for k in range(full.num_classes)}
    assert set(per_class.values()) == {3}
    sub = ClipDataset(clips, "train", videos_per_class=2, subset_seed=1)
    assert len(sub) == 2 * full.num_classes and len(full) == 3 * full.num_classes
    assert {int(sub[i]["label"]) for i in range(len(sub))} == set(range(full.num_classes))
    assert ClipDataset(clips, "test", videos_per_class=0).video_ids.tolist() == ClipDataset(clips, "test").video_ids.tolist()

    cfg = DistillConfig(clips=clips, out=str(tmp_path / "none"), method="none", student_videos_per_class=2, student_subset_seed=1,
                        train=TrainConfig(epochs=1, batch_size=4, warmup_epochs=0, device="cpu"))
    result = stages.distill(cfg, progress=False, track=False)
    history = json.loads((tmp_path / "none" / "history.json").read_text())
    assert history[-1]["samples"] == len(sub)
    assert result["top1"] >= 0  # evaluated on the whole test split
    with pytest.raises(ConfigError, match="student_videos_per_class = 4, but in .*use at most 3"):
        stages.distill(DistillConfig(clips=clips, out=str(tmp_path / "x"), method="none", student_videos_per_class=4,
                                     train=TrainConfig(epochs=1, device="cpu")), progress=False, track=False)
    assert not (tmp_path / "x" / "model.pt").exists()
    with pytest.raises(ConfigError, match="student_videos_per_class must be >= 0"):
        DistillConfig(student_videos_per_class=-1).validate()


def test_gates_pass_fail_and_missing_rows_are_reported():
    table = [{"method": "teacher rgb (r2plus1d_student)", "top1": 0.98}, {"method": "teacher flow (r2plus1d_student on TV-L1)", "top1": 0.40},
             {"method": "none", "top1": 0.32}, {"method": "kd", "top1": 0.52}]
    gates = regime_gates(table)
    assert [g["passed"] for g in gates] == [True, False, None]
    assert gates[0]["slack"] == pytest.approx(0.98 - 0.32 - 0.10)
    assert gates[1]["slack"] == pytest.approx(0.40 - 0.32 - 0.10)
    md = gates_markdown(gates)
    assert "| pass |" in md and "| FAIL |" in md and "not measured (its row not trained)" in md
    table.append({"method": "sd (lambda_=0)", "top1": 0.31})
    assert regime_gates(table)[2]["passed"] is False
    table[-1]["top1"] = 0.32
    assert regime_gates(table)[2]["passed"] is True  # fine-tuned >= scratch: equal passes


def test_the_demo_runs_the_regime_and_the_default_profile_uses_every_video():
    from vidistill.config import from_dict
    from vidistill_pipeline import cli, runner

    assert set(cli.PROFILES) == set(runner.PROFILES)
    params = runner.resolve_params("params.yaml", profile="demo")
    k = params["distill"]["student_videos_per_class"]
    assert k == 10
    train_per_class = params["prep"]["synth"]["videos_per_class"] * (1 - params["prep"]["test_fraction"])
    assert train_per_class >= 2 * k  # the teachers see more labelled videos than the students
    cfg = from_dict(DistillConfig, params["distill"], where="distill.")
    cfg.validate()
    assert cfg.train.hflip and cfg.train.crop_scale < 1 and params["teach"]["train"]["hflip"]
    for profile in ("default", "tiny"):  # your videos: every labelled one trains the students
        assert runner.resolve_params("params.yaml", profile=profile)["distill"]["student_videos_per_class"] == 0
