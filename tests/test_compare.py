"""`vidistill bench methods` end to end at toy scale: every row, mean ± std over seeds, the latency ratio."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vidistill.evaluate.compare import bench_methods, method_jobs


def test_method_jobs_expand_the_sweeps():
    jobs = method_jobs(["none", "d3d", "sd"], [1.0, 0.1], [0.0, 100.0], [100.0])
    assert [(label, key) for label, key, _ in jobs] == [
        ("none", "none"), ("d3d (λ=1)", "d3d"), ("d3d (λ=0.1)", "d3d"), ("sd (λ=0: plain fine-tuning)", "sd"),
        ("sd (λ=100)", "sd"), ("sd (λ=100, running-statistics snapshot)", "sd")]
    assert jobs[-1][2] == {"lambda_": 100.0, "snapshot_norm": "running"}


def test_a_bad_setting_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="distill.methods.d3d.lambda_ must be >= 0"):
        bench_methods(work=tmp_path, d3d_lambdas=(-1.0,))
    with pytest.raises(ValueError, match="teach.pretext must be"):
        bench_methods(work=tmp_path, sd_pretext="jigsaw")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_bench_methods_at_toy_scale(tmp_path):
    result = bench_methods(work=tmp_path, seeds=2, videos_per_class=3, teacher_epochs=1, student_epochs=1,
                           rgb_teacher="r2plus1d_student", methods=("none", "d3d", "sd"), d3d_lambdas=(1.0,),
                           sd_lambdas=(0.0, 1.0), sd_running_lambdas=())
    labels = [r["method"] for r in result["rows"]]
    assert labels == ["teacher rgb (r2plus1d_student)", "teacher flow (r2plus1d_student on TV-L1)",
                      "sd's source encoder (pace prediction, its own task on source test clips)",
                      "two-stream: teacher rgb + teacher flow", "none", "two-stream: none + teacher flow", "d3d (λ=1)",
                      "sd (λ=0: plain fine-tuning)", "sd (λ=1)"]
    assert len(result["per_seed"]) == 2 * len(labels)
    for row in result["rows"]:
        per_seed = [r["top1"] for r in result["per_seed"] if r["method"] == row["method"]]
        assert row["seeds"] == 2 and row["top1"] == pytest.approx(np.mean(per_seed))
        assert row["top1_std"] == pytest.approx(np.std(per_seed))
        assert ("train_acc" in row) == (not row["method"].startswith("two-stream"))
    latency = result["latency"]
    assert latency["two_stream_ms"] > latency["student_ms"] > 0 and latency["speedup"] > 1
    assert 0 <= latency["accuracy_vs_two_stream"]
    assert "| d3d (λ=1) |" in result["markdown"]
    assert json.loads((tmp_path / "result.json").read_text())["settings"]["videos_per_class"] == 3
