"""End to end: the whole pipeline under kfp.local (tiny profile) as a user runs it, a task that fails,
and a tiny `dvc repro`."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vidistill.config import load_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tasks(methods: list[str]) -> list[str]:
    """Every task a local run shows, by its display name (the fan-out with its method)."""
    return ["start-mlflow-run", "shard-plan", "prep-shard", "prep", "fingerprint-source", "prep-source", "tvl1-flow-shard", "tvl1-flow",
            "teach-rgb", "teach-flow", "pretrain-encoder", "two-stream", "experts", "masked-image-teacher",
            "masked-video-teacher", "masked-video-distillation", *(f"distill[{m}]" for m in methods), "comparison",
            "select-best", "export-onnx", "track-stages", "register-promote", "publish-report", "close-mlflow-run"]


# what kfp.local prints for every task, which belongs in the task's log and never on the console
NOISE = ("Executing task", "Streamed logs", "executor_input", "KFP Executor", "no effect in the current local runner",
         "non-Python base image", "View run", "Traceback")
COMPUTE_TASKS = ("prep-shard", "prep", "prep-source", "tvl1-flow-shard", "tvl1-flow", "teach-rgb", "teach-flow",
                 "pretrain-encoder", "two-stream", "experts", "masked-image-teacher", "masked-video-teacher",
                 "masked-video-distillation", "comparison", "select-best", "export-onnx")


def _pipeline_run(tmp_path: Path, *sets: str) -> subprocess.CompletedProcess:
    """`vidistill pipeline run --local --profile tiny --set ...` as a user runs it, with its own MLflow store."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "COLUMNS": "120"}
    argv = [str(BIN / "vidistill"), "pipeline", "run", "--local", "--profile", "tiny", "--params", str(ROOT / "params.yaml"),
            "--workdir", str(tmp_path / "work"), *(a for item in sets for a in ("--set", item))]
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)


@pytest.mark.slow
def test_pipeline_run_on_your_own_videos(tmp_path, monkeypatch):
    """Issue 17's run: a folder of videos (real footage written by the test helpers, broken inputs included)
    through the whole pipeline with one command; a short console naming every task; a log per task; the
    champion under the configured model name, which the summary names; a report with every section. Then
    the same command again: every compute task from kfp.local's cache."""
    from helpers_browser import Sections, chromium, open_in_chromium
    from helpers_video import real_footage_dataset

    real_footage_dataset(tmp_path / "videos", segments=6, frames=24)
    methods = load_params(ROOT / "params.yaml")["pipeline"]["methods"]
    sets = ("prep.dataset=folder", f"prep.root={tmp_path / 'videos'}", "register.model_name=my-videos")
    done = _pipeline_run(tmp_path, *sets)
    assert done.returncode == 0, done.stdout + done.stderr
    console = done.stdout

    # a console a person reads: every task as it starts and ends, no executor output, no kfp warnings
    lines = console.splitlines()
    assert len(lines) <= 2 * len(_tasks(methods)) + 45, console  # a line as each task starts and ends, then the result
    assert not [n for n in NOISE if n in console + done.stderr], console + done.stderr
    for label in _tasks(methods):
        assert re.search(rf"▶ {re.escape(label)}\s+started$", console, re.M), label
        assert re.search(rf"✓ {re.escape(label)}\s+done\s+\d+\.\d s", console), label
    assert re.search(r"✓ prep\s+done .* 8 train / 4 test clips, 2 input\(s\) skipped", console)  # the 2 notes.txt
    # the note says what the numbers say, one way or the other
    assert ("Distillation paid in this run" in console) != ("No distilled student beat none in this run" in console), console

    # one log per task under the run's folder, with kfp's executor log and warnings
    summary = json.loads((tmp_path / "work" / "outputs" / "demo_summary.json").read_text())
    log_dir = Path(summary["log_dir"])
    assert log_dir.parent == Path(summary["run_dir"]) and f"task logs: {log_dir}" in console
    assert sorted(t["label"] for t in summary["tasks"]) == sorted(_tasks(methods))
    for task in summary["tasks"]:
        log = Path(task["log"])
        assert log.parent == log_dir and task["status"] == "done", task
        text = log.read_text()
        assert "Executing task" in text and "[KFP Executor" in text and "no effect in the current local runner" in text, log
    assert "epoch 1/1" in (log_dir / "distill-kd.log").read_text()  # the stage's own progress, in its log

    # the champion under the configured name, and the summary names it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from vidistill.export.runtime import make_session
    from vidistill.registry.models import download_model
    from vidistill_pipeline.demo import champion

    champ = champion("my-videos")
    assert champ is not None and champ["tags"]["parity_passed"] == "true" and champ["tags"]["method"] in methods
    assert summary["model_name"] == "my-videos" and summary["champion"]["version"] == champ["version"]
    assert f"models:/my-videos@champion = version {champ['version']}" in console
    assert "serve --model models:/my-videos@champion" in console and "vidistill-synthetic" not in console
    got = download_model("models:/my-videos@champion", tmp_path / "champion")
    assert got["classes"] == ["bikes", "carphone"]
    sess = make_session(got["onnx_path"])
    (inp,) = sess.get_inputs()
    shape = [2 if not isinstance(d, int) else d for d in inp.shape]
    assert shape[1] == 3, "the student must take RGB only"
    logits = sess.run(["logits"], {inp.name: np.random.default_rng(0).random(shape, dtype=np.float32)})[0]
    assert logits.shape == (2, 2) and np.isfinite(logits).all()

    # the report: Markdown on the console and in the Kubeflow UI, HTML with every section and figure
    report = Path(summary["report"]).read_text()
    assert "two-stream" in report and all(f"| student: {m} |" in report for m in methods)
    assert "| chance | 0.500 |" in report and "`my-videos` version" in report
    page = Path(summary["page"])
    assert page.suffix == ".html" and f"report: {page}" in console
    parsed = Sections(page.read_text())
    assert parsed.sections == ["summary", "decision", "cost", "curves", "confusion", "dataset", "settings", "encoder"]
    # top-1 + cost; curves and confusion matrices: 2 teachers and the students, the encoder; + two-stream confusion
    assert sum(inline for _, inline in parsed.images) == len(parsed.images) == 2 + 2 * (3 + len(methods)) + 1
    assert "notes.txt" in page.read_text()  # the skipped inputs are listed
    if chromium() is not None:
        seen = open_in_chromium(page, tmp_path)
        assert Sections(seen["dom"]).sections == parsed.sections and min(seen["image_widths"]) > 100

    # one parent run with child runs per stage (nested by the track-stages task), all carrying lineage tags;
    # the comparison report is attached to the parent
    from vidistill.registry.tracking import client

    c = client()
    experiments = [e.experiment_id for e in c.search_experiments()]
    parents = [r for r in c.search_runs(experiments) if r.data.tags.get("vidistill.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["model_name"] == "my-videos"
    parent = parents[0].info.run_id
    children = [r for r in c.search_runs(experiments) if r.data.tags.get("mlflow.parentRunId") == parent]
    stages = {r.data.tags["vidistill.stage"] for r in children}
    assert {"prep", "flow", "teach_rgb", "teach_flow", "export", "register"} | {f"distill_{m}" for m in methods} <= stages
    for r in children:
        assert r.data.tags["vidistill.git_commit"] and r.data.tags["vidistill.params_hash"]
        if r.data.tags["vidistill.stage"] != "prep":
            assert r.data.tags["vidistill.data_hash"] not in ("", "none", "unknown"), r.data.tags
    assert {a.path for a in c.list_artifacts(parent, "report")} == {"report/comparison.md", "report/comparison.html"}

    # the same command again: every compute task comes from kfp.local's cache; only the side effects run
    # (a new parent run, which tags the reused stage runs, the registration and the published report)
    again = _pipeline_run(tmp_path, *sets)
    assert again.returncode == 0, again.stdout + again.stderr
    for label in (*COMPUTE_TASKS, *(f"distill[{m}]" for m in methods)):
        assert re.search(rf"✓ {re.escape(label)}\s+cached", again.stdout), label
    for label in ("start-mlflow-run", "track-stages", "register-promote", "publish-report", "close-mlflow-run"):
        assert re.search(rf"✓ {re.escape(label)}\s+done", again.stdout), label
    second = json.loads((tmp_path / "work" / "outputs" / "demo_summary.json").read_text())
    assert set(second["index"]["reused"]) == set(summary["index"]["adopted"]) and not second["index"]["adopted"]
    assert second["onnx"] == summary["onnx"]
    parents = [r for r in c.search_runs(experiments) if r.data.tags.get("vidistill.stage") == "pipeline"]
    newest = max(parents, key=lambda r: r.info.start_time)
    assert {k.removeprefix("vidistill.reused_run.") for k in newest.data.tags if k.startswith("vidistill.reused_run.")} \
        == set(summary["index"]["adopted"])


@pytest.mark.slow
def test_a_failing_task_shows_its_last_lines_and_its_log(tmp_path, monkeypatch):
    """prep on a folder whose only "videos" are broken: the task fails; the console names it, shows its log's
    last lines and the log's path; the command exits 1; the exit handler still closes the MLflow run."""
    for cls in ("jump", "run"):
        (tmp_path / "broken" / cls).mkdir(parents=True)
        (tmp_path / "broken" / cls / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    done = _pipeline_run(tmp_path, "prep.dataset=folder", f"prep.root={tmp_path / 'broken'}")
    assert done.returncode == 1, done.stdout + done.stderr
    # the first task that reads the videos fails: the shard plan (it lists the folder for the prep shards)
    failed = re.search(r"✗ shard-plan\s+FAILED\s+\d+\.\d s\s+log: (\S+)", done.stdout)
    assert failed, done.stdout
    log = Path(failed.group(1))
    assert log.exists() and log.parent.name == "logs"
    assert f"full log: {log}" in done.stderr and "the pipeline failed at shard-plan" in done.stderr
    shown = [line.removeprefix("    ") for line in
             done.stderr.split("lines of its log:\n", 1)[1].split("\nfull log:", 1)[0].splitlines()]
    logged = [line.rstrip() for line in log.read_text().splitlines()]
    while not logged[-1].strip(" -"):  # the tail leaves out trailing blank and rule lines
        logged.pop()
    assert len(shown) == 30 and shown == logged[-30:], shown
    error = "vidistill.errors.ConfigError: folder: no class directories with videos under"
    assert any(error in line for line in shown) and f"error: {error}" in done.stderr, done.stderr
    assert not [n for n in NOISE if n in done.stdout], done.stdout  # the traceback is in the log and its tail
    assert "▶ tvl1-flow" not in done.stdout and re.search(r"✓ close-mlflow-run\s+done", done.stdout)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from vidistill.registry.tracking import client

    c = client()
    parents = [r for r in c.search_runs([e.experiment_id for e in c.search_experiments()])
               if r.data.tags.get("vidistill.stage") == "pipeline"]
    assert [r.info.status for r in parents] == ["FAILED"]


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
