"""ONNX Runtime serving (KServe v2 protocol over REST and gRPC): `serve(...)`, `vidistill serve` or
`python -m vidistill.serve --model ...`.

The names below are imported lazily, so `vidistill.serve.options` (the command line) stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LoadedModel", "create_app", "load_model", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vidistill.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'vidistill.serve' has no attribute {name!r}")
