"""`make demo`: the whole Kubeflow pipeline on this machine (kfp.local), then a summary of what it made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def find_output(run_dir: Path, task: str, name: str) -> Path:
    """An output artifact of a task in a kfp.local run directory (`<run>/<task>/<name>`)."""
    hits = sorted(run_dir.glob(f"**/{task}*/{name}"))
    if not hits:
        raise FileNotFoundError(f"no output {name!r} of task {task!r} under {run_dir}")
    return hits[-1]


def champion(model_name: str) -> dict[str, Any] | None:
    """The registry's current champion version and its tags (None when there is none)."""
    from mlflow.exceptions import MlflowException

    from vidistill.registry.tracking import client

    try:
        mv = client().get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None
    return {"version": mv.version, "tags": dict(mv.tags), "source": mv.source}


def run_demo(*, profile: str = "demo", params: str | Path = "params.yaml", workdir: Path = Path("."),
             cache: bool = True) -> dict[str, Any]:
    """Run the pipeline locally and print the comparison, the champion and where to look.

    Outputs are found through the index the uncached `track-stages` task writes in this run's folder,
    so tasks served from kfp.local's cache (`cache=True`) are found where an earlier run made them.
    """
    from rich.console import Console
    from rich.markdown import Markdown

    from vidistill_pipeline.runner import local_tracking, run_local

    console = Console()
    console.rule(f"vidistill pipeline — local run, profile {profile!r}")
    workdir = Path(workdir).resolve()
    with local_tracking(workdir):
        result = run_local(params, profile=profile, workdir=workdir, cache=cache)
        model_name = result["params"].get("register", {}).get("model_name", "vidistill-synthetic")
        champ = champion(model_name)
    run_dir: Path = result["run_dir"]
    index = json.loads(find_output(run_dir, "track-stages-op", "index").read_text())
    report, page = Path(index["stages"]["report"]["path"]), Path(index["stages"]["page"]["path"])
    onnx = Path(index["stages"]["export"]["path"]) / "model.onnx"
    console.rule("result")
    console.print(Markdown(report.read_text()))
    if profile in ("demo", "tiny"):
        console.print(f"(profile {profile!r} trains on few videos for few epochs, so these models stay near chance: the "
                      "run shows the pipeline. For the method comparison run `vidistill bench methods`; README, "
                      "\"Method comparison\".)")
    if champ:
        tags = champ["tags"]
        console.print(f"[bold]champion[/]: models:/{model_name}@champion = version {champ['version']} "
                      f"(method {tags.get('method')}, top1 {tags.get('top1')}, parity {tags.get('parity_passed')}; "
                      f"decision: {tags.get('promotion.reason', '')})")
    else:
        console.print(f"[bold red]no champion[/] in {model_name}: see the register-promote task output")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    console.print(f"ONNX student (RGB only): {onnx}\ncomparison report: {report}  (HTML: {page})\n"
                  f"pipeline outputs: {run_dir}\nwall time: {result['seconds']:.0f} s\n"
                  f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} --default-artifact-root {workdir / 'mlartifacts'} "
                  f"--host 127.0.0.1 --port 5000\n"
                  f"serve the champion: .venv/bin/vidistill serve --model models:/{model_name}@champion "
                  f"(with MLFLOW_TRACKING_URI={uri})")
    if index["reused"]:
        console.print(f"served from the cache (code version {result['code_version']}): {', '.join(index['reused'])}")
    summary = {"profile": profile, "seconds": result["seconds"], "run_dir": str(run_dir), "report": str(report),
               "onnx": str(onnx), "champion": champ, "tracking_uri": uri, "index": index,
               "code_version": result["code_version"]}
    out = Path(workdir) / "outputs" / "demo_summary.json"
    out.write_text(json.dumps(summary, indent=2, default=str))
    return summary
