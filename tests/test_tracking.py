"""Stage tracking against a real `mlflow server`: parent/child runs, lineage tags, params, failures."""

from __future__ import annotations

import pytest
from mlflow_server import mlflow_server  # noqa: F401  (fixture)

from vidistill.registry import tracking
from vidistill.registry.tracking import LINEAGE_TAGS, PARENT_ENV, end_pipeline_run, stage_run, start_pipeline_run


def test_pipeline_parent_with_stage_children(mlflow_server, monkeypatch, tmp_path):  # noqa: F811
    parent = start_pipeline_run("pipeline-demo", {"profile": "demo"}, tags={"data_hash": "d0"}, experiment="t-tracking")
    monkeypatch.setenv(PARENT_ENV, parent)
    params = {"train": {"lr": 0.003, "epochs": 2}, "method": "sd"}
    report = tmp_path / "report.json"
    report.write_text("{}")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "curve.txt").write_text("1 2 3")
    with stage_run("distill", params=params, tags={"data_hash": "d0", "method": "sd", "teacher_run_id": "t123", "owner": "ci"},
                   experiment="t-tracking") as run:
        run.log_metrics({"loss": 1.5, "top1": 0.25}, step=1)
        run.log_metrics({"loss": 0.5}, step=2)
        run.log_artifact(report)
        run.log_artifacts(tmp_path / "plots", artifact_path="plots")
    with stage_run("evaluate", params={"split": "test"}, tags={"data_hash": "d0"}, experiment="t-tracking") as ev:
        pass
    end_pipeline_run(parent, "FINISHED")

    c = tracking.client()
    child = c.get_run(run.run_id)
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert c.get_run(ev.run_id).data.tags["mlflow.parentRunId"] == parent
    assert child.data.params == {"train.lr": "0.003", "train.epochs": "2", "method": "sd"}
    assert child.data.metrics == {"loss": 0.5, "top1": 0.25}
    assert [m.value for m in c.get_metric_history(run.run_id, "loss")] == [1.5, 0.5]
    tags = child.data.tags
    assert {f"vidistill.{k}" for k in LINEAGE_TAGS} <= set(tags)
    assert (tags["vidistill.stage"], tags["vidistill.method"], tags["vidistill.teacher_run_id"]) == ("distill", "sd", "t123")
    assert tags["vidistill.data_hash"] == "d0" and tags["owner"] == "ci"
    assert tags["vidistill.params_hash"] == tracking.params_hash(params)
    assert tags["vidistill.git_commit"] == tracking.git_commit()
    assert sorted(f.path for f in c.list_artifacts(run.run_id)) == ["plots", "report.json"]
    assert [f.path for f in c.list_artifacts(run.run_id, "plots")] == ["plots/curve.txt"]
    parent_run = c.get_run(parent)
    assert parent_run.info.status == "FINISHED" and parent_run.data.tags["vidistill.stage"] == "pipeline"
    assert parent_run.data.tags["vidistill.method"] == "none"  # every lineage tag exists on every run


def test_failed_stage_is_marked_failed(mlflow_server, monkeypatch):  # noqa: F811
    monkeypatch.delenv(PARENT_ENV, raising=False)
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run("train", params={"lr": 1}, experiment="t-tracking") as run:
            raise RuntimeError("boom")
    got = tracking.client().get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert "mlflow.parentRunId" not in got.data.tags


def test_user_errors_are_named(mlflow_server, monkeypatch):  # noqa: F811
    monkeypatch.setenv(PARENT_ENV, "0" * 32)
    with pytest.raises(ValueError, match=f"{PARENT_ENV}="):
        with stage_run("train", params={}, experiment="t-tracking"):
            pass
    monkeypatch.delenv(PARENT_ENV)
    with stage_run("train", params={}, experiment="t-tracking") as run:
        with pytest.raises(ValueError, match=r"\['acc'\]"):
            run.log_metrics({"acc": "high"})
        with pytest.raises(FileNotFoundError, match="missing.txt"):
            run.log_artifact("missing.txt")
    with pytest.raises(ValueError, match="status must be one of"):
        end_pipeline_run(run.run_id, "DONE")


def test_default_tracking_uri_is_sqlite_in_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.tracking_uri() == "http://mlflow:5000"
