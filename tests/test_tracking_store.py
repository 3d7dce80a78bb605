"""The default tracking store (issue #21, kind 4): one store per project, found from any working
directory, at an absolute, percent-encoded location, safe when several processes start on it at once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from helpers_runs import start, write_params
from mlflow import MlflowClient
from sqlalchemy.engine import make_url

from vidistill.registry import tracking

ODD = "my runs 100% ?a#1"  # a space, %, ? and # in one folder name


def test_three_tracked_commands_started_at_once_on_a_fresh_store_all_succeed(tmp_path):
    """Three `vidistill prep` (three datasets side by side) start together in a fresh project whose folder
    name needs escaping, one of them from a subfolder: all succeed, their runs and artifacts land in the
    project's one store, and the store is intact for the next command."""
    project = tmp_path / ODD
    write_params(project, {"prep": {"synth": {"videos_per_class": 2, "frames": 6}}})
    sub = project / "sub folder"
    sub.mkdir()
    procs = []
    for i in range(3):
        procs.append(start(sub if i == 0 else project, "prep", "--quiet", "--params", str(project / "params.yaml"),
                           "--out", str(project / "data" / f"clips_{i}"), "--root", str(project / "data" / "raw" / f"v{i}"),
                           "--synth-seed", str(i), log=tmp_path / f"prep{i}.log"))
    for proc in procs:
        assert proc.wait(timeout=900) == 0, Path(proc.log).read_text()[-3000:]
        assert "Traceback" not in Path(proc.log).read_text()

    db = project / "mlflow.db"
    assert db.is_file() and not (sub / "mlflow.db").exists() and not (tmp_path / "mlflow.db").exists()
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert len(con.execute("SELECT version_num FROM alembic_version").fetchall()) == 1
    c = MlflowClient(tracking.sqlite_uri(db))
    exp = c.get_experiment_by_name("vidistill")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert exp.artifact_location == (project / "mlartifacts" / "vidistill").as_uri()
    for r in runs:
        assert [a.path for a in c.list_artifacts(r.info.run_id)] == ["manifest.json"]
    stored = list((project / "mlartifacts" / "vidistill").glob("*/artifacts/manifest.json"))
    assert len(stored) == 3  # under the project folder, its odd name intact
    assert tracking.experiment_id(c, "vidistill") == exp.experiment_id  # the next command finds it all


def test_the_store_location_is_absolute_escaped_and_anchored_at_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    project = tmp_path / ODD
    deep = project / "runs" / "distill"
    deep.mkdir(parents=True)
    (project / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(deep)
    uri = tracking.tracking_uri()
    assert make_url(uri).database == str(project / "mlflow.db")  # what SQLAlchemy (MLflow's store) opens
    assert tracking.sqlite_path(uri) == project / "mlflow.db"
    assert "?" not in uri.removeprefix("sqlite:///") and "#" not in uri and " " not in uri

    # a DVC experiment's temporary copy of the project: its runs belong to the project
    copy = project / ".dvc" / "tmp" / "exps" / "standalone" / "tmpab12"
    copy.mkdir(parents=True)
    (copy / "params.yaml").write_text("{}\n")
    assert tracking.project_root(copy) == project
    monkeypatch.setenv("DVC_ROOT", str(project))  # what DVC sets for a stage's command (also for --temp, --queue)
    monkeypatch.chdir(copy)
    assert tracking.project_root() == project
    monkeypatch.delenv("DVC_ROOT")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert tracking.project_root(outside) == outside  # no project: the working directory, as before
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
