"""The vidistill Kubeflow pipeline: prep -> flow -> teachers -> distill[methods] -> report -> export -> register.

    prep(target) ──> flow ──> teach(flow) ──┐
        │    └─────────────> teach(rgb) ────┼──> ParallelFor(methods): distill ──> comparison ──> select best
        └──> experts (several datasets) ────┤
    prep(source) ──> teach(source encoder) ─┤                                              └─> export ──If(parity)──> register/promote
    prep(target) ──> masked image teacher ──┬─> masked video distillation (mvd_encoder) ──┘
                 └─> masked video teacher ──┘   (each a marker only, when no method of `methods` needs mvd_encoder)
                                   teach(rgb) + teach(flow) ──> evaluate (two-stream baseline) ──> comparison    └Else──> not registered
                                    comparison + the registration decision (OneOf) ──> publish report (Markdown, HTML, MLflow)
                                                         every stage's MLflow run ──> track-stages (nests them under the parent run)

Scale-out: prep and flow fan out over `shards` (a ParallelFor of shard tasks and a merge that writes
exactly the unsharded output, see shards.py); with VIDISTILL_TEACHER_LAUNCHER=trainjob the two
teachers train as Kubeflow Trainer TrainJobs of N nodes x G GPUs (trainjob.py).

GPU-heavy tasks (flow, teach, distill) request `nvidia.com/gpu`, a node selector and a toleration for
the cluster's GPU node pool (`GpuPool`: GKE, AKS and EKS/Karpenter label keys); every task mounts the
data PVC, reads the MLflow URI from a ConfigMap (credentials, where a login guards MLflow, from an
optional Secret) and runs as a non-root user. All of these are ignored by
`kfp.local` and present in the compiled IR YAML.

Caching: compute tasks (prep, flow, teachers, students, evaluation, comparison, selection, export) are
cached; their cache key holds their parameters, upstream artifacts, image and `code_version`. Side
effects (the MLflow parent run, nesting the stage runs, registration and promotion, publishing the
report to MLflow) are never cached.

The default fan-out (`methods`) and the other pipeline defaults come from params.yaml when the pipeline
is built (`build_pipeline`), so the method registry and params.yaml stay the only lists of methods. The
registered model's name and the promotion margin are `register.model_name` and `register.margin`
(`register_params`), one key each.
"""

import os
from dataclasses import dataclass, replace
from typing import Any

from kfp import dsl, kubernetes

from vidistill.config import ClusterConfig, ConfigError
from vidistill_pipeline.components import (
    TAG,
    distill_op,
    end_pipeline_run_op,
    evaluate_op,
    experts_op,
    export_op,
    method_pretrain_op,
    not_registered_op,
    prep_op,
    publish_report_op,
    register_op,
    report_op,
    select_best_op,
    start_pipeline_run_op,
    teach_op,
    track_stages_op,
)
from vidistill_pipeline.shards import (
    fingerprint_op,
    flow_shard_op,
    merge_flow_op,
    merge_prep_op,
    prep_shard_op,
    shard_plan_op,
)
from vidistill_pipeline.trainjob import (
    MLFLOW_CONFIG_KEYS,
    MLFLOW_SECRET_KEYS,
    config_dict,
    config_from_env,
    teach_trainjob_op,
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
# VIDISTILL_GPU_POOL, VIDISTILL_GPU_TYPE, VIDISTILL_DATA_PVC, VIDISTILL_MLFLOW_CONFIG, VIDISTILL_MLFLOW_SECRET; an
# unknown pool or a name Kubernetes would refuse stops here in one line (vidistill.config.ClusterConfig)
_CLUSTER = ClusterConfig.from_env()
DATA_PVC, MLFLOW_CONFIG, MLFLOW_SECRET = _CLUSTER.data_pvc, _CLUSTER.mlflow_config, _CLUSTER.mlflow_secret
POOL = GPU_POOLS[_CLUSTER.gpu_pool]
if _CLUSTER.gpu_type:
    POOL = replace(POOL, node_value=_CLUSTER.gpu_type)
DATA_MOUNT = "/workspace"  # docker/Dockerfile.*: WORKDIR /workspace
# the images run as this user (docker/Dockerfile.*: USER 10001), and Pod Security "restricted" wants it said
RUN_AS_USER = 10001


def _cluster(task: dsl.PipelineTask, *, cache: bool, gpu: bool = False) -> dsl.PipelineTask:
    """Caching and cluster settings of a task (the cluster ones are no-ops under kfp.local, present in the IR)."""
    task.set_caching_options(cache)
    task.set_cpu_request("1").set_memory_request("2G").set_cpu_limit("2").set_memory_limit("8G")
    # the images' working directory: params.yaml's relative paths (data/videos, data/clips, runs/...) land on
    # the shared volume, as they do in the teacher TrainJobs and as they do locally in the checkout
    kubernetes.mount_pvc(task, pvc_name=DATA_PVC, mount_path=DATA_MOUNT)
    kubernetes.use_config_map_as_env(task, config_map_name=MLFLOW_CONFIG,
                                     config_map_key_to_env={k: k for k in MLFLOW_CONFIG_KEYS})
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET, secret_key_to_env={k: k for k in MLFLOW_SECRET_KEYS},
                                 optional=True)
    kubernetes.set_security_context(task, run_as_user=RUN_AS_USER, run_as_group=RUN_AS_USER, run_as_non_root=True)
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


# --- scale-out: where the teachers train (pod | trainjob), chosen at compile time by the cluster overlay's
# pipeline.env (k8s/overlays/*/pipeline.env); see vidistill_pipeline/trainjob.py
TEACHER_LAUNCHER = os.environ.get("VIDISTILL_TEACHER_LAUNCHER", "pod")
if TEACHER_LAUNCHER not in ("pod", "trainjob"):
    raise ConfigError(f"VIDISTILL_TEACHER_LAUNCHER={TEACHER_LAUNCHER!r}: choose pod (one GPU pod) or trainjob "
                     "(a Kubeflow Trainer TrainJob over N nodes x G GPUs)")


def teacher(**inputs: Any) -> dsl.PipelineTask:
    """A teacher's training task: `teach_op` in one GPU pod (the default), or with
    VIDISTILL_TEACHER_LAUNCHER=trainjob a CPU task that launches and follows a `TrainJob`."""
    if TEACHER_LAUNCHER == "trainjob":
        return compute(teach_trainjob_op(trainjob=config_dict(config_from_env()), **inputs))
    return compute(teach_op(**inputs), gpu=True)


def sharded_prep_flow(prep_params: Any, flow_params: Any, code: Any, shards: Any) -> tuple[dsl.PipelineTask, dsl.PipelineTask]:
    """prep and flow fanned out over `shards` (see vidistill_pipeline/shards.py). Returns the merge tasks,
    whose outputs `clips` and `flow` are the unsharded prep's and flow's."""
    plan = _cluster(shard_plan_op(params=prep_params, code_version=code, shards=shards), cache=False)
    plan.set_display_name("shard-plan")
    with dsl.ParallelFor(plan.output) as item:  # the videos as they are now key prep's cache (issue 25.4)
        part = compute(prep_shard_op(params=prep_params, code_version=code, data_fingerprint=item.fingerprint,
                                     shard=item.shard, shards=shards))
        part.set_display_name("prep-shard")
    prep = compute(merge_prep_op(params=prep_params, code_version=code, parts=dsl.Collected(part.outputs["part"])))
    prep.set_display_name("prep")
    with dsl.ParallelFor(plan.output) as item:
        piece = compute(flow_shard_op(params=flow_params, code_version=code, clips=prep.outputs["clips"], shard=item.shard,
                                      shards=shards), gpu=True).set_display_name("tvl1-flow-shard")
    flow = compute(merge_flow_op(params=flow_params, code_version=code, clips=prep.outputs["clips"],
                                 parts=dsl.Collected(piece.outputs["part"]))).set_display_name("tvl1-flow")
    return prep, flow
# --- end scale-out


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
    code_version: str,
    mvd_pretrain_params: dict,
    experts_params: dict,
    shards: int = 1,
):
    """The stage graph. Compute tasks get `code_version`, side effects `parent_run_id`."""
    code = code_version
    prep, flow = sharded_prep_flow(prep_params, flow_params, code, shards)  # scale-out: prep and flow over shards
    # the source videos' fingerprint keys prep-source's cache, as shard-plan's does prep's (issue 25.4)
    src_data = _cluster(fingerprint_op(params=source_prep_params), cache=False).set_display_name("fingerprint-source")
    src = compute(prep_op(params=source_prep_params, code_version=code, data_fingerprint=src_data.output))
    src.set_display_name("prep-source")
    rgb = teacher(params=teach_params, code_version=code, modality="rgb", clips=prep.outputs["clips"])
    rgb.set_display_name("teach-rgb")
    temporal = teacher(params=teach_params, code_version=code, modality="flow", clips=prep.outputs["clips"],
                       flow=flow.outputs["flow"]).set_display_name("teach-flow")
    encoder = compute(teach_op(params=pretrain_params, code_version=code, modality="rgb", clips=src.outputs["clips"]),
                      gpu=True).set_display_name("pretrain-encoder")
    # masked video distillation's pre-training (MAE image teacher, VideoMAE video teacher, MVD student): run only
    # when a method of `methods` needs the `mvd_encoder` they lead to; otherwise each writes a marker and stops
    masked = {"params": mvd_pretrain_params, "code_version": code, "methods": methods, "needed_for": "mvd_encoder",
              "clips": prep.outputs["clips"]}
    image_teacher = compute(method_pretrain_op(section="image_teacher", **masked), gpu=True)
    image_teacher.set_display_name("masked-image-teacher")
    video_teacher = compute(method_pretrain_op(section="video_teacher", **masked), gpu=True)
    video_teacher.set_display_name("masked-video-teacher")
    masked_student = compute(method_pretrain_op(section="student", image_teacher=image_teacher.outputs["model"],
                                                video_teacher=video_teacher.outputs["model"], **masked), gpu=True)
    masked_student.set_display_name("masked-video-distillation")
    # multi-dataset methods: one expert per dataset (no work unless a method of `methods` needs them)
    experts = compute(experts_op(params=experts_params, code_version=code, methods=methods, clips=prep.outputs["clips"],
                                 pretrained=encoder.outputs["model"]), gpu=True).set_display_name("experts")
    two_stream = compute(evaluate_op(params=evaluate_params, code_version=code, clips=prep.outputs["clips"],
                                     flow=flow.outputs["flow"], rgb=rgb.outputs["model"],
                                     flow_model=temporal.outputs["model"])).set_display_name("two-stream")
    with dsl.ParallelFor(methods) as method:
        student = compute(distill_op(params=distill_params, code_version=code, method=method,
                                     clips=prep.outputs["clips"], flow=flow.outputs["flow"],
                                     teacher_rgb=rgb.outputs["model"], teacher_flow=temporal.outputs["model"],
                                     pretrained=encoder.outputs["model"], mvd_encoder=masked_student.outputs["model"],
                                     experts=experts.outputs["experts"]),
                          gpu=True)
        student.set_display_name("distill")
    # a Collected channel may be consumed once (kfp 2.17's compiler fails on a reused one): one per consumer
    comparison = compute(report_op(students=dsl.Collected(student.outputs["student"]), two_stream=two_stream.outputs["report"],
                                   teacher_rgb=rgb.outputs["model"], teacher_flow=temporal.outputs["model"],
                                   encoder=encoder.outputs["model"], clips=prep.outputs["clips"],
                                   source_clips=src.outputs["clips"], flow=flow.outputs["flow"],
                                   distill_params=distill_params, code_version=code)).set_display_name("comparison")
    best = compute(select_best_op(students=dsl.Collected(student.outputs["student"]))).set_display_name("select-best")
    exported = compute(export_op(params=export_params, code_version=code, student=best.outputs["best"],
                                 clips=prep.outputs["clips"])).set_display_name("export-onnx")
    side_effect(track_stages_op(parent_run_id=parent_run_id, clips=prep.outputs["clips"], source_clips=src.outputs["clips"],
                                flow=flow.outputs["flow"], teacher_rgb=rgb.outputs["model"],
                                teacher_flow=temporal.outputs["model"], encoder=encoder.outputs["model"],
                                two_stream=two_stream.outputs["report"],
                                students=dsl.Collected(student.outputs["student"]),
                                onnx=exported.outputs["onnx"], image_teacher=image_teacher.outputs["model"],
                                video_teacher=video_teacher.outputs["model"],
                                masked_student=masked_student.outputs["model"],
                                experts=experts.outputs["experts"])).set_display_name("track-stages")
    with dsl.If(exported.outputs["Output"] == True, name="parity-passed"):  # noqa: E712 - kfp condition syntax
        registered = side_effect(register_op(params=register_params, parent_run_id=parent_run_id,
                                             onnx=exported.outputs["onnx"])).set_display_name("register-promote")
    with dsl.Else(name="parity-failed"):
        refused = compute(not_registered_op(onnx=exported.outputs["onnx"])).set_display_name("not-registered")
    side_effect(publish_report_op(parent_run_id=parent_run_id, comparison=comparison.outputs["comparison"],
                                  onnx=exported.outputs["onnx"], register_params=register_params,
                                  decision=dsl.OneOf(registered.output, refused.output))).set_display_name("publish-report")


STAGE_SECTIONS = ("prep", "flow", "teach", "pretrain", "distill", "evaluate", "export", "register", "mvd_pretrain",
                  "experts")
PIPELINE_KEYS = ("methods", "run_name", "shards")  # params.yaml `pipeline` keys that are pipeline parameters


def pipeline_arguments(params: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Pipeline arguments from a params.yaml dict: the stage sections plus its `pipeline` section."""
    pipe = dict(params.get("pipeline", {}))
    args: dict[str, Any] = {f"{s}_params": dict(params.get(s) or {}) for s in STAGE_SECTIONS}
    args["source_prep_params"] = dict(pipe.get("source_prep") or {})
    args.update({key: pipe[key] for key in PIPELINE_KEYS if key in pipe})
    args.update(overrides)
    return args


def build_pipeline(params: dict[str, Any], *, code_version: str = TAG) -> Any:
    """The pipeline, with its defaults (the stage sections, `methods`, `run_name`) taken from params.yaml; without a `pipeline.methods` the fan-out is every registered method.

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
    default_run = str(defaults.get("run_name", PIPELINE_NAME))
    default_shards = defaults.get("shards", 1)
    if not isinstance(default_shards, int) or isinstance(default_shards, bool) or default_shards < 1:
        raise ConfigError(f"params.yaml pipeline.shards must be an integer >= 1 (pieces prep and flow fan out over), "
                          f"got {default_shards!r}")

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
        mvd_pretrain_params: dict,
        experts_params: dict,
        methods: list = default_methods,
        run_name: str = default_run,
        code_version: str = code_version,
        shards: int = default_shards,
    ):
        """Every `<stage>_params` is that stage's section of params.yaml; `source_prep_params` describes the
        source dataset the pre-trained encoder learns from; `methods` are the distillation methods to fan
        out over; `code_version` keys the cache of the compute tasks. The DAG runs inside an exit handler
        that closes the MLflow parent run, also when a task fails."""
        job = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        close = side_effect(end_pipeline_run_op(job_id=job)).set_display_name("close-mlflow-run")
        with dsl.ExitHandler(close, name="tracked-run"):
            start = side_effect(start_pipeline_run_op(name=run_name, methods=methods, register_params=register_params,
                                                      code_version=code_version, job_id=job))
            start.set_display_name("start-mlflow-run")
            vidistill_dag(parent_run_id=start.output, prep_params=prep_params, source_prep_params=source_prep_params,
                          flow_params=flow_params, teach_params=teach_params, pretrain_params=pretrain_params,
                          distill_params=distill_params, evaluate_params=evaluate_params, export_params=export_params,
                          register_params=register_params, methods=methods,
                          code_version=code_version,
                          mvd_pretrain_params=mvd_pretrain_params, experts_params=experts_params,
                          shards=shards).set_display_name("vidistill-dag")

    return vidistill_pipeline
