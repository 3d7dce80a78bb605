"""`none`: the RGB-only student trained with cross-entropy alone — the no-distillation baseline.

Registered like a method so that comparisons and the pipeline's fan-out treat it like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vidistill.distill.base import Distiller, register_method


@dataclass
class NoParams:
    """No hyperparameters (the supervised term's label smoothing is `distill.train.label_smoothing`)."""


@register_method("none")
class NoDistillation(Distiller):
    """Cross-entropy only: the RGB student without any teacher.

    In `vidistill bench methods` its student, softmax-averaged with the flow teacher, is the reference
    two-stream network at the student's size (`bench_ensembles`).
    """

    Params = NoParams
    bench_ensembles = ("teacher_flow",)
    labels_only = True

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One step: L = CE(s(x), y) with label smoothing.

        Args:
            batch: `rgb` `(B, 3, T, H, W)` in [0, 1], `label` `(B,)` int64.

        Returns:
            `loss` (scalar), `logits` `(B, K)`, `ce` (= loss).
        """
        logits, _ = self.student(batch["rgb"])  # (B, K)
        ce = self.ce(logits, batch)
        return {"loss": ce, "logits": logits, "ce": ce}
