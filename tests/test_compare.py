"""`vidistill bench methods` (`vidistill.benchmarks.methods`): jobs from the registry, generic sweeps, and the
benchmark end to end at toy scale (every row, mean ± std over seeds, loss terms, the latency ratio)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vidistill.benchmarks.methods import bench_methods, method_jobs
from vidistill.distill import get_method, list_methods
from vidistill.errors import ConfigError


def test_method_jobs_come_from_the_registry_and_sweeps():
    jobs = method_jobs(["none", "d3d", "sd"], {})
    assert [(label, key) for label, key, _ in jobs] == [
        ("none", "none"), ("d3d (lambda_=1)", "d3d"), ("d3d (lambda_=0.1)", "d3d"), ("d3d (lambda_=1, teacher=rgb)", "d3d"),
        ("sd (lambda_=0)", "sd"),
        ("sd (lambda_=1)", "sd"), ("sd (lambda_=100)", "sd"), ("sd (lambda_=0, optimizer=train)", "sd"),
        ("sd (lambda_=100, optimizer=train)", "sd")]
    assert jobs[-1][2] == {"lambda_": 100.0, "optimizer": "train"}
    # a sweep replaces the method's default variants by every combination, typed by its Params
    jobs = method_jobs(["sd", "toy"], {"sd": {"lambda_": ["0", "1.5"], "snapshot_norm": ["batch", "running"]},
                                       "toy": {"beta": ["2"]}})
    assert [hp for _, _, hp in jobs] == [
        {"lambda_": 0.0, "snapshot_norm": "batch"}, {"lambda_": 0.0, "snapshot_norm": "running"},
        {"lambda_": 1.5, "snapshot_norm": "batch"}, {"lambda_": 1.5, "snapshot_norm": "running"}, {"beta": 2.0}]


@pytest.mark.parametrize("method", list_methods())
def test_every_method_gets_at_least_one_job_with_valid_hyperparameters(method):
    from vidistill.distill import method_params

    jobs = method_jobs([method], {})
    assert jobs and all(key == method for _, key, _ in jobs)
    for _, key, hp in jobs:
        method_params(key, hp)
    assert len(jobs) == max(1, len(get_method(method).bench_variants))


def test_a_bad_setting_is_refused_before_any_work(tmp_path):
    work = tmp_path / "work"
    for kwargs, message in (({"sweep": {"d3d": {"lambda_": ["-1"]}}}, "distill.methods.d3d.lambda_ must be >= 0"),
                            ({"sweep": {"d3d": {"gamma": ["1"]}}}, "unknown hyperparameter sweep.d3d.gamma; d3d's are: lambda_"),
                            ({"sweep": {"d3d": {"lambda_": ["one"]}}}, "sweep.d3d.lambda_ must be a float"),
                            ({"methods": ("none",), "sweep": {"kd": {"tau": ["2"]}}}, "does not train"),
                            ({"methods": ("d4d",)}, "unknown distillation method 'd4d'"),
                            ({"source_pretext": "jigsaw"}, "teach.pretext must be"),
                            ({"crop_scale": 0.0}, "crop_scale"),
                            ({"videos_per_class": 6, "student_videos_per_class": 5},
                             "student_videos_per_class=5 is more than the 4 training videos per class")):
        with pytest.raises(ConfigError, match=message):
            bench_methods(work=work, **kwargs)
    assert not work.exists()


@pytest.mark.slow
def test_bench_methods_at_toy_scale(tmp_path):
    result = bench_methods(work=tmp_path, seeds=2, videos_per_class=3, student_videos_per_class=1, teacher_epochs=1,
                           student_epochs=1, methods=("none", "d3d", "sd", "toy"),
                           sweep={"d3d": {"lambda_": ["1"]}, "sd": {"lambda_": ["0", "1"]}, "toy": {"beta": ["0", "1"]}})
    labels = [r["method"] for r in result["rows"]]
    assert labels == ["teacher rgb (r2plus1d_student)", "teacher flow (r2plus1d_student on TV-L1)",
                      "source encoder (pace prediction, its own task on source test clips)",
                      "two-stream: teacher rgb + teacher flow", "none", "two-stream: none + teacher flow",
                      "d3d (lambda_=1)", "sd (lambda_=0)", "sd (lambda_=1)", "toy (beta=0)", "toy (beta=1)"]
    assert len(result["per_seed"]) == 2 * len(labels)
    rows = {r["method"]: r for r in result["rows"]}
    for row in result["rows"]:
        per_seed = [r["top1"] for r in result["per_seed"] if r["method"] == row["method"]]
        assert row["seeds"] == 2 and row["top1"] == pytest.approx(np.mean(per_seed))
        assert row["top1_std"] == pytest.approx(np.std(per_seed))
        assert ("train_acc" in row) == (not row["method"].startswith("two-stream"))
    # every loss term each method returns is in its row (last epoch, mean ± std over seeds)
    assert {"term:ce", "term:distill", "term:loss"} <= set(rows["d3d (lambda_=1)"])
    assert {"term:ce", "term:match"} <= set(rows["toy (beta=1)"]) and "term:kd" not in rows["toy (beta=1)"]
    assert rows["toy (beta=0)"]["term:loss"] == pytest.approx(rows["toy (beta=0)"]["term:ce"])
    (latency,) = result["latency"]  # d3d declares bench_latency
    assert latency["method"] == "d3d (lambda_=1)" and latency["two_stream_row"] == "two-stream: none + teacher flow"
    assert latency["two_stream_ms"] > latency["student_ms"] > 0 and latency["speedup"] > 1
    assert 0 <= latency["accuracy_vs_two_stream"]
    md = result["markdown"].splitlines()
    assert md[0].startswith("| gate |") and len(result["gates"]) == 3  # the regime's gates come first
    assert "| d3d (lambda_=1) |" in result["markdown"] and " match |" in next(line for line in md if line.startswith("| method"))
    settings = json.loads((tmp_path / "result.json").read_text())["settings"]
    assert settings["videos_per_class"] == 3 and settings["hflip"] is True and settings["student_videos_per_class"] == 1


def test_a_diverged_seed_is_counted_not_averaged():
    from vidistill.benchmarks.methods import aggregate, regime_gates
    from vidistill.evaluate.report import markdown_table

    rows = [{"method": "none", "seed": 0, "top1": 0.5}, {"method": "none", "seed": 1, "top1": 0.7},
            {"method": "sd (lambda_=100)", "seed": 0, "top1": 0.4},
            {"method": "sd (lambda_=100)", "seed": 1, "diverged": "the loss became nan at epoch 1, step 7"},
            {"method": "sd (lambda_=1000)", "seed": 0, "diverged": "the loss became inf"}]
    table = {r["method"]: r for r in aggregate(rows)}
    assert table["none"]["top1"] == pytest.approx(0.6) and "diverged" not in table["none"]
    assert (table["sd (lambda_=100)"]["seeds"], table["sd (lambda_=100)"]["diverged"]) == (1, 1)
    assert table["sd (lambda_=100)"]["top1"] == pytest.approx(0.4)
    assert table["sd (lambda_=1000)"]["seeds"] == 0 and "top1" not in table["sd (lambda_=1000)"]
    md = markdown_table(list(table.values()))
    assert "| sd (lambda_=1000) | – | – | – | 0 | 1 |" in md
    assert all(g["passed"] is None for g in regime_gates(list(table.values())))  # no teacher rows: not measured


def test_the_baseline_is_the_registrys_labels_only_method():
    from vidistill.distill import baseline_methods

    assert "none" in baseline_methods() and not {"kd", "d3d", "sd"} & set(baseline_methods())
    assert all(get_method(k).needs == () for k in baseline_methods())  # a baseline needs no teacher
