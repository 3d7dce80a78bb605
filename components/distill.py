from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.image import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def distill_op(params: dict, parent_run_id: str, method: str, clips: Input[Dataset], flow: Input[Dataset],
               teacher_rgb: Input[Model], teacher_flow: Input[Model], pretrained: Input[Model],
               student: Output[Model], metrics: Output[Metrics], confusion: Output[ClassificationMetrics]) -> str:
    """Distil an RGB student with `method` (`vidistill.stages.distill`) and evaluate it; returns a JSON summary."""
    import json
    import os

    from vidistill import stages

    result = stages.run("distill", params, parent_run_id=parent_run_id, method=method, clips=clips.path,
                        flow=flow.path, out=student.path, teacher_rgb=os.path.join(teacher_rgb.path, "model.pt"),
                        teacher_flow=os.path.join(teacher_flow.path, "model.pt"),
                        pretrained=os.path.join(pretrained.path, "model.pt"))
    student.metadata["method"] = method
    evaluation = json.load(open(os.path.join(student.path, "eval", "metrics.json")))
    for key in ("top1", "top5", "mAP"):
        metrics.log_metric(key, evaluation[key])
    confusion.log_confusion_matrix(evaluation["classes"], evaluation["confusion_matrix"])
    return json.dumps({"method": method, "model_dir": student.path, **{k: evaluation[k] for k in ("top1", "top5", "mAP")},
                       "train_seconds": result["train_seconds"]})
