"""D3D: Distilled 3D Networks (Stroud et al., WACV 2020; ../shared/papers/d3d_distilled_3d_networks.md).

The RGB student ("spatial stream") is trained with

    L(θ) = L_a(θ) + λ · L_d(θ)                                   (eq. 1)
    L_d(θ) = 1/N Σ_i (f_s(x_i; θ) − f_t(x_i))²                    (eq. 2)

where L_a is cross-entropy and f_s, f_t are the *pre-softmax* outputs of the student and of the fixed
temporal stream (the same 3D CNN on TV-L1 flow). The squared difference of the two K-vectors is summed
over classes and averaged over clips, as eq. 2 writes it. The text calls it a "mean squared error"; read
as a mean over the K classes too, it is this loss at λ/K (`vidistill bench methods` sweeps λ, so both
readings are measured). λ = 1 (the paper's setting "in many cases"). The temporal stream sees the flow of
the same sampled, cropped and flipped clip as the student (the loader flips flow with u → −u). At
inference the temporal stream is discarded: the student needs RGB only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vidistill.distill.base import Distiller, register_method
from vidistill.errors import ConfigError
from vidistill.train.artifacts import load_model


def d3d_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-clip squared L2 distance of pre-softmax outputs (eq. 2 before the mean), shape (B,)."""
    return (student_logits - teacher_logits).pow(2).sum(dim=1)


@dataclass
class D3DParams:
    """D3D eq. 1.

    Attributes:
        lambda_: λ >= 0, the weight of the distillation term L_d (eq. 1); 1 is the paper's setting.
    """

    lambda_: float = 1.0

    def validate(self) -> None:
        if self.lambda_ < 0:
            raise ConfigError(f"distill.methods.d3d.lambda_ must be >= 0, got {self.lambda_}")


@register_method("d3d")
class D3D(Distiller):
    """Distil the flow temporal stream into the RGB student through its logits.

    `vidistill bench methods` trains λ = 1 (the paper's) and λ = 0.1 by default, and times the student
    against the two-stream pipeline it replaces (`bench_latency`).
    """

    Params = D3DParams
    needs = ("teacher_flow",)
    needs_flow = True
    bench_variants = ({"lambda_": 1.0}, {"lambda_": 0.1})
    bench_latency = True

    def __init__(self, student, params: D3DParams, ctx) -> None:
        super().__init__(student, params, ctx)
        teacher, _ = load_model(ctx.teacher_flow)
        if getattr(teacher, "modality", "rgb") != "flow":
            raise ConfigError(f"D3D's teacher must be a flow (temporal-stream) model; {ctx.teacher_flow} takes {teacher.modality}")
        self.add_teacher("flow", teacher)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One step: L = CE(f_s(x), y) + λ·(1/B)·Σ_i ‖f_s(x_i) − f_t(flow(x_i))‖² (eq. 1-2).

        Args:
            batch: `rgb` `(B, 3, T, H, W)` in [0, 1] for the student, `flow` `(B, 2, T-1, H, W)` in
                pixels (TV-L1 of the same clip) for the frozen temporal stream, `label` `(B,)` int64.

        Returns:
            `loss` (scalar), `logits` `(B, K)` of the student, `ce` (L_a, with label smoothing) and
            `distill` (L_d of eq. 2).
        """
        logits, _ = self.student(batch["rgb"])  # (B, K)
        with torch.no_grad():
            t_logits, _ = self.teachers["flow"](batch["flow"])  # (B, K) from (B, 2, T-1, H, W)
        ce = self.ce(logits, batch)
        distill = d3d_loss(logits, t_logits).mean()
        loss = ce + self.params.lambda_ * distill
        return {"loss": loss, "logits": logits, "ce": ce, "distill": distill}
