from kfp import dsl

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_pipeline_run_op(name: str, methods: list, model_name: str, job_id: str) -> str:
    """Open the MLflow parent run of this pipeline execution; every stage nests its run under it."""
    from vidistill.registry.tracking import start_pipeline_run

    return start_pipeline_run(name, {"methods": ",".join(methods), "model_name": model_name},
                              tags={"vidistill.pipeline_job_id": job_id})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def end_pipeline_run_op(job_id: str, status: dsl.PipelineTaskFinalStatus):
    """Close the parent run with the pipeline's final state (runs even when a task failed).

    An exit task may not depend on other tasks, so it finds the parent run by the job-id tag.
    """
    from vidistill.registry.pipeline_runs import end_pipeline_job

    end_pipeline_job(job_id, "FINISHED" if status.state == "SUCCEEDED" else "FAILED")
