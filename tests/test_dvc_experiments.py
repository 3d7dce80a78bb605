"""DVC experiments keep their results (issue #21, kind 7), with the real `dvc` and `git` commands.

The project is a tiny git + DVC repository whose dvc.yaml holds the `prep` and `teach_rgb` stages exactly
as `vidistill pipeline compile` generates them (`build_dvc`), minus their library-code dependencies
(the test project has no copy of `src/`): cached metrics and plots, persisted checkpoints, `--resume
--restart-if-stale` on the training command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers_runs import BIN, ROOT, env, epochs_logged, wait_for, write_params

from vidistill_pipeline.dvc import build_dvc

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x",
           "DVC_NO_ANALYTICS": "1"}
TEACHER = "runs/teacher_rgb"


def _env() -> dict[str, str]:
    return env(**GIT_ENV)


def _sh(cwd: Path, *args: str, timeout: float = 600) -> str:
    exe = [str(BIN / args[0])] if args[0] == "dvc" else [args[0]]
    done = subprocess.run(exe + list(args[1:]), cwd=cwd, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dvcproj")
    write_params(root, {"teach": {"train": {"epochs": 2, "lr": 0.01}}})
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["pipeline"] = {"methods": ["none"]}
    stages = build_dvc(params, ROOT)["stages"]
    keep = {}
    for name in ("prep", "teach_rgb"):
        stage = dict(stages[name])
        stage["deps"] = [d for d in stage.get("deps", []) if not str(d).startswith("src/")]
        if not stage["deps"]:
            stage.pop("deps")
        keep[name] = stage
    assert {"persist": True, "cache": False} in [o[f"{TEACHER}/checkpoints"] for o in keep["teach_rgb"]["outs"]
                                                   if isinstance(o, dict)]
    assert "--resume --restart-if-stale" in keep["teach_rgb"]["cmd"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": keep}, sort_keys=False))
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\n*.log\n")
    _sh(root, "git", "init", "-q")
    _sh(root, "dvc", "init", "-q")
    _sh(root, "git", "add", "-A")
    _sh(root, "git", "commit", "-qm", "baseline")
    return root


def _teach_runs(root: Path) -> int:
    with sqlite3.connect(root / "mlflow.db") as con:
        return con.execute("SELECT COUNT(*) FROM tags WHERE key = 'vidistill.stage' AND value = 'teach_rgb'").fetchone()[0]


def test_two_experiments_keep_their_metrics_and_checkout_restores_them(repo):
    """`dvc exp run -S` twice (the second with --temp, in a copy under .dvc/tmp/exps): `dvc exp show` lists
    both experiments' metrics, `dvc plots diff` finds both histories, `dvc exp apply` restores the model
    and metrics of the experiment applied, and both MLflow runs are in the project's store."""
    _sh(repo, "dvc", "exp", "run", "-q", "-n", "lr_a", "-S", "teach.train.lr=0.01")
    a_metrics = json.loads((repo / TEACHER / "eval" / "metrics.json").read_text())
    a_model = (repo / TEACHER / "model.pt").read_bytes()
    _sh(repo, "dvc", "exp", "run", "-q", "--temp", "-n", "lr_b", "-S", "teach.train.lr=0.2")

    shown = json.loads(_sh(repo, "dvc", "exp", "show", "--json"))
    found = {}
    for rev in shown:
        for exp in rev.get("experiments") or []:
            for item in exp.get("revs") or []:
                data = item.get("data") or {}
                metrics = (data.get("metrics") or {}).get(f"{TEACHER}/eval/metrics.json", {}).get("data", {})
                found[item.get("name")] = (metrics, data["params"]["params.yaml"]["data"]["teach"]["train"]["lr"])
    assert set(found) >= {"lr_a", "lr_b"}, shown
    assert found["lr_a"][1] == 0.01 and found["lr_b"][1] == 0.2
    for name in ("lr_a", "lr_b"):
        assert {"top1", "mean_class_accuracy"} <= set(found[name][0]), found[name]
    assert found["lr_a"][0]["top1"] == a_metrics["top1"]

    plots = _sh(repo, "dvc", "plots", "diff", "lr_a", "lr_b", "--json", "--split")
    assert f"{TEACHER}/history.json" in plots and "lr_a" in plots and "lr_b" in plots

    # the workspace holds lr_a's results (the --temp run left it alone); apply lr_b, then lr_a again
    _sh(repo, "dvc", "exp", "apply", "lr_b")
    b_metrics = json.loads((repo / TEACHER / "eval" / "metrics.json").read_text())
    assert b_metrics["top1"] == found["lr_b"][0]["top1"]
    assert (repo / TEACHER / "model.pt").read_bytes() != a_model
    _sh(repo, "dvc", "exp", "apply", "lr_a")
    assert json.loads((repo / TEACHER / "eval" / "metrics.json").read_text()) == a_metrics
    assert (repo / TEACHER / "model.pt").read_bytes() == a_model

    assert _teach_runs(repo) == 2  # the --temp run tracked in the project's store, not in its copy
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))


def test_a_killed_dvc_repro_resumes_from_its_checkpoint(repo):
    """`dvc repro` killed (SIGKILL to DVC and the training process) after some epochs: DVC removed the
    stage's outputs before running it, but the persisted checkpoints stayed, and the rerun continues."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["teach"]["train"].update(epochs=12, lr=0.05)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.rmtree(repo / TEACHER, ignore_errors=True)  # the applied experiment's history must not count as this run's epochs
    log = repo / "repro1.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([str(BIN / "dvc"), "repro", "teach_rgb"], cwd=repo, env=_env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    wait_for(lambda: epochs_logged(repo / TEACHER) >= 2, proc=proc, timeout=300, what="two epochs under dvc repro")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = epochs_logged(repo / TEACHER)
    assert 2 <= done < 12 and (repo / TEACHER / "checkpoints" / "last.pt").is_file(), log.read_text()
    first = json.loads((repo / TEACHER / "history.json").read_text())[0]

    out = _sh(repo, "dvc", "repro", "teach_rgb")
    assert "resuming from" in out and "of 12 epochs done" in out, out[-3000:]
    resumed_at = int(out.split("of 12 epochs done")[0].rsplit(":", 1)[1].strip())
    assert resumed_at >= done - 1 >= 1  # at most the epoch in flight at the kill is trained again
    history = json.loads((repo / TEACHER / "history.json").read_text())
    assert len(history) == 12 and history[0] == first
    _sh(repo, "dvc", "status")  # the pipeline is complete and consistent
