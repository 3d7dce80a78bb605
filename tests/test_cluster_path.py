"""Issue 25: the production path's field failures, one test each (the cluster rehearsal itself is
tests/test_rehearsal.py). The Kubeflow Pipelines API server cannot run here: `KfpApiStandIn` (a small HTTP
server answering kfp.Client's v2beta1 calls, and playing a Dex login page or a KFP 1.8 backend) stands in for
it. MLflow, ONNX Runtime, tritonclient and the server are real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kfp_api_standin import KfpApiStandIn

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def vidistill(*argv: str, env: dict | None = None, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vidistill"), *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# --- 5. schedule sends what run --host sends, with the same checks -------------------------------


def test_schedule_compiles_with_this_environment_and_checks_params(tmp_path):
    env = {"VIDISTILL_IMAGE_REGISTRY": "registry.example.com/team", "VIDISTILL_IMAGE_TAG": "nightly-7"}
    stale = tmp_path / "pipeline.yaml"  # a committed package with other images must not be what is scheduled
    stale.write_text((ROOT / "pipeline.yaml").read_text())
    with KfpApiStandIn() as api:
        done = vidistill("pipeline", "schedule", "--host", api.url, "--cron", "0 0 2 * * *", "--params",
                         str(ROOT / "params.yaml"), "--set", "teach.train.epochs=3", env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        (job,) = api.recurring
    spec = job["pipeline_spec"]["pipeline_spec"]
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images and all(i.startswith("registry.example.com/team/vidistill:nightly-7-") for i in images), images
    assert job["runtime_config"]["parameters"]["teach_params"]["train"]["epochs"] == 3
    assert job["max_concurrency"] in ("1", 1) and job["no_catchup"] is True
    with KfpApiStandIn() as api:  # a bad parameter or method: refused before the server hears of it
        for bad in ("teach.train.epochs=-3", "pipeline.methods=[no-such-method]"):
            done = vidistill("pipeline", "schedule", "--host", api.url, "--cron", "0 0 2 * * *", "--params",
                             str(ROOT / "params.yaml"), "--set", bad, cwd=tmp_path)
            assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert api.requests == [] and api.recurring == []


# --- 6. submitting: one line and a non-zero exit for every failure; Kubeflow's login -------------------


@pytest.mark.parametrize("backend, expected", [
    ("login", "answered with a login page"),
    ("kfp-1.8", "has no v2 API (version 1.8.5)"),
    ("2.2.0", "is 2.2.0; vidistill's pipeline needs >= 2.16.0"),
])
def test_submit_refuses_in_one_line(backend, expected):
    with KfpApiStandIn(backend=backend) as api:
        done = vidistill("pipeline", "run", "--host", api.url, "--params", str(ROOT / "params.yaml"))
        assert not api.created_runs()
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_submit_to_a_mistyped_host_is_one_line():
    done = vidistill("pipeline", "run", "--host", "http://127.0.0.1:9", "--params", str(ROOT / "params.yaml"))
    assert done.returncode == 2 and "no Kubeflow Pipelines API answers at http://127.0.0.1:9" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_submit_behind_a_login_sends_the_cookie_or_token():
    """Kubeflow behind Dex: the session cookie (or a token) from the environment reaches every request."""
    with KfpApiStandIn() as api:
        done = vidistill("pipeline", "run", "--host", api.url, "--params", str(ROOT / "params.yaml"),
                         env={"VIDISTILL_KFP_COOKIES": "authservice_session=s3cr3t", "VIDISTILL_KFP_TOKEN": "t0ken"})
        assert done.returncode == 0, done.stderr
        headers = [{k.lower(): v for k, v in r["headers"].items()} for r in api.requests]
        assert len(headers) >= 3 and all(h.get("cookie") == "authservice_session=s3cr3t" for h in headers)
        assert all(h.get("authorization") == "Bearer t0ken" for h in headers)
    assert "s3cr3t" not in done.stdout + done.stderr and "t0ken" not in done.stdout + done.stderr


# --- 8. MLflow errors are one line -------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_mlflow(tmp_path_factory):
    """A real MLflow server that accepts only the Host header `mlflow.example:5000` (port-forward case)."""
    from vidistill.registry.server import MlflowServer

    work = tmp_path_factory.mktemp("mlflow")
    with MlflowServer(work / "m.db", work / "artifacts", allowed_hosts="mlflow.example:5000") as server:
        yield server.uri


def test_mlflow_failures_are_one_line(guarded_mlflow):
    from vidistill.registry.server import free_port

    for uri, expected in ((guarded_mlflow, "refuses the Host header"),
                          ("http://127.0.0.1:9", "no MLflow server answers at http://127.0.0.1:9")):
        for argv in (["promote", "--model-name", "m", "--version", "1"], ["rollback", "--model-name", "m"],
                     ["serve", "--model", "models:/m@champion", "--port", str(free_port()), "--no-grpc"]):
            done = vidistill(*argv, env={"MLFLOW_TRACKING_URI": uri}, timeout=120)
            assert done.returncode == 2 and expected in done.stderr, (argv, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_tracking_error_messages(monkeypatch):
    from mlflow.exceptions import MlflowException

    from vidistill.registry.tracking import redact, tracking_error_message

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:s3cret@mlflow:5000")
    assert redact("http://user:s3cret@mlflow:5000") == "http://***@mlflow:5000"
    unauth = MlflowException("API request to endpoint /api/2.0/mlflow/experiments/get-by-name failed with error code 401 != 200")
    assert "MLFLOW_TRACKING_USERNAME" in tracking_error_message(unauth) and "s3cret" not in tracking_error_message(unauth)
    assert "403 Forbidden" in tracking_error_message(MlflowException("failed with error code 403 != 200. Response body: ''"))
    assert tracking_error_message(KeyError("x")) is None  # a bug keeps its traceback


def test_demo_names_the_server_page_for_a_server_store(tmp_path):
    from vidistill_pipeline.demo import mlflow_ui_hint

    assert mlflow_ui_hint("http://127.0.0.1:5000", tmp_path) == "MLflow UI: http://127.0.0.1:5000"
    assert "--backend-store-uri sqlite:///" in mlflow_ui_hint(f"sqlite:///{tmp_path}/mlflow.db", tmp_path)


# --- 9. ONNX Runtime threads follow the cgroup CPU quota --------------------------------------------


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "50000 100000\n"}, 1),  # limits.cpu 500m
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "max 100000\n"}, None),  # no limit: ORT's default
    ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_threads_from_the_cgroup_quota(tmp_path, files, expected):
    from vidistill.export.runtime import default_threads

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    got = default_threads(tmp_path)
    assert got == (None if expected is None else min(expected, os.cpu_count() or 1))


def test_sessions_take_the_quota_threads(monkeypatch, tmp_path):
    """make_session applies `default_threads` when no count is asked for, and an explicit count wins."""
    import torch

    from vidistill.export import runtime

    path = tmp_path / "m.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), str(path), dynamo=False)
    monkeypatch.setattr(runtime, "default_threads", lambda: 1)
    assert runtime.make_session(path).get_session_options().intra_op_num_threads == 1
    monkeypatch.setattr(runtime, "default_threads", lambda: None)
    assert runtime.make_session(path).get_session_options().intra_op_num_threads == 0  # ORT's own default
    assert runtime.make_session(path, threads=2).get_session_options().intra_op_num_threads == 2


# --- 4. new videos reach prep: the dataset's fingerprint keys prep's cache ----------------------------


def test_fingerprint_changes_with_the_videos_and_keys_prep(tmp_path):
    from helpers_video import tiny_video

    from vidistill.config import PrepConfig
    from vidistill.data.layouts import parse_layout

    root = tmp_path / "videos"
    for cls in ("jump", "run"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            tiny_video(root / cls / f"{cls}_{i}.mp4", seed=i)
    cfg = PrepConfig(dataset="folder", root=str(root))

    def fingerprint() -> str:
        return parse_layout(cfg).fingerprint()

    first = fingerprint()
    assert fingerprint() == first  # the same videos: the same key, so a rerun is served from the cache
    (root / "wave").mkdir()
    for i in range(2):
        tiny_video(root / "wave" / f"wave_{i}.mp4", seed=5 + i)
    with_class = fingerprint()
    assert with_class != first
    tiny_video(root / "run" / "run_0.mp4", frames=5, seed=9)  # a video rewritten in place
    assert fingerprint() != with_class
    # in the compiled pipeline, prep's tasks take the fingerprint of an uncached task as an input
    spec = next(yaml.safe_load_all((ROOT / "pipeline.yaml").read_text()))
    for comp in ("comp-prep-shard-op", "comp-prep-op"):
        assert "data_fingerprint" in spec["components"][comp]["inputDefinitions"]["parameters"], comp


# --- 10. first contact outside the repository ---------------------------------------------------


def test_pipeline_in_an_empty_folder_uses_the_packaged_defaults(tmp_path, monkeypatch):
    from vidistill.config import ConfigError, load_params
    from vidistill_pipeline import runner

    monkeypatch.chdir(tmp_path)
    params = runner.resolve_params("params.yaml", profile="tiny")  # was: "prep.synth.out (None) differs from prep.root"
    assert params["pipeline"]["methods"] == load_params(ROOT / "params.yaml")["pipeline"]["methods"]
    assert (ROOT / "params.yaml").resolve() == runner.PACKAGED_PARAMS.resolve()  # the repository's file is the packaged one
    with pytest.raises(ConfigError, match="--params nope.yaml does not exist"):
        runner.resolve_params("nope.yaml")
    done = vidistill("pipeline", "compile", "--out", "p.yaml", cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "p.yaml").is_file(), done.stderr
    assert "using vidistill's defaults" in done.stderr and not (tmp_path / "dvc.yaml").exists()


def test_prep_never_replaces_videos_synth_wrote(tmp_path):
    from vidistill.config import ConfigError, SynthConfig
    from vidistill.data.synthetic import generate

    out = tmp_path / "videos"
    generate(SynthConfig(out=str(out), videos_per_class=2, frames=8), progress=False, writer="synth")
    before = sorted(p.relative_to(out) for p in out.rglob("*.mp4"))
    with pytest.raises(ConfigError, match=r"holds videos `vidistill synth` wrote .*videos_per_class: 2 there, 3 here"):
        generate(SynthConfig(out=str(out), videos_per_class=3, frames=8), progress=False)  # what prep does
    assert sorted(p.relative_to(out) for p in out.rglob("*.mp4")) == before
    assert generate(SynthConfig(out=str(out), videos_per_class=2, frames=8), progress=False) == out  # same settings: read
    mine = tmp_path / "prep-made"  # a dataset prep wrote itself is still regenerated when its settings change
    generate(SynthConfig(out=str(mine), videos_per_class=2, frames=8), progress=False)
    generate(SynthConfig(out=str(mine), videos_per_class=3, frames=8), progress=False)
    assert len(list(mine.rglob("*.mp4"))) == 3 * len(json.loads((mine / "synth.json").read_text())["classes"])


# --- a new class reaches serving: the champion cannot name it ---------------------------------------


def test_a_candidate_with_new_classes_replaces_the_champion():
    from types import SimpleNamespace

    from vidistill.registry.models import _new_classes

    def version(classes):
        return SimpleNamespace(tags={"classes": json.dumps(classes)})

    assert _new_classes(version(["a", "b"]), version(["a", "b", "c"])) == ["c"]
    assert _new_classes(version(["a", "b"]), version(["a", "c"])) == []  # a class dropped: not comparable, refused
    assert _new_classes(version(["a", "b"]), version(["a", "b"])) == []  # same classes, other data: refused as before
