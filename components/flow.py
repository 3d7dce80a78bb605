from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def flow_op(params: dict, parent_run_id: str, clips: Input[Dataset], flow: Output[Dataset]) -> str:
    """TV-L1 flow of every clip (`vidistill.stages.flow`), on the GPU when the pod has one."""
    import json

    from vidistill import stages

    return json.dumps(stages.run("flow", params, parent_run_id=parent_run_id, clips=clips.path, out=flow.path), default=str)
