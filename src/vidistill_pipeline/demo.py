"""`make demo` and `vidistill pipeline run --local`: the whole Kubeflow pipeline on this machine (kfp.local),
then the result table and where everything is."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any


def champion(model_name: str) -> dict[str, Any] | None:
    """The registry's current champion version and its tags (None when there is none)."""
    from mlflow.exceptions import MlflowException

    from vidistill.registry.tracking import client

    try:
        mv = client().get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None
    return {"version": int(mv.version), "tags": dict(mv.tags), "source": mv.source}  # a str over REST, an int from sqlite


def _task(tasks: list[Any], label: str) -> Any:
    """The (last) task record with this display name, or None (e.g. a branch that did not run)."""
    hits = [t for t in tasks if t.label == label]
    return hits[-1] if hits else None


def _output_path(tasks: list[Any], label: str, output: str) -> Path | None:
    task = _task(tasks, label)
    value = task.outputs.get(output) if task is not None else None
    return Path(value.path) if getattr(value, "path", None) else None


def demo_note(params: dict[str, Any], profile: str, data: dict[str, Any]) -> str:
    """What this run's numbers say, computed from them: did the best distilled student beat the baseline
    (the registry's `labels_only` method, the same student trained on labels alone), did the RGB teacher,
    and how much one test clip weighs. "" when the run has no baseline student or no distilled one.

    One run is one seed on one test split: the note says so, and points at `vidistill bench methods` for
    the mean ± std over seeds.
    """
    from vidistill.distill import baseline_methods

    students = {m.get("method"): m["top1"] for m in data.get("models", [])
                if m.get("role") == "student" and m.get("top1") is not None and m.get("method")}
    baselines = baseline_methods()
    base = next((k for k in baselines if k in students), None)
    distilled = {k: v for k, v in students.items() if k not in baselines}
    if base is None or not distilled:
        return ""
    plain = students[base]
    best = max(distilled, key=lambda k: distilled[k])
    gain = distilled[best] - plain
    teacher = next((m["top1"] for m in data.get("models", []) if m.get("name") == "RGB teacher" and m.get("top1") is not None), None)
    test_clips = ((data.get("dataset") or {}).get("splits") or {}).get("test", {}).get("clips")
    k = (params.get("distill") or {}).get("student_videos_per_class") or 0
    setting = f"students labelled with {k} videos per class, teachers with every training video; " if k else ""
    if gain > 0:
        verdict = (f"Distillation paid in this run: {best} reached top-1 {distilled[best]:.3f} against {plain:.3f} "
                   f"for {base}, the same student trained on labels alone ({gain:+.3f})")
    else:
        verdict = (f"No distilled student beat {base} in this run: the best, {best}, reached top-1 "
                   f"{distilled[best]:.3f} against {plain:.3f} for {base} ({gain:+.3f})")
    parts = [verdict + "."]
    if teacher is not None:
        parts.append(f"The RGB teacher: {teacher:.3f} ({teacher - plain:+.3f} over {base}).")
    weight = f" on {test_clips} test clips (one clip = {1 / test_clips:.3f})" if test_clips else ""
    parts.append(f"Profile {profile!r} ({setting}chance {data['chance']['top1']:.3f}): one seed{weight}; "
                 "the mean ± std over seeds is `vidistill bench methods` (README, \"Benchmark regime\").")
    return " ".join(parts)


def run_demo(*, profile: str = "demo", params: str | Path = "params.yaml", workdir: Path = Path("."), cache: bool = True,
             overrides: dict[str, Any] | None = None, console: Any = None) -> dict[str, Any]:
    """Check the parameters, run the pipeline locally, then print the comparison, the registration
    decision and where everything is.

    Args:
        profile: a key of `runner.PROFILES`.
        params: the params.yaml to start from.
        workdir: where data/, runs/, outputs/ and mlflow.db go.
        cache: reuse kfp.local's cache.
        overrides: dotted params.yaml keys (`--set`), checked with everything else before any work.
        console: a `rich.console.Console` with a fixed file (default: stdout).

    Returns:
        The summary also written to `<workdir>/outputs/demo_summary.json`.

    Raises:
        vidistill.config.ConfigError: a bad parameter (nothing has run).
        vidistill_pipeline.runner.PipelineFailed: a task failed.
    """
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.markup import escape

    from vidistill_pipeline.runner import local_tracking, resolve_params, run_local

    console = console or Console(file=sys.stdout, highlight=False)
    workdir = Path(workdir).resolve()
    resolved = resolve_params(params, profile=profile, workdir=workdir, overrides=overrides)  # before any work
    model_name = str(resolved.get("register", {}).get("model_name", ""))
    prep = resolved.get("prep", {})
    methods = resolved.get("pipeline", {}).get("methods", [])
    console.rule(f"vidistill pipeline: local run, profile {profile!r}")
    console.print(escape(f"data: {prep.get('dataset')} at {prep.get('root')}; methods: {', '.join(methods)}; "
                         f"registered model: {model_name}"), soft_wrap=True)
    given = os.environ.get("MLFLOW_TRACKING_URI", "")
    with local_tracking(workdir):
        result = run_local(resolved, workdir=workdir, cache=cache, console=console)
        champ = champion(model_name)
    tasks = result["tasks"]
    report, page = _output_path(tasks, "publish-report", "report"), _output_path(tasks, "publish-report", "page")
    index_path = _output_path(tasks, "track-stages", "index")
    index = json.loads(index_path.read_text()) if index_path else {"reused": {}, "adopted": {}, "stages": {}}
    onnx_dir = _output_path(tasks, "export-onnx", "onnx")
    outcome_task = _task(tasks, "register-promote") or _task(tasks, "not-registered")
    outcome = json.loads(outcome_task.outputs["Output"]) if outcome_task and "Output" in outcome_task.outputs else {}
    comparison_dir = _output_path(tasks, "comparison", "comparison")
    data = json.loads((comparison_dir / "comparison.json").read_text()) if comparison_dir else {}

    console.rule("result")
    if report:
        console.print(Markdown(report.read_text()))
    note = demo_note(resolved, profile, data)
    if note:
        console.print(escape(note))
    if champ:
        tags = champ["tags"]
        console.print("[bold]champion[/]: " + escape(f"models:/{model_name}@champion = version {champ['version']} "
                                                    f"(method {tags.get('method')}, top-1 {float(tags.get('top1', 'nan')):.3f})"))
    else:
        console.print("[bold red]no champion[/] " + escape(f"in {model_name}: {outcome.get('reason') or 'see the decision above'}"))
    # the server local_tracking started is gone now: name the store it served (or the user's own server)
    uri = given if given.startswith(("http://", "https://", "sqlite:///")) else f"sqlite:///{workdir / 'mlflow.db'}"
    if page and report:  # a copy a person can open by name (kfp's artifact files have no extension)
        shutil.copyfile(page, workdir / "outputs" / "comparison.html")
        shutil.copyfile(report, workdir / "outputs" / "comparison.md")
        page, report = workdir / "outputs" / "comparison.html", workdir / "outputs" / "comparison.md"
    onnx = onnx_dir / "model.onnx" if onnx_dir else None
    lines = [f"report: {page}  (Markdown: {report})", f"ONNX student (RGB only): {onnx}",
             f"task logs: {result['log_dir']}", f"pipeline outputs: {result['run_dir']}",
             f"wall time: {result['seconds']:.0f} s",
             mlflow_ui_hint(uri, workdir)]
    if champ:
        lines.append(f"serve the champion: MLFLOW_TRACKING_URI={uri} .venv/bin/vidistill serve "
                     f"--model models:/{model_name}@champion")
    console.print(escape("\n".join(lines)), soft_wrap=True)
    cached = [t.label for t in tasks if t.status == "cached"]
    if cached:
        console.print(escape(f"served from kfp.local's cache (code version {result['code_version']}): {', '.join(cached)}"),
                      soft_wrap=True)
    summary = {"profile": profile, "seconds": result["seconds"], "run_dir": str(result["run_dir"]),
               "log_dir": str(result["log_dir"]), "report": str(report), "page": str(page), "onnx": str(onnx),
               "model_name": model_name, "champion": champ, "outcome": outcome, "tracking_uri": uri, "index": index,
               "code_version": result["code_version"],
               "tasks": [{"label": t.label, "status": t.status, "seconds": t.seconds, "log": str(t.log)} for t in tasks]}
    out = workdir / "outputs" / "demo_summary.json"
    out.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def mlflow_ui_hint(uri: str, workdir: Path) -> str:
    """Where to look at the run in MLflow's UI: the server's own page for an http(s) store (`mlflow ui
    --backend-store-uri http://...` fails: a server is not a backend store), else `mlflow ui` on the file."""
    if uri.startswith(("http://", "https://")):
        return f"MLflow UI: {uri}"
    return (f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} --default-artifact-root {workdir / 'mlartifacts'} "
            "--host 127.0.0.1 --port 5000")
