"""The teacher's Kubeflow Trainer `TrainJob` launcher (vidistill_pipeline.trainjob).

No Kubernetes cluster runs here, so the launcher talks to a STAND-IN for the Kubernetes API: a real
HTTP server in this process that speaks the few REST endpoints the official `kubernetes` client
calls (create/get a `trainer.kubeflow.org/v1alpha1` TrainJob, list pods by label, read a pod's log)
and plays the Trainer controller's part by moving the job's status conditions along. The client,
its serialisation and its error handling are the real ones.
"""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import torch
import yaml
from kubernetes import client

from vidistill_pipeline import trainjob
from vidistill_pipeline.trainjob import (
    MLFLOW_CONFIG_KEYS,
    MLFLOW_SECRET_KEYS,
    TrainJobConfig,
    TrainJobFailed,
    build_trainjob,
    launch,
    run_teacher,
)

ROOT = Path(__file__).resolve().parents[1]
BASE = f"/apis/{trainjob.GROUP}/{trainjob.VERSION}/namespaces/"


class StandIn(ThreadingHTTPServer):
    """The Kubernetes API as far as the launcher uses it; `outcome` scripts how the job ends."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.jobs: dict[str, dict[str, Any]] = {}
        self.gets: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self.outcome: dict[str, Any] = {"type": "Complete", "reason": "JobsCompleted", "message": "jobs completed"}
        self.running_gets = 2  # GETs that see the job running before it ends
        self.on_complete = None  # called with the job once it completes (the trainer's side effects)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                          "message": message, "code": code})

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        self.server.requests.append(("POST", url.path))
        ns, _, plural = url.path.removeprefix(BASE).partition("/")
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not url.path.startswith(BASE) or plural != trainjob.PLURAL or body["kind"] != "TrainJob":
            return self._status(404, "NotFound", f"no route {url.path}")
        name = body["metadata"]["name"]
        if name in self.server.jobs:
            return self._status(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{name}" already exists')
        body["metadata"].update(namespace=ns, uid="1234")
        self.server.jobs[name] = body
        self._send(201, body)

    def do_GET(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        self.server.requests.append(("GET", self.path))
        if url.path.startswith(BASE) and f"/{trainjob.PLURAL}/" in url.path:
            name = url.path.rsplit("/", 1)[1]
            job = self.server.jobs.get(name)
            if job is None:
                return self._status(404, "NotFound", f"trainjob {name} not found")
            n = self.server.gets[name] = self.server.gets.get(name, 0) + 1
            if n <= self.server.running_gets:
                job["status"] = {"conditions": [], "jobsStatus": [{"name": "node", "active": 2}]}
            elif "conditions" not in job.get("status", {}) or not job["status"]["conditions"]:
                job["status"] = {"conditions": [{**self.server.outcome, "status": "True"}]}
                if self.server.outcome["type"] == "Complete" and self.server.on_complete:
                    self.server.on_complete(job)
            return self._send(200, job)
        if url.path.endswith("/pods"):
            selector = parse_qs(url.query).get("labelSelector", [""])[0]
            key, _, name = selector.partition("=")
            pods = [] if key != trainjob.POD_JOB_LABEL or name not in self.server.jobs else [
                {"metadata": {"name": f"{name}-node-0-{i}-abcde", "labels": {key: name}}} for i in range(2)]
            return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods})
        if url.path.endswith("/log"):
            pod = url.path.split("/")[-2]
            query = parse_qs(url.query)
            if query.get("container") != ["node"]:
                return self._status(400, "BadRequest", "container node expected")
            return self._send(200, f"[{pod}] epoch 3\nRuntimeError: CUDA out of memory\n", "text/plain")
        self._status(404, "NotFound", f"no route {url.path}")


@pytest.fixture
def api() -> Any:
    server = StandIn()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    conf = client.Configuration(host=server.url)
    with client.ApiClient(conf) as api_client:
        yield server, api_client
    server.shutdown()
    server.server_close()


CFG = TrainJobConfig(nodes=3, gpus_per_node=4, cpu="12", memory="48Gi", namespace="team-a", image="reg/vidistill:1-cuda")


def test_trainjob_object() -> None:
    """Nodes, GPUs, torchrun with --resume, the runtime, the data folder and the MLflow secret by reference."""
    from vidistill.cli import build_parser

    body = build_trainjob(CFG, name="vidistill-teach-flow-abc", modality="flow", folder="trainjobs/abc", flow=True)
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert body["metadata"] == {"name": "vidistill-teach-flow-abc", "namespace": "team-a", "labels": body["metadata"]["labels"]}
    assert body["spec"]["runtimeRef"] == {"name": "vidistill-torch", "apiGroup": "trainer.kubeflow.org",
                                          "kind": "ClusterTrainingRuntime"}
    t = body["spec"]["trainer"]
    assert t["numNodes"] == 3 and t["numProcPerNode"] == 4 and t["image"] == "reg/vidistill:1-cuda"
    for part in ("requests", "limits"):
        assert t["resourcesPerNode"][part] == {"cpu": "12", "memory": "48Gi", "nvidia.com/gpu": "4"}
    assert t["command"] == ["torchrun"] and t["args"][:2] == ["--no-python", "vidistill"]
    args = build_parser().parse_args(t["args"][2:])  # the real CLI accepts what the pods run
    assert args.command == "teach" and getattr(args, "cfg:resume") is True and getattr(args, "cfg:modality") == "flow"
    assert getattr(args, "cfg:clips") == "trainjobs/abc/clips" and getattr(args, "cfg:flow") == "trainjobs/abc/flow"
    assert getattr(args, "cfg:out") == "trainjobs/abc/out" and args.params == "trainjobs/abc/params.yaml"
    env = {e["name"]: e for e in t["env"]}
    assert set(env) == {*MLFLOW_CONFIG_KEYS, *MLFLOW_SECRET_KEYS} and "MLFLOW_TRACKING_URI" in MLFLOW_CONFIG_KEYS
    # the URI from the ConfigMap k8s/base creates; credentials only from an optional Secret (issue 25.1)
    assert all(env[k]["valueFrom"]["configMapKeyRef"]["name"] == "vidistill-mlflow-client" for k in MLFLOW_CONFIG_KEYS)
    assert all(env[k]["valueFrom"]["secretKeyRef"] == {"name": "vidistill-mlflow-auth", "key": k, "optional": True}
               for k in MLFLOW_SECRET_KEYS)
    rgb = build_trainjob(CFG, name="x", modality="rgb", folder="f", flow=False)
    assert not any(a.startswith("--flow") for a in rgb["spec"]["trainer"]["args"])


def test_config_refused_before_work() -> None:
    with pytest.raises(ValueError, match="nodes must be an integer >= 1"):
        TrainJobConfig.from_dict({"nodes": 0})
    with pytest.raises(ValueError, match="unknown key.*gpus"):
        TrainJobConfig.from_dict({"gpus": 2})
    with pytest.raises(ValueError, match="VIDISTILL_TRAINJOB_NODES='two'"):
        trainjob.config_from_env({"VIDISTILL_TRAINJOB_NODES": "two"})
    cfg = trainjob.config_from_env({"VIDISTILL_TRAINJOB_NODES": "4", "VIDISTILL_TRAINJOB_GPUS_PER_NODE": "8"})
    assert (cfg.nodes, cfg.gpus_per_node) == (4, 8) and cfg.image.endswith("-cuda")


def test_launch_follows_to_success(api: Any) -> None:
    server, api_client = api
    body = build_trainjob(CFG, name="vidistill-teach-rgb-0123456789ab", modality="rgb", folder="f", flow=False)
    lines: list[str] = []
    done = launch(body, api_client=api_client, poll_s=0.01, on_status=lines.append)
    assert server.jobs[body["metadata"]["name"]]["spec"]["trainer"]["numNodes"] == 3  # what the API received
    assert done["status"]["conditions"][0]["type"] == "Complete"
    assert server.gets[body["metadata"]["name"]] == server.running_gets + 1  # followed until it ended
    assert sorted(done["logs"]) == [f"{body['metadata']['name']}-node-0-{i}-abcde" for i in range(2)]
    assert lines[0].endswith("created") and "Complete=True (JobsCompleted)" in lines[-1]
    # a restarted launcher adopts the job of the same name instead of failing on 409
    lines.clear()
    launch(body, api_client=api_client, poll_s=0.01, on_status=lines.append)
    assert "exists already" in lines[0] and len(server.jobs) == 1


def test_launch_reports_failure_reason_and_logs(api: Any) -> None:
    server, api_client = api
    server.outcome = {"type": "Failed", "reason": "FailedJobs", "message": "jobset vidistill-teach-rgb-x: node-0 failed"}
    body = build_trainjob(CFG, name="vidistill-teach-rgb-x", modality="rgb", folder="f", flow=False)
    with pytest.raises(TrainJobFailed) as info:
        launch(body, api_client=api_client, poll_s=0.01, on_status=lambda _: None)
    exc = info.value
    assert exc.reason == "FailedJobs" and "node-0 failed" in exc.condition_message
    assert len(exc.logs) == 2 and all("CUDA out of memory" in text for text in exc.logs.values())
    assert "FailedJobs" in str(exc) and "CUDA out of memory" in str(exc)


def test_launch_times_out(api: Any) -> None:
    server, api_client = api
    server.running_gets = 10**6
    body = build_trainjob(CFG, name="vidistill-teach-rgb-y", modality="rgb", folder="f", flow=False)
    with pytest.raises(TimeoutError, match="still running"):
        launch(body, api_client=api_client, poll_s=0.01, timeout_s=0.2, on_status=lambda _: None)


def test_api_refusal_surfaces(api: Any) -> None:
    _, api_client = api
    body = build_trainjob(CFG, name="x", modality="rgb", folder="f", flow=False)
    body["kind"] = "PyTorchJob"  # the stand-in refuses it as the API server refuses an unknown route
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as info:
        launch(body, api_client=api_client, poll_s=0.01, on_status=lambda _: None)
    assert info.value.status == 404


def test_run_teacher_stages_inputs_and_returns_the_model(api: Any, tmp_path: Path) -> None:
    """Inputs are staged onto the shared volume, and the trainer's model.pt and eval/ come back as the
    task's artifact. The stand-in writes what rank 0 of `vidistill teach` writes when the job completes."""
    server, api_client = api
    clips, flow, volume, out = (tmp_path / d for d in ("clips", "flow", "volume", "out"))
    for d, name in ((clips, "manifest.json"), (flow, "index.json")):
        d.mkdir()
        (d / name).write_text("{}")

    def trainer_writes(job: dict[str, Any]) -> None:
        args = job["spec"]["trainer"]["args"]
        folder = volume / next(a for a in args if a.startswith("--out=")).removeprefix("--out=")
        (folder / "eval").mkdir(parents=True)
        (folder / "eval" / "metrics.json").write_text(json.dumps({"top1": 0.5, "top5": 0.9, "mAP": 0.4}))
        torch.save({"name": "m", "kwargs": {}, "classes": [], "extra": {"run_id": "run-7"}, "state_dict": {}},
                   folder / "model.pt")

    server.on_complete = trainer_writes
    cfg = {"nodes": 2, "gpus_per_node": 1, "workspace": str(volume), "poll_s": 0.01}
    params = {"model": "r2plus1d_student", "train": {"epochs": 1}}
    result = run_teacher(params, cfg, code_version="c0", modality="flow", clips=str(clips), flow=str(flow),
                         out=str(out), data_hash="d0", api_client=api_client)
    assert result["top1"] == 0.5 and result["run_id"] == "run-7"
    assert (out / "model.pt").exists() and (out / "eval" / "metrics.json").exists()
    key = trainjob.job_key(params, code_version="c0", data_hash="d0", modality="flow")
    staged = volume / "trainjobs" / key
    assert (staged / "clips" / "manifest.json").exists() and (staged / "flow" / "index.json").exists()
    assert yaml.safe_load((staged / "params.yaml").read_text()) == {"teach": params}
    assert result["name"] == f"vidistill-teach-flow-{key}" and len(result["name"]) <= 63
    assert trainjob.job_key(params, code_version="c1", data_hash="d0", modality="flow") != key


def test_compiled_pipeline_launches_trainjobs(tmp_path: Path) -> None:
    """With the cluster overlay's switch the compiled IR trains both teachers through the launcher,
    with the configured nodes and GPUs; without it they stay single GPU pods."""
    overlay = {}  # the cluster overlay's compile-time choices (k8s/overlays/gke/pipeline.env)
    for line in (ROOT / "k8s" / "overlays" / "gke" / "pipeline.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            overlay[key] = value
    assert overlay["VIDISTILL_TEACHER_LAUNCHER"] == "trainjob"
    overlay.update(VIDISTILL_TRAINJOB_NODES="4", VIDISTILL_TRAINJOB_GPUS_PER_NODE="8")  # sizes reach the IR
    env = {**os.environ, **overlay}
    out = tmp_path / "pipeline.yaml"
    code = ("import sys; from vidistill_pipeline.runner import compile_pipeline; "
            f"compile_pipeline({str(out)!r}, params_file={str(ROOT / 'params.yaml')!r})")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT, timeout=300)
    ir = next(yaml.safe_load_all(out.read_text()))
    dag = ir["components"]["comp-vidistill-dag"]["dag"]["tasks"]
    launchers = {n: t for n, t in dag.items() if t["componentRef"]["name"].startswith("comp-teach-trainjob-op")}
    assert {t["taskInfo"]["name"] for t in launchers.values()} == {"teach-rgb", "teach-flow"}
    for task in launchers.values():
        constant = task["inputs"]["parameters"]["trainjob"]["runtimeValue"]["constant"]
        assert constant["nodes"] == 4 and constant["gpus_per_node"] == 8 and constant["runtime"] == "vidistill-torch"
    # the default compile (the committed pipeline.yaml) keeps them as GPU pods
    committed = next(yaml.safe_load_all((ROOT / "pipeline.yaml").read_text()))
    tasks = committed["components"]["comp-vidistill-dag"]["dag"]["tasks"]
    assert not [t for t in tasks.values() if "trainjob" in t["componentRef"]["name"]]
    assert {tasks[n]["taskInfo"]["name"] for n in tasks if tasks[n]["componentRef"]["name"].startswith("comp-teach-op")} >= {"teach-rgb", "teach-flow"}
