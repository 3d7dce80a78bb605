"""End to end: the whole pipeline under kfp.local (tiny profile) and a tiny `dvc repro`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_local_pipeline_promotes_a_champion_that_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    from vidistill.config import load_params
    from vidistill_pipeline.demo import run_demo

    methods = load_params(ROOT / "params.yaml")["pipeline"]["methods"]
    summary = run_demo(profile="tiny", params=ROOT / "params.yaml", workdir=tmp_path)
    champ = summary["champion"]
    assert champ is not None, "no champion alias after the pipeline"
    assert champ["tags"]["parity_passed"] == "true"
    assert champ["tags"]["method"] in methods
    report = Path(summary["report"]).read_text()
    assert "two-stream" in report and all(f"| {m} |" in report for m in methods)

    # the registered champion is an RGB-only ONNX model that ONNX Runtime serves
    from vidistill.export.runtime import make_session
    from vidistill.registry.models import download_model

    got = download_model("models:/vidistill-synthetic@champion", tmp_path / "champion")
    sess = make_session(got["onnx_path"])
    (inp,) = sess.get_inputs()
    shape = [2 if not isinstance(d, int) else d for d in inp.shape]
    assert shape[1] == 3, "the student must take RGB only"
    logits = sess.run(["logits"], {inp.name: np.random.default_rng(0).random(shape, dtype=np.float32)})[0]
    assert logits.shape == (2, len(got["classes"])) and np.isfinite(logits).all()

    # one parent run with child runs per stage (nested by the track-stages task), all carrying lineage tags;
    # the comparison report is attached to the parent
    from vidistill.registry.tracking import client

    c = client()
    experiments = [e.experiment_id for e in c.search_experiments()]
    parents = [r for r in c.search_runs(experiments) if r.data.tags.get("vidistill.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = [r for r in c.search_runs(experiments) if r.data.tags.get("mlflow.parentRunId") == parent]
    stages = {r.data.tags["vidistill.stage"] for r in children}
    assert {"prep", "flow", "teach_rgb", "teach_flow", "export", "register"} | {f"distill_{m}" for m in methods} <= stages
    for r in children:
        assert r.data.tags["vidistill.git_commit"] and r.data.tags["vidistill.params_hash"]
        if r.data.tags["vidistill.stage"] != "prep":
            assert r.data.tags["vidistill.data_hash"] not in ("", "none", "unknown"), r.data.tags
    assert {a.path for a in c.list_artifacts(parent, "report")} == {"report/comparison.md", "report/comparison.html"}

    # the same run again: every compute task comes from kfp.local's cache; only the side effects run
    # (a new parent run, which tags the reused stage runs, and the registration)
    again = run_demo(profile="tiny", params=ROOT / "params.yaml", workdir=tmp_path)
    assert set(again["index"]["reused"]) == set(summary["index"]["adopted"]) and not again["index"]["adopted"]
    assert again["report"] == summary["report"] and again["onnx"] == summary["onnx"]
    parents = [r for r in c.search_runs(experiments) if r.data.tags.get("vidistill.stage") == "pipeline"]
    newest = max(parents, key=lambda r: r.info.start_time)
    assert {k.removeprefix("vidistill.reused_run.") for k in newest.data.tags if k.startswith("vidistill.reused_run.")} \
        == set(summary["index"]["adopted"])


@pytest.mark.slow
def test_tiny_dvc_repro(tmp_path):
    work = tmp_path / "repo"
    local_state = {".venv", "data", "runs", "outputs", "mlflow.db", "mlruns", "mlartifacts", ".git", "dvc.lock"}
    shutil.copytree(ROOT, work, ignore=lambda d, names: [n for n in names if Path(d) == ROOT and n in local_state])
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    import yaml

    params = yaml.safe_load((work / "params.yaml").read_text())
    params["prep"]["synth"]["videos_per_class"] = 3
    params["prep"]["frames"] = 4
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    dvc = str(BIN / "dvc")
    done = subprocess.run([dvc, "repro", "prep"], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((work / "data" / "clips" / "manifest.json").read_text())
    assert manifest["frames"] == 4
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    assert lock["stages"]["prep"]["params"]["params.yaml"]["prep"]["frames"] == 4
    status = subprocess.run([dvc, "status", "prep"], cwd=work, env=env, check=True, capture_output=True, text=True).stdout
    assert "up to date" in status.lower()
    dry = subprocess.run([dvc, "repro", "--dry", "flow"], cwd=work, env=env, capture_output=True, text=True)
    assert dry.returncode == 0 and "Running stage 'flow'" in dry.stdout, dry.stdout + dry.stderr
