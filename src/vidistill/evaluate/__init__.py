"""Metrics, evaluation runs and reports."""

from vidistill.evaluate.metrics import classification_metrics, mean_average_precision, topk_accuracy
from vidistill.evaluate.runner import predict, score, write_report

__all__ = ["classification_metrics", "mean_average_precision", "predict", "score", "topk_accuracy", "write_report"]
