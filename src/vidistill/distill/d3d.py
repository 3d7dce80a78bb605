"""D3D: Distilled 3D Networks (Stroud et al., WACV 2020; ../shared/papers/d3d_distilled_3d_networks.md).

The RGB student ("spatial stream") is trained with

    L(θ) = L_a(θ) + λ · L_d(θ)                                   (eq. 1)
    L_d(θ) = 1/N Σ_i (f_s(x_i; θ) − f_t(x_i))²                    (eq. 2)

where L_a is cross-entropy and f_s, f_t are the *pre-softmax* outputs of the student and of the fixed
temporal stream (the same 3D CNN on TV-L1 flow). At inference the temporal stream is discarded: the
student needs RGB only.

Reduction over the K logits (a reading, stated and kept explicit): eq. 2 writes the squared difference of
the two K-vectors, so `d3d_loss` *sums* it over the K classes and the batch mean gives 1/N Σ_i. The text
calls it a "mean squared error"; read as a mean over the K classes too (e.g. `tf.losses.mean_squared_error`),
it is this loss at λ/K, i.e. our λ = 1 is their λ = K (8 for our synthetic classes). `vidistill bench methods`
trains λ = 1 and λ = 0.1 ≈ 1/K, so both readings are measured. λ = 1 is the paper's setting "in many cases".

Teacher (`teacher`). "flow" (the default, the method): the temporal stream, which sees the flow of the
same sampled, cropped and flipped clip as the student (the loader flips flow with u → −u). "rgb": the same
loss distilled from an RGB stream (`teacher_rgb`) instead, the paper's control of Table 6 ("D3D distilled
from spatial stream": 74.3 against 75.9 on Kinetics-400), which shows that the gain comes from the flow
rather than from distillation itself. It is that control only when `teacher_rgb` has the flow teacher's
architecture (params.yaml's `teach.model` trains both; the benchmark's default `rgb_teacher` is the
student's architecture, as the flow teacher's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vidistill.distill.base import Distiller, register_method
from vidistill.errors import ConfigError
from vidistill.train.artifacts import load_model


def d3d_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-clip squared L2 distance of pre-softmax outputs, eq. 2 before the mean over clips: Σ_k (f_s − f_t)_k²,
    summed over the K classes (not averaged: see the module docstring), shape (B,)."""
    return (student_logits - teacher_logits).pow(2).sum(dim=1)


TEACHERS = ("flow", "rgb")


@dataclass
class D3DParams:
    """D3D eq. 1 and its teacher.

    Attributes:
        lambda_: λ >= 0, the weight of the distillation term L_d (eq. 1, summed over the K logits); 1 is the
            paper's setting.
        teacher: "flow", the temporal stream (`teacher_flow`, D3D itself), or "rgb", an RGB stream
            (`teacher_rgb`, Table 6's "distilled from spatial stream" control).
    """

    lambda_: float = 1.0
    teacher: str = "flow"

    def validate(self) -> None:
        if self.lambda_ < 0:
            raise ConfigError(f"distill.methods.d3d.lambda_ must be >= 0, got {self.lambda_}")
        if self.teacher not in TEACHERS:
            raise ConfigError(f"distill.methods.d3d.teacher must be one of {', '.join(TEACHERS)} (flow: the temporal "
                              f"stream, D3D; rgb: the paper's Table 6 control), got {self.teacher!r}")


@register_method("d3d")
class D3D(Distiller):
    """Distil the flow temporal stream (or, as the paper's control, an RGB stream) into the RGB student through
    its logits.

    `vidistill bench methods` trains λ = 1 (the paper's), λ = 0.1 and the RGB-teacher control at λ = 1 by
    default, and times the student against the two-stream pipeline it replaces (`bench_latency`).
    """

    Params = D3DParams
    needs = ("teacher_flow", "teacher_rgb")  # the one `teacher` names (`needed_files`)
    needs_flow = True
    bench_variants = ({"lambda_": 1.0}, {"lambda_": 0.1}, {"lambda_": 1.0, "teacher": "rgb"})
    bench_latency = True

    @classmethod
    def needed_files(cls, params: D3DParams) -> tuple[str, ...]:
        return (f"teacher_{params.teacher}",)

    @classmethod
    def reads_flow(cls, params: D3DParams) -> bool:
        return params.teacher == "flow"

    def __init__(self, student, params: D3DParams, ctx) -> None:
        super().__init__(student, params, ctx)
        path = getattr(ctx, f"teacher_{params.teacher}")
        teacher, _ = load_model(path)
        modality = getattr(teacher, "modality", "rgb")
        if modality != params.teacher:
            raise ConfigError(f"distill.methods.d3d.teacher is {params.teacher!r}, but {path} takes {modality}; D3D's "
                              f"teacher is the temporal stream (a flow model), its control an RGB model")
        self.add_teacher(params.teacher, teacher)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One step: L = CE(f_s(x), y) + λ·(1/B)·Σ_i Σ_k (f_s(x_i) − f_t(x_i))_k² (eq. 1-2), f_t the frozen
        teacher on the flow of the clip (`teacher: flow`) or on the clip itself (`teacher: rgb`).

        Args:
            batch: `rgb` `(B, 3, T, H, W)` in [0, 1] for the student; `flow` `(B, 2, T-1, H, W)` in pixels
                (TV-L1 of the same clip) for the temporal stream; `label` `(B,)` int64.

        Returns:
            `loss` (scalar), `logits` `(B, K)` of the student, `ce` (L_a, with label smoothing) and
            `distill` (L_d of eq. 2).
        """
        logits, _ = self.student(batch["rgb"])  # (B, K)
        with torch.no_grad():
            t_logits, _ = self.teachers[self.params.teacher](batch[self.params.teacher])  # (B, K)
        ce = self.ce(logits, batch)
        distill = d3d_loss(logits, t_logits).mean()
        loss = ce + self.params.lambda_ * distill
        return {"loss": loss, "logits": logits, "ce": ce, "distill": distill}
