"""The vidistill Kubeflow pipeline: prep -> flow -> teachers -> distill[methods] -> report -> export -> register.

    prep(target) ──> flow ──> teach(flow) ──┐
        │    └─────────────> teach(rgb) ────┼──> ParallelFor(methods): distill ──> report ──> select best
    prep(source) ──> teach(source encoder) ─┘                                              └─> export ──If(parity)──> register/promote
                                   teach(rgb) + teach(flow) ──> evaluate (two-stream baseline) ──> report
                                                         every stage's MLflow run ──> track-stages (nests them under the parent run)

GPU-heavy tasks (flow, teach, distill) request `nvidia.com/gpu`, a node selector and a toleration for
the cluster's GPU node pool (`GpuPool`: GKE, AKS and EKS/Karpenter label keys); every task mounts the
data PVC and reads the MLflow URI and credentials from a Kubernetes Secret. All of these are ignored by
`kfp.local` and present in the compiled IR YAML.

Caching: compute tasks (prep, flow, teachers, students, evaluation, report, selection, export) are
cached; their cache key holds their parameters, upstream artifacts, image and `code_version`. Side
effects (the MLflow parent run, nesting the stage runs, registration and promotion) are never cached.

The default fan-out (`methods`) and the other pipeline defaults come from params.yaml's `pipeline`
section when the pipeline is built (`build_pipeline`), so the method registry and params.yaml stay
the only lists of methods.
"""

import os
from dataclasses import dataclass
from typing import Any

from kfp import dsl, kubernetes

from vidistill_pipeline.components import (
    TAG,
    distill_op,
    end_pipeline_run_op,
    evaluate_op,
    export_op,
    flow_op,
    prep_op,
    register_op,
    report_op,
    select_best_op,
    start_pipeline_run_op,
    teach_op,
    track_stages_op,
)

PIPELINE_NAME = "vidistill"


@dataclass(frozen=True)
class GpuPool:
    """How GPU tasks are scheduled onto the cluster's GPU node pool."""

    accelerator: str = "nvidia.com/gpu"
    count: int = 1
    node_label: str = "cloud.google.com/gke-accelerator"
    node_value: str = "nvidia-l4"
    taint_key: str = "nvidia.com/gpu"
    taint_value: str = "present"
    cpu: str = "4"
    memory: str = "16G"


# label keys of the GPU node pool on the common managed clusters
GPU_POOLS: dict[str, GpuPool] = {
    "gke": GpuPool(),
    "aks": GpuPool(node_label="kubernetes.azure.com/accelerator", node_value="nvidia", taint_key="sku", taint_value="gpu"),
    "eks": GpuPool(node_label="karpenter.k8s.aws/instance-gpu-name", node_value="l4", taint_key="nvidia.com/gpu",
                   taint_value="true"),
}
DATA_PVC = os.environ.get("VIDISTILL_DATA_PVC", "vidistill-data")
MLFLOW_SECRET = os.environ.get("VIDISTILL_MLFLOW_SECRET", "vidistill-mlflow")
POOL = GPU_POOLS[os.environ.get("VIDISTILL_GPU_POOL", "gke")]


def _cluster(task: dsl.PipelineTask, *, cache: bool, gpu: bool = False) -> dsl.PipelineTask:
    """Caching and cluster settings of a task (the cluster ones are no-ops under kfp.local, present in the IR)."""
    task.set_caching_options(cache)
    task.set_cpu_request("1").set_memory_request("2G").set_cpu_limit("2").set_memory_limit("8G")
    kubernetes.mount_pvc(task, pvc_name=DATA_PVC, mount_path="/data")
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET, secret_key_to_env={
        "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
    })
    if gpu:
        task.set_accelerator_type(POOL.accelerator).set_accelerator_limit(POOL.count)
        task.set_cpu_request(POOL.cpu).set_cpu_limit(POOL.cpu).set_memory_request(POOL.memory).set_memory_limit(POOL.memory)
        kubernetes.add_node_selector(task, label_key=POOL.node_label, label_value=POOL.node_value)
        kubernetes.add_toleration(task, key=POOL.taint_key, operator="Equal", value=POOL.taint_value, effect="NoSchedule")
    return task


def compute(task: dsl.PipelineTask, *, gpu: bool = False) -> dsl.PipelineTask:
    """A cached task: its outputs depend only on its inputs (parameters, artifacts, code version)."""
    return _cluster(task, cache=True, gpu=gpu)


def side_effect(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """A task that changes the outside world (MLflow runs, the model registry): never cached."""
    return _cluster(task, cache=False)


@dsl.pipeline(name="vidistill-dag")
def vidistill_dag(
    parent_run_id: str,
    prep_params: dict,
    source_prep_params: dict,
    flow_params: dict,
    teach_params: dict,
    pretrain_params: dict,
    distill_params: dict,
    evaluate_params: dict,
    export_params: dict,
    register_params: dict,
    methods: list,
    model_name: str,
    promotion_margin: float,
    code_version: str,
):
    """The stage graph. Compute tasks get `code_version`, side effects `parent_run_id`."""
    code = code_version
    prep = compute(prep_op(params=prep_params, code_version=code)).set_display_name("prep")
    src = compute(prep_op(params=source_prep_params, code_version=code)).set_display_name("prep-source")
    flow = compute(flow_op(params=flow_params, code_version=code, clips=prep.outputs["clips"]), gpu=True)
    flow.set_display_name("tvl1-flow")
    rgb = compute(teach_op(params=teach_params, code_version=code, modality="rgb", clips=prep.outputs["clips"]), gpu=True)
    rgb.set_display_name("teach-rgb")
    temporal = compute(teach_op(params=teach_params, code_version=code, modality="flow", clips=prep.outputs["clips"],
                                flow=flow.outputs["flow"]), gpu=True).set_display_name("teach-flow")
    encoder = compute(teach_op(params=pretrain_params, code_version=code, modality="rgb", clips=src.outputs["clips"]),
                      gpu=True).set_display_name("pretrain-encoder")
    two_stream = compute(evaluate_op(params=evaluate_params, code_version=code, clips=prep.outputs["clips"],
                                     flow=flow.outputs["flow"], rgb=rgb.outputs["model"],
                                     flow_model=temporal.outputs["model"])).set_display_name("two-stream")
    with dsl.ParallelFor(methods) as method:
        student = compute(distill_op(params=distill_params, code_version=code, method=method,
                                     clips=prep.outputs["clips"], flow=flow.outputs["flow"],
                                     teacher_rgb=rgb.outputs["model"], teacher_flow=temporal.outputs["model"],
                                     pretrained=encoder.outputs["model"]), gpu=True)
        student.set_display_name("distill")
    # a Collected channel may be consumed once (kfp 2.17's compiler fails on a reused one): one per consumer
    report = compute(report_op(students=dsl.Collected(student.outputs["student"]),
                               two_stream=two_stream.outputs["metrics"])).set_display_name("comparison-report")
    best = compute(select_best_op(students=dsl.Collected(student.outputs["student"]))).set_display_name("select-best")
    exported = compute(export_op(params=export_params, code_version=code, student=best.outputs["best"],
                                 clips=prep.outputs["clips"])).set_display_name("export-onnx")
    side_effect(track_stages_op(parent_run_id=parent_run_id, clips=prep.outputs["clips"], source_clips=src.outputs["clips"],
                                flow=flow.outputs["flow"], teacher_rgb=rgb.outputs["model"],
                                teacher_flow=temporal.outputs["model"], encoder=encoder.outputs["model"],
                                two_stream=two_stream.outputs["report"],
                                students=dsl.Collected(student.outputs["student"]), onnx=exported.outputs["onnx"],
                                report=report.outputs["report"], page=report.outputs["page"])).set_display_name("track-stages")
    with dsl.If(exported.outputs["Output"] == True, name="parity-passed"):  # noqa: E712 - kfp condition syntax
        side_effect(register_op(params=register_params, parent_run_id=parent_run_id, onnx=exported.outputs["onnx"],
                                model_name=model_name, margin=promotion_margin)).set_display_name("register-promote")


STAGE_SECTIONS = ("prep", "flow", "teach", "pretrain", "distill", "evaluate", "export", "register")
PIPELINE_KEYS = ("methods", "model_name", "promotion_margin", "run_name")


def pipeline_arguments(params: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Pipeline arguments from a params.yaml dict: the stage sections plus its `pipeline` section."""
    pipe = dict(params.get("pipeline", {}))
    args: dict[str, Any] = {f"{s}_params": dict(params.get(s) or {}) for s in STAGE_SECTIONS}
    args["source_prep_params"] = dict(pipe.get("source_prep") or {})
    args.update({key: pipe[key] for key in PIPELINE_KEYS if key in pipe})
    args.update(overrides)
    return args


def build_pipeline(params: dict[str, Any], *, code_version: str = TAG) -> Any:
    """The pipeline, with its defaults (`methods`, `model_name`, `promotion_margin`, `run_name`) taken from
    params.yaml's `pipeline` section; without a `pipeline.methods` the fan-out is every registered method.

    Args:
        params: params.yaml as a dict.
        code_version: default of the `code_version` parameter that keys the compute tasks' cache; the
            image tag by default (a local run passes the source hash, `runner.code_version()`).

    Returns:
        The `@dsl.pipeline` graph component (call it under `kfp.local`, or compile it).

    Raises:
        vidistill.config.ConfigError: `pipeline.methods` is empty, not a list, or names a method the
            registry does not know.
    """
    from vidistill.config import ConfigError
    from vidistill.distill import list_methods

    defaults = pipeline_arguments(params)
    methods = defaults.get("methods", list_methods())  # no params.yaml (another directory): every method
    if not methods or not isinstance(methods, list):
        raise ConfigError(f"params.yaml pipeline.methods must be a non-empty list of methods, got {methods!r}; "
                          f"registered: {', '.join(list_methods())}")
    unknown = [m for m in methods if m not in list_methods()]
    if unknown:
        raise ConfigError(f"pipeline.methods names unknown method(s) {', '.join(map(str, unknown))}; "
                          f"registered: {', '.join(list_methods())}")
    default_methods = list(methods)
    default_model = str(defaults.get("model_name", "vidistill"))
    default_margin = float(defaults.get("promotion_margin", 0.0))
    default_run = str(defaults.get("run_name", PIPELINE_NAME))

    @dsl.pipeline(name=PIPELINE_NAME, description="Distil video action-recognition teachers into RGB-only ONNX students")
    def vidistill_pipeline(
        prep_params: dict,
        source_prep_params: dict,
        flow_params: dict,
        teach_params: dict,
        pretrain_params: dict,
        distill_params: dict,
        evaluate_params: dict,
        export_params: dict,
        register_params: dict,
        methods: list = default_methods,
        model_name: str = default_model,
        promotion_margin: float = default_margin,
        run_name: str = default_run,
        code_version: str = code_version,
    ):
        """Every `<stage>_params` is that stage's section of params.yaml; `source_prep_params` describes the
        source dataset the pre-trained encoder learns from; `methods` are the distillation methods to fan
        out over; `code_version` keys the cache of the compute tasks. The DAG runs inside an exit handler
        that closes the MLflow parent run, also when a task fails."""
        job = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        with dsl.ExitHandler(side_effect(end_pipeline_run_op(job_id=job)), name="tracked-run"):
            start = side_effect(start_pipeline_run_op(name=run_name, methods=methods, model_name=model_name,
                                                      code_version=code_version, job_id=job))
            start.set_display_name("start-mlflow-run")
            vidistill_dag(parent_run_id=start.output, prep_params=prep_params, source_prep_params=source_prep_params,
                          flow_params=flow_params, teach_params=teach_params, pretrain_params=pretrain_params,
                          distill_params=distill_params, evaluate_params=evaluate_params, export_params=export_params,
                          register_params=register_params, methods=methods, model_name=model_name,
                          promotion_margin=promotion_margin, code_version=code_version).set_display_name("vidistill-dag")

    return vidistill_pipeline
