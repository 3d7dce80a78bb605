"""The pipeline's MLflow parent run: nest the stages' runs under it and attach the comparison report.

Kubeflow caches compute tasks on their inputs, so they cannot take the parent run id (new in every
pipeline run) as an input: each compute stage logs its own top-level MLflow run (live metrics,
lineage tags) and records the run id in its output artifact's metadata. One uncached task per
pipeline run (`track_stages_op`) then calls `adopt_stage_runs`.
"""

from __future__ import annotations

from pathlib import Path

REUSED_TAG = "vidistill.reused_run."


def adopt_stage_runs(parent_run_id: str, runs: dict[str, str]) -> dict[str, dict[str, str]]:
    """Nest stage runs under `parent_run_id`.

    A run without a parent was made by this pipeline run: it becomes a child (`mlflow.parentRunId`).
    A run that already has a parent was served from Kubeflow's cache: it stays under the pipeline run
    that made it, and the parent gets the tag `vidistill.reused_run.<stage>` = its run id.

    Args:
        parent_run_id: the pipeline's parent run (`start_pipeline_run`).
        runs: stage name -> MLflow run id.

    Returns:
        `{"adopted": {stage: run_id}, "reused": {stage: run_id}}`.

    Raises:
        mlflow.exceptions.MlflowException: a run id that the tracking server does not know.
    """
    from vidistill.registry.tracking import client

    c = client()
    c.get_run(parent_run_id)  # fails early with the server's message when the parent is unknown
    adopted, reused = {}, {}
    for stage, run_id in runs.items():
        current = c.get_run(run_id).data.tags.get("mlflow.parentRunId")
        if current in (None, "", parent_run_id):
            c.set_tag(run_id, "mlflow.parentRunId", parent_run_id)
            adopted[stage] = run_id
        else:
            c.set_tag(parent_run_id, REUSED_TAG + stage, run_id)
            reused[stage] = run_id
    return {"adopted": adopted, "reused": reused}


def log_report(parent_run_id: str, markdown: str | Path, html: str | Path) -> None:
    """Attach the comparison report to the parent run as `report/comparison.md` and `report/comparison.html`."""
    import shutil
    import tempfile

    from vidistill.registry.tracking import client

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(markdown, Path(tmp) / "comparison.md")
        shutil.copy(html, Path(tmp) / "comparison.html")
        client().log_artifacts(parent_run_id, tmp, "report")
