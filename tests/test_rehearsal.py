"""The cluster rehearsal (issue 25, `make rehearsal`): scripts/rehearsal.py with real parts (kubectl kustomize,
PostgreSQL, `mlflow server` as its manifest runs it, every pipeline task as its pod in bubblewrap, the
predictor queried with tritonclient, a new class rolled out). The Kubernetes and KFP API servers cannot run
here: the script does their work (resolving each pod's env from the compiled IR against the rendered
objects, kfp.local's orchestration) and says so."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "rehearsal.py"
TOOLS = [t for t in ("bwrap", "kubectl") if shutil.which(t) is None] + \
    ([] if list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) else ["postgresql"])
needs_tools = pytest.mark.skipif(bool(TOOLS), reason=f"the rehearsal needs {', '.join(TOOLS)} (make rehearsal-tools)")


def _module():
    spec = importlib.util.spec_from_file_location("rehearsal", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_server_image_pins_what_the_rehearsal_runs():
    """The rehearsal's MLflow runs with this environment's packages: the image's requirements must pin the same
    versions as constraints.txt (mlflow and the PostgreSQL driver the backend store URI names)."""
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    image = dict(line.split("==") for line in (ROOT / "docker" / "mlflow-requirements.txt").read_text().splitlines()
                 if "==" in line and not line.startswith("#"))
    assert {"mlflow", "psycopg2-binary"} <= set(image)
    assert {k: v for k, v in image.items() if k in pins} == {k: pins[k] for k in image if k in pins}
    import sqlalchemy

    mlflow_yaml = list(yaml.safe_load_all((ROOT / "k8s" / "base" / "mlflow.yaml").read_text()))
    env = next(d for d in mlflow_yaml if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    uri = next(e["value"] for e in env if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    url = sqlalchemy.engine.make_url(re.sub(r"\$\((\w+)\)", "x", uri))
    assert url.get_dialect().driver == "psycopg2"  # the driver the image installs (a bare postgresql:// is psycopg 3)


@needs_tools
def test_a_task_referencing_a_missing_key_fails_the_rehearsal(tmp_path):
    """Every task's env is resolved against the rendered objects: remove the key every task reads, and the
    rehearsal names the task and the key (what the kubelet would report as CreateContainerConfigError)."""
    rehearsal = _module()
    cluster = rehearsal.Cluster(rehearsal.render(ROOT / "k8s" / "overlays" / "gke"), rehearsal.created_secrets())
    ir = tmp_path / "pipeline.yaml"
    ir.write_text((ROOT / "pipeline.yaml").read_text())
    pods = rehearsal.task_pods(ir, cluster)
    assert pods["prep_shard_op"]["env"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")
    assert all(p["uid"] == 10001 and p["mounts"] == {"/workspace": "vidistill-data"} for p in pods.values())
    del cluster.one("ConfigMap", "vidistill-mlflow-client")["data"]["MLFLOW_TRACKING_URI"]
    with pytest.raises(rehearsal.RehearsalError, match=r"task exec-.*key MLFLOW_TRACKING_URI of ConfigMap vidistill-mlflow-client"):
        rehearsal.task_pods(ir, cluster)


@needs_tools
def test_a_missing_secret_key_fails_make_rehearsal(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "w"),
                           "--drop-secret-key", "Secret/vidistill-postgres/POSTGRES_PASSWORD"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "key POSTGRES_PASSWORD of Secret vidistill-postgres does not exist" in done.stderr, done.stderr


@pytest.mark.slow
@needs_tools
def test_cluster_rehearsal(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "w")], capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "over PostgreSQL (postgresql+psycopg2)" in out
    assert re.search(r"tritonclient HTTP \+ gRPC: version 1, classes \['left', 'right'\]", out), out
    assert re.search(r"new class 'up': prep reran, version 2 promoted and served by the running predictor", out), out
