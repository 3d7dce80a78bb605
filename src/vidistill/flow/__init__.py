"""TV-L1 optical flow: batched PyTorch (CPU/CUDA) and OpenCV reference backends, uint8 flow codec.

- `tvl1(frames0, frames1, backend=..., **params)`: flow for N frame pairs;
- `encode_flow` / `decode_flow`: the data contract's uint8 storage (bound 20 px);
- `vidistill.flow.stage.run_flow`: the `vidistill flow` stage over prep's clip shards;
- `vidistill.flow.bench.bench_flow`: speed and accuracy of the backends on warped photos.

Names are imported on first use, so the OpenCV worker processes start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "tvl1": "vidistill.flow.api",
    "encode_flow": "vidistill.flow.codec",
    "decode_flow": "vidistill.flow.codec",
    "TVL1Params": "vidistill.flow.params",
    "min_frame_size": "vidistill.flow.params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vidistill.flow' has no attribute {name!r}")
