from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate_op(params: dict, parent_run_id: str, clips: Input[Dataset], flow: Input[Dataset], rgb: Input[Model],
                flow_model: Input[Model], metrics: Output[Metrics]) -> str:
    """The two-stream baseline: softmax average of the RGB and flow teachers (`vidistill.stages.evaluate`)."""
    import json
    import os

    from vidistill import stages

    checkpoints = ",".join(os.path.join(m.path, "model.pt") for m in (rgb, flow_model))
    result = stages.run("evaluate", params, parent_run_id=parent_run_id, clips=clips.path, flow=flow.path,
                        checkpoint=checkpoints, out=metrics.path + "_report")
    for key in ("top1", "top5", "mAP"):
        metrics.log_metric(key, result[key])
    return json.dumps({"method": "two-stream (teachers)", **{k: result[k] for k in ("top1", "top5", "mAP")}})
