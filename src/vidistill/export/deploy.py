"""What `vidistill export` writes beside `model.onnx` for deployment (issue 29): the int8 model with its
accuracy gate (`export.int8`) and the Triton/KServe model repository (`export.repository`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _calibration(train: Any, n: int, batch: int = 16) -> list[np.ndarray]:
    """`n` training clips spread evenly over the split (all classes), in (B, 3, T, H, W) float32 batches."""
    import torch

    idx = np.unique(np.linspace(0, len(train) - 1, num=min(n, len(train))).round().astype(int))
    return [torch.stack([train[int(i)]["rgb"] for i in idx[j:j + batch]]).numpy() for j in range(0, len(idx), batch)]


def _evaluation(test: Any, batch: int = 16) -> Any:
    """Every evaluation clip as `(clips (B, 3, T, H, W), labels (B,))` batches, read lazily."""
    import torch

    for j in range(0, len(test), batch):
        items = [test[i] for i in range(j, min(j + batch, len(test)))]
        yield torch.stack([it["rgb"] for it in items]).numpy(), np.array([int(it["label"]) for it in items])


def export_deployables(cfg: Any, path: Path, test: Any, run: Any) -> dict[str, Any]:
    """After a passed parity gate: the int8 model and gate (when `cfg.int8`), the model repository (when
    `cfg.repository`). Returns `{"int8": gate | None, "repository": {name: folder}}`.

    The int8 model enters the repository (as `<repository_name>-int8`) only when its gate passed.

    Raises:
        ValueError: the training split is empty (nothing to calibrate on).
    """
    from vidistill.export.model_repository import REPOSITORY_DIR, write_model_repository
    from vidistill.export.quantize import quantize_and_gate

    import shutil

    from vidistill.export.quantize import INT8_DIR

    gate = None
    if not cfg.int8:  # an int8 model of an earlier export is not this model's: never register it by mistake
        shutil.rmtree(Path(cfg.out) / INT8_DIR, ignore_errors=True)
    if cfg.int8:
        from vidistill.data import ClipDataset

        train = ClipDataset(cfg.clips, "train")
        if len(train) == 0:
            raise ValueError(f"{cfg.clips} has no training clips to calibrate the int8 model on; run prep first or pass --no-int8")
        gate = quantize_and_gate(path, _calibration(train, cfg.calibration_clips), _evaluation(test),
                                 max_drop_points=cfg.int8_max_drop)
        run.log_metrics({"int8_top1_drop_points": gate["drop_points"], "int8_top1_agreement": gate["top1_agreement"],
                         "int8_gate_passed": float(gate["passed"]), "int8_bytes": float(gate["bytes_int8"])})
        run.log_artifact(Path(gate["onnx"]).parent / "gate.json")
    repos: dict[str, str] = {}
    if cfg.repository:
        root = Path(cfg.out) / REPOSITORY_DIR
        repos[cfg.repository_name] = str(write_model_repository(path, root, cfg.repository_name))
        name = f"{cfg.repository_name}-int8"
        shutil.rmtree(root / name, ignore_errors=True)  # only an int8 model that passed this export's gate is served
        if gate is not None and gate["passed"]:
            repos[name] = str(write_model_repository(gate["onnx"], root, name))
    return {"int8": gate, "repository": repos}
