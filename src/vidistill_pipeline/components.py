"""Kubeflow components: one per stage, thin wrappers over `vidistill.stages`.

They are lightweight Python components (`@dsl.component(base_image=IMAGE)`), so the same definitions
run on a cluster (in the project image) and locally with `kfp.local.SubprocessRunner` (in the current
environment). Each body imports `vidistill` and calls one stage.

Outputs are typed: a stage's files go to its output artifact, and what later tasks need (top-1, the
method, the data hash, the MLflow run id) travels as artifact metadata and `Metrics`, never as JSON
strings or by reading another task's file layout.

Caching (see `dag.py`): compute components are cached by Kubeflow, whose cache key is the component's
command (which holds the function's source), its image and its inputs. So compute components take
`code_version` (the content hash of the library's source, `runner.code_version()`), which changes the
key when library code changes, and do not take the pipeline's MLflow parent run id, which changes every
run; their MLflow runs are nested under the parent by `track_stages_op`. Every output artifact is
written to its path, since `kfp.local` treats an artifact without a file as a cache miss.
"""

import os
from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from vidistill import __version__

# The images components run in (built from docker/; see docker/README.md). Set at compile time:
# VIDISTILL_IMAGE_REGISTRY (default `localhost:5000`, as docker/build.sh) and VIDISTILL_IMAGE_TAG
# (default the package version). GPU steps use the CUDA image. The image is part of every cache key.
REGISTRY = os.environ.get("VIDISTILL_IMAGE_REGISTRY", "localhost:5000")
TAG = os.environ.get("VIDISTILL_IMAGE_TAG", __version__)
CPU_IMAGE = f"{REGISTRY}/vidistill:{TAG}-cpu"
CUDA_IMAGE = f"{REGISTRY}/vidistill:{TAG}-cuda"


# ----------------------------------------------------------------------------------------------
# compute (cached)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prep_op(params: dict, code_version: str, clips: Output[Dataset], data_fingerprint: str = ""):
    """Decode videos into uint8 clip shards (`vidistill.stages.prep`).

    `clips.metadata`: clips per split, skipped inputs, `data_hash`, `mlflow_run_id`. `code_version` and
    `data_fingerprint` (`fingerprint_op`: the videos as they are now) only key the cache.
    """
    import json
    from pathlib import Path

    import mlflow

    from vidistill import stages

    summary = stages.run("prep", params, out=clips.path, progress=True)
    manifest = json.loads((Path(clips.path) / "manifest.json").read_text())
    clips.metadata.update({"clips": {k: v["clips"] for k, v in summary["splits"].items()},
                           "skipped": len(summary["skipped"]), "data_hash": manifest.get("hash", "unknown"),
                           "mlflow_run_id": mlflow.last_active_run().info.run_id})


# TV-L1 flow runs sharded: flow_shard_op and merge_flow_op in shards.py


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def teach_op(params: dict, code_version: str, modality: str, clips: Input[Dataset], model: Output[Model],
             metrics: Output[Metrics], flow: Input[Dataset] = None):
    """Train a teacher (`vidistill.stages.teach`); `model.path` is a directory holding model.pt, the
    evaluation (eval/metrics.json) and the per-epoch training history (history.json).

    `metrics`: top1, mean class accuracy, top5, mAP on the test split. `model.metadata`: the same, the
    modality, the training time and the MLflow run id.
    """
    import json
    from pathlib import Path

    from vidistill import stages

    paths = {"clips": clips.path, "out": model.path, "modality": modality}
    if flow is not None:
        paths["flow"] = flow.path
    result = stages.run("teach", params, progress=True, **paths)
    (Path(model.path) / "history.json").write_text(json.dumps(result["history"]))
    scores = {k: float(result[k]) for k in ("top1", "mean_class_accuracy", "top5", "mAP")}
    for key, value in scores.items():
        metrics.log_metric(key, value)
    Path(metrics.path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics.path).write_text(json.dumps(scores))
    model.metadata.update({**scores, "modality": modality, "data_hash": clips.metadata.get("data_hash", "unknown"),
                           "train_seconds": float(result["train_seconds"]), "mlflow_run_id": result["run_id"]})


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def method_pretrain_op(params: dict, section: str, code_version: str, methods: list, needed_for: str,
                       clips: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
                       image_teacher: Input[Model] = None, video_teacher: Input[Model] = None):
    """A pre-training stage that only some methods need (`vidistill.stages.teach` with `params[section]`,
    e.g. a masked pretext): it runs when a method of `methods` needs the model file `needed_for` (a
    `DistillContext` field, e.g. `mvd_encoder`) that the stage leads to, and otherwise does no work and
    writes only a marker, so the fan-out stays "the methods parameter only".

    `metrics`: the held-out masked-reconstruction loss (before and after training). `model.metadata`:
    the same, `skipped`, the pretext and the MLflow run id.
    """
    import json
    from pathlib import Path

    from vidistill.distill import get_method

    Path(model.path).mkdir(parents=True, exist_ok=True)
    Path(metrics.path).parent.mkdir(parents=True, exist_ok=True)
    if not any(needed_for in get_method(m).needs for m in methods):
        (Path(model.path) / "SKIPPED").write_text(f"no method of {list(methods)} needs {needed_for}\n")
        Path(metrics.path).write_text("{}")
        model.metadata.update({"skipped": True, "needed_for": needed_for})
        return
    from vidistill import stages

    paths = {"clips": clips.path, "out": model.path}
    for name, teacher in (("image_teacher", image_teacher), ("video_teacher", video_teacher)):
        if teacher is not None:
            paths[name] = str(Path(teacher.path) / "model.pt")
    if section not in params:
        raise ValueError(f"section {section!r} is missing from this stage's parameters ({sorted(params)}); add it to params.yaml")
    result = stages.run("teach", params[section], progress=True, **paths)
    (Path(model.path) / "history.json").write_text(json.dumps(result["history"]))
    scores = {k: float(result[k]) for k in ("heldout_loss", "heldout_loss_init")}
    for key, value in scores.items():
        metrics.log_metric(key, value)
    Path(metrics.path).write_text(json.dumps(scores))
    model.metadata.update({**scores, "skipped": False, "needed_for": needed_for, "pretext": params[section].get("pretext", ""),
                           "data_hash": clips.metadata.get("data_hash", "unknown"),
                           "train_seconds": float(result["train_seconds"]), "mlflow_run_id": result["run_id"]})


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def experts_op(params: dict, code_version: str, methods: list, clips: Input[Dataset], pretrained: Input[Model],
               experts: Output[Artifact]):
    """One expert per dataset and their cached embeddings (`vidistill.stages.experts`), for the methods that
    need them (`"experts"` in their `needs`); without such a method in `methods` it does no work and writes a
    manifest saying so. With `experts.pretrained` set, every expert's encoder starts from `pretrained` (the
    pace encoder of the `pretrain-encoder` task).

    `experts.metadata`: the datasets, every expert's top-1 on its test split, `mlflow_run_id`.
    """
    from pathlib import Path

    import mlflow

    from vidistill import stages
    from vidistill.data.multi import write_manifest
    from vidistill.distill import get_method

    if not any("experts" in get_method(m).needs for m in methods):
        Path(experts.path).mkdir(parents=True, exist_ok=True)
        write_manifest(experts.path, {"datasets": [], "skipped": "no method of pipeline.methods needs experts"})
        experts.metadata.update({"datasets": [], "skipped": True})
        return
    init = {"pretrained": str(Path(pretrained.path) / "model.pt")} if params.get("pretrained") else {}
    manifest = stages.run("experts", params, clips=clips.path, out=experts.path, **init)
    experts.metadata.update({"datasets": [d["name"] for d in manifest["datasets"]],
                             **{f"{d['name']}_expert_top1": float(d["top1"]) for d in manifest["datasets"]},
                             "mlflow_run_id": mlflow.last_active_run().info.run_id})


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def distill_op(params: dict, code_version: str, method: str, clips: Input[Dataset], flow: Input[Dataset],
               teacher_rgb: Input[Model], teacher_flow: Input[Model], pretrained: Input[Model],
               mvd_encoder: Input[Model],
               experts: Input[Artifact],
               student: Output[Model], metrics: Output[Metrics], confusion: Output[ClassificationMetrics]):
    """Distil an RGB student with `method` (`vidistill.stages.distill`) and evaluate it; `student.path`
    holds model.pt, eval/metrics.json and the per-epoch training history (history.json).

    `student.metadata`: method, top1, mean_class_accuracy, top5, mAP, train_seconds, classes, data_hash,
    mlflow_run_id;
    `metrics` and `confusion` show in the Kubeflow UI.
    """
    import json
    from pathlib import Path

    from vidistill import stages
    from vidistill_pipeline.runner import apply_fanout_threads

    apply_fanout_threads()  # a local run: the students share this machine's cores
    result = stages.run("distill", params, method=method, clips=clips.path, flow=flow.path, out=student.path,
                        teacher_rgb=str(Path(teacher_rgb.path) / "model.pt"),
                        teacher_flow=str(Path(teacher_flow.path) / "model.pt"),
                        pretrained=str(Path(pretrained.path) / "model.pt"),
                        mvd_encoder=str(Path(mvd_encoder.path) / "model.pt"), experts=experts.path,
                        progress=True)
    (Path(student.path) / "history.json").write_text(json.dumps(result["history"]))
    evaluation = json.loads((Path(student.path) / "eval" / "metrics.json").read_text())  # this task's own output
    scores = {k: float(evaluation[k]) for k in ("top1", "mean_class_accuracy", "top5", "mAP")}
    for key, value in scores.items():
        metrics.log_metric(key, value)
    confusion.log_confusion_matrix(evaluation["classes"], evaluation["confusion_matrix"])
    for artifact in (metrics, confusion):
        Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
        Path(artifact.path).write_text(json.dumps(artifact.metadata))
    student.metadata.update({**scores, "method": method, "train_seconds": float(result["train_seconds"]),
                             "classes": evaluation["classes"], "data_hash": evaluation.get("data_hash", "unknown"),
                             "mlflow_run_id": result["run_id"]})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate_op(params: dict, code_version: str, clips: Input[Dataset], flow: Input[Dataset], rgb: Input[Model],
                flow_model: Input[Model], report: Output[Artifact], metrics: Output[Metrics]):
    """The two-stream baseline: softmax average of the RGB and flow teachers (`vidistill.stages.evaluate`).

    `metrics`: top1, mean class accuracy, top5, mAP. `report` is the evaluation folder (metrics.json, confusion.png); its
    metadata holds the scores and the MLflow run id (Metrics metadata stays numeric for the UI).
    """
    import json
    from pathlib import Path

    import mlflow

    from vidistill import stages

    checkpoints = ",".join(str(Path(m.path) / "model.pt") for m in (rgb, flow_model))
    result = stages.run("evaluate", params, clips=clips.path, flow=flow.path, checkpoint=checkpoints, out=report.path)
    scores = {k: float(result[k]) for k in ("top1", "mean_class_accuracy", "top5", "mAP")}
    for key, value in scores.items():
        metrics.log_metric(key, value)
    report.metadata.update({**scores, "mlflow_run_id": mlflow.last_active_run().info.run_id})
    Path(metrics.path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics.path).write_text(json.dumps(scores))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def report_op(students: Input[List[Model]], two_stream: Input[Artifact], teacher_rgb: Input[Model],
              teacher_flow: Input[Model], encoder: Input[Model], clips: Input[Dataset], source_clips: Input[Dataset],
              flow: Input[Dataset], distill_params: dict, code_version: str, comparison: Output[Artifact]):
    """Everything the comparison report shows, measured once: per student and teacher top-1/top-5/mAP,
    training history, confusion matrix, parameters, ONNX size and latency per clip on this node; the
    dataset (classes, counts, skipped inputs) and chance level (`vidistill_pipeline.report`).

    `comparison.path` is a folder holding `comparison.json`; publishing it (with the registration
    decision) is the uncached `publish_report_op`.
    """
    from vidistill_pipeline.report import build_comparison

    build_comparison(students=[(s.path, dict(s.metadata)) for s in students],
                     two_stream=(two_stream.path, dict(two_stream.metadata)),
                     teacher_rgb=(teacher_rgb.path, dict(teacher_rgb.metadata)),
                     teacher_flow=(teacher_flow.path, dict(teacher_flow.metadata)),
                     encoder=(encoder.path, dict(encoder.metadata)), clips=clips.path, source_clips=source_clips.path,
                     flow=(flow.path, dict(flow.metadata)), out=comparison.path, distill_params=distill_params)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def select_best_op(students: Input[List[Model]], best: Output[Model]):
    """Copy the student with the highest top-1 (ties: the first in fan-out order) to `best`, metadata included."""
    import shutil

    winner = max(students, key=lambda s: s.metadata["top1"])
    shutil.copytree(winner.path, best.path)
    best.metadata.update(winner.metadata)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export_op(params: dict, code_version: str, student: Input[Model], clips: Input[Dataset], onnx: Output[Model]) -> bool:
    """Export the student to ONNX and check parity (`vidistill.stages.export`); returns whether parity passed.

    `onnx.metadata`: the student's metadata plus the parity result (`parity_passed`,
    `parity_max_abs_diff`, `parity_top1_agreement`, `opset`) and the export's MLflow run id.
    """
    from pathlib import Path

    import mlflow

    from vidistill import stages
    from vidistill.export.onnx import ExportError

    onnx.metadata.update({k: v for k, v in student.metadata.items() if k != "mlflow_run_id"})
    try:
        result = stages.run("export", params, model=str(Path(student.path) / "model.pt"), clips=clips.path, out=onnx.path)
    except ExportError as exc:  # reported, and the pipeline's dsl.If skips registration
        print(f"export: {exc}")
        Path(onnx.path).mkdir(parents=True, exist_ok=True)
        onnx.metadata.update({"parity_passed": False, "error": str(exc)})
        return False
    parity = result["parity"]
    onnx.metadata.update({"parity_passed": bool(parity["passed"]), "parity_max_abs_diff": parity["max_abs_diff"],
                          "parity_top1_agreement": parity["top1_agreement"], "opset": parity["opset"],
                          "mlflow_run_id": mlflow.last_active_run().info.run_id})
    return bool(parity["passed"])


# ----------------------------------------------------------------------------------------------
# side effects (never cached)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register_op(params: dict, parent_run_id: str, onnx: Input[Model]) -> str:
    """Register the ONNX student in MLflow under `register.model_name` and run the promotion gate with
    `register.margin` (`vidistill.stages.register`).

    The gate reads the student's scores from `onnx.metadata` (written by the distill and export
    tasks). Returns the outcome as JSON: `{"registered": true, "model_name", "version", "decision": {...}}`
    (the decision as `vidistill.registry.models.promote` returns it).
    """
    import json
    import tempfile
    from pathlib import Path

    from vidistill import stages

    meta = dict(onnx.metadata)
    with tempfile.TemporaryDirectory() as tmp:
        scores = Path(tmp) / "metrics.json"
        scores.write_text(json.dumps({k: meta[k] for k in ("top1", "top5", "mAP", "data_hash", "classes") if k in meta}))
        result = stages.run("register", params, parent_run_id=parent_run_id, onnx=onnx.path, method=meta["method"],
                            metrics=str(scores))
    print(f"registered {result['model_name']} version {result['version']}: {json.dumps(result['decision'])}")
    return json.dumps({"registered": True, "model_name": result["model_name"], "version": str(result["version"]),
                       "method": meta["method"], "decision": result["decision"]}, default=str)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def not_registered_op(onnx: Input[Model]) -> str:
    """The outcome when ONNX parity failed and nothing was registered, as JSON (see `register_op`)."""
    import json

    meta = dict(onnx.metadata)
    reason = meta.get("error") or (f"ONNX parity failed (max |diff| {meta.get('parity_max_abs_diff')}, "
                                   f"top-1 agreement {meta.get('parity_top1_agreement')})")
    return json.dumps({"registered": False, "method": meta.get("method"), "reason": reason})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def publish_report_op(parent_run_id: str, comparison: Input[Artifact], onnx: Input[Model], register_params: dict,
                      decision: str, report: Output[Markdown], page: Output[HTML]):
    """The comparison report with the registration decision: Markdown and a self-contained HTML page (shown
    by the Kubeflow UI), also attached to the pipeline's MLflow parent run as `report/comparison.md` and
    `report/comparison.html` (`vidistill_pipeline.report.publish`)."""
    import json

    from vidistill_pipeline.report import publish

    publish(comparison.path, decision=json.loads(decision), onnx=(onnx.path, dict(onnx.metadata)),
            model_name=str(register_params.get("model_name", "")), markdown=report.path, html=page.path,
            parent_run_id=parent_run_id)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def track_stages_op(parent_run_id: str, clips: Input[Dataset], source_clips: Input[Dataset], flow: Input[Dataset],
                    teacher_rgb: Input[Model], teacher_flow: Input[Model], encoder: Input[Model],
                    two_stream: Input[Artifact], students: Input[List[Model]], onnx: Input[Model],
                    index: Output[Artifact], image_teacher: Input[Model] = None,
                    video_teacher: Input[Model] = None, masked_student: Input[Model] = None,
                    experts: Input[Artifact] = None):
    """Nest the stages' MLflow runs under the pipeline's parent run and write `index` (JSON: every stage's
    artifact URI, metadata and MLflow run id), so a local run finds its outputs even where tasks were
    served from the cache."""
    import json
    from pathlib import Path

    from vidistill_pipeline.tracking import adopt_stage_runs

    stages = {"prep": clips, "prep_source": source_clips, "flow": flow, "teach_rgb": teacher_rgb,
              "teach_flow": teacher_flow, "pretrain": encoder, "two_stream": two_stream, "export": onnx}
    if experts is not None:
        stages["experts"] = experts
    stages.update({f"distill_{s.metadata['method']}": s for s in students})
    stages.update({name: a for name, a in (("masked_image_teacher", image_teacher), ("masked_video_teacher", video_teacher),
                                           ("masked_student", masked_student))
                   if a is not None and not a.metadata.get("skipped")})  # method pre-training stages that ran
    entries = {name: {"uri": a.uri, "path": a.path, "metadata": dict(a.metadata)} for name, a in stages.items()}
    runs = {name: a.metadata["mlflow_run_id"] for name, a in stages.items() if a.metadata.get("mlflow_run_id")}
    outcome = adopt_stage_runs(parent_run_id, runs)
    Path(index.path).write_text(json.dumps({"parent_run_id": parent_run_id, "stages": entries, **outcome}, indent=2))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_pipeline_run_op(name: str, methods: list, register_params: dict, code_version: str, job_id: str) -> str:
    """Open the MLflow parent run of this pipeline execution; returns its id."""
    from vidistill.registry.tracking import start_pipeline_run

    return start_pipeline_run(name, {"methods": ",".join(methods), "model_name": register_params.get("model_name", ""),
                                     "code_version": code_version},
                              tags={"vidistill.pipeline_job_id": job_id})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def end_pipeline_run_op(job_id: str, status: dsl.PipelineTaskFinalStatus):
    """Close the parent run with the pipeline's final state (runs even when a task failed).

    An exit task may not depend on other tasks, so it finds the parent run by the job-id tag.
    """
    from vidistill.registry.pipeline_runs import end_pipeline_job

    end_pipeline_job(job_id, "FINISHED" if status.state == "SUCCEEDED" else "FAILED")


COMPUTE = (prep_op, teach_op, method_pretrain_op, experts_op, distill_op, evaluate_op, report_op, select_best_op,
           export_op, not_registered_op)
SIDE_EFFECTS = (register_op, publish_report_op, track_stages_op, start_pipeline_run_op, end_pipeline_run_op)
