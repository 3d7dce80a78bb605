"""MLflow tracking at the stage edge: one parent run per pipeline, one child run per stage.

Models and losses never call MLflow; a stage wraps its work in `stage_run(...)` and logs what the
library functions return. Every run carries the same lineage tags (`LINEAGE_TAGS`) so a registered
model can be traced back to its code commit, data, parameters, method and teacher.

Tracking URI: `MLFLOW_TRACKING_URI` if set (e.g. `http://mlflow:5000`, the single writer when
stages run in parallel), else the project's own store, `sqlite:///<project>/mlflow.db` (MLflow 3
refuses the `./mlruns` file store by default), with artifacts in `<project>/mlartifacts/`:
* the project is `$DVC_ROOT` when DVC runs the command (DVC points it at the real project also for
  `dvc exp run --temp` and `--queue`, which run in a temporary copy under `.dvc/tmp/exps/`), else the
  nearest folder up from the working directory that holds `params.yaml`, `dvc.yaml` or `.dvc`, else
  the working directory; so every stage of a project finds the same store from any folder;
* the location is absolute and percent-encoded (a folder may be named `my runs`, `100%`, `a?b`, `#1`);
* the store's first-time creation (schema and migrations) and the experiment's creation are
  serialised with a file lock beside it, so several stages started at once on a fresh project all
  succeed and leave it intact.

A run follows its process's life: a stage run ends FINISHED, FAILED when its body raises, and KILLED
on Ctrl-C or SIGTERM. A process killed outright (SIGKILL, power loss) cannot say so, so every stage
run is tagged with its process (`vidistill.process`: host, pid, start time) and the next stage run
in the experiment marks RUNNING runs whose process is gone as KILLED. `--resume` continues the run
the checkpoint was made by (`resume_run_id`), so every epoch's metrics are in one run.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from vidistill.config import flatten
from vidistill.errors import ConfigError, UserError
from vidistill.interrupts import deferred

PARENT_ENV = "VIDISTILL_PARENT_RUN_ID"
TAG_PREFIX = "vidistill."
# Lineage tags set on every run (pipeline parents and stage children), as `vidistill.<name>`.
LINEAGE_TAGS = ("git_commit", "data_hash", "params_hash", "method", "teacher_run_id", "stage")
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
PROCESS_TAG = TAG_PREFIX + "process"  # "<host>|<pid>|<process start time>" of the process that runs a stage
KILLED_TAG = TAG_PREFIX + "killed"  # why a run was marked KILLED by someone else than its own process
_MLFLOW_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch call
_PARAM_MAX_CHARS = 6000
PROJECT_MARKERS = ("params.yaml", "dvc.yaml", ".dvc")
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
class TrackingServerError(UserError):
    """No MLflow server answers at the tracking URI."""


_ready: set[str] = set()  # sqlite stores whose schema this process has checked under the lock


def project_root(cwd: str | Path | None = None) -> Path:
    """The project the default tracking store belongs to (absolute).

    `$DVC_ROOT` when set (DVC sets it for stage commands; for `dvc exp run --temp` and `--queue` it is
    the real project, not the temporary copy); else a DVC experiment's temporary copy
    (`<project>/.dvc/tmp/exps/...`) maps to its project; else the nearest folder up from `cwd` that
    holds `params.yaml`, `dvc.yaml` or `.dvc`; else `cwd` itself.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path(cwd or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for folder in (here, *here.parents):
        if any((folder / marker).exists() for marker in PROJECT_MARKERS):
            return folder
    return here


def sqlite_uri(path: str | Path) -> str:
    """`sqlite:///<absolute path>`, percent-encoded (SQLAlchemy decodes it; spaces, %, ? and # survive)."""
    return "sqlite:///" + quote(str(Path(path).resolve()))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri.removeprefix("sqlite:///").split("?")[0]))


# MLflow's own default (7 retries, backoff factor 2) keeps a command waiting 254 s on a server that is down
DEFAULT_HTTP_RETRIES = "3"


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, in one line, when no MLflow server answers at `uri` (any HTTP answer passes: what it
    says about credentials or hosts comes with the first real request, see `tracking_error_message`).
    Also lowers MLflow's HTTP retries to `DEFAULT_HTTP_RETRIES` unless MLFLOW_HTTP_REQUEST_MAX_RETRIES is set.

    Raises:
        TrackingServerError: nothing answers at `uri` (refused, unknown host, timeout).
    """
    import requests

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", DEFAULT_HTTP_RETRIES)
    # the TLS settings MLflow's own client honours
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true")
    verify: bool | str = False if insecure else os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True
    cert = os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout, allow_redirects=False, verify=verify, cert=cert)
    except requests.exceptions.SSLError as e:
        raise TrackingServerError(f"the MLflow server at {redact(uri)} fails TLS verification ({_reason(e)}); set "
                                  "MLFLOW_TRACKING_SERVER_CERT_PATH to its CA bundle") from None
    except requests.exceptions.RequestException as e:
        uri = redact(uri)
        raise TrackingServerError(f"no MLflow server answers at {uri} ({_reason(e)}); start it, or point "
                                  "MLFLOW_TRACKING_URI at one (on the cluster: kubectl -n vidistill port-forward "
                                  "svc/mlflow 5000:5000, then http://localhost:5000)") from None


def redact(uri: str) -> str:
    """`uri` without the user and password a URI may carry (`http://user:pass@host` -> `http://***@host`)."""
    parts = urlparse(uri)
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl() if "@" in parts.netloc else uri


def _reason(exc: BaseException) -> str:
    """The last, most specific part of a requests/urllib3 error chain, in a few words."""
    text = " ".join(str(exc).split())
    for marker in ("Failed to resolve", "Connection refused", "timed out", "Name or service not known",
                   "No route to host", "certificate verify failed"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__


def tracking_error_message(exc: BaseException) -> str | None:
    """One line saying what an MLflow client error means and what to do, or None when `exc` is not one.

    Covers an unreachable server, 401 (missing or wrong credentials), 403 "Invalid Host header" (the
    server's --allowed-hosts does not list the host in the URI, e.g. a port-forward on another local
    port), other 403s, and MLflow's own errors (their message, on one line).
    """
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, TrackingServerError):
        return str(exc)
    uri = redact(os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri())
    text = " ".join(str(exc).split())
    if isinstance(exc, requests.exceptions.RequestException) or (
            isinstance(exc, MlflowException) and ("Max retries exceeded" in text or "failed with exception" in text)):
        return (f"the MLflow server at {uri} cannot be reached ({_reason(exc)}); start it or point MLFLOW_TRACKING_URI "
                "at one")
    if not isinstance(exc, MlflowException):
        return None
    if "Invalid Host header" in text:
        host = urlparse(uri).netloc
        return (f"the MLflow server at {uri} refuses the Host header {host!r} (its --allowed-hosts does not list it): "
                "use a host it lists (kubectl -n vidistill port-forward svc/mlflow 5000:5000 and http://localhost:5000) "
                "or add it to --allowed-hosts in k8s/base/mlflow.yaml")
    if "error code 401" in text or "401 Client Error" in text:
        return (f"the MLflow server at {uri} wants credentials (401 Unauthorized): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN (on the cluster: Secret vidistill-mlflow-auth)")
    if "error code 403" in text or "403 Client Error" in text:
        return (f"the MLflow server at {uri} forbids this request (403 Forbidden): the user in MLFLOW_TRACKING_USERNAME "
                "lacks the permission; ask an MLflow admin")
    return f"MLflow: {text[:400]}"


def tracking_uri() -> str:
    """The MLflow tracking URI: `$MLFLOW_TRACKING_URI`, or the project's `sqlite:///<project>/mlflow.db`
    (`project_root`, absolute and percent-encoded)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(project_root() / STORE_FILE)


def _store_lock(uri: str) -> Any:
    """A file lock beside a SQLite store (`<db>.lock`); a no-op context for servers."""
    db = sqlite_path(uri)
    if db is None:
        return nullcontext()
    from filelock import FileLock

    return FileLock(str(db) + ".lock", timeout=600)


def client() -> MlflowClient:
    """An `MlflowClient` on `tracking_uri()`; also points the fluent API (`mlflow.*`) there.

    For a server (http/https), the first call in a process checks that it answers (`check_server`).

    For a SQLite store, the first call in a process creates (or migrates) its schema under the store's
    file lock, so processes starting at once on a fresh store never race MLflow's table creation.

    Raises:
        vidistill.errors.OutputError: the folder of a SQLite store cannot be written.
        TrackingServerError: no server answers at an http(s) tracking URI.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    db = sqlite_path(uri)
    if uri.startswith(("http://", "https://")) and uri not in _ready:
        check_server(uri)
        _ready.add(uri)
    if db is None or uri in _ready:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    from vidistill.outputs import check_writable

    check_writable(db.parent, key="the MLflow store's folder; set MLFLOW_TRACKING_URI to use another store")
    with _store_lock(uri):  # MLflow creates (or upgrades) the tables when it first opens a store
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        c.search_experiments(max_results=1)
        c.search_registered_models(max_results=1)  # the registry's store too
    _ready.add(uri)
    return c


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: `<store folder>/mlartifacts/<experiment>` as a `file://`
    URI for a SQLite store (MLflow's default, `./mlruns`, would follow the working directory); None (the
    server decides) otherwise."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / ARTIFACTS_DIR / quote(experiment, safe="")).as_uri()


def experiment_id(c: MlflowClient, experiment: str) -> str:
    """The id of experiment `experiment`, created if missing (race-free between processes).

    Raises:
        vidistill.errors.ConfigError: the experiment exists but was deleted.
    """
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        uri = tracking_uri()
        with _store_lock(uri):
            exp = c.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    return c.create_experiment(experiment, artifact_location=artifact_location(uri, experiment))
                except MlflowException as e:  # created by another process meanwhile (a server store)
                    if e.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp = c.get_experiment_by_name(experiment)
    if exp.lifecycle_stage == "deleted":
        raise ConfigError(f"MLflow experiment {experiment!r} was deleted on {tracking_uri()}; restore it "
                          f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or delete it for good "
                          "(`mlflow gc`)")
    return exp.experiment_id


def process_tag() -> str:
    """This process as `<host>|<pid>|<start time>` (the start time tells a reused pid apart)."""
    import psutil

    return f"{socket.gethostname()}|{os.getpid()}|{psutil.Process().create_time():.2f}"


def process_alive(tag: str) -> bool | None:
    """Whether the process a `process_tag` names still runs; None when it ran on another host (unknown)."""
    import psutil

    try:
        host, pid, started = tag.split("|")
        pid_n, started_f = int(pid), float(started)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        return abs(psutil.Process(pid_n).create_time() - started_f) < 0.05
    except psutil.Error:  # no such process (or not ours to see)
        return False


def close_dead_runs(c: MlflowClient, experiment_ids: list[str]) -> list[str]:
    """Mark RUNNING stage runs whose process is gone (killed by SIGKILL, a crash, a power loss) as KILLED.

    Only runs tagged with a process on this host are judged; runs without the tag (pipeline parent
    runs, which their exit handler closes) and runs of other hosts are left alone.

    Returns:
        The ids of the runs marked KILLED.
    """
    closed = []
    for run in c.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=500):
        tag = run.data.tags.get(PROCESS_TAG)
        if not tag or process_alive(tag) is not False:
            continue
        now = c.get_run(run.info.run_id)  # a resume may have just reopened it under a live process
        if now.info.status != "RUNNING" or now.data.tags.get(PROCESS_TAG) != tag:
            continue
        c.set_tag(run.info.run_id, KILLED_TAG, f"its process ({tag}) was gone when a later run started")
        c.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


def run_status(run_id: str) -> str | None:
    """The status of `run_id` on the current store (None when the store does not know it)."""
    try:
        return client().get_run(run_id).info.status
    except MlflowException:
        return None


def git_commit(cwd: str | Path | None = None) -> str:
    """`git rev-parse HEAD` of `cwd` (default: the current directory), or "unknown" outside a repo."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def params_hash(params: dict[str, Any]) -> str:
    """Short content hash of a (nested) parameter dict, independent of key order."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def lineage_tags(stage: str, params: dict[str, Any], tags: dict[str, Any] | None) -> dict[str, str]:
    """All run tags: the six lineage tags (missing ones as "none") plus any other tags given.

    Args:
        stage: stage name, stored as `vidistill.stage`.
        params: the stage parameters (hashed into `vidistill.params_hash`).
        tags: extra tags; lineage values may be given as `data_hash` or `vidistill.data_hash`
            (likewise `method`, `teacher_run_id`, `git_commit`); other keys are kept as they are.

    Returns:
        Tag dict with string values.
    """
    given = {str(k): "none" if v is None else str(v) for k, v in (tags or {}).items()}
    out: dict[str, str] = {}
    for key, value in given.items():
        short = key.removeprefix(TAG_PREFIX)
        out[TAG_PREFIX + short if short in LINEAGE_TAGS else key] = value
    out.setdefault(TAG_PREFIX + "git_commit", git_commit())
    out[TAG_PREFIX + "params_hash"] = params_hash(params)
    out[TAG_PREFIX + "stage"] = stage
    for name in LINEAGE_TAGS:
        out.setdefault(TAG_PREFIX + name, "none")
    return out


def _log_params(c: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    flat = [Param(k, str(v)[:_PARAM_MAX_CHARS]) for k, v in sorted(flatten(params).items())]
    for i in range(0, len(flat), _MLFLOW_BATCH):
        c.log_batch(run_id, params=flat[i : i + _MLFLOW_BATCH])


@dataclass
class StageRun:
    """Handle yielded by `stage_run`: logs to one MLflow run by id (thread-safe, no fluent state)."""

    run_id: str
    client: MlflowClient

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics (non-numeric values are refused with the key named)."""
        bad = {k: v for k, v in metrics.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad:
            raise ValueError(f"metrics must be numbers; got non-numeric values for {sorted(bad)}: {bad}")
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        with deferred():
            for i in range(0, len(items), _MLFLOW_BATCH):
                self.client.log_batch(self.run_id, metrics=items[i : i + _MLFLOW_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file (refuses a missing path with its name)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"log_artifact: {p} is not a file")
        with deferred():
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """Upload a directory tree (refuses a missing directory with its name)."""
        p = Path(directory)
        if not p.is_dir():
            raise FileNotFoundError(f"log_artifacts: {p} is not a directory")
        with deferred():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set extra run tags."""
        with deferred():
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


@contextmanager
def stage_run(
    stage: str, *, params: dict[str, Any], tags: dict[str, Any] | None = None, experiment: str = "vidistill",
    resume_run_id: str | None = None,
) -> Iterator[StageRun]:
    """Run one pipeline stage inside an MLflow run.

    The run is a child of `$VIDISTILL_PARENT_RUN_ID` when that is set (one parent run per pipeline,
    one child per stage). It is also the fluent active run for its duration, so `mlflow.*.log_model`
    called inside attaches to it. The run ends FINISHED, FAILED when the body raises, KILLED on
    KeyboardInterrupt (Ctrl-C, or SIGTERM through the `vidistill` command). Before it starts, RUNNING
    runs of the experiment whose process is gone are marked KILLED (`close_dead_runs`).

    Args:
        stage: stage name (`prep`, `distill`, `export`, ...); also the run name.
        params: stage parameters (nested dicts are flattened to `a.b` keys).
        tags: lineage values (`data_hash`, `method`, `teacher_run_id`) and any extra tags.
        experiment: MLflow experiment name (created if missing).
        resume_run_id: continue this run (a resumed training run) when the store has it: its status
            goes back to RUNNING, `vidistill.resumes` counts the resumes, and its params are kept;
            otherwise a new run is tagged `vidistill.resumed_from` with this id.

    Yields:
        `StageRun` with `run_id`, `log_metrics`, `log_artifact`, `log_artifacts`, `set_tags`.
    """
    with deferred():
        run_id, c = _start_stage_run(stage, params=params, tags=tags, experiment=experiment, resume_run_id=resume_run_id)
    try:
        yield StageRun(run_id=run_id, client=c)
    except KeyboardInterrupt:
        _end(run_id, "KILLED")
        raise
    except BaseException:
        _end(run_id, "FAILED")
        raise
    _end(run_id, "FINISHED")


def _start_stage_run(stage: str, *, params: dict[str, Any], tags: dict[str, Any] | None, experiment: str,
                     resume_run_id: str | None) -> tuple[str, MlflowClient]:
    """Open (or reopen) the stage's run as the active fluent run; see `stage_run`."""
    c = client()
    exp_id = experiment_id(c, experiment)
    mlflow.set_experiment(experiment_id=exp_id)
    close_dead_runs(c, [exp_id])
    parent = os.environ.get(PARENT_ENV) or None
    if parent is not None:
        try:
            c.get_run(parent)
        except MlflowException as e:
            raise ConfigError(f"{PARENT_ENV}={parent!r} is not a run on {tracking_uri()}: {e.message}") from None
    all_tags = lineage_tags(stage, params, tags)
    all_tags[PROCESS_TAG] = process_tag()
    nested = mlflow.active_run() is not None
    previous = None
    if resume_run_id:
        try:
            previous = c.get_run(resume_run_id)
        except MlflowException:
            all_tags[TAG_PREFIX + "resumed_from"] = resume_run_id
    if previous is not None:
        run = mlflow.start_run(run_id=resume_run_id, nested=nested)
        resumes = int(previous.data.tags.get(TAG_PREFIX + "resumes", "0")) + 1
        c.log_batch(resume_run_id, tags=[RunTag(PROCESS_TAG, all_tags[PROCESS_TAG]),
                                         RunTag(TAG_PREFIX + "resumes", str(resumes))])
    else:
        run = mlflow.start_run(experiment_id=exp_id, run_name=stage, parent_run_id=None if nested else parent,
                               nested=nested, tags=all_tags)
        _log_params(c, run.info.run_id, params)
    return run.info.run_id, c


def _end(run_id: str, status: str) -> None:
    """End `run_id` (the active fluent run) with `status`; Ctrl-C or SIGTERM meanwhile waits until it is recorded."""
    with deferred():
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status)
        else:
            client().set_terminated(run_id, status=status)


def start_pipeline_run(name: str, params: dict[str, Any], *, tags: dict[str, Any] | None = None, experiment: str = "vidistill") -> str:
    """Create the parent run of one pipeline execution and leave it RUNNING.

    Pass the returned id to the stages as `$VIDISTILL_PARENT_RUN_ID`; close it with `end_pipeline_run`.

    Args:
        name: run name (e.g. the pipeline name and profile).
        params: pipeline parameters (flattened and logged).
        tags: lineage values and extra tags, as in `stage_run`.
        experiment: MLflow experiment name (created if missing).

    Returns:
        The parent run id.
    """
    c = client()
    all_tags = lineage_tags("pipeline", params, tags)
    all_tags["mlflow.runName"] = name
    run = c.create_run(experiment_id(c, experiment), tags=all_tags, run_name=name)
    _log_params(c, run.info.run_id, params)
    return run.info.run_id


def end_pipeline_run(run_id: str, status: str = "FINISHED") -> None:
    """End the pipeline's parent run with `status` (FINISHED, FAILED or KILLED)."""
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
    client().set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))
