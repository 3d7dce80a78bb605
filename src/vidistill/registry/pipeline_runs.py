"""Find and close a pipeline's parent MLflow run by the Kubeflow job id it was tagged with."""

from __future__ import annotations

from vidistill.registry.tracking import client, end_pipeline_run

JOB_TAG = "vidistill.pipeline_job_id"


def end_pipeline_job(job_id: str, status: str = "FINISHED") -> list[str]:
    """End every still-running parent run tagged with `job_id`; returns their run ids."""
    c = client()
    experiments = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(experiments, filter_string=f"tags.`{JOB_TAG}` = '{job_id}'")
    ended = [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    for run_id in ended:
        end_pipeline_run(run_id, status)
    return ended
