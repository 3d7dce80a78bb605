"""The orchestration around the vidistill library: the Kubeflow pipeline and the DVC stage graph.

The library (`vidistill`) never imports this package. `vidistill pipeline ...` and `vidistill demo`
reach it through the `vidistill.commands` entry point (`vidistill_pipeline.cli:register`).

Modules:
    components: one Kubeflow component per stage, thin wrappers over `vidistill.stages`.
    dag: the pipeline (fan-out over methods, GPU pools, PVC, secrets, caching).
    runner: compile, local run (`kfp.local`), recurring runs; the code version in cache keys.
    dvc: `dvc.yaml` generated from the method registry and `params.yaml`.
    tracking: nesting the stages' MLflow runs under the pipeline's parent run.
    demo: `vidistill demo` (`make demo`).
    cli: the `pipeline` and `demo` subcommands.
"""
