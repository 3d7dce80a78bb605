"""The cluster rehearsal (`make rehearsal`, issue 25): the production path with real parts, on this machine.

What a user does on a cluster, step by step, with every part real except the two API servers that cannot
run here (Kubernetes and Kubeflow Pipelines; their work is done by this script, said at each step):

1. Render the overlay with the real `kubectl kustomize`; create the Secrets with `k8s/create-secrets.sh`,
   the command k8s/README.md gives users (this script reads what it prints instead of `kubectl apply`).
2. Start PostgreSQL (Debian's, 15; the manifest's image is 16) with the database and login of the Secret,
   and `mlflow server` exactly as `k8s/base/mlflow.yaml` runs it: its command, its env from the rendered
   ConfigMap and Secrets with Kubernetes' `$(VAR)` expansion, as its pod's user with a read-only root and
   only its volumes writable (bubblewrap). Two stand-ins: the Service names resolve to 127.0.0.1 (an
   /etc/hosts in each sandbox; PostgreSQL's port is rewritten to the one it got) and servers bind
   127.0.0.1 where the manifests say 0.0.0.0.
3. Compile the pipeline with the overlay's pipeline.env and run it with kfp.local, every task as its pod
   would run: env, ConfigMaps and Secrets resolved from the compiled IR's Kubernetes platform spec
   against the rendered objects (a task that references a missing object or key fails the rehearsal,
   naming it), the data PVC as a directory at its mount path and working directory, the task's
   `runAsUser` with a read-only root and only /tmp, the home directory and the volume writable.
   Stand-ins: kfp.local's orchestration (the KFP API server and driver), its pipeline root for the
   object store, and the teachers as pods (the overlay's TrainJob launcher needs the Kubernetes API).
4. Start the InferenceService's predictor: the ServingRuntime's container command and args, with the
   InferenceService's env and `{{.Name}}` filled as KServe does, in its pod's sandbox; query it with
   tritonclient over HTTP and gRPC.
5. Add a class folder of new videos to the same data root, run the same pipeline again, and check that
   prep reran, the new champion was promoted, and the running predictor serves it (the new class).

Usage: python scripts/rehearsal.py [--overlay k8s/overlays/gke] [--workdir DIR] [--keep]
Exit 0 when every check passed; otherwise one line naming what failed (and the logs' folder).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVICE_HOSTS = ("mlflow", "mlflow.vidistill", "mlflow.vidistill.svc", "mlflow.vidistill.svc.cluster.local")
MLFLOW_PORT = 5000  # the Service's port: the tracking URI and --allowed-hosts name it


# what the image holds: the checkout and its Python environment (bound read-only into every sandbox, also
# where they live under /tmp or /home, which the sandboxes replace with empty tmpfs)
IMAGE_PATHS = sorted({Path(p).resolve() for p in (ROOT, sys.prefix, sys.base_prefix, Path(sys.executable).resolve().parent)
                      if Path(p).resolve().parts[1:2] in (("tmp",), ("home",), ("run",))})


class RehearsalError(Exception):
    """A step of the rehearsal failed; the message names the task, object or check."""


# --------------------------------------------------------------------------------------------
# 1. the objects: rendered overlay + the Secrets the documented script creates


def render(overlay: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RehearsalError(f"kubectl kustomize {overlay} failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def created_secrets() -> list[dict[str, Any]]:
    """What `bash k8s/create-secrets.sh` prints, in a clean environment (none of this shell's credentials)."""
    out = subprocess.run(["bash", str(ROOT / "k8s" / "create-secrets.sh")], capture_output=True, text=True,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    if out.returncode != 0:
        raise RehearsalError(f"k8s/create-secrets.sh failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


class Cluster:
    """The namespace's objects as the API server would hold them after the documented steps: the Secrets
    the user created, then `kubectl apply -k` of the overlay (which holds no Secret, so it keeps them)."""

    def __init__(self, rendered: list[dict[str, Any]], secrets: list[dict[str, Any]]) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        for obj in [*secrets, *rendered]:  # in the order k8s/README.md applies them
            self.objects[(obj["kind"], obj["metadata"]["name"])] = obj

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, name))

    def one(self, kind: str, name: str) -> dict[str, Any]:
        obj = self.get(kind, name)
        if obj is None:
            raise RehearsalError(f"{kind} {name} is not in the rendered overlay")
        return obj

    def data(self, kind: str, name: str) -> dict[str, str] | None:
        obj = self.get(kind, name)
        if obj is None:
            return None
        values = dict(obj.get("data") or {})
        if kind == "Secret":
            values = {k: base64.b64decode(v).decode() for k, v in values.items()}
            values.update(obj.get("stringData") or {})
        return values

    def key(self, kind: str, name: str, key: str, *, optional: bool, who: str) -> str | None:
        values = self.data(kind, name)
        if values is None or key not in values:
            if optional:
                return None
            what = f"{kind} {name}" if values is None else f"key {key} of {kind} {name}"
            raise RehearsalError(f"{who}: {what} does not exist (CreateContainerConfigError); create it as k8s/README.md says")
        return values[key]


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' dependent environment variables: `$(VAR)` takes an earlier variable's value."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def container_env(container: dict[str, Any], cluster: Cluster, who: str) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom, then env (valueFrom, `$(VAR)`)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        for kind, ref in (("ConfigMap", source.get("configMapRef")), ("Secret", source.get("secretRef"))):
            if ref:
                values = cluster.data(kind, ref["name"])
                if values is None and not ref.get("optional"):
                    raise RehearsalError(f"{who}: {kind} {ref['name']} does not exist (envFrom)")
                env.update(values or {})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
            continue
        source = item["valueFrom"]
        kind, ref = ("Secret", source["secretKeyRef"]) if "secretKeyRef" in source else ("ConfigMap", source["configMapKeyRef"])
        value = cluster.key(kind, ref["name"], ref["key"], optional=bool(ref.get("optional")), who=who)
        if value is not None:
            env[item["name"]] = value
    return env


def task_pods(ir: Path, cluster: Cluster) -> dict[str, dict[str, Any]]:
    """For each component function of the compiled IR, its pod as the KFP driver would build it from the
    platform spec: env from ConfigMaps and Secrets, the PVC mounts, the security context.

    Raises:
        RehearsalError: a task references a ConfigMap, Secret, key or PVC that does not exist (and is not
            optional), or two executors of one function disagree.
    """
    spec, platform = list(yaml.safe_load_all(ir.read_text()))
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    pods: dict[str, dict[str, Any]] = {}
    for name, container in spec["deploymentSpec"]["executors"].items():
        args = container["container"].get("args", [])
        function = args[args.index("--function_to_execute") + 1]
        k8s = executors.get(name, {})
        env: dict[str, str] = {}
        for ref in k8s.get("configMapAsEnv", []):
            for pair in ref["keyToEnv"]:
                value = cluster.key("ConfigMap", ref["configMapName"], pair["configMapKey"],
                                    optional=bool(ref.get("optional")), who=f"task {name}")
                if value is not None:
                    env[pair["envVar"]] = value
        for ref in k8s.get("secretAsEnv", []):
            for pair in ref["keyToEnv"]:
                value = cluster.key("Secret", ref["secretName"], pair["secretKey"], optional=bool(ref.get("optional")),
                                    who=f"task {name}")
                if value is not None:
                    env[pair["envVar"]] = value
        mounts = {}
        for pvc in k8s.get("pvcMount", []):
            claim = pvc.get("constant") or pvc.get("pvcName")
            if cluster.get("PersistentVolumeClaim", claim) is None:
                raise RehearsalError(f"task {name}: PersistentVolumeClaim {claim} does not exist")
            mounts[pvc["mountPath"]] = claim
        security = k8s.get("securityContext", {})
        pod = {"env": env, "mounts": mounts, "uid": int(security.get("runAsUser", 0)), "image": container["container"]["image"]}
        if function in pods and {k: v for k, v in pods[function].items() if k != "image"} != \
                {k: v for k, v in pod.items() if k != "image"}:  # (never print the env: it may hold Secret values)
            raise RehearsalError(f"executors of {function} differ in their Kubernetes settings (env names "
                                 f"{sorted(pods[function]['env'])} vs {sorted(env)}, mounts, uid)")
        pods[function] = pod
    return pods


# --------------------------------------------------------------------------------------------
# the pods' filesystem rules (bubblewrap)


class Sandbox:
    """`bwrap` argv for a pod: the machine's files read-only (the image), a read-only root, a tmpfs /tmp
    and home (emptyDirs), the pod's volumes bound read-write at their mount paths, the Services' names
    in /etc/hosts, the pod's uid (a user namespace), and only the pod's environment."""

    def __init__(self, work: Path) -> None:
        self.hosts = work / "hosts"
        self.hosts.write_text("127.0.0.1 localhost " + " ".join(SERVICE_HOSTS) + "\n")
        # the images' users (postgres 999, vidistill and mlflow 10001), as their /etc/passwd has them
        self.passwd, self.group = work / "passwd", work / "group"
        self.passwd.write_text(Path("/etc/passwd").read_text() + "".join(
            f"pod{uid}:x:{uid}:{uid}::/home/pod{uid}:/bin/sh\n" for uid in (999, 10001)))
        self.group.write_text(Path("/etc/group").read_text() + "".join(f"pod{uid}:x:{uid}:\n" for uid in (999, 10001)))

    def argv(self, command: list[str], *, env: dict[str, str], uid: int, volumes: dict[str, Path],
             home: str, cwd: str, extra_rw: list[Path] = ()) -> list[str]:
        if uid == 0:
            raise RehearsalError(f"a pod would run as root: {command[:3]}; the manifests ask for runAsNonRoot")
        args = ["bwrap", "--die-with-parent", "--unshare-user", "--unshare-pid", "--uid", str(uid), "--gid", str(uid)]
        for entry in sorted(Path("/").iterdir()):
            if entry.name in ("proc", "dev", "tmp", "sys", "home", "run"):
                continue
            args += ["--symlink", os.readlink(entry), str(entry)] if entry.is_symlink() else ["--ro-bind", str(entry), str(entry)]
        args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/run", "--tmpfs", "/home"]
        for path in IMAGE_PATHS:  # the image's code, wherever this checkout lives (a clone under /tmp included)
            args += ["--ro-bind", str(path), str(path)]
        args += ["--dir", home, "--ro-bind", str(self.hosts), "/etc/hosts", "--ro-bind", str(self.passwd), "/etc/passwd",
                 "--ro-bind", str(self.group), "/etc/group"]
        for mount in volumes:  # a mount point the image lacks: an empty directory above it, as a runtime makes
            parent = Path(mount).parent
            while not parent.exists():
                parent = parent.parent
            if not Path(mount).exists() and parent != Path("/"):
                args += ["--tmpfs", str(parent)]
        for path in extra_rw:  # kfp.local's pipeline root: the object store's stand-in
            args += ["--bind", str(path), str(path)]
        for mount, host in volumes.items():
            args += ["--bind", str(host), mount]
        args += ["--remount-ro", "/", "--chdir", cwd, "--clearenv"]
        for key, value in {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": home, **env}.items():
            args += ["--setenv", key, value]
        return args + command


# --------------------------------------------------------------------------------------------
# 2. PostgreSQL and MLflow as their manifests run them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Any, what: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RehearsalError(f"{what} exited with {proc.returncode}: {log.read_text()[-1500:]}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise RehearsalError(f"{what} did not come up in {timeout:.0f} s (log: {log})")


def start(stack: ExitStack, argv: list[str], log: Path) -> subprocess.Popen:
    fh = stack.enter_context(log.open("w"))
    proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def stop() -> None:  # the whole process group: a server's workers too
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                continue
    stack.callback(stop)
    return proc


def postgres(stack: ExitStack, cluster: Cluster, sandbox: Sandbox, work: Path) -> int:
    """PostgreSQL with the StatefulSet's Secret (user, password, database), as its pod's uid."""
    sts = cluster.one("StatefulSet", "postgres")
    pod = sts["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "postgres"]
    env = container_env(container, cluster, "StatefulSet postgres")
    uid = int(container.get("securityContext", {}).get("runAsUser") or pod.get("securityContext", {}).get("runAsUser"))
    data = work / "pgdata"
    data.mkdir()
    bindir = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if bindir is None:
        raise RehearsalError("PostgreSQL's server is not installed (/usr/lib/postgresql/*/bin/initdb); Debian: apt-get "
                             "install postgresql (make rehearsal-tools does it as root)")
    bindir = bindir.parent
    pwfile = work / "pgpass-init"
    pwfile.write_text(env["POSTGRES_PASSWORD"] + "\n")
    port = free_port()
    volumes = {"/var/lib/postgresql/data": data, "/run/secrets-init": work}
    init = sandbox.argv([str(bindir / "initdb"), "-D", "/var/lib/postgresql/data", "-U", env["POSTGRES_USER"],
                         "--pwfile=/run/secrets-init/pgpass-init", "-A", "scram-sha-256"],
                        env={}, uid=uid, volumes=volumes, home="/home/postgres", cwd="/tmp")
    done = subprocess.run(init, capture_output=True, text=True)
    pwfile.unlink()
    if done.returncode != 0:
        hint = (" (bubblewrap cannot create a user namespace here: e.g. Ubuntu 24.04's AppArmor restriction, "
                "kernel.apparmor_restrict_unprivileged_userns)") if done.stderr.startswith("bwrap:") else ""
        raise RehearsalError(f"initdb failed{hint}: {done.stderr[-1000:]}")
    log = work / "postgres.log"
    proc = start(stack, sandbox.argv([str(bindir / "postgres"), "-D", "/var/lib/postgresql/data", "-h", "127.0.0.1",
                                      "-p", str(port), "-k", "/tmp"],
                                     env={}, uid=uid, volumes={"/var/lib/postgresql/data": data}, home="/home/postgres",
                                     cwd="/tmp"), log)
    import psycopg2

    def ready() -> bool:
        psycopg2.connect(host="127.0.0.1", port=port, user=env["POSTGRES_USER"], password=env["POSTGRES_PASSWORD"],
                         dbname="postgres").close()
        return True
    wait_for(ready, "PostgreSQL", proc, log)
    conn = psycopg2.connect(host="127.0.0.1", port=port, user=env["POSTGRES_USER"], password=env["POSTGRES_PASSWORD"],
                            dbname="postgres")
    conn.autocommit = True
    conn.cursor().execute(f'CREATE DATABASE "{env["POSTGRES_DB"]}"')  # what the image's entrypoint does
    conn.close()
    print(f"[rehearsal] PostgreSQL {bindir.parent.name} on 127.0.0.1:{port} (the postgres Service's stand-in), uid {uid}")
    return port


def mlflow_server(stack: ExitStack, cluster: Cluster, sandbox: Sandbox, work: Path, pg_port: int) -> str:
    """`mlflow server` as the Deployment runs it: its command, its env, its pod's uid and volumes."""
    dep = cluster.one("Deployment", "mlflow")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(container, cluster, "Deployment mlflow")
    # stand-in for the postgres Service: its DNS name and port, rewritten to the local server
    env = {k: v.replace("@postgres:5432/", f"@127.0.0.1:{pg_port}/") for k, v in env.items()}
    if "--host 0.0.0.0" not in container["args"][0]:
        raise RehearsalError("the MLflow Deployment no longer says --host 0.0.0.0; update the rehearsal's loopback rewrite")
    script = container["args"][0].replace("--host 0.0.0.0", "--host 127.0.0.1")  # servers bind loopback here
    if f"--port {MLFLOW_PORT}" not in script:
        raise RehearsalError(f"the MLflow Deployment no longer serves on {MLFLOW_PORT}; update the rehearsal")
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", MLFLOW_PORT)) == 0:
            raise RehearsalError(f"127.0.0.1:{MLFLOW_PORT} is taken; the rehearsal's MLflow needs the Service's port")
    volumes = {}
    for mount in container.get("volumeMounts", []):
        host = work / "volumes" / f"mlflow-{mount['name']}"
        host.mkdir(parents=True)
        volumes[mount["mountPath"]] = host
    uid = int(container["securityContext"]["runAsUser"])
    home = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "home")
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job consumers (not used; triples the start time)
    log = work / "mlflow-server.log"
    proc = start(stack, sandbox.argv(container["command"] + [script], env=env, uid=uid,
                                     volumes={k: v for k, v in volumes.items() if k not in (home, "/tmp")},
                                     home=home, cwd=home), log)
    import requests

    uri = f"http://127.0.0.1:{MLFLOW_PORT}"
    wait_for(lambda: requests.get(f"{uri}/health", timeout=2).ok, "mlflow server", proc, log, timeout=180)
    print(f"[rehearsal] mlflow server on {uri} over PostgreSQL ({env['MLFLOW_BACKEND_STORE_URI'].split(':', 1)[0]}), "
          f"artifacts proxied to {env.get('MLFLOW_ARTIFACTS_DESTINATION')}, uid {uid}")
    return uri


# --------------------------------------------------------------------------------------------
# 3. the pipeline, every task as its pod


def overlay_env(overlay: Path) -> dict[str, str]:
    env = {}
    for line in (overlay / "pipeline.env").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip()
    # the TrainJob launcher creates TrainJobs through the Kubernetes API, which cannot run here
    # (tests/test_trainjob.py drives it against a stand-in); the rehearsal trains the teachers as pods
    env.pop("VIDISTILL_TEACHER_LAUNCHER", None)
    return env


@contextmanager
def tasks_as_pods(pods: dict[str, dict[str, Any]], sandbox: Sandbox, volume: Path, object_store: Path) -> Iterator[list[str]]:
    """kfp.local runs each task's command through its pod's sandbox; yields the functions that ran."""
    from kfp.local import subprocess_task_handler as handler

    original = handler.run_local_subprocess
    ran: list[str] = []

    def run_as_pod(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        function = next(a.split("--function_to_execute", 1)[1].split()[0] for a in [" ".join(full_command)])
        pod = pods.get(function)
        if pod is None:
            raise RehearsalError(f"kfp.local ran {function}, which the compiled IR has no executor for")
        ran.append(function)
        env = {**pod["env"], **(env_vars or {})}
        threads = os.environ.get("VIDISTILL_FANOUT_THREADS")  # the pod's CPU limit, on this 2-core machine
        if threads:
            env["VIDISTILL_FANOUT_THREADS"] = threads
        argv = sandbox.argv(full_command, env=env, uid=pod["uid"], volumes={m: volume for m in pod["mounts"]},
                            home="/home/vidistill", cwd=next(iter(pod["mounts"]), "/tmp"), extra_rw=[object_store])
        return original(argv, None)

    handler.run_local_subprocess = run_as_pod
    try:
        yield ran
    finally:
        handler.run_local_subprocess = original


def run_pipeline(overlay: Path, cluster: Cluster, sandbox: Sandbox, work: Path, volume: Path, *, overrides: dict[str, Any],
                 tracking: str) -> dict[str, Any]:
    """Compile with the overlay's settings, check every task's pod, run the pipeline with each task as its pod."""
    from vidistill_pipeline import runner

    env = overlay_env(overlay)
    ir = work / "pipeline.yaml"
    params = runner.resolve_params(ROOT / "params.yaml", profile="tiny", overrides=overrides, absolute=False)
    code = ("import sys, yaml; from vidistill_pipeline.runner import compile_package; "
            "compile_package(yaml.safe_load(open(sys.argv[1])), __import__('pathlib').Path(sys.argv[2]))")
    (work / "params.json").write_text(json.dumps(params))
    done = subprocess.run([sys.executable, "-c", code, str(work / "params.json"), str(ir)], env={**os.environ, **env},
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RehearsalError(f"compiling the pipeline with {overlay}/pipeline.env failed: {done.stderr[-800:]}")
    pods = task_pods(ir, cluster)
    print(f"[rehearsal] compiled with {overlay.relative_to(ROOT)}/pipeline.env: {len(pods)} components; every task's "
          f"ConfigMaps, Secrets and PVC exist; uids {sorted({p['uid'] for p in pods.values()})}")
    object_store = work / "outputs"
    object_store.mkdir(exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = tracking  # the orchestrator's (kfp.local's) own process
    with tasks_as_pods(pods, sandbox, volume, object_store) as ran:
        try:
            result = runner.run_local(params, workdir=work, cache=True)
        except runner.PipelineFailed as e:
            raise RehearsalError("pipeline task(s) failed: " + "; ".join(
                f"{t.label} (log {t.log}: {' '.join((t.error() or t.tail()[-1:] or [''])[-1:]) if not t.error() else t.error()})"
                for t in e.tasks)) from None
    statuses = {t.label: t.status for t in result["tasks"]}
    print(f"[rehearsal] pipeline: {len(ran)} task pods ran in {result['seconds']:.0f} s; cached: "
          f"{', '.join(k for k, v in statuses.items() if v == 'cached') or 'none'}")
    return {"statuses": statuses, "params": params}


# --------------------------------------------------------------------------------------------
# 4. the predictor


def predictor(stack: ExitStack, cluster: Cluster, sandbox: Sandbox, work: Path, *, watch_s: float) -> dict[str, Any]:
    isvc = cluster.one("InferenceService", "vidistill-student")
    model = isvc["spec"]["predictor"]["model"]
    runtime = cluster.one("ServingRuntime", model["runtime"])
    (container,) = runtime["spec"]["containers"]
    who = f"InferenceService {isvc['metadata']['name']}"
    env = container_env({"env": container.get("env", []) + model.get("env", [])}, cluster, who)
    http, grpc = free_port(), free_port()
    argv = []
    for arg in container["command"] + container["args"]:
        arg = expand(arg.replace("{{.Name}}", isvc["metadata"]["name"]), env)
        argv.append(arg)
    swaps = {"--host": "127.0.0.1", "--port": str(http), "--grpc-port": str(grpc), "--watch": str(watch_s)}
    for flag, value in swaps.items():  # loopback, free ports, a short watch period: stand-ins, said in the docs
        argv[argv.index(flag) + 1] = value
    argv[0] = str(BIN / "python") if argv[0] == "python" else argv[0]
    uid = int(model["securityContext"]["runAsUser"])
    home = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "home")
    log = work / "predictor.log"
    proc = start(stack, sandbox.argv(argv, env=env, uid=uid, volumes={}, home=home, cwd="/tmp"), log)
    import requests

    url = f"127.0.0.1:{http}"
    wait_for(lambda: requests.get(f"http://{url}/v2/health/ready", timeout=2).ok, "predictor", proc, log, timeout=180)
    print(f"[rehearsal] predictor: {' '.join(argv[argv.index('--model'):argv.index('--model') + 4])} ... uid {uid}")
    return {"http": url, "grpc": f"127.0.0.1:{grpc}", "name": isvc["metadata"]["name"], "log": log,
            "model_uri": env["VIDISTILL_MODEL_URI"]}


def query(server: dict[str, Any]) -> dict[str, Any]:
    """Ask the predictor with tritonclient over HTTP and gRPC; both must answer the same logits."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    name = server["name"]
    h = httpclient.InferenceServerClient(server["http"])
    g = grpcclient.InferenceServerClient(server["grpc"])
    if not (h.is_model_ready(name) and g.is_model_ready(name)):
        raise RehearsalError(f"predictor: model {name} is not ready")
    if g.is_model_ready("no-such-model"):
        raise RehearsalError("predictor: gRPC ModelReady says an unknown model is ready")
    meta = h.get_model_metadata(name)
    (inp,) = meta["inputs"]
    shape = [1 if d == -1 else d for d in inp["shape"]]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    hi = httpclient.InferInput(inp["name"], shape, "FP32")
    hi.set_data_from_numpy(x, binary_data=True)
    gi = grpcclient.InferInput(inp["name"], shape, "FP32")
    gi.set_data_from_numpy(x)
    lh = h.infer(name, [hi]).as_numpy("logits")
    lg = g.infer(name, [gi]).as_numpy("logits")
    if lh.shape != lg.shape or not np.allclose(lh, lg, atol=1e-5):
        raise RehearsalError(f"predictor: HTTP and gRPC logits differ ({lh.shape} vs {lg.shape})")
    return {"version": meta["versions"][0], "classes": meta["parameters"]["classes"], "logits": lh.shape}


# --------------------------------------------------------------------------------------------


def make_videos(root: Path, classes: list[str], work: Path) -> None:
    """Real encoded videos (vidistill's synthetic generator), one folder per class, on the data volume."""
    from vidistill.config import SynthConfig
    from vidistill.data.synthetic import class_names, generate

    names = class_names(0)
    src = work / "synth"
    if not src.exists():
        generate(SynthConfig(out=str(src), videos_per_class=4, frames=12), progress=False)
    for cls in classes:
        if cls not in names:
            raise RehearsalError(f"no synthetic class {cls!r}; choose from {names}")
        shutil.copytree(src / cls, root / cls)


def rehearse(overlay: Path, work: Path, *, drop_secret_key: str | None = None) -> dict[str, Any]:
    from vidistill.data.synthetic import class_names

    work.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(render(overlay), created_secrets())
    if drop_secret_key:  # a test: a key every task needs is missing, and the rehearsal must say which
        kind, name, key = drop_secret_key.split("/")
        obj = cluster.one(kind, name)
        for field in ("data", "stringData"):
            (obj.get(field) or {}).pop(key, None)
    print(f"[rehearsal] {len(cluster.objects)} objects: kubectl kustomize {overlay.relative_to(ROOT)} + "
          "k8s/create-secrets.sh")
    for kind, name in (("Deployment", "mlflow"), ("StatefulSet", "postgres")):  # the kubelet's check before any start
        for container in cluster.one(kind, name)["spec"]["template"]["spec"]["containers"]:
            env = container_env(container, cluster, f"{kind} {name}")
            if kind == "StatefulSet" and "POSTGRES_PASSWORD" not in env:
                raise RehearsalError(f"{kind} {name}: POSTGRES_PASSWORD is not set (Secret vidistill-postgres lacks it); "
                                     "the database refuses to initialise")
    sandbox = Sandbox(work)
    volume = work / "volumes" / "vidistill-data"  # the data PVC
    volume.mkdir(parents=True, exist_ok=True)
    names = class_names(0)
    first, added = names[:2], names[2]
    make_videos(volume / "data" / "videos", first, work)
    isvc_env = {e["name"]: e.get("value") for e in cluster.one("InferenceService", "vidistill-student")["spec"]["predictor"]["model"]["env"]}
    model_name = re.fullmatch(r"models:/(.+)@champion", isvc_env["VIDISTILL_MODEL_URI"]).group(1)
    overrides = {"prep.dataset": "folder", "prep.root": "data/videos", "register.model_name": model_name,
                 "pipeline.methods": ["none", "kd"]}
    with ExitStack() as stack:
        pg = postgres(stack, cluster, sandbox, work)
        tracking = mlflow_server(stack, cluster, sandbox, work, pg)
        one = run_pipeline(overlay, cluster, sandbox, work, volume, overrides=overrides, tracking=tracking)
        server = predictor(stack, cluster, sandbox, work, watch_s=1.0)
        before = query(server)
        if before["classes"] != first:
            raise RehearsalError(f"the champion serves classes {before['classes']}, expected {first}")
        print(f"[rehearsal] tritonclient HTTP + gRPC: version {before['version']}, classes {before['classes']}, "
              f"logits {before['logits']}")
        make_videos(volume / "data" / "videos", [added], work)  # a new class folder under the same root
        two = run_pipeline(overlay, cluster, sandbox, work, volume, overrides=overrides, tracking=tracking)
        if two["statuses"].get("prep") == "cached":
            raise RehearsalError("the second run served prep from the cache although a class folder was added")
        deadline = time.monotonic() + 60
        while True:
            after = query(server)
            if after["version"] != before["version"] or time.monotonic() > deadline:
                break
            time.sleep(1)
        if after["classes"] != [*first, added] or after["logits"][1] != len(first) + 1:
            raise RehearsalError(f"after the second run the predictor serves version {after['version']} with classes "
                                 f"{after['classes']}; expected the new champion with {[*first, added]}")
        print(f"[rehearsal] new class {added!r}: prep reran, version {after['version']} promoted and served by the running "
              f"predictor without a restart (classes {after['classes']})")
    return {"before": before, "after": after, "first": one["statuses"], "second": two["statuses"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rehearsal", description=__doc__.split("\n\n")[0])
    p.add_argument("--overlay", default="k8s/overlays/gke", help="the overlay to render (default: k8s/overlays/gke)")
    p.add_argument("--workdir", default=None, help="where its files go (default: a temporary folder, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, databases, pipeline outputs)")
    p.add_argument("--drop-secret-key", default=None, metavar="KIND/NAME/KEY", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    hints = {"bwrap": "Debian: apt-get install bubblewrap", "kubectl": "kubectl with kustomize, from Kubernetes' package "
             "repository (https://kubernetes.io/docs/tasks/tools/); Debian's kubernetes-client is too old"}
    for tool, hint in hints.items():
        if shutil.which(tool) is None:
            print(f"rehearsal: {tool} is not installed ({hint})", file=sys.stderr)
            return 2
    if a.workdir and Path(a.workdir).exists() and any(Path(a.workdir).iterdir()):
        print(f"rehearsal: --workdir {a.workdir} is not empty; name a new folder", file=sys.stderr)
        return 2
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="vidistill-rehearsal-"))
    t0 = time.monotonic()
    try:
        rehearse((ROOT / a.overlay).resolve(), work.resolve(), drop_secret_key=a.drop_secret_key)
    except RehearsalError as e:  # the work folder stays: its logs say why
        print(f"rehearsal failed: {e} (logs: {work})", file=sys.stderr)
        return 1
    if not a.keep and not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[rehearsal] passed in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
