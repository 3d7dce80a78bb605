from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def teach_op(params: dict, parent_run_id: str, modality: str, clips: Input[Dataset], model: Output[Model],
             metrics: Output[Metrics], flow: Input[Dataset] = None) -> str:
    """Train a teacher (`vidistill.stages.teach`); `model.path` is a directory holding model.pt."""
    import json

    from vidistill import stages

    paths = {"clips": clips.path, "out": model.path, "modality": modality}
    if flow is not None:
        paths["flow"] = flow.path
    result = stages.run("teach", params, parent_run_id=parent_run_id, **paths)
    for key in ("top1", "top5", "mAP"):
        metrics.log_metric(key, result[key])
    return json.dumps({k: v for k, v in result.items() if k != "history"}, default=str)
