"""Training loop, tasks and model files shared by teachers and students."""

from vidistill.train.artifacts import load_model, save_model
from vidistill.train.loop import Supervised, TrainTask, fit, model_input, resolve_device, scan, supervised_loss

__all__ = ["Supervised", "TrainTask", "fit", "load_model", "model_input", "resolve_device", "save_model", "scan",
           "supervised_loss"]
