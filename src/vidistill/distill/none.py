"""`none`: the RGB-only student trained with cross-entropy alone — the no-distillation baseline.

Registered like a method so that comparisons and the pipeline's fan-out treat it like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vidistill.distill.base import Distiller, register_method


@dataclass
class NoParams:
    """No hyperparameters."""


@register_method("none")
class NoDistillation(Distiller):
    """Cross-entropy only: the RGB student without any teacher."""

    Params = NoParams

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits, _ = self.student(batch["rgb"])
        ce = F.cross_entropy(logits, batch["label"])
        return {"loss": ce, "logits": logits, "ce": ce}
