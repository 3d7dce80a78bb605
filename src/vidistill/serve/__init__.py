"""ONNX Runtime serving (KServe v2 protocol): `serve(...)` or `python -m vidistill.serve --model ...`."""

from vidistill.serve.app import LoadedModel, create_app, load_model, serve

__all__ = ["LoadedModel", "create_app", "load_model", "serve"]
