"""vidistill: distill video action-recognition models into small RGB-only ONNX students."""

__version__ = "0.1.0"
