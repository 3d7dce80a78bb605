"""`toy`: a distillation method that lives outside vidistill, as a third party would write one.

It is found through its `vidistill.methods` entry point (`tests/plugins/vidistill_toy_method-0.1.dist-info`,
on `sys.path` via `tests/conftest.py`); with one `params.yaml` entry (`distill.methods.toy`) it is
listed by `vidistill methods`, trains with `vidistill distill --method toy`, is covered by every test
parametrized over `list_methods()` and is swept by `vidistill bench methods --set sweep.toy.beta=...`.

It also trains a composite student (encoder + residual adjustment + head, the shape of JEDI's
product) registered here as the preset `toy_composite`, which `model.pt`, `vidistill evaluate` and
`vidistill export` rebuild through the same entry point.

Loss: L = CE(s(x), y) + β·(1/B)·Σ_i (1/K)·‖s(x_i) − t(x_i)‖² (logit matching to the RGB teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vidistill.distill import DistillContext, Distiller, register_method
from vidistill.errors import ConfigError
from vidistill.models import ZooModel, create_model, register_model
from vidistill.train import load_model


class AdjustedStudent(ZooModel):
    """Composite student: encoder features `(B, D)` -> f + MLP(f) (residual, low-rank) -> linear head.

    Args:
        base: the encoder's preset (its own head is dropped).
        hidden: width of the adjustment MLP.
    """

    def __init__(self, *, num_classes: int, frames: int, size: int, base: str, hidden: int) -> None:
        encoder = create_model(base, num_classes=num_classes, frames=frames, size=size)
        super().__init__(num_classes=num_classes, modality="rgb", input_kind="video", frames=frames, size=size,
                         feature_dim=encoder.feature_dim)
        encoder.head = nn.Identity()  # the encoder returns its features twice
        self.encoder = encoder
        self.adjust = nn.Sequential(nn.Linear(encoder.feature_dim, hidden), nn.ReLU(), nn.Dropout(0.5),
                                    nn.Linear(hidden, encoder.feature_dim))
        self.head = nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB `(B, 3, T, H, W)` in [0, 1] -> `(logits (B, K), adjusted features (B, D))`."""
        _, f = self.encoder(x)  # (B, D)
        adjusted = f + self.adjust(f)  # (B, D)
        return self.head(adjusted), adjusted


@register_model
def toy_composite(*, num_classes: int, frames: int = 8, size: int = 56, modality: str = "rgb",
                  base: str = "r2plus1d_student", hidden: int = 8) -> AdjustedStudent:
    """Composite toy student: `base` encoder + residual adjustment (width `hidden`) + head (RGB only)."""
    assert modality == "rgb", modality
    return AdjustedStudent(num_classes=num_classes, frames=frames, size=size, base=base, hidden=hidden)


@dataclass
class ToyParams:
    """The toy's hyperparameters.

    Attributes:
        beta: β >= 0, the weight of the logit-matching term.
        hidden: width of the student's adjustment MLP (a builder argument `model.pt` keeps).
    """

    beta: float = 0.5
    hidden: int = 8

    def validate(self) -> None:
        if self.beta < 0:
            raise ConfigError(f"distill.methods.toy.beta must be >= 0, got {self.beta}")
        if self.hidden < 1:
            raise ConfigError(f"distill.methods.toy.hidden must be >= 1, got {self.hidden}")


@register_method("toy")
class ToyLogitMatching(Distiller):
    """Toy: CE + β·logit matching to the RGB teacher, on a composite student (an out-of-tree plugin)."""

    Params = ToyParams
    needs = ("teacher_rgb",)
    student_preset = "toy_composite"

    @classmethod
    def build_student(cls, params: ToyParams, ctx: DistillContext, *, default: str) -> nn.Module:
        return create_model(cls.student_name(params, default), num_classes=ctx.num_classes, frames=ctx.frames,
                            size=ctx.size, hidden=params.hidden)

    def __init__(self, student: nn.Module, params: ToyParams, ctx: DistillContext) -> None:
        super().__init__(student, params, ctx)
        self.add_teacher("rgb", load_model(ctx.teacher_rgb)[0])

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One step: L = CE + β·match.

        Args:
            batch: `rgb` `(B, 3, T, H, W)` in [0, 1] and `label` `(B,)` int64.

        Returns:
            `loss`, `logits` `(B, K)`, `ce` and `match` ((1/K)·‖s − t‖², mean over the batch).
        """
        logits, _ = self.student(batch["rgb"])  # (B, K)
        with torch.no_grad():
            t_logits, _ = self.teachers["rgb"](batch["rgb"])  # (B, K)
        ce = self.ce(logits, batch)
        match = (logits - t_logits).pow(2).mean(dim=1).mean()
        return {"loss": ce + self.params.beta * match, "logits": logits, "ce": ce, "match": match}
