"""A toy student trained for a few steps on clips whose class is visible (a bright square in one of four
quadrants, over noise), exported with the project's exporter: a model with a real, non-trivial top-1
for the int8 gate, the model repository and the latency-budget tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CLASSES = ["top-left", "top-right", "bottom-left", "bottom-right"]
FRAMES, SIZE = 4, 32


def toy_clips(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(clips (n, 3, T, S, S) float32 in [0, 1], labels (n,) int64)`: the square's quadrant is the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    x = rng.random((n, 3, FRAMES, SIZE, SIZE), dtype=np.float32) * 0.5
    half = SIZE // 2
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 2)
        oy, ox = rng.integers(2, half - 10, 2)
        y0, x0 = r * half + oy, c * half + ox
        x[i, :, :, y0:y0 + 8, x0:x0 + 8] = 1.0
    return x, labels.astype(np.int64)


def train_toy_student(out: Path, *, steps: int = 40, seed: int = 0) -> dict[str, Any]:
    """Train `r2plus1d_student` for `steps` Adam steps on toy clips, export it to `out/model.onnx`.

    Returns `{"model", "onnx_path", "train": (clips, labels), "test": (clips, labels)}`.
    """
    import torch
    import torch.nn.functional as F

    from vidistill.export.onnx import export_onnx
    from vidistill.models import create_model

    torch.manual_seed(seed)
    model = create_model("r2plus1d_student", num_classes=len(CLASSES), frames=FRAMES, size=SIZE)
    train_x, train_y = toy_clips(256, seed=seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train_y), (32,), generator=gen)
        logits, _ = model(torch.from_numpy(train_x[idx.numpy()]))
        loss = F.cross_entropy(logits, torch.from_numpy(train_y[idx.numpy()]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = export_onnx(model, out, classes=CLASSES, preprocess={"stride": 1, "short_side": SIZE})
    return {"model": model, "onnx_path": path, "train": (train_x, train_y), "test": toy_clips(200, seed=seed + 2)}


def batched(x: np.ndarray, y: np.ndarray, size: int = 50) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]
