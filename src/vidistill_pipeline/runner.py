"""Compile the vidistill pipeline, run it locally (`kfp.local`), submit one run to a cluster, or schedule it."""

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

from vidistill.config import ConfigError, load_params, set_dotted, validate_pipeline_params
from vidistill.errors import UserError

COMPILED = Path("pipeline.yaml")  # relative to the working directory, beside params.yaml and dvc.yaml
PACKAGED_PARAMS = Path(__file__).with_name("params.yaml")  # the repository's params.yaml links here


def pipeline_params(params_file: str | Path = "params.yaml") -> dict[str, Any]:
    """params.yaml as the pipeline reads it: `params_file`, or, where the default `params.yaml` is not in the
    working directory (a folder outside the repository), vidistill's packaged defaults (the repository's
    params.yaml), said in one line on stderr.

    Raises:
        ConfigError: a `params_file` other than the default that does not exist.
    """
    path = Path(params_file)
    if path.exists():
        return load_params(path)
    if str(params_file) != "params.yaml":
        raise ConfigError(f"--params {params_file} does not exist; pass a params.yaml (vidistill's defaults: {PACKAGED_PARAMS})")
    import sys

    print(f"no params.yaml in {Path.cwd()}: using vidistill's defaults ({PACKAGED_PARAMS}); copy it here to change them",
          file=sys.stderr)
    return load_params(PACKAGED_PARAMS)

# profile -> dotted overrides of params.yaml. `default` is params.yaml as it is (what `pipeline run` takes
# unless told otherwise: your data, every labelled video for every network). `demo` is `make demo`: the
# benchmark regime on the synthetic data (README, "Benchmark regime": the teachers see all 28 labelled
# training videos per class, the students 10 of them, so the teachers know more), within 15 minutes on
# 2 CPU cores. `tiny` is what the tests run; `large` is for a GPU node pool. None of them names a method:
# every profile fans out over params.yaml's `pipeline.methods`.
PROFILES: dict[str, dict[str, Any]] = {
    "tiny": {
        "prep.synth.videos_per_class": 4, "prep.frames": 4, "prep.synth.frames": 12, "pipeline.source_prep.synth.videos_per_class": 4,
        "pipeline.source_prep.frames": 10, "pipeline.source_prep.synth.frames": 12, "pretrain.pretext_frames": 4,
        "flow.tvl1.nscales": 2, "flow.tvl1.warps": 2, "flow.tvl1.outer_iterations": 2, "flow.tvl1.inner_iterations": 5,
        "teach.train.epochs": 1, "pretrain.train.epochs": 1, "distill.train.epochs": 1,
        # multi-dataset methods: the experts, and JEDI's own schedule (500 epochs by default, not distill.train's)
        "experts.train.epochs": 1, "distill.methods.jedi.epochs": 2, "distill.methods.jedi.burn_in": 1,
    },
    "default": {},
    "demo": {"distill.student_videos_per_class": 10},
    "large": {
        "prep.synth.videos_per_class": 100, "pipeline.source_prep.synth.videos_per_class": 100, "teach.model": "r2plus1d_teacher",
        "teach.train.epochs": 40, "pretrain.train.epochs": 30, "distill.train.epochs": 60,
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
    compiler.Compiler().compile(build_pipeline(pipeline_params(params_file)), str(path))
    return path


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`["prep.frames=8", "pipeline.methods=[m1, m2]"]` -> `{"prep.frames": 8, "pipeline.methods": ["m1", "m2"]}`.

    Each value is read as params.yaml would read it (YAML: `8` is a number, `true` a boolean, `[a, b]` a
    list); the stage dataclasses then coerce it as they do for the file.

    Raises:
        ConfigError: an item without `=` or with an empty key.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE with a dotted params.yaml key (e.g. prep.root=/videos), got {item!r}")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", parsed.strip()):
            parsed = float(parsed)  # YAML 1.1 reads 1e-3 as a string; a person means a number
        out[key.strip()] = parsed
    return out


PREP_SECTIONS = ("prep", "pipeline.source_prep")  # sections read by PrepConfig


def _section(params: dict[str, Any], dotted: str) -> Any:
    cur: Any = params
    for key in dotted.split("."):
        cur = cur.get(key) if isinstance(cur, dict) else None
    return cur


def resolve_params(params_file: str | Path = "params.yaml", *, profile: str = "default", workdir: str | Path = ".",
                   overrides: dict[str, Any] | None = None, absolute: bool = True) -> dict[str, Any]:
    """params.yaml + profile + overrides (`--set`), checked (`vidistill.config.validate_pipeline_params`) before anything runs.

    With `absolute` (a local run), every relative `data/...` and `runs/...` path is made absolute under
    `workdir`, and a prep section's other relative `root` (a folder the user named) under the current
    directory, so every task process reads the same files. A prep section's generated synthetic videos
    go where it reads them (`synth.out` follows `root`) unless `synth.out` is set explicitly.

    Raises:
        ConfigError: an unknown profile, section or key, or a value a stage would refuse.
    """
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    params = copy.deepcopy(pipeline_params(params_file))
    overrides = dict(overrides or {})
    for key, value in {**PROFILES[profile], **overrides}.items():
        set_dotted(params, key, value)
    for name in PREP_SECTIONS:
        section = _section(params, name)
        if isinstance(section, dict) and isinstance(section.get("synth"), dict) and f"{name}.synth.out" not in overrides:
            section["synth"]["out"] = section.get("root", section["synth"].get("out"))
    methods = _section(params, "pipeline.methods")
    if isinstance(methods, str):  # --set pipeline.methods=m1,m2
        params["pipeline"]["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
    if absolute:
        root = Path(workdir).resolve()

        def to_absolute(d: Any) -> Any:
            if isinstance(d, dict):
                return {k: to_absolute(v) for k, v in d.items()}
            if isinstance(d, list):  # e.g. experts.datasets
                return [to_absolute(v) for v in d]
            if isinstance(d, str) and re.match(r"^(data|runs)/", d):
                return str(root / d)
            return d

        params = to_absolute(params)
        for name in PREP_SECTIONS:
            section = _section(params, name)
            if isinstance(section, dict) and isinstance(section.get("root"), str) and section["root"]:
                section["root"] = str(Path(section["root"]).expanduser().resolve())
                if isinstance(section.get("synth"), dict) and f"{name}.synth.out" not in overrides:
                    section["synth"]["out"] = section["root"]
    return validate_pipeline_params(params)


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


class PipelineFailed(RuntimeError):
    """A task of a local run failed. `tasks` are the failed tasks (`console.TaskRecord`: label, log)."""

    def __init__(self, tasks: list[Any]) -> None:
        self.tasks = tasks
        super().__init__("task(s) failed: " + ", ".join(f"{t.label} (log: {t.log})" for t in tasks))


def task_summary(label: str, outputs: dict[str, Any]) -> str:
    """A few words on what a finished task made, from its outputs' metadata (the console's end line)."""
    import json

    parts = []
    for name, value in outputs.items():
        meta = dict(getattr(value, "metadata", None) or {})
        if name == "clips" and "clips" in meta:  # kfp keeps metadata numbers as floats
            splits = sorted(meta["clips"].items(), key=lambda kv: (kv[0] != "train", kv[0]))  # train first
            parts.append(" / ".join(f"{int(n)} {s}" for s, n in splits) +
                         f" clips, {int(meta.get('skipped', 0))} input(s) skipped")
        elif name == "flow" and "pairs" in meta:
            parts.append(f"{int(meta['pairs'])} frame pairs, {meta.get('pairs_per_s', 0):.1f} pairs/s, "
                         f"{int(meta.get('failed', 0))} failed")
        elif name in ("model", "student", "report") and "top1" in meta:
            parts.append(f"top-1 {meta['top1']:.3f}, top-5 {meta.get('top5', 0):.3f}, mAP {meta.get('mAP', 0):.3f}")
        elif name == "best" and "method" in meta:
            parts.append(f"best student: {meta['method']} (top-1 {meta.get('top1', 0):.3f})")
        elif name == "onnx" and "parity_passed" in meta:
            parts.append("ONNX parity " + ("passed" if meta["parity_passed"] else "FAILED") +
                         (f" (max |diff| {meta['parity_max_abs_diff']:.1e})" if meta.get("parity_max_abs_diff") is not None else ""))
        elif name == "Output" and isinstance(value, str) and value.startswith("{"):
            outcome = json.loads(value)
            if outcome.get("registered"):
                parts.append(f"{outcome['model_name']} v{outcome['version']}: {outcome['decision'].get('decision')}")
            else:
                parts.append(f"not registered: {outcome.get('reason')}")
    return "; ".join(parts)


FANOUT_THREADS_ENV = "VIDISTILL_FANOUT_THREADS"  # torch threads of each task of the methods' fan-out, in a local run


def local_parallelism() -> int:
    """How many iterations of a `dsl.ParallelFor` kfp.local runs at once (its `ParallelExecutor`'s cap, 2 in
    kfp 2.17; 2 if that internal class moves)."""
    try:
        from kfp.local.orchestrator.enhanced_dag_orchestrator import ParallelExecutor

        return max(1, int(ParallelExecutor().max_workers))
    except (ImportError, AttributeError, TypeError, ValueError):
        return 2


def fanout_threads(items: int, cores: int | None = None) -> int:
    """torch threads for each of `items` fan-out tasks that kfp.local runs side by side on this machine.

    Each task is its own process, and torch gives every process a thread per core: two students at two
    threads each on 2 cores ran 7x slower than at one thread each (145 s against 20 s for the same two
    12-epoch runs, README "Results on this machine"), OpenMP threads spinning against each other. So the cores
    are shared out: `cores // min(items, local_parallelism())`, at least 1.
    """
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, min(items, local_parallelism())))


def apply_fanout_threads() -> None:
    """In a fan-out task: take the thread count the local run set (`VIDISTILL_FANOUT_THREADS`); nothing
    on a cluster, where each pod has its own cores."""
    value = os.environ.get(FANOUT_THREADS_ENV, "")
    if value.isdigit() and int(value) >= 1:
        import torch

        torch.set_num_threads(int(value))


def run_local(params: dict[str, Any], *, workdir: str | Path = ".", cache: bool = True, console: Any = None) -> dict[str, Any]:
    """Run the whole pipeline on this machine with `kfp.local.SubprocessRunner` (the `make demo` job).

    The console gets one line per task as it starts and ends; each task's output (its stages' progress,
    kfp's executor log and warnings) goes to `<run folder>/logs/<task>.log` (`console.TaskConsole`).
    With `cache` (the default) compute tasks whose inputs and `code_version()` match an earlier run in
    `<workdir>/outputs/kfp` are served from kfp.local's cache, so a rerun after a failure resumes.
    Call it inside `local_tracking(workdir)` (or with MLFLOW_TRACKING_URI pointing at a server).

    Args:
        params: resolved parameters (`resolve_params`).
        workdir: the pipeline root is `<workdir>/outputs/kfp`.
        cache: reuse kfp.local's cache.
        console: a `rich.console.Console` writing to a fixed file (default: this process's stdout).

    Returns:
        `seconds`, `pipeline_root`, `run_dir` (this run's folder), `log_dir`, `tasks` (`TaskRecord`s, with
        each task's outputs), `params`, `code_version`.

    Raises:
        PipelineFailed: a task failed (after the exit handler closed the MLflow parent run).
    """
    from kfp import local

    from vidistill_pipeline.console import TaskConsole
    from vidistill_pipeline.dag import build_pipeline, pipeline_arguments

    workdir = Path(workdir).resolve()
    pipeline_root = workdir / "outputs" / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True,
               enable_caching=cache)
    version = code_version()
    pipeline = build_pipeline(params)
    t0 = time.perf_counter()
    previous = os.environ.get(FANOUT_THREADS_ENV)
    if previous is None:  # the tasks inherit this process's environment
        os.environ[FANOUT_THREADS_ENV] = str(fanout_threads(len(params["pipeline"]["methods"])))
    try:
        with TaskConsole(pipeline_root, console=console, summarise=task_summary) as tasks:
            try:
                pipeline(**pipeline_arguments(params, code_version=version))
            except RuntimeError:
                if tasks.failed:
                    raise PipelineFailed(tasks.failed) from None
                raise
    finally:
        if previous is None:
            os.environ.pop(FANOUT_THREADS_ENV, None)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "pipeline_root": pipeline_root, "run_dir": tasks.run_dir, "log_dir": tasks.log_dir,
            "tasks": tasks.tasks, "params": params, "code_version": version}


# The oldest Kubeflow Pipelines backend that runs the compiled IR: artifact fan-in from a ParallelFor
# (dsl.Collected of the students' models, kubeflow/pipelines#11725: 2.14.0), optional Secrets as env
# (#12216: 2.15.0) and the tasks' security context (kfp-kubernetes set_security_context, #12832: 2.16.0);
# 2.14-2.15 refuse the run at creation ("unknown field securityContext"). k8s/README.md says the same.
MIN_KFP_BACKEND = (2, 16, 0)
TOKEN_ENV, COOKIES_ENV = "VIDISTILL_KFP_TOKEN", "VIDISTILL_KFP_COOKIES"


class SubmitError(UserError):
    """A Kubeflow Pipelines API refused or could not take a submission; the message says why and what to do."""


def _auth() -> dict[str, Any]:
    """kfp.Client's auth arguments from the environment: a bearer token (`$VIDISTILL_KFP_TOKEN`, e.g. from
    `kubectl create token`), a login cookie (`$VIDISTILL_KFP_COOKIES`, e.g. `authservice_session=...` or
    `oauth2_proxy_kubeflow=...` copied from a browser signed in to the Kubeflow dashboard, Dex), or a
    service-account token file (`$KF_PIPELINES_SA_TOKEN_PATH`, kfp's default path inside a cluster)."""
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH

    kwargs: dict[str, Any] = {}
    if os.environ.get(TOKEN_ENV):
        kwargs["existing_token"] = os.environ[TOKEN_ENV]
    elif os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or Path(KF_PIPELINES_SA_TOKEN_PATH).exists():
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials()
    if os.environ.get(COOKIES_ENV):
        kwargs["cookies"] = os.environ[COOKIES_ENV]
    return kwargs


def _headers() -> dict[str, str]:
    """The same auth as HTTP headers, for the version check before the kfp client is built."""
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH

    headers = {}
    token_file = Path(os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or KF_PIPELINES_SA_TOKEN_PATH)
    if os.environ.get(TOKEN_ENV):
        headers["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"
    elif token_file.is_file():
        headers["Authorization"] = f"Bearer {token_file.read_text().strip()}"
    if os.environ.get(COOKIES_ENV):
        headers["Cookie"] = os.environ[COOKIES_ENV]
    return headers


def _version(tag: str) -> tuple[int, ...] | None:
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", tag or "")
    return tuple(int(x) for x in m.groups()) if m else None


def check_backend(host: str, *, timeout: float = 15.0) -> dict[str, Any]:
    """Ask the KFP API at `host` who it is (`GET /apis/v2beta1/healthz`) before anything is sent.

    Returns:
        The healthz answer (`commit_sha`, `tag_name`, `multi_user`).

    Raises:
        SubmitError: nothing answers (wrong URL, port-forward down), a login page answers instead of the
            API (Kubeflow behind Dex/oauth2-proxy without a cookie or token), credentials are refused, or
            the backend is older than `MIN_KFP_BACKEND` (e.g. KFP 1.8, which has no v2 API).
    """
    import requests

    minimum = ".".join(map(str, MIN_KFP_BACKEND))
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    try:
        r = requests.get(url, headers=_headers(), timeout=timeout, allow_redirects=False)
    except requests.exceptions.RequestException as e:
        from vidistill.registry.tracking import _reason

        raise SubmitError(f"no Kubeflow Pipelines API answers at {host} ({_reason(e)}); check --host (e.g. "
                          "http://localhost:8080 after kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80)") from None
    login = f"set {COOKIES_ENV} to the dashboard's session cookie (e.g. authservice_session=...) or {TOKEN_ENV} to a token"
    if r.is_redirect or "json" not in r.headers.get("content-type", "") and r.status_code == 200:
        where = r.headers.get("location", "an HTML page")
        raise SubmitError(f"{host} answered with a login page ({where}), not the Kubeflow Pipelines API: {login}")
    if r.status_code in (401, 403):
        raise SubmitError(f"{host} refused the credentials ({r.status_code}): {login}")
    if r.status_code == 404:
        tag = "?"
        try:
            old = requests.get(host.rstrip("/") + "/apis/v1beta1/healthz", headers=_headers(), timeout=timeout)
            if old.ok and "json" in old.headers.get("content-type", ""):
                tag = str(old.json().get("tag_name", "?"))
        except (requests.exceptions.RequestException, ValueError):
            pass
        raise SubmitError(f"the Kubeflow Pipelines backend at {host} has no v2 API (version {tag}); vidistill's "
                          f"pipeline needs KFP >= {minimum}: upgrade Kubeflow Pipelines")
    if not r.ok:
        raise SubmitError(f"{host}/apis/v2beta1/healthz answered {r.status_code} {r.reason}; is --host the KFP API?")
    try:
        info = r.json()
    except ValueError:
        raise SubmitError(f"{host}/apis/v2beta1/healthz did not answer JSON; is --host the KFP API?") from None
    found = _version(str(info.get("tag_name", "")))
    if found is not None and found < MIN_KFP_BACKEND:
        raise SubmitError(f"the Kubeflow Pipelines backend at {host} is {info.get('tag_name')}; vidistill's pipeline "
                          f"needs >= {minimum} (artifact fan-in from ParallelFor, optional Secrets, the tasks' security context): upgrade it")
    return info


@contextmanager
def kfp_errors(host: str, what: str) -> Iterator[None]:
    """Turn what the kfp client raises (API refusals, HTTP errors) into one-line `SubmitError`s."""
    try:
        yield
    except SubmitError:
        raise
    except Exception as e:  # kfp_server_api.ApiException, urllib3 errors, ValueError from the client
        status = getattr(e, "status", None)
        body = str(getattr(e, "body", "") or "")
        try:
            import json

            body = json.loads(body).get("message", body) if body else ""
        except (ValueError, AttributeError):
            pass
        reason = f"{status} {getattr(e, 'reason', '')}".strip() if status else type(e).__name__
        detail = " ".join((body or str(e)).split())[:300]
        raise SubmitError(f"{what} at {host} failed ({reason}): {detail}") from None


def kfp_client(host: str) -> Any:
    """A `kfp.Client` for the Kubeflow Pipelines API at `host`, authenticated from the environment, never
    from command-line flags (`_auth`: `$VIDISTILL_KFP_TOKEN`, `$VIDISTILL_KFP_COOKIES`, a service-account
    token file). `$KF_PIPELINES_UI_ENDPOINT` sets the UI links when the UI is elsewhere than the API."""
    import warnings

    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 ..."
        return kfp.Client(host=host, **_auth())


def run_url(host: str, run_id: str) -> str:
    """The Kubeflow UI page of a run (`$KF_PIPELINES_UI_ENDPOINT` when the UI is elsewhere than the API)."""
    return f"{os.environ.get('KF_PIPELINES_UI_ENDPOINT', host).rstrip('/')}/#/runs/details/{run_id}"


FINAL_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED")


def submit(host: str, params: dict[str, Any], *, experiment: str = "vidistill", run_name: str | None = None) -> dict[str, Any]:
    """Submit the pipeline once to a Kubeflow Pipelines cluster (`Client.create_run_from_pipeline_package`).

    The pipeline is compiled from `params` (its defaults) into a temporary package, and the run gets
    every stage section and `methods`/`run_name` as its parameters, so `--set` reaches the cluster run.
    `code_version` keeps its compiled default, the image tag (see `dag.py`).

    Args:
        host: the KFP API URL (e.g. `https://kubeflow.example.com/pipeline` or a port-forward).
        params: resolved parameters (`resolve_params(..., absolute=False)`): paths are the cluster's.
        experiment: KFP experiment (created when missing).
        run_name: the run's display name (default: `pipeline.run_name` and the time).

    Returns:
        `{"run_id", "url", "experiment", "name", "state"}` (`state` as the server answered the submission).
    """
    import contextlib
    import io
    import tempfile

    from vidistill_pipeline.dag import pipeline_arguments

    check_backend(host)
    name = run_name or f"{(params.get('pipeline') or {}).get('run_name', 'vidistill')} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    with tempfile.TemporaryDirectory() as tmp, kfp_errors(host, "submitting the run"):
        package = compile_package(params, Path(tmp) / "pipeline.yaml")
        client = kfp_client(host)
        with contextlib.redirect_stdout(io.StringIO()):  # kfp prints its own "Run details" line
            result = client.create_run_from_pipeline_package(str(package), arguments=pipeline_arguments(params),
                                                             run_name=name, experiment_name=experiment)
    if not getattr(result, "run_id", None):
        raise SubmitError(f"{host} took the request but returned no run id (a login page or a proxy answered instead "
                          f"of the KFP API?): set {COOKIES_ENV} or {TOKEN_ENV}, or check --host")
    state = str(getattr(getattr(result, "run_info", None), "state", None) or "PENDING").upper()
    return {"run_id": result.run_id, "url": run_url(host, result.run_id), "experiment": experiment, "name": name,
            "state": state}


def compile_package(params: dict[str, Any], path: Path) -> Path:
    """Compile the pipeline with `params` as its defaults to `path`: what `submit` and `schedule` send, built
    in this process (so with this environment's VIDISTILL_IMAGE_REGISTRY/TAG and cluster settings), never
    a pipeline.yaml lying in the folder."""
    from kfp import compiler

    from vidistill_pipeline.dag import build_pipeline

    compiler.Compiler().compile(build_pipeline(params), str(path))
    return path


def wait_for_run(host: str, run_id: str, *, poll_s: float = 10.0, timeout_s: float | None = None,
                 on_state: Any = None) -> str:
    """Follow a cluster run until it ends; returns its final state (`FINAL_STATES`).

    Args:
        host: the KFP API URL.
        run_id: the run.
        poll_s: seconds between status requests.
        timeout_s: give up after this long (None: no limit).
        on_state: called with each new state.

    Raises:
        TimeoutError: `timeout_s` passed before the run ended.
    """
    client = kfp_client(host)
    started, last = time.monotonic(), None
    while True:
        with kfp_errors(host, f"reading run {run_id}"):
            state = str(client.get_run(run_id).state or "PENDING").upper()
        if state != last:
            last = state
            if on_state is not None:
                on_state(state)
        if state in FINAL_STATES:
            return state
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise TimeoutError(f"run {run_id} is still {state} after {timeout_s:.0f} s; follow it at {run_url(host, run_id)}")
        time.sleep(poll_s)


def schedule(host: str, params: dict[str, Any], *, cron: str, experiment: str = "vidistill",
             job_name: str = "vidistill-nightly") -> Any:
    """Create a Kubeflow recurring run (6-field cron, seconds first) of the pipeline `submit` would send.

    The package is compiled here from `params` (resolved and checked by `resolve_params`, like a run's), so
    a scheduled run gets the same images, cluster settings and parameters as `pipeline run --host`. One
    run at a time (`max_concurrency=1`) and no catch-up of missed runs. The runs keep the compiled
    `code_version` default (the image tag), so the cluster's cache follows the images.

    Raises:
        ConfigError: a cron expression without 6 fields.
        SubmitError: the API is unreachable, behind a login, too old, or refuses the recurring run.
    """
    import tempfile

    fields = cron.split()
    if len(fields) != 6:
        raise ConfigError(f"--cron must have 6 fields (seconds first, e.g. '0 0 2 * * *' = 02:00 daily), got {cron!r}")
    from vidistill_pipeline.dag import pipeline_arguments

    check_backend(host)
    with tempfile.TemporaryDirectory() as tmp, kfp_errors(host, "creating the recurring run"):
        package = compile_package(params, Path(tmp) / "pipeline.yaml")
        client = kfp_client(host)
        exp = client.create_experiment(experiment)
        return client.create_recurring_run(
            experiment_id=exp.experiment_id, job_name=job_name, cron_expression=cron, max_concurrency=1,
            no_catchup=True, pipeline_package_path=str(package), params=pipeline_arguments(params))
