"""Multi-node teacher training launched from the pipeline as a Kubeflow Trainer v2 `TrainJob`.

The launcher task (a small CPU pod) stages the task's clips (and flow) onto the shared data volume,
creates a `TrainJob` (`trainer.kubeflow.org/v1alpha1`) that runs `torchrun ... vidistill teach
--resume` on N nodes x G GPUs through a `ClusterTrainingRuntime` (k8s/base/trainer-runtime.yaml),
follows the job's status conditions (`Complete` / `Failed`) to the end, and copies the trained
teacher from the shared volume into its own output artifact, so the next task gets it as a normal
pipeline artifact. On failure it raises `TrainJobFailed` with the condition's reason and message and
the tail of every pod's log.

Resume: the job's name and its folder on the shared volume are derived from what it trains (the
teach parameters, the code version, the data hash, the modality), and the trainer always passes
`--resume`. A pre-empted pod (spot node) is restarted by the runtime's JobSet (`failurePolicy`) and
continues from `checkpoints/last.pt` on the volume (bit-exact, see `vidistill.train.loop`); a
launcher pod that is itself restarted finds the existing `TrainJob` (HTTP 409) and follows it instead
of starting another one.

Only the official `kubernetes` client is used (`CustomObjectsApi`, `CoreV1Api`); status is polled
with `get_namespaced_custom_object` (one GET per `poll_s`), which survives API-server restarts and
proxies that cut long watches.
"""

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from vidistill_pipeline.components import CPU_IMAGE

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
RUNTIME = "vidistill-torch"  # the ClusterTrainingRuntime in k8s/base/trainer-runtime.yaml
POD_JOB_LABEL = "jobset.sigs.k8s.io/jobset-name"  # JobSet labels every pod with its JobSet (= TrainJob) name
# what every pipeline task and TrainJob reads from the MLflow client ConfigMap (k8s/base/mlflow.yaml creates it)
# and from the credentials Secret, which is optional: MLflow as k8s/base deploys it has no login, and a pod
# must start without that Secret
MLFLOW_CONFIG_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


class TrainJobFailed(RuntimeError):
    """The TrainJob ended with condition `Failed`.

    Attributes:
        name: the TrainJob's name.
        reason: the condition's reason (e.g. `DeadlineExceeded`, `FailedJobs`).
        condition_message: the condition's message.
        logs: pod name -> the tail of its log.
    """

    def __init__(self, name: str, reason: str, message: str, logs: dict[str, str]):
        self.name, self.reason, self.condition_message, self.logs = name, reason, message, logs
        tails = "".join(f"\n--- {pod} ---\n{text.rstrip()}" for pod, text in logs.items())
        super().__init__(f"TrainJob {name} failed: {reason}: {message}{tails}")


@dataclass(frozen=True)
class TrainJobConfig:
    """Where and how big the teacher's TrainJob is (`pipeline.trainjob` in params.yaml).

    Attributes:
        nodes: training nodes (pods), `spec.trainer.numNodes`.
        gpus_per_node: GPUs per node = torchrun processes per node (`numProcPerNode`).
        cpu, memory: requests = limits per node.
        namespace: where the TrainJob is created (the pipeline's namespace).
        runtime: the `ClusterTrainingRuntime` it references.
        image: the trainer image (the project's CUDA image).
        workspace: the shared data volume as the launcher pod mounts it.
        pod_workspace: the same volume as the runtime mounts it in the trainer pods (their working dir).
        mlflow_config: the ConfigMap holding MLFLOW_TRACKING_URI.
        mlflow_secret: the optional Secret holding MLflow credentials (referenced, never copied).
        poll_s: seconds between status reads.
        timeout_s: give up following after this long (0 = never); the TrainJob keeps running.
        log_lines: lines of each pod's log reported on failure.
    """

    nodes: int = 2
    gpus_per_node: int = 2
    cpu: str = "8"
    memory: str = "32Gi"
    namespace: str = "vidistill"
    runtime: str = RUNTIME
    image: str = ""
    workspace: str = "/workspace"
    pod_workspace: str = "/workspace"
    mlflow_config: str = "vidistill-mlflow-client"
    mlflow_secret: str = "vidistill-mlflow-auth"
    poll_s: float = 15.0
    timeout_s: float = 0.0
    log_lines: int = 50

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainJobConfig":
        """Raises `ValueError` naming an unknown key or a count below 1."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"pipeline.trainjob: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cfg = cls(**data)
        for name in ("nodes", "gpus_per_node"):
            if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
                raise ValueError(f"pipeline.trainjob.{name} must be an integer >= 1, got {getattr(cfg, name)!r}")
        return cfg


def config_from_env(environ: dict[str, str] | None = None) -> TrainJobConfig:
    """The TrainJob's size and placement at compile time, from the cluster overlay's `pipeline.env`
    (k8s/overlays/*/pipeline.env): VIDISTILL_TRAINJOB_NODES, VIDISTILL_TRAINJOB_GPUS_PER_NODE,
    VIDISTILL_TRAINJOB_CPU, VIDISTILL_TRAINJOB_MEMORY, VIDISTILL_NAMESPACE, VIDISTILL_DATA_MOUNT,
    VIDISTILL_MLFLOW_CONFIG, VIDISTILL_MLFLOW_SECRET;
    the image is the project's CUDA image. Raises `ValueError` naming a bad value."""
    import os

    from vidistill_pipeline.components import CUDA_IMAGE

    env = os.environ if environ is None else environ
    data: dict[str, Any] = {"image": CUDA_IMAGE}
    for var, key, kind in (("VIDISTILL_TRAINJOB_NODES", "nodes", int), ("VIDISTILL_TRAINJOB_GPUS_PER_NODE", "gpus_per_node", int),
                           ("VIDISTILL_TRAINJOB_CPU", "cpu", str), ("VIDISTILL_TRAINJOB_MEMORY", "memory", str),
                           ("VIDISTILL_NAMESPACE", "namespace", str), ("VIDISTILL_DATA_MOUNT", "workspace", str),
                           ("VIDISTILL_MLFLOW_CONFIG", "mlflow_config", str), ("VIDISTILL_MLFLOW_SECRET", "mlflow_secret", str)):
        if env.get(var):
            try:
                data[key] = kind(env[var])
            except ValueError:
                raise ValueError(f"{var}={env[var]!r} is not a {kind.__name__}; set a whole number") from None
    return TrainJobConfig.from_dict(data)


def job_key(params: dict[str, Any], *, code_version: str, data_hash: str, modality: str) -> str:
    """12 hex digits naming what a TrainJob trains: the same inputs give the same job and folder."""
    blob = json.dumps({"params": params, "code": code_version, "data": data_hash, "modality": modality}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def job_name(modality: str, key: str) -> str:
    """An RFC 1035 label of at most 63 characters, as the TrainJob CRD requires."""
    return f"vidistill-teach-{modality}-{key}"


def build_trainjob(cfg: TrainJobConfig, *, name: str, modality: str, folder: str, flow: bool) -> dict[str, Any]:
    """The `TrainJob` object for one teacher.

    Args:
        cfg: size and placement.
        name: the TrainJob's name (`job_name`).
        modality: `rgb` or `flow`.
        folder: the job's folder relative to the pods' working directory (the shared volume); it holds
            `params.yaml`, `clips/`, `flow/` and `out/`.
        flow: whether the teacher reads `folder/flow`.

    Returns:
        The object as a dict, ready for `CustomObjectsApi.create_namespaced_custom_object`.
    """
    argv = ["--no-python", "vidistill", "teach", "--quiet", "--params", f"{folder}/params.yaml", "--section", "teach",
            f"--modality={modality}", f"--clips={folder}/clips", f"--out={folder}/out", "--device=cuda", "--resume"]
    if flow:
        argv.append(f"--flow={folder}/flow")
    env = [{"name": key, "valueFrom": {"configMapKeyRef": {"name": cfg.mlflow_config, "key": key}}} for key in MLFLOW_CONFIG_KEYS]
    env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": cfg.mlflow_secret, "key": key, "optional": True}}}
            for key in MLFLOW_SECRET_KEYS]
    resources = {"cpu": cfg.cpu, "memory": cfg.memory, "nvidia.com/gpu": str(cfg.gpus_per_node)}
    trainer: dict[str, Any] = {
        # torchrun reads --nnodes, --nproc-per-node, --node-rank and the rendezvous address from the
        # PET_* variables the runtime's torch policy sets in every pod
        "command": ["torchrun"], "args": argv, "env": env, "numNodes": cfg.nodes, "numProcPerNode": cfg.gpus_per_node,
        "resourcesPerNode": {"requests": dict(resources), "limits": dict(resources)},
    }
    if cfg.image:
        trainer["image"] = cfg.image
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
        "metadata": {"name": name, "namespace": cfg.namespace,
                     "labels": {"app.kubernetes.io/part-of": "vidistill", "app.kubernetes.io/name": "vidistill-teacher",
                                "vidistill.io/modality": modality}},
        "spec": {"runtimeRef": {"name": cfg.runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
                 "trainer": trainer},
    }


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def pod_logs(core: Any, namespace: str, name: str, *, tail_lines: int) -> dict[str, str]:
    """Pod name -> the last `tail_lines` lines of its trainer container's log (or why there is none)."""
    from kubernetes.client.exceptions import ApiException

    logs = {}
    for pod in core.list_namespaced_pod(namespace, label_selector=f"{POD_JOB_LABEL}={name}").items:
        try:
            logs[pod.metadata.name] = core.read_namespaced_pod_log(pod.metadata.name, namespace, container="node",
                                                                   tail_lines=tail_lines)
        except ApiException as exc:
            logs[pod.metadata.name] = f"(no log: HTTP {exc.status} {exc.reason})"
    return logs


def launch(body: dict[str, Any], *, api_client: Any = None, poll_s: float = 15.0, timeout_s: float = 0.0,
           log_lines: int = 50, on_status: Callable[[str], None] = print) -> dict[str, Any]:
    """Create the TrainJob (or adopt the one of that name) and follow it until `Complete` or `Failed`.

    Args:
        body: the object (`build_trainjob`).
        api_client: a `kubernetes.client.ApiClient`; None = the in-cluster service account.
        poll_s: seconds between status reads.
        timeout_s: stop following after this long (0 = never).
        log_lines: lines of each pod's log kept.
        on_status: called with a line whenever the conditions change.

    Returns:
        The finished object (its `status`) plus `logs` (pod -> log tail).

    Raises:
        TrainJobFailed: the job's `Failed` condition, with reason, message and pod logs.
        TimeoutError: `timeout_s` passed first.
        kubernetes.client.exceptions.ApiException: the API refused the object (e.g. 403 without RBAC).
    """
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    if api_client is None:
        config.load_incluster_config()
        api_client = client.ApiClient()
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        on_status(f"trainjob {namespace}/{name}: created")
    except ApiException as exc:
        if exc.status != 409:
            raise
        on_status(f"trainjob {namespace}/{name}: exists already (a restarted launcher): following it")
    t0, seen = time.monotonic(), None
    while True:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        conditions = [(c.get("type"), c.get("status"), c.get("reason")) for c in (obj.get("status") or {}).get("conditions") or []]
        if conditions != seen:
            on_status(f"trainjob {namespace}/{name}: " + (", ".join(f"{t}={s} ({r})" for t, s, r in conditions) or "pending"))
            seen = conditions
        failed = _condition(obj, "Failed")
        if failed:
            raise TrainJobFailed(name, failed.get("reason", "Unknown"), failed.get("message", ""),
                                 pod_logs(core, namespace, name, tail_lines=log_lines))
        if _condition(obj, "Complete"):
            return {**obj, "logs": pod_logs(core, namespace, name, tail_lines=log_lines)}
        if timeout_s and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"trainjob {namespace}/{name} still running after {timeout_s:.0f} s; it keeps running: "
                               f"`kubectl -n {namespace} get trainjob {name}`")
        time.sleep(poll_s)


def _stage(src: str | Path, dst: Path) -> None:
    """Copy an artifact folder onto the shared volume once (a `.complete` marker makes it resumable)."""
    if (dst / ".complete").exists():
        return
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    (dst / ".complete").touch()


def run_teacher(params: dict[str, Any], trainjob: dict[str, Any], *, code_version: str, modality: str, clips: str,
                out: str, data_hash: str, flow: str | None = None, api_client: Any = None) -> dict[str, Any]:
    """Train a teacher with a TrainJob and copy it to `out` (what the `teach-trainjob` task runs).

    Args:
        params: the `teach` section of params.yaml.
        trainjob: `pipeline.trainjob` (see `TrainJobConfig`).
        code_version, data_hash: key the job's name and folder (see `job_key`).
        modality: `rgb` or `flow`.
        clips, flow: the task's input artifact folders (staged onto the shared volume).
        out: the task's model artifact folder: receives `model.pt` and `eval/`.
        api_client: as `launch`.

    Returns:
        top1, top5, mAP (from the teacher's `eval/metrics.json`), `run_id` (its MLflow run), `name`.

    Raises:
        TrainJobFailed, TimeoutError: as `launch`.
    """
    import yaml

    cfg = TrainJobConfig.from_dict(trainjob)
    key = job_key(params, code_version=code_version, data_hash=data_hash, modality=modality)
    name, folder = job_name(modality, key), f"trainjobs/{key}"
    host = Path(cfg.workspace) / folder
    host.mkdir(parents=True, exist_ok=True)
    _stage(clips, host / "clips")
    if flow is not None:
        _stage(flow, host / "flow")
    (host / "params.yaml").write_text(yaml.safe_dump({"teach": params}, sort_keys=True))
    body = build_trainjob(cfg, name=name, modality=modality, folder=folder, flow=flow is not None)
    launch(body, api_client=api_client, poll_s=cfg.poll_s, timeout_s=cfg.timeout_s, log_lines=cfg.log_lines)
    result = host / "out"
    Path(out).mkdir(parents=True, exist_ok=True)
    shutil.copy2(result / "model.pt", Path(out) / "model.pt")
    shutil.copytree(result / "eval", Path(out) / "eval", dirs_exist_ok=True)
    scores = json.loads((result / "eval" / "metrics.json").read_text())
    from vidistill.train.loop import load_checkpoint

    run_id = load_checkpoint(result / "model.pt").get("extra", {}).get("run_id", "")
    return {**{k: float(scores[k]) for k in ("top1", "top5", "mAP")}, "run_id": run_id, "name": name}


def config_dict(cfg: TrainJobConfig) -> dict[str, Any]:
    """`cfg` as the plain dict a pipeline constant holds."""
    return asdict(cfg)


# ----------------------------------------------------------------------------------------------
# the pipeline component (chosen instead of `teach_op` by `VIDISTILL_TEACHER_LAUNCHER=trainjob`, see dag.py)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def teach_trainjob_op(params: dict, code_version: str, modality: str, trainjob: dict, clips: Input[Dataset],
                      model: Output[Model], metrics: Output[Metrics], flow: Input[Dataset] = None):
    """Train a teacher as a Kubeflow Trainer `TrainJob` (`vidistill_pipeline.trainjob.run_teacher`).

    The same outputs as `teach_op`: `model.path` holds model.pt (and eval/), `metrics` top1, top5,
    mAP, `model.metadata` the scores, modality, data hash, MLflow run id and the TrainJob's name.
    """
    import json
    from pathlib import Path

    from vidistill_pipeline.trainjob import run_teacher

    data_hash = clips.metadata.get("data_hash", "unknown")
    result = run_teacher(params, trainjob, code_version=code_version, modality=modality, clips=clips.path,
                         flow=flow.path if flow is not None else None, out=model.path, data_hash=data_hash)
    scores = {k: result[k] for k in ("top1", "top5", "mAP")}
    for key, value in scores.items():
        metrics.log_metric(key, value)
    Path(metrics.path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics.path).write_text(json.dumps(scores))
    model.metadata.update({**scores, "modality": modality, "data_hash": data_hash, "mlflow_run_id": result["run_id"],
                           "trainjob": result["name"]})


__all__ = ["TrainJobConfig", "TrainJobFailed", "build_trainjob", "config_dict", "job_key", "job_name",
           "launch", "pod_logs", "run_teacher", "teach_trainjob_op"]
