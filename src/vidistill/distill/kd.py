"""Vanilla knowledge distillation (Hinton, Vinyals & Dean, 2015), the baseline.

L = (1 - α) · CE(s, y) + α · τ² · KL(softmax(t/τ) ‖ softmax(s/τ)), with t the frozen RGB teacher's
logits; the τ² factor keeps the soft-target gradients on the scale of the hard-target ones.

α = 0.5 by default. The vanilla-KD baseline of SAKD's released code (`mlvccn/SAKD_ActionRec`, its KD
distiller) weighs CE 0.1 and KD 0.9: that is `alpha: 0.9` here (say which one a "SAKD vs KD" comparison
used; methods review SAKD-10).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vidistill.distill.base import Distiller, register_method
from vidistill.errors import ConfigError
from vidistill.train.artifacts import load_model


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample τ²·KL(p_t^τ ‖ p_s^τ), shape (B,)."""
    log_p_s = F.log_softmax(student_logits / tau, dim=1)
    log_p_t = F.log_softmax(teacher_logits / tau, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * tau**2


@dataclass
class KDParams:
    """Hinton et al. 2015 (sec. 2): the loss is (1 − α)·CE + α·τ²·KL.

    Attributes:
        tau: τ, the softmax temperature of both soft distributions (> 0).
        alpha: α in [0, 1], the weight of the soft-target term; 1 − α weighs cross-entropy (0.9: the vanilla
            KD of SAKD's released code).
    """

    tau: float = 4.0
    alpha: float = 0.5

    def validate(self) -> None:
        if self.tau <= 0:
            raise ConfigError(f"distill.methods.kd.tau must be > 0, got {self.tau}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"distill.methods.kd.alpha must be in [0, 1], got {self.alpha}")


@register_method("kd")
class KD(Distiller):
    """Hinton KD from the RGB teacher (`teacher_rgb`, a larger network on the same clips)."""

    Params = KDParams
    needs = ("teacher_rgb",)

    def __init__(self, student, params: KDParams, ctx) -> None:
        super().__init__(student, params, ctx)
        self.add_teacher("rgb", load_model(ctx.teacher_rgb)[0])

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One step: L = (1 − α)·CE(s(x), y) + α·τ²·KL(softmax(t(x)/τ) ‖ softmax(s(x)/τ)).

        Args:
            batch: `rgb` `(B, 3, T, H, W)` in [0, 1] (student and teacher see the same clip),
                `label` `(B,)` int64.

        Returns:
            `loss` (scalar), `logits` `(B, K)` of the student, `ce` (with label smoothing) and `kd`
            (τ²·KL, mean over the batch).
        """
        logits, _ = self.student(batch["rgb"])  # (B, K)
        with torch.no_grad():
            t_logits, _ = self.teachers["rgb"](batch["rgb"])  # (B, K)
        ce = self.ce(logits, batch)
        kd = kd_loss(logits, t_logits, self.params.tau).mean()
        loss = (1 - self.params.alpha) * ce + self.params.alpha * kd
        return {"loss": loss, "logits": logits, "ce": ce, "kd": kd}
