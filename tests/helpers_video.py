"""Test helpers that write tiny real videos (PyAV) and dataset layouts around them.

Import from a test file as `from helpers_video import write_video, moving_frames` (pytest puts
`tests/` on `sys.path`, as for `mlflow_server`).
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def write_video(path: str | Path, frames: np.ndarray, fps: int = 12, codec: str = "mpeg4") -> Path:
    """Encode uint8 RGB `frames` `(T, H, W, 3)` (H, W even) to `path` (container from the suffix), yuv420p."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    T, H, W, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.bit_rate = W * H * fps * 4
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        container.mux(stream.encode(None))
    return path


def moving_frames(n: int = 16, *, height: int = 48, width: int = 64, seed: int = 0, dx: int = 2) -> np.ndarray:
    """A smooth random texture translating `dx` pixels per frame, uint8 `(n, H, W, 3)`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width + n * abs(dx)].astype(np.float32)
    img = np.zeros((*yy.shape, 3), np.float32)
    for c in range(3):
        for _ in range(3):
            f = rng.uniform(0.05, 0.2, 2)
            img[..., c] += np.cos(2 * np.pi * (f[0] * xx + f[1] * yy) + rng.uniform(0, 6.3))
    img = ((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)
    return np.stack([img[:, t * abs(dx): t * abs(dx) + width] for t in range(n)])


def counter_frames(n: int, *, height: int = 48, width: int = 64) -> np.ndarray:
    """Frame `t` is a flat grey of value `10 * t + 5` (frame numbers survive the codec), uint8 `(n, H, W, 3)`."""
    values = (10 * np.arange(n) + 5).clip(0, 255).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (n, height, width, 3)).copy()


def frame_numbers(clip: np.ndarray) -> list[int]:
    """Invert `counter_frames`: the frame number of each frame of a `(T, S, S, 3)` clip."""
    return [int(round((float(f.mean()) - 5) / 10)) for f in clip]
