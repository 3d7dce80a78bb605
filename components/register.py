from kfp import dsl
from kfp.dsl import Input, Model

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register_op(params: dict, parent_run_id: str, onnx: Input[Model], student: Input[Model], method: str,
                model_name: str, margin: float) -> str:
    """Register the ONNX student in MLflow and run the promotion gate (`vidistill.stages.register`)."""
    import json
    import os

    from vidistill import stages

    result = stages.run("register", params, parent_run_id=parent_run_id, onnx=onnx.path, method=method,
                        metrics=os.path.join(student.path, "eval", "metrics.json"), model_name=model_name, margin=margin)
    return json.dumps(result, default=str)
