"""MLflow at the pipeline edge: tracking (`tracking`), model registry and promotion gate (`models`)."""

from vidistill.registry.models import download_model, promote, register_onnx, rollback
from vidistill.registry.tracking import end_pipeline_run, stage_run, start_pipeline_run

__all__ = ["download_model", "end_pipeline_run", "promote", "register_onnx", "rollback", "stage_run", "start_pipeline_run"]
