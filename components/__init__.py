"""Kubeflow components: one per stage, thin wrappers over `vidistill.stages`.

They are lightweight Python components (`@dsl.component(base_image=IMAGE)`) so that the same
definitions run on a cluster (in the project image) and locally with `kfp.local.SubprocessRunner`
(in the current environment). Each body imports `vidistill` and calls one stage.
"""

from components.distill import distill_op
from components.evaluate import evaluate_op
from components.export import export_op
from components.flow import flow_op
from components.prep import prep_op
from components.register import register_op
from components.report import report_op, select_best_op
from components.teach import teach_op
from components.tracking import end_pipeline_run_op, start_pipeline_run_op

__all__ = ["distill_op", "end_pipeline_run_op", "evaluate_op", "export_op", "flow_op", "prep_op", "register_op",
           "report_op", "select_best_op", "start_pipeline_run_op", "teach_op"]
