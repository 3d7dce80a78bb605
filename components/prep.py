from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prep_op(params: dict, parent_run_id: str, clips: Output[Dataset]) -> str:
    """Decode videos into uint8 clip shards (`vidistill.stages.prep`); returns the summary as JSON."""
    import json

    from vidistill import stages

    return json.dumps(stages.run("prep", params, parent_run_id=parent_run_id, out=clips.path), default=str)
