"""Kubernetes manifests (k8s/), checked offline.

The base and each overlay are rendered with the real kustomize built into kubectl (`kubectl kustomize
DIR`); without a kubectl that has it, every test here skips with that reason. Core manifests,
and the pod templates inside the custom resources, are validated strictly against the Kubernetes
OpenAPI schemas of K8S_VERSION with kubernetes-validate; custom resources (PyTorchJob,
ServingRuntime, InferenceService) get field checks of their own. Every pod must meet the security
baseline, every reference (PVC, Secret, ConfigMap, runtime) must resolve, NetworkPolicies must let
exactly the intended traffic in, and no Secret is in the manifests (k8s/create-secrets.sh makes them).
"""

from __future__ import annotations

import copy
import os
import functools
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.31"  # the oldest minor still in GKE's regular channel and most distributions
NAMESPACE = "vidistill"
OVERLAYS = ["gke", "generic"]
PLACEHOLDER = "CHANGE_ME"
CREDENTIAL_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY", re.I)

Resource = dict[str, Any]


@functools.cache
def _kustomize_error() -> str | None:
    """Why `kubectl kustomize` cannot render here, or None when it can."""
    if not shutil.which("kubectl"):
        return "kubectl is not installed: the manifests are rendered with `kubectl kustomize`"
    proc = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True, text=True, timeout=60)
    return None if proc.returncode == 0 else f"this kubectl has no kustomize: {proc.stderr.strip().splitlines()[0]}"


pytestmark = pytest.mark.skipif(_kustomize_error() is not None, reason=str(_kustomize_error()))


@functools.cache
def _rendered(directory: Path) -> str:
    proc = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {directory}: {proc.stderr}"
    return proc.stdout


def render(directory: Path) -> list[Resource]:
    """The resources `kubectl kustomize DIR` renders (a fresh copy each call, so tests may mutate them)."""
    return [r for r in yaml.safe_load_all(_rendered(directory)) if r]


CLUSTER_SCOPED = {"ClusterTrainingRuntime"}  # k8s/cluster/: installed once per cluster, no namespace


def render_overlay(name: str) -> list[Resource]:
    """The namespace's overlay plus the cluster-scoped overlay of the same name (the TrainJob runtime)."""
    return render(K8S / "overlays" / name) + render(K8S / "cluster" / "overlays" / name)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Resource]]:
    return request.param, render_overlay(request.param)


@pytest.fixture(scope="module")
def base() -> list[Resource]:
    return render(K8S / "base")


def find(resources: list[Resource], kind: str, name: str | None = None) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]


def one(resources: list[Resource], kind: str, name: str) -> Resource:
    (res,) = find(resources, kind, name)
    return res


# ----------------------------------------------------------------------------------------------
# pod templates of every workload, including those inside custom resources


def pod_templates(resources: list[Resource]) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(where, pod spec)` for every pod the resources create, as the controllers would build it."""
    runtimes = {r["metadata"]["name"]: r for r in find(resources, "ServingRuntime")}
    training_runtimes = {r["metadata"]["name"]: r for r in find(resources, "ClusterTrainingRuntime")}
    for r in resources:
        kind, name = r["kind"], r["metadata"]["name"]
        if kind == "StatefulSet":  # the controller adds a volume per claim template
            spec = copy.deepcopy(r["spec"]["template"]["spec"])
            spec.setdefault("volumes", []).extend(
                {"name": t["metadata"]["name"], "persistentVolumeClaim": {"claimName": f"{t['metadata']['name']}-{name}-0"}}
                for t in r["spec"].get("volumeClaimTemplates", []))
            yield f"{kind}/{name}", spec
        elif kind in ("Deployment", "Job", "DaemonSet", "ReplicaSet"):
            yield f"{kind}/{name}", r["spec"]["template"]["spec"]
        elif kind == "CronJob":
            yield f"{kind}/{name}", r["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif kind == "PyTorchJob":
            for replica, spec in r["spec"]["pytorchReplicaSpecs"].items():
                yield f"{kind}/{name}/{replica}", spec["template"]["spec"]
        elif kind == "ClusterTrainingRuntime":
            for job in r["spec"]["template"]["spec"]["replicatedJobs"]:
                yield f"{kind}/{name}/{job['name']}", job["template"]["spec"]["template"]["spec"]
        elif kind == "TrainJob" and r["spec"]["runtimeRef"]["name"] in training_runtimes:
            yield f"{kind}/{name}/node", trainjob_pod(r, training_runtimes[r["spec"]["runtimeRef"]["name"]])
        elif kind == "ServingRuntime":  # its containers, as any InferenceService using it gets them
            yield f"{kind}/{name}", {k: r["spec"][k] for k in ("containers", "volumes") if k in r["spec"]}
        elif kind == "InferenceService":
            yield f"{kind}/{name}/predictor", predictor_pod(r, runtimes)
        elif kind in ("Pod",):
            yield f"{kind}/{name}", r["spec"]


def _merge(base: Any, override: Any) -> Any:
    """Maps merged key by key (the override wins); anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return copy.deepcopy(override)


def trainjob_pod(job: Resource, runtime: Resource) -> dict[str, Any]:
    """The trainer pod Kubeflow Trainer builds: the runtime's `node` pod with the TrainJob's image,
    command, args, env (merged by name) and resourcesPerNode put on the `node` container."""
    (node,) = [j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == "node"]
    pod = copy.deepcopy(node["template"]["spec"]["template"]["spec"])
    (container,) = [c for c in pod["containers"] if c["name"] == "node"]
    trainer = job["spec"].get("trainer", {})
    for key in ("image", "command", "args"):
        if key in trainer:
            container[key] = copy.deepcopy(trainer[key])
    env = {e["name"]: e for e in container.get("env", [])} | {e["name"]: e for e in trainer.get("env", [])}
    if env:
        container["env"] = list(env.values())
    if "resourcesPerNode" in trainer:
        container["resources"] = copy.deepcopy(trainer["resourcesPerNode"])
    return pod


def predictor_pod(isvc: Resource, runtimes: dict[str, Resource]) -> dict[str, Any]:
    """The predictor pod KServe builds: the runtime's container with the model's overrides merged
    in, the runtime's volumes, and the predictor's pod-level fields."""
    predictor = copy.deepcopy(isvc["spec"]["predictor"])
    model = predictor.pop("model")
    runtime = runtimes[model["runtime"]]["spec"]
    container = copy.deepcopy(runtime["containers"][0])
    for key in ("resources", "securityContext", "env", "args", "image"):
        if key in model:
            container[key] = _merge(container.get(key), model[key]) if isinstance(model[key], dict) else model[key]
    pod = {k: v for k, v in predictor.items() if k not in ("minReplicas", "maxReplicas", "scaleTarget", "scaleMetric",
                                                              "containerConcurrency", "timeout", "canaryTrafficPercent",
                                                              "logger", "batcher", "deploymentStrategy")}
    pod["containers"] = [container]
    pod["volumes"] = copy.deepcopy(runtime.get("volumes", [])) + pod.get("volumes", [])
    return pod


def test_every_pod_kind_is_covered(overlay: tuple[str, list[Resource]]) -> None:
    _, resources = overlay
    where = [w for w, _ in pod_templates(resources)]
    assert {w.split("/")[0] for w in where} == {"StatefulSet", "Deployment", "Job", "PyTorchJob", "ServingRuntime",
                                                "InferenceService", "ClusterTrainingRuntime", "TrainJob"}
    assert "PyTorchJob/vidistill-teacher/Master" in where and "PyTorchJob/vidistill-teacher/Worker" in where
    assert "TrainJob/vidistill-teacher-v2/node" in where and "ClusterTrainingRuntime/vidistill-torch/node" in where


def as_pod(spec: dict[str, Any], name: str) -> Resource:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


# ----------------------------------------------------------------------------------------------
# schema validation


def test_core_manifests_valid(overlay: tuple[str, list[Resource]]) -> None:
    _, resources = overlay
    custom = {"PyTorchJob", "InferenceService", "ServingRuntime", "TrainJob", "ClusterTrainingRuntime"}
    for r in resources:
        if r["kind"] in custom:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(r, K8S_VERSION, strict=True)
            continue
        try:
            kubernetes_validate.validate(r, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{r['kind']}/{r['metadata']['name']} is invalid for Kubernetes {K8S_VERSION}: {exc}")


def test_custom_resource_pod_templates_valid(overlay: tuple[str, list[Resource]]) -> None:
    """Pod specs inside PyTorchJob, ServingRuntime, InferenceService, ClusterTrainingRuntime and TrainJob
    (the runtime's pod with the job's overrides) validate as core Pods."""
    _, resources = overlay
    for where, spec in pod_templates(resources):
        if where.split("/")[0] in ("PyTorchJob", "ServingRuntime", "InferenceService", "ClusterTrainingRuntime", "TrainJob"):
            try:
                kubernetes_validate.validate(as_pod(spec, "x"), K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {exc}")


def test_validation_is_live(base: list[Resource]) -> None:
    dep = copy.deepcopy(one(base, "Deployment", "mlflow"))
    dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limitz"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    dep = copy.deepcopy(one(base, "Deployment", "mlflow"))
    dep["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_everything_in_the_namespace(overlay: tuple[str, list[Resource]]) -> None:
    _, resources = overlay
    assert [r["metadata"]["name"] for r in find(resources, "Namespace")] == [NAMESPACE]
    for r in resources:
        if r["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in r["metadata"], f"{r['kind']}/{r['metadata']['name']} is cluster-scoped"
        elif r["kind"] != "Namespace":
            assert r["metadata"].get("namespace") == NAMESPACE, f"{r['kind']}/{r['metadata']['name']}"
        assert r["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "vidistill", r["metadata"]["name"]


# ----------------------------------------------------------------------------------------------
# security baseline on every pod


def test_pod_security(overlay: tuple[str, list[Resource]]) -> None:
    _, resources = overlay
    for where, spec in pod_templates(resources):
        pod_sc = spec.get("securityContext", {})
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        if not where.startswith("ServingRuntime"):  # pod-level fields come from the InferenceService
            assert spec.get("automountServiceAccountToken") is False, f"{where}: mount no API token it does not use"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert not [v for v in volumes.values() if "hostPath" in v], f"{where} mounts a hostPath"
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            eff = {**pod_sc, **sc}
            label = f"{where}/{c['name']}"
            assert eff.get("runAsNonRoot") is True, f"{label}: runAsNonRoot"
            assert isinstance(eff.get("runAsUser"), int) and eff["runAsUser"] > 0, f"{label}: runAsUser"
            assert eff.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{label}: seccompProfile"
            assert sc.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation"
            assert sc.get("readOnlyRootFilesystem") is True, f"{label}: readOnlyRootFilesystem"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), f"{label}: capabilities"
            assert not sc.get("privileged"), f"{label}: privileged"
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), f"{label}: resources.{part} needs cpu and memory"
            gpus = res["limits"].get("nvidia.com/gpu")
            if "nvidia.com/gpu" in res["requests"]:
                assert res["requests"]["nvidia.com/gpu"] == gpus, f"{label}: GPU requests must equal limits"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], f"{label}: /tmp must be an emptyDir"
            for path, vol in mounts.items():
                assert vol in volumes, f"{label}: mount {path} names no volume"


def test_gpu_pods_scheduled_on_gpu_pool(overlay: tuple[str, list[Resource]]) -> None:
    name, resources = overlay
    selector = {"gke": ("cloud.google.com/gke-accelerator", None), "generic": ("nvidia.com/gpu.present", "true")}[name]
    gpu_pods = 0
    for where, spec in pod_templates(resources):
        wants_gpu = any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in spec["containers"])
        node_selector = spec.get("nodeSelector", {})
        if not wants_gpu:
            assert not any("gpu" in k or "accelerator" in k for k in node_selector), f"{where} is pinned to GPU nodes"
            continue
        gpu_pods += 1
        assert {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"} in spec.get("tolerations", []), where
        key, value = selector
        assert key in node_selector and node_selector[key], f"{where}: nodeSelector {node_selector}"
        if value:
            assert node_selector[key] == value
        if name == "gke":  # issue 25.7: one accelerator type per overlay, the pipeline's GPU tasks included
            env = dict(line.split("=", 1) for line in (K8S / "overlays" / name / "pipeline.env").read_text().splitlines()
                       if line and not line.startswith("#"))
            assert node_selector[key] == env["VIDISTILL_GPU_TYPE"], f"{where}: {node_selector[key]} vs pipeline.env"
    assert gpu_pods == 5  # the GPU check Job, the PyTorchJob master and worker, the TrainJob runtime and its job


def test_base_leaves_scheduling_and_storage_to_overlays(base: list[Resource]) -> None:
    for where, spec in pod_templates(base + render(K8S / "cluster" / "base")):
        assert "nodeSelector" not in spec, where
    assert "storageClassName" not in one(base, "PersistentVolumeClaim", "vidistill-data")["spec"]


# ----------------------------------------------------------------------------------------------
# references resolve


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def created_secrets(env: dict[str, str] | None = None) -> list[Resource]:
    """The Secrets k8s/create-secrets.sh prints (what k8s/README.md tells users to apply before the overlay)."""
    out = subprocess.run(["bash", str(K8S / "create-secrets.sh"), *(env or {}).pop("ARGS", "").split()],
                         capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"], **(env or {})})
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_references_resolve(overlay: tuple[str, list[Resource]]) -> None:
    _, resources = overlay
    resources = resources + created_secrets()  # the objects a user creates, as k8s/README.md says
    pvcs = {r["metadata"]["name"] for r in find(resources, "PersistentVolumeClaim")}
    secrets = {r["metadata"]["name"]: r for r in find(resources, "Secret")}
    configmaps = {r["metadata"]["name"]: r for r in find(resources, "ConfigMap")}
    for r in resources:
        for node in walk(r):
            if "claimName" in node:
                assert node["claimName"] in pvcs, f"{r['metadata']['name']}: PVC {node['claimName']}"
            for ref_key, known in (("secretRef", secrets), ("configMapRef", configmaps)):
                ref = node.get(ref_key)
                if ref and not ref.get("optional"):
                    assert ref["name"] in known, f"{r['metadata']['name']}: {ref_key} {ref['name']}"
            for ref_key, known in (("secretKeyRef", secrets), ("configMapKeyRef", configmaps)):
                ref = node.get(ref_key)
                if ref and ref.get("optional") and ref["name"] not in known:
                    continue  # an optional Secret the user may create (create-secrets.sh auth)
                if ref:
                    data = {**known[ref["name"]].get("data", {}), **known[ref["name"]].get("stringData", {})}
                    assert ref["key"] in data, f"{r['metadata']['name']}: {ref['name']}.{ref['key']}"


def test_env_expansions_refer_to_earlier_variables(overlay: tuple[str, list[Resource]]) -> None:
    """Kubernetes expands $(VAR) in env values only from variables defined before it (or envFrom)."""
    _, resources = overlay
    secrets = {r["metadata"]["name"]: r for r in find(resources, "Secret")}
    configmaps = {r["metadata"]["name"]: r for r in find(resources, "ConfigMap")}
    operator_env = {"MASTER_ADDR", "MASTER_PORT", "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "WORLD_SIZE", "RANK"}
    for where, spec in pod_templates(resources):
        for c in spec["containers"]:
            known: set[str] = set()
            for source in c.get("envFrom", []):
                ref = source.get("secretRef") or source.get("configMapRef")
                store = secrets if "secretRef" in source else configmaps
                if ref["name"] in store:
                    known |= set(store[ref["name"]].get("data", {})) | set(store[ref["name"]].get("stringData", {}))
            for env in c.get("env", []):
                for var in re.findall(r"\$\((\w+)\)", env.get("value", "")):
                    assert var in known, f"{where}/{c['name']}: {env['name']} uses $({var}) before it is defined"
                known.add(env["name"])
            if where.startswith(("PyTorchJob", "TrainJob", "ClusterTrainingRuntime")):
                known |= operator_env
            if where.startswith("ServingRuntime"):  # KServe merges the InferenceService model's env into the runtime's
                known |= {e["name"] for isvc in find(resources, "InferenceService")
                          for e in isvc["spec"]["predictor"]["model"].get("env", [])}
            for arg in c.get("args", []) + c.get("command", []):
                for var in re.findall(r"\$\((\w+)\)", arg):
                    assert var in known, f"{where}/{c['name']}: argument uses undefined $({var})"


# ----------------------------------------------------------------------------------------------
# secrets: placeholders only


def test_no_secret_in_the_manifests(overlay: tuple[str, list[Resource]]) -> None:
    """Secrets are never in the manifests (`kubectl apply -k` would put placeholders back over the real ones,
    issue 25): create-secrets.sh makes them, with a fresh random password each time it is asked to."""
    import base64

    _, resources = overlay
    assert not find(resources, "Secret"), [s["metadata"]["name"] for s in find(resources, "Secret")]
    first, second = created_secrets(), created_secrets()
    assert [s["metadata"]["name"] for s in first] == ["vidistill-postgres"]

    def password(secrets: list[Resource]) -> str:
        return base64.b64decode(secrets[0]["data"]["POSTGRES_PASSWORD"]).decode()
    assert re.fullmatch(r"[0-9a-f]{48}", password(first)) and password(first) != password(second)
    auth = created_secrets({"ARGS": "auth", "MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"})
    assert [s["metadata"]["name"] for s in auth] == ["vidistill-mlflow-auth"]  # added later, the database login untouched


def test_no_literal_credentials_outside_secrets(overlay: tuple[str, list[Resource]]) -> None:
    _, resources = overlay
    for r in resources:
        if r["kind"] == "Secret":
            continue
        for node in walk(r):
            if "name" in node and "value" in node and CREDENTIAL_KEY.search(str(node["name"])):
                pytest.fail(f"{r['metadata']['name']}: env {node['name']} has a literal value; use secretKeyRef")
            for value in node.values():
                if isinstance(value, str):
                    for password in re.findall(r"://[^/\s:@]+:([^@\s]+)@", value):
                        assert re.fullmatch(r"\$[({]\w+[)}]", password), f"{r['metadata']['name']}: credentials in URI {value!r}"


def guard_script(resources: list[Resource], kind: str, name: str) -> str:
    (spec,) = [s for w, s in pod_templates(resources) if w == f"{kind}/{name}"]
    container = spec["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    return container["args"][0]


@pytest.mark.parametrize(("kind", "name"), [("StatefulSet", "postgres"), ("Deployment", "mlflow")])
def test_placeholder_password_refused_at_start(base: list[Resource], kind: str, name: str, tmp_path: Path) -> None:
    """The start scripts exit with a message while the Secret still holds the placeholder."""
    script = guard_script(base, kind, name)
    proc = subprocess.run(["/bin/sh", "-c", script], env={"POSTGRES_PASSWORD": PLACEHOLDER, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=10, cwd=tmp_path)
    assert proc.returncode == 1 and "placeholder password" in proc.stderr


# ----------------------------------------------------------------------------------------------
# MLflow and PostgreSQL


def test_mlflow_server_command(base: list[Resource]) -> None:
    from click import Command

    from mlflow.cli import server as mlflow_server

    script = guard_script(base, "Deployment", "mlflow")
    (exec_line,) = [line.strip() for line in script.splitlines() if line.strip().startswith("exec mlflow server")]
    import shlex

    argv = shlex.split(exec_line)[3:]
    assert isinstance(mlflow_server, Command)
    ctx = mlflow_server.make_context("server", list(argv), resilient_parsing=False)  # raises on unknown options
    params = ctx.params
    assert params["host"] == "0.0.0.0" and params["port"] == 5000 and params["serve_artifacts"]
    dep = one(base, "Deployment", "mlflow")
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    uri = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert uri.startswith("postgresql+psycopg2://") and "@postgres:5432/" in uri
    assert one(base, "ConfigMap", "vidistill-mlflow")["data"]["MLFLOW_ARTIFACTS_DESTINATION"]
    svc = one(base, "Service", "postgres")
    assert svc["spec"]["ports"][0]["port"] == 5432
    sts = one(base, "StatefulSet", "postgres")
    assert sts["spec"]["serviceName"] == "postgres" and sts["spec"]["volumeClaimTemplates"]


def test_mlflow_allowed_hosts_accept_service_names(base: list[Resource]) -> None:
    """Use MLflow's own Host-header check with the list the manifest passes."""
    import shlex

    from mlflow.server.security_utils import is_allowed_host_header

    script = guard_script(base, "Deployment", "mlflow")
    argv = shlex.split(next(line for line in script.splitlines() if "--allowed-hosts" in line))
    allowed = [h.strip() for h in argv[argv.index("--allowed-hosts") + 1].split(",")]
    port = one(base, "Service", "mlflow")["spec"]["ports"][0]["port"]
    for host in ("mlflow", f"mlflow.{NAMESPACE}", f"mlflow.{NAMESPACE}.svc", f"mlflow.{NAMESPACE}.svc.cluster.local"):
        assert is_allowed_host_header(allowed, host), host
        assert is_allowed_host_header(allowed, f"{host}:{port}"), f"{host}:{port}"
    assert is_allowed_host_header(allowed, "localhost:5000")
    for host in ("evil.example.com", "mlflow.evil.example.com:5000", "mlflow.other-ns.svc:5000", ""):
        assert not is_allowed_host_header(allowed, host), host


def test_mlflow_image_tags_follow_build_sh(overlay: tuple[str, list[Resource]]) -> None:
    _, resources = overlay
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for r in resources for node in walk(r) for key in ("containers", "initContainers")
              for c in node.get(key, []) if isinstance(node.get(key), list)}
    ours = {i for i in images if not i.startswith("postgres:")}
    assert ours == {f"registry.example.com/vidistill:{version}-{f}" for f in ("cuda", "serve", "mlflow")}
    assert {i for i in images if i.startswith("postgres:")} and all(re.search(r":\d+\.\d+", i) for i in images)


# ----------------------------------------------------------------------------------------------
# custom resources


def test_pytorchjob(overlay: tuple[str, list[Resource]]) -> None:
    from vidistill.cli import build_parser

    _, resources = overlay
    job = one(resources, "PyTorchJob", "vidistill-teacher")
    assert job["apiVersion"] == "kubeflow.org/v1"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    nproc = job["spec"]["nprocPerNode"]
    assert isinstance(nproc, str) and nproc.isdigit()
    world = int(nproc) * sum(s["replicas"] for s in specs.values())
    for replica, spec in specs.items():
        assert spec["restartPolicy"] in ("OnFailure", "Never", "ExitCode", "Always")
        (c,) = [c for c in spec["template"]["spec"]["containers"] if c["name"] == "pytorch"]
        assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == nproc, f"{replica}: one process per GPU"
        assert {"name": "pytorchjob-port", "containerPort": 23456} in c["ports"]
        argv = c["command"] + c["args"]
        assert argv[0] == "torchrun" and "--nproc-per-node=$(PET_NPROC_PER_NODE)" in argv
        assert "--nnodes=$(PET_NNODES)" in argv and "--node-rank=$(PET_NODE_RANK)" in argv
        i = argv.index("--no-python")
        assert argv[i + 1:i + 3] == ["vidistill", "teach"]
        args = build_parser().parse_args(argv[i + 2:])  # the real CLI accepts these flags
        assert args.command == "teach" and getattr(args, "cfg:train.device") == "cuda"
        assert int(getattr(args, "cfg:train.batch_size")) % world == 0, "the global batch is split across ranks"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert c["workingDir"] in mounts and "/dev/shm" in mounts
        assert any(e["name"] == "MLFLOW_TRACKING_URI" and e["value"] == "http://mlflow:5000" for e in c["env"])


def test_trainjob(overlay: tuple[str, list[Resource]]) -> None:
    """The Trainer v2 TrainJob: its runtime exists and is a torch runtime whose pods resume after
    pre-emption; one process per GPU; the CLI accepts the arguments; the global batch splits evenly."""
    from vidistill.cli import build_parser

    _, resources = overlay
    job = one(resources, "TrainJob", "vidistill-teacher-v2")
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    ref = job["spec"]["runtimeRef"]
    assert ref["apiGroup"] == "trainer.kubeflow.org" and ref["kind"] == "ClusterTrainingRuntime"
    runtime = one(resources, "ClusterTrainingRuntime", ref["name"])
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch" and "torch" in runtime["spec"]["mlPolicy"]
    jobset = runtime["spec"]["template"]["spec"]
    assert jobset["failurePolicy"]["maxRestarts"] >= 1, "a pre-empted pod must restart the JobSet"
    (node,) = jobset["replicatedJobs"]
    assert node["name"] == "node" and node["template"]["spec"]["backoffLimit"] == 0
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    trainer = job["spec"]["trainer"]
    gpus = trainer["numProcPerNode"]
    assert isinstance(gpus, int) and str(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]) == str(gpus)
    assert trainer["resourcesPerNode"]["requests"]["nvidia.com/gpu"] == trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
    argv = trainer["command"] + trainer["args"]
    assert argv[:4] == ["torchrun", "--no-python", "vidistill", "teach"]
    args = build_parser().parse_args(argv[3:])
    assert getattr(args, "cfg:resume") is True and getattr(args, "cfg:train.device") == "cuda"
    assert int(getattr(args, "cfg:train.batch_size")) % (gpus * trainer["numNodes"]) == 0
    (pod,) = [s for w, s in pod_templates(resources) if w == "TrainJob/vidistill-teacher-v2/node"]
    (c,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert c["workingDir"] in mounts and "/dev/shm" in mounts


def test_trainjob_launcher_rbac(overlay: tuple[str, list[Resource]]) -> None:
    """The role lets the pipeline's launcher make every API call `vidistill_pipeline.trainjob.launch` makes."""
    _, resources = overlay
    role = one(resources, "Role", "vidistill-trainjob-launcher")
    binding = one(resources, "RoleBinding", "vidistill-trainjob-launcher")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert all(s["kind"] == "ServiceAccount" and s["namespace"] == NAMESPACE for s in binding["subjects"])

    def may(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in role["rules"])

    calls = [("trainer.kubeflow.org", "trainjobs", "create"), ("trainer.kubeflow.org", "trainjobs", "get"),
             ("", "pods", "list"), ("", "pods/log", "get")]
    assert all(may(*call) for call in calls)
    assert not may("trainer.kubeflow.org", "trainjobs", "delete") and not may("", "secrets", "get"), "least privilege"


def test_inference_service(overlay: tuple[str, list[Resource]]) -> None:
    _, resources = overlay
    isvc = one(resources, "InferenceService", "vidistill-student")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "onnx" and model["protocolVersion"] == "v2"
    # issue 25.3: the champion comes from the registry (nothing wrote the PVC path it used to serve)
    assert "storageUri" not in model
    uri = {e["name"]: e.get("value") for e in model["env"]}["VIDISTILL_MODEL_URI"]
    assert re.fullmatch(r"models:/[A-Za-z0-9_.-]+@champion", uri), uri
    runtime = one(resources, "ServingRuntime", model["runtime"])
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert {"name": "onnx", "version": "1", "autoSelect": True} in runtime["spec"]["supportedModelFormats"]
    assert "v2" in runtime["spec"]["protocolVersions"]
    (c,) = runtime["spec"]["containers"]
    assert c["name"] == "kserve-container" and c["ports"][0]["containerPort"] == 8080
    argv = c["command"] + c["args"]
    assert argv[:3] == ["python", "-m", "vidistill.serve"]
    assert argv[argv.index("--model") + 1] == "$(VIDISTILL_MODEL_URI)" and float(argv[argv.index("--watch") + 1]) > 0
    env = {e["name"]: e["valueFrom"]["configMapKeyRef"] for e in c["env"] if "configMapKeyRef" in e["valueFrom"]}
    assert all(e["valueFrom"]["secretKeyRef"]["optional"] for e in c["env"] if "secretKeyRef" in e["valueFrom"])
    config = one(resources, "ConfigMap", env["MLFLOW_TRACKING_URI"]["name"])
    assert config["data"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")
    assert argv[argv.index("--port") + 1] == "8080" and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_python_snippets_compile(overlay: tuple[str, list[Resource]]) -> None:
    _, resources = overlay
    snippets = 0
    for where, spec in pod_templates(resources):
        for c in spec["containers"]:
            if c.get("command") == ["python", "-c"]:
                compile(c["args"][0], f"{where}/{c['name']}", "exec")
                snippets += 1
    assert snippets == 1


# ----------------------------------------------------------------------------------------------
# storage and network policy


def test_storage(overlay: tuple[str, list[Resource]]) -> None:
    name, resources = overlay
    data = one(resources, "PersistentVolumeClaim", "vidistill-data")["spec"]
    assert data["accessModes"] == ["ReadWriteMany"] and data.get("storageClassName")
    if name == "gke":
        assert data["storageClassName"] == "standard-rwx"
        sts = one(resources, "StatefulSet", "postgres")
        assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "standard-rwo"
    assert one(resources, "Deployment", "mlflow")["spec"]["strategy"]["type"] == "Recreate"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if set(selector) - {"matchLabels"}:
        raise ValueError(f"selector {selector} uses more than matchLabels")
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ingress_allowed(policies: list[Resource], *, dst: dict[str, str], port: int,
                    src: dict[str, str], src_ns: str, src_ns_labels: dict[str, str]) -> bool:
    """NetworkPolicy semantics for one TCP connection into namespace `NAMESPACE`."""
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], dst) and "Ingress" in p["spec"]["policyTypes"]]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(pp.get("port") == port for pp in ports):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    raise ValueError("ipBlock peers are not modelled")
                ns_ok = (_selects(peer["namespaceSelector"], src_ns_labels) if "namespaceSelector" in peer
                         else src_ns == NAMESPACE)
                pod_ok = _selects(peer["podSelector"], src) if "podSelector" in peer else True
                if ns_ok and pod_ok:
                    return True
    return False


def test_network_policies(overlay: tuple[str, list[Resource]]) -> None:
    _, resources = overlay
    policies = find(resources, "NetworkPolicy")
    labels = lambda kind, name: one(resources, kind, name)["spec"]["template"]["metadata"]["labels"]  # noqa: E731
    mlflow, postgres = labels("Deployment", "mlflow"), labels("StatefulSet", "postgres")
    job = labels("Job", "vidistill-gpu-check")
    teacher = {**one(resources, "PyTorchJob", "vidistill-teacher")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"],
               "training.kubeflow.org/job-name": "vidistill-teacher"}  # set by the operator
    predictor = {"serving.kserve.io/inferenceservice": "vidistill-student"}  # set by KServe
    here = {"kubernetes.io/metadata.name": NAMESPACE}

    def allowed(dst: dict[str, str], port: int, src: dict[str, str], ns: str = NAMESPACE, ns_labels: dict[str, str] | None = None) -> bool:
        return ingress_allowed(policies, dst=dst, port=port, src=src, src_ns=ns,
                               src_ns_labels=ns_labels if ns_labels is not None else {"kubernetes.io/metadata.name": ns})

    assert any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] for p in policies), "default deny"
    assert allowed(mlflow, 5000, job) and allowed(mlflow, 5000, teacher) and allowed(mlflow, 5000, {"any": "pod"})
    assert not allowed(mlflow, 5000, {}, ns="default")
    assert allowed(mlflow, 5000, {}, ns="kubeflow-user", ns_labels={"vidistill.io/mlflow-client": "true"})
    assert not allowed(mlflow, 5432, job)
    assert allowed(postgres, 5432, mlflow)
    assert not allowed(postgres, 5432, job) and not allowed(postgres, 5432, teacher) and not allowed(postgres, 5432, {}, ns="default")
    assert allowed(teacher, 29500, teacher) and not allowed(teacher, 23456, job)
    runtime = one(resources, "ClusterTrainingRuntime", "vidistill-torch")["spec"]["template"]["spec"]["replicatedJobs"][0]
    node = runtime["template"]["spec"]["template"]["metadata"]["labels"]
    assert allowed(node, 29500, node) and not allowed(node, 29500, job) and not allowed(node, 29500, node, ns="default")
    assert allowed(predictor, 8080, {}, ns="istio-system") and not allowed(predictor, 22, {}, ns="istio-system")
    assert not allowed(job, 8080, mlflow) and not allowed(job, 8080, {}, ns_labels=here)


def _mutations() -> list[tuple[str, Any]]:
    def rw_root(rs: list[Resource]) -> None:
        one(rs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False

    def no_limits(rs: list[Resource]) -> None:
        del one(rs, "PyTorchJob", "vidistill-teacher")["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resources"]["limits"]

    def root_runtime(rs: list[Resource]) -> None:
        one(rs, "ServingRuntime", "vidistill-onnx")["spec"]["containers"][0]["securityContext"]["runAsUser"] = 0

    def open_postgres(rs: list[Resource]) -> None:
        one(rs, "NetworkPolicy", "allow-postgres-from-mlflow")["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]

    def real_password(rs: list[Resource]) -> None:
        rs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vidistill-postgres"},
                   "stringData": {"POSTGRES_PASSWORD": "hunter2hunter2"}})

    def root_trainer(rs: list[Resource]) -> None:
        runtime = one(rs, "ClusterTrainingRuntime", "vidistill-torch")
        pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        pod["containers"][0]["securityContext"]["runAsUser"] = 0

    def no_resume(rs: list[Resource]) -> None:
        one(rs, "TrainJob", "vidistill-teacher-v2")["spec"]["trainer"]["args"].remove("--resume")

    def open_ddp(rs: list[Resource]) -> None:
        one(rs, "NetworkPolicy", "allow-trainjob-ddp")["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {}}]

    def no_toleration(rs: list[Resource]) -> None:
        del one(rs, "Job", "vidistill-gpu-check")["spec"]["template"]["spec"]["tolerations"]

    return [(test_pod_security, rw_root), (test_pod_security, no_limits), (test_pod_security, root_runtime),
            (test_network_policies, open_postgres), (test_no_secret_in_the_manifests, real_password),
            (test_gpu_pods_scheduled_on_gpu_pool, no_toleration), (test_pod_security, root_trainer),
            (test_trainjob, no_resume), (test_network_policies, open_ddp)]


@pytest.mark.parametrize(("check", "mutate"), _mutations(), ids=lambda f: f.__name__)
def test_checks_catch_violations(check: Any, mutate: Any) -> None:
    """Each policy check fails on a manifest set that breaks it (the checks are live)."""
    resources = render_overlay("gke")
    check(("gke", resources))  # passes as rendered
    mutate(resources)
    with pytest.raises(AssertionError):
        check(("gke", resources))
