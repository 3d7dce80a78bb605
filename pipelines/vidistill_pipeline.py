"""The vidistill Kubeflow pipeline: prep -> flow -> teachers -> distill[methods] -> report -> export -> register.

    prep(target) ──> flow ──> teach(flow) ──┐
        │    └─────────────> teach(rgb) ────┼──> ParallelFor(methods): distill ──> report ──> select best
    prep(source) ──> teach(source encoder) ─┘                                              └─> export ──If(parity)──> register/promote
                                   teach(rgb) + teach(flow) ──> evaluate (two-stream baseline) ──> report

GPU-heavy tasks (flow, teach, distill) request `nvidia.com/gpu`, a node selector and a toleration for
the cluster's GPU node pool (`GpuPool`: GKE, AKS and EKS/Karpenter label keys); every task mounts the
data PVC and reads the MLflow URI and credentials from a Kubernetes Secret. All of these are ignored by
`kfp.local` and present in the compiled IR YAML. Side-effect tasks (tracking, register/promote) have
caching off.
"""


import os
from dataclasses import dataclass
from typing import Any

from kfp import dsl, kubernetes

from components import (
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


def _cluster(task: dsl.PipelineTask, *, gpu: bool = False, cache: bool = True) -> dsl.PipelineTask:
    """Cluster settings of a task (no-ops under kfp.local, present in the compiled YAML)."""
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
):
    """The stage graph; every stage's MLflow run nests under `parent_run_id`."""
    parent = parent_run_id
    prep = _cluster(prep_op(params=prep_params, parent_run_id=parent), cache=False).set_display_name("prep")
    src = _cluster(prep_op(params=source_prep_params, parent_run_id=parent), cache=False).set_display_name("prep-source")
    flow = _cluster(flow_op(params=flow_params, parent_run_id=parent, clips=prep.outputs["clips"]), gpu=True,
                    cache=False).set_display_name("tvl1-flow")
    rgb = _cluster(teach_op(params=teach_params, parent_run_id=parent, modality="rgb", clips=prep.outputs["clips"]),
                   gpu=True, cache=False).set_display_name("teach-rgb")
    temporal = _cluster(teach_op(params=teach_params, parent_run_id=parent, modality="flow", clips=prep.outputs["clips"],
                                 flow=flow.outputs["flow"]), gpu=True, cache=False).set_display_name("teach-flow")
    encoder = _cluster(teach_op(params=pretrain_params, parent_run_id=parent, modality="rgb", clips=src.outputs["clips"]),
                       gpu=True, cache=False).set_display_name("pretrain-encoder")
    two_stream = _cluster(evaluate_op(params=evaluate_params, parent_run_id=parent, clips=prep.outputs["clips"],
                                      flow=flow.outputs["flow"], rgb=rgb.outputs["model"],
                                      flow_model=temporal.outputs["model"]), cache=False).set_display_name("two-stream")
    with dsl.ParallelFor(methods) as method:
        student = _cluster(distill_op(params=distill_params, parent_run_id=parent, method=method,
                                      clips=prep.outputs["clips"], flow=flow.outputs["flow"],
                                      teacher_rgb=rgb.outputs["model"], teacher_flow=temporal.outputs["model"],
                                      pretrained=encoder.outputs["model"]), gpu=True, cache=False)
        student.set_display_name("distill")
    # (a Collected channel may be consumed once: kfp 2.17's compiler fails on a reused one)
    report = _cluster(report_op(results=dsl.Collected(student.outputs["Output"]), baseline=two_stream.outputs["Output"]), cache=False)
    report.set_display_name("comparison-report")
    best = _cluster(select_best_op(results=dsl.Collected(student.outputs["Output"]), students=dsl.Collected(student.outputs["student"])), cache=False)
    best.set_display_name("select-best")
    exported = _cluster(export_op(params=export_params, parent_run_id=parent, student=best.outputs["best"],
                                  clips=prep.outputs["clips"]), cache=False).set_display_name("export-onnx")
    with dsl.If(exported.outputs["Output"] == True, name="parity-passed"):  # noqa: E712 - kfp condition syntax
        registered = _cluster(register_op(params=register_params, parent_run_id=parent, onnx=exported.outputs["onnx"],
                                          student=best.outputs["best"], method=best.outputs["Output"],
                                          model_name=model_name, margin=promotion_margin), cache=False)
        registered.set_display_name("register-promote")


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
    methods: list = ["none", "kd", "d3d", "sd"],  # noqa: B006 - kfp pipeline parameters need literal defaults
    model_name: str = "vidistill-synthetic",
    promotion_margin: float = 0.0,
    run_name: str = "vidistill",
):
    """Every `<stage>_params` is that stage's section of params.yaml; `source_prep_params` describes the
    source dataset the `sd` encoder is pre-trained on; `methods` are the distillation methods to fan out over.
    The DAG runs inside an exit handler that closes the MLflow parent run, also when a task fails."""
    job = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    with dsl.ExitHandler(_cluster(end_pipeline_run_op(job_id=job), cache=False), name="tracked-run"):
        start = _cluster(start_pipeline_run_op(name=run_name, methods=methods, model_name=model_name, job_id=job), cache=False).set_display_name("start-mlflow-run")
        vidistill_dag(parent_run_id=start.output, prep_params=prep_params, source_prep_params=source_prep_params,
                      flow_params=flow_params, teach_params=teach_params, pretrain_params=pretrain_params,
                      distill_params=distill_params, evaluate_params=evaluate_params, export_params=export_params,
                      register_params=register_params, methods=methods, model_name=model_name,
                      promotion_margin=promotion_margin).set_display_name("vidistill-dag").set_caching_options(False)


STAGE_SECTIONS = ("prep", "flow", "teach", "pretrain", "distill", "evaluate", "export", "register")


def pipeline_arguments(params: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Pipeline arguments from a params.yaml dict: the stage sections plus its `pipeline` section."""
    pipe = dict(params.get("pipeline", {}))
    args: dict[str, Any] = {f"{s}_params": dict(params.get(s) or {}) for s in STAGE_SECTIONS}
    args["source_prep_params"] = dict(pipe.get("source_prep") or {})
    for key in ("methods", "model_name", "promotion_margin", "run_name"):
        if key in pipe:
            args[key] = pipe[key]
    args.update(overrides)
    return args
