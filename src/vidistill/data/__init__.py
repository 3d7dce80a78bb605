"""Data: video decoding, dataset layouts, clip sampling, the prep stage, the synthetic generator.

`run_prep`, `generate` and `ClipDataset` are imported on first use, so worker processes that
only decode videos never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vidistill.data.dataset import ClipDataset
    from vidistill.data.pace import PaceClips
    from vidistill.data.prep import run_prep
    from vidistill.data.synthetic import generate

__all__ = ["ClipDataset", "PaceClips", "generate", "run_prep"]

_EXPORTS = {"ClipDataset": "vidistill.data.dataset", "PaceClips": "vidistill.data.pace", "run_prep": "vidistill.data.prep",
            "generate": "vidistill.data.synthetic"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vidistill.data' has no attribute {name!r}")
