from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export_op(params: dict, parent_run_id: str, student: Input[Model], clips: Input[Dataset], onnx: Output[Model]) -> bool:
    """Export the student to ONNX and check parity (`vidistill.stages.export`); returns whether parity passed."""
    import os

    from vidistill import stages
    from vidistill.export.onnx import ExportError

    try:
        result = stages.run("export", params, parent_run_id=parent_run_id, model=os.path.join(student.path, "model.pt"),
                            clips=clips.path, out=onnx.path)
    except ExportError as exc:  # reported, and the pipeline's dsl.If skips registration
        print(f"export: {exc}")
        return False
    onnx.metadata.update({"parity_max_abs_diff": result["parity"]["max_abs_diff"]})
    return bool(result["parity"]["passed"])
