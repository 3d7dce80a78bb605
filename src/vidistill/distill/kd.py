"""Vanilla knowledge distillation (Hinton, Vinyals & Dean, 2015), the baseline.

L = (1 - α) · CE(s, y) + α · τ² · KL(softmax(t/τ) ‖ softmax(s/τ)), with t the frozen RGB teacher's
logits; the τ² factor keeps the soft-target gradients on the scale of the hard-target ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vidistill.config import ConfigError
from vidistill.distill.base import Distiller, register_method, weighted_mean
from vidistill.train.artifacts import load_model


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample τ²·KL(p_t^τ ‖ p_s^τ), shape (B,)."""
    log_p_s = F.log_softmax(student_logits / tau, dim=1)
    log_p_t = F.log_softmax(teacher_logits / tau, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * tau**2


@dataclass
class KDParams:
    tau: float = 4.0  # softmax temperature
    alpha: float = 0.5  # weight of the soft-target term; 1 - alpha on cross-entropy

    def validate(self) -> None:
        if self.tau <= 0:
            raise ConfigError(f"distill.methods.kd.tau must be > 0, got {self.tau}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"distill.methods.kd.alpha must be in [0, 1], got {self.alpha}")


@register_method("kd")
class KD(Distiller):
    """Hinton KD from the RGB teacher."""

    Params = KDParams
    needs = ("teacher_rgb",)

    def __init__(self, student, params: KDParams, ctx) -> None:
        super().__init__(student, params, ctx)
        self.add_teacher("rgb", load_model(ctx.teacher_rgb)[0])

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits, _ = self.student(batch["rgb"])
        with torch.no_grad():
            t_logits, _ = self.teachers["rgb"](batch["rgb"])
        ce = F.cross_entropy(logits, batch["label"])
        kd = weighted_mean(kd_loss(logits, t_logits, self.params.tau), batch.get("weight"))
        loss = (1 - self.params.alpha) * ce + self.params.alpha * kd
        return {"loss": loss, "logits": logits, "ce": ce, "kd": kd}
