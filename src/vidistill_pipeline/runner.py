"""Compile, run locally (`kfp.local`) and schedule the vidistill pipeline."""

from __future__ import annotations

import copy
import hashlib
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vidistill.config import ConfigError, load_params, set_dotted

COMPILED = Path("pipeline.yaml")  # relative to the working directory, beside params.yaml and dvc.yaml

# profile -> dotted overrides of params.yaml. `demo` is `make demo` (within 15 minutes on 2 CPU
# cores); `regime` is `make demo PROFILE=regime`, the setting in which distillation can pay (README,
# "Benchmark regime"; estimated at about 17 minutes on 2 quiet cores, not 15); `tiny` is what the tests run; `large` is for a GPU node pool. None of them names a method:
# every profile fans out over params.yaml's `pipeline.methods`.
PROFILES: dict[str, dict[str, Any]] = {
    "tiny": {
        "prep.synth.videos_per_class": 4, "prep.frames": 4, "prep.synth.frames": 12, "pipeline.source_prep.synth.videos_per_class": 4,
        "pipeline.source_prep.frames": 10, "pipeline.source_prep.synth.frames": 12, "pretrain.pretext_frames": 4,
        "flow.tvl1.nscales": 2, "flow.tvl1.warps": 2, "flow.tvl1.outer_iterations": 2, "flow.tvl1.inner_iterations": 5,
        "teach.model": "r2plus1d_student", "teach.train.epochs": 1, "pretrain.train.epochs": 1, "distill.train.epochs": 1,
    },
    "demo": {},
    # the benchmark regime (issue #12; docs/regime-exploration.md): the teachers train on every labelled
    # training video (34 per class), the students on a stratified 17 per class of them, so the teacher knows
    # more than the student; the RGB teacher has the student's architecture (the data is what it knows more)
    "regime": {
        "prep.synth.videos_per_class": 48, "distill.student_videos_per_class": 17, "teach.model": "r2plus1d_student",
        "teach.train.epochs": 20, "distill.train.epochs": 30,
    },
    "large": {
        "prep.synth.videos_per_class": 100, "pipeline.source_prep.synth.videos_per_class": 100,
        "teach.train.epochs": 40, "pretrain.train.epochs": 30, "distill.train.epochs": 40,
    },
}


def code_version() -> str:
    """Content hash (16 hex digits) of the vidistill library's Python source.

    A local run passes it as the pipeline's `code_version`, so an edit of the library misses the cache
    of every compute task. (On a cluster the image tag plays that part: tag images per commit.)
    """
    import vidistill

    root = Path(vidistill.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def compile_pipeline(path: str | Path = COMPILED, *, params_file: str | Path = "params.yaml") -> Path:
    """Compile the pipeline to Kubeflow IR YAML (GPU requests, node selectors, tolerations, PVC, secrets),
    with its defaults (the fan-out over `pipeline.methods`) from `params_file`."""
    from kfp import compiler

    from vidistill_pipeline.dag import build_pipeline

    path = Path(path)
    compiler.Compiler().compile(build_pipeline(load_params(params_file)), str(path))
    return path


def resolve_params(params_file: str | Path = "params.yaml", *, profile: str = "demo", workdir: str | Path = ".",
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """params.yaml + profile + overrides, with every relative data/run path made absolute under `workdir`."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    params = copy.deepcopy(load_params(params_file))
    for key, value in {**PROFILES[profile], **(overrides or {})}.items():
        set_dotted(params, key, value)
    root = Path(workdir).resolve()

    def absolute(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: absolute(v) for k, v in d.items()}
        if isinstance(d, str) and re.match(r"^(data|runs)/", d):
            return str(root / d)
        return d

    return absolute(params)


@contextmanager
def local_tracking(workdir: str | Path) -> Iterator[str]:
    """The tracking URI for a local run: `$MLFLOW_TRACKING_URI` when it names a server, else a real
    `mlflow server` on 127.0.0.1 over `<workdir>/mlflow.db` for the duration (the single SQLite writer
    while ParallelFor iterations run at the same time)."""
    current = os.environ.get("MLFLOW_TRACKING_URI", "")
    if current.startswith(("http://", "https://")):
        yield current
        return
    from vidistill.registry.server import MlflowServer

    workdir = Path(workdir).resolve()
    db = Path(current.removeprefix("sqlite:///")) if current.startswith("sqlite:///") else workdir / "mlflow.db"
    with MlflowServer(db, workdir / "mlartifacts", serve_artifacts=False) as server:
        os.environ["MLFLOW_TRACKING_URI"] = server.uri
        try:
            yield server.uri
        finally:
            if current:
                os.environ["MLFLOW_TRACKING_URI"] = current
            else:
                os.environ.pop("MLFLOW_TRACKING_URI", None)


def run_local(params_file: str | Path = "params.yaml", *, profile: str = "demo", workdir: str | Path = ".",
              overrides: dict[str, Any] | None = None, cache: bool = True) -> dict[str, Any]:
    """Run the whole pipeline on this machine with `kfp.local.SubprocessRunner` (the `make demo` job).

    With `cache` (the default) compute tasks whose inputs and `code_version()` match an earlier run in
    `<workdir>/outputs/kfp` are served from kfp.local's cache, so a rerun after a failure resumes.
    Call it inside `local_tracking(workdir)` (or with MLFLOW_TRACKING_URI pointing at a server).

    Returns:
        `seconds`, `pipeline_root`, `run_dir` (this run's folder), `params` (resolved), `code_version`.
    """
    from kfp import local

    from vidistill_pipeline.dag import build_pipeline, pipeline_arguments

    workdir = Path(workdir).resolve()
    params = resolve_params(params_file, profile=profile, workdir=workdir, overrides=overrides)
    pipeline_root = workdir / "outputs" / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True,
               enable_caching=cache)
    version = code_version()
    pipeline = build_pipeline(params)
    t0 = time.perf_counter()
    started = time.time()
    pipeline(**pipeline_arguments(params, code_version=version))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "pipeline_root": pipeline_root, "run_dir": _latest_run(pipeline_root, started),
            "params": params, "code_version": version}


def _latest_run(pipeline_root: Path, since: float) -> Path:
    runs = [p for p in pipeline_root.glob("vidistill-*") if p.is_dir() and p.stat().st_mtime >= since - 1]
    if not runs:
        raise FileNotFoundError(f"no pipeline output under {pipeline_root}")
    return max(runs, key=lambda p: p.stat().st_mtime)


def schedule(host: str, *, cron: str, params_file: str | Path = "params.yaml", experiment: str = "vidistill",
             job_name: str = "vidistill-nightly", package: str | Path = COMPILED) -> Any:
    """Create a Kubeflow recurring run of the compiled pipeline (6-field cron, seconds first).

    One run at a time (`max_concurrency=1`) and no catch-up of missed runs. The runs keep the compiled
    `code_version` default (the image tag), so the cluster's cache follows the images.
    """
    fields = cron.split()
    if len(fields) != 6:
        raise ConfigError(f"--cron must have 6 fields (seconds first, e.g. '0 0 2 * * *' = 02:00 daily), got {cron!r}")
    import kfp

    from vidistill_pipeline.dag import pipeline_arguments

    package = Path(package)
    if not package.exists():
        compile_pipeline(package, params_file=params_file)
    client = kfp.Client(host=host)
    exp = client.create_experiment(experiment)
    return client.create_recurring_run(
        experiment_id=exp.experiment_id, job_name=job_name, cron_expression=cron, max_concurrency=1, no_catchup=True,
        pipeline_package_path=str(package), params=pipeline_arguments(load_params(params_file)))
