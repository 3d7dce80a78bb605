"""MLflow tracking at the stage edge: one parent run per pipeline, one child run per stage.

Models and losses never call MLflow; a stage wraps its work in `stage_run(...)` and logs what the
library functions return. Every run carries the same lineage tags (`LINEAGE_TAGS`) so a registered
model can be traced back to its code commit, data, parameters, method and teacher.

Tracking URI: `MLFLOW_TRACKING_URI` if set (e.g. `http://mlflow:5000`, the single writer when
stages run in parallel), else `sqlite:///<cwd>/mlflow.db` (MLflow 3 refuses the `./mlruns` file
store by default).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

from vidistill.config import flatten

PARENT_ENV = "VIDISTILL_PARENT_RUN_ID"
TAG_PREFIX = "vidistill."
# Lineage tags set on every run (pipeline parents and stage children), as `vidistill.<name>`.
LINEAGE_TAGS = ("git_commit", "data_hash", "params_hash", "method", "teacher_run_id", "stage")
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_MLFLOW_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch call
_PARAM_MAX_CHARS = 6000


def tracking_uri() -> str:
    """The MLflow tracking URI: `$MLFLOW_TRACKING_URI` or `sqlite:///<cwd>/mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client() -> MlflowClient:
    """An `MlflowClient` on `tracking_uri()`; also points the fluent API (`mlflow.*`) there."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


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


def _experiment_id(c: MlflowClient, experiment: str) -> str:
    exp = c.get_experiment_by_name(experiment)
    return exp.experiment_id if exp is not None else c.create_experiment(experiment)


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
        for i in range(0, len(items), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _MLFLOW_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file (refuses a missing path with its name)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"log_artifact: {p} is not a file")
        self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """Upload a directory tree (refuses a missing directory with its name)."""
        p = Path(directory)
        if not p.is_dir():
            raise FileNotFoundError(f"log_artifacts: {p} is not a directory")
        self.client.log_artifacts(self.run_id, str(p), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set extra run tags."""
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


@contextmanager
def stage_run(
    stage: str, *, params: dict[str, Any], tags: dict[str, Any] | None = None, experiment: str = "vidistill"
) -> Iterator[StageRun]:
    """Run one pipeline stage inside an MLflow run.

    The run is a child of `$VIDISTILL_PARENT_RUN_ID` when that is set (one parent run per pipeline,
    one child per stage). It is also the fluent active run for its duration, so `mlflow.*.log_model`
    called inside attaches to it. The run ends FINISHED, or FAILED when the body raises.

    Args:
        stage: stage name (`prep`, `distill`, `export`, ...); also the run name.
        params: stage parameters (nested dicts are flattened to `a.b` keys).
        tags: lineage values (`data_hash`, `method`, `teacher_run_id`) and any extra tags.
        experiment: MLflow experiment name (created if missing).

    Yields:
        `StageRun` with `run_id`, `log_metrics`, `log_artifact`, `log_artifacts`, `set_tags`.
    """
    c = client()
    mlflow.set_experiment(experiment)
    parent = os.environ.get(PARENT_ENV) or None
    if parent is not None:
        try:
            c.get_run(parent)
        except mlflow.exceptions.MlflowException as e:
            raise ValueError(f"{PARENT_ENV}={parent!r} is not a run on {tracking_uri()}: {e.message}") from None
    all_tags = lineage_tags(stage, params, tags)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=stage, parent_run_id=None if nested else parent, nested=nested, tags=all_tags) as run:
        run_id = run.info.run_id
        _log_params(c, run_id, params)
        yield StageRun(run_id=run_id, client=c)


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
    run = c.create_run(_experiment_id(c, experiment), tags=all_tags, run_name=name)
    _log_params(c, run.info.run_id, params)
    return run.info.run_id


def end_pipeline_run(run_id: str, status: str = "FINISHED") -> None:
    """End the pipeline's parent run with `status` (FINISHED, FAILED or KILLED)."""
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
    client().set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))
