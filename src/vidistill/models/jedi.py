"""JEDI's student (Bicsi et al., "JEDI: Joint Expert Distillation ..."): a frozen expert encoder, an adjustment
module and the expert's classification head, as one registered preset (`jedi_student`).

JEDI trains the adjustment module and the head on the encoder's cached embeddings (sec. 3.3), so during
training the student is `AdjustedHead` (embedding in, logits out); the product that is saved, evaluated and
exported is `JEDIStudent`, the encoder followed by the trained `AdjustedHead`. In eval mode the two agree
(dropout is off), which `tests/test_jedi.py` checks against the cached-embedding path.
"""

from __future__ import annotations

import torch
from torch import nn

from vidistill.models.base import ZooModel
from vidistill.models.registry import create_model, register_model


def adjust_hidden(dim: int, ratio: float) -> int:
    """Hidden width of the adjustment module for an embedding of width `dim`.

    The paper uses 256 hidden units for 1024- and 2048-wide embeddings, "around 12-25 % of the input
    dimensionality" (sec. 4.4); we keep the ratio, not the absolute 256: `round(ratio · dim)`, at least 1,
    and 0 (no adjustment module) when `ratio` is 0. For our 64-wide `r2plus1d_student` features and the
    default ratio 0.125 that is 8.
    """
    if ratio < 0:
        raise ValueError(f"the adjustment ratio must be >= 0, got {ratio}")
    return 0 if ratio == 0 else max(1, round(ratio * dim))


class Adjustment(nn.Module):
    """JEDI's adjustment module (Fig. 2, eq. 3): `e + Dropout_p(W₂ · SiLU(W₁ · e))`, a residual low-rank map.

    Eq. 3 reads `e ← (M + I) e` with `M = UV` of rank `hidden ≪ d`; the SiLU and the dropout (p = 0.75,
    sec. 4.4, applied to the adjustment before the addition) make it "more complex than a simple
    matrix-vector product". With `zero_init`, `W₂` starts at zero, so JEDI's training starts exactly at the
    expert (our reading; the paper does not say how the module is initialised). `hidden = 0` is the identity
    (no adjustment).

    Args:
        dim: d, the embedding width.
        hidden: m, the hidden width (see `adjust_hidden`).
        dropout: p of the dropout on the adjustment.
        zero_init: start `W₂` (and its bias) at zero; otherwise PyTorch's default initialisation.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.75, *, zero_init: bool = True) -> None:
        super().__init__()
        if hidden < 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"hidden must be >= 0 and dropout in [0, 1), got {hidden}, {dropout}")
        self.dim, self.hidden = dim, hidden
        if hidden:
            self.down = nn.Linear(dim, hidden)  # W₁ (V in eq. 3)
            self.act = nn.SiLU()
            self.up = nn.Linear(hidden, dim)  # W₂ (U in eq. 3)
            self.dropout = nn.Dropout(dropout)
            if zero_init:
                nn.init.zeros_(self.up.weight)
                nn.init.zeros_(self.up.bias)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """`(B, d)` embeddings -> `(B, d)` adjusted embeddings."""
        if not self.hidden:
            return e
        return e + self.dropout(self.up(self.act(self.down(e))))


class AdjustedHead(nn.Module):
    """The trainable part of JEDI's student M_i: adjustment module, then the expert's linear head.

    Args:
        dim: d_i, the width of expert i's embeddings.
        num_classes: K_i of dataset i.
        hidden: the adjustment's hidden width (0: none).
        dropout: the adjustment's dropout.
        zero_init: start the adjustment at the identity (see `Adjustment`).
    """

    def __init__(self, dim: int, num_classes: int, *, hidden: int, dropout: float = 0.75, zero_init: bool = True) -> None:
        super().__init__()
        self.adjust = Adjustment(dim, hidden, dropout, zero_init=zero_init)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings `(B, d)` -> `(logits (B, K), adjusted embeddings (B, d))`."""
        adjusted = self.adjust(e)
        return self.head(adjusted), adjusted


class JEDIStudent(ZooModel):
    """The exported JEDI student: frozen expert encoder -> adjustment -> head (no extra cost but two small
    matrix products over the expert, sec. 4.5).

    Args:
        num_classes: K of the main dataset.
        frames: T of the clips.
        size: H = W of the clips.
        base: the expert's preset; its own head is replaced by this model's `head`.
        hidden: the adjustment's hidden width.
        adjust_dropout: the adjustment's dropout (inactive in eval mode, hence in ONNX).
    """

    def __init__(self, *, num_classes: int, frames: int, size: int, base: str, hidden: int, adjust_dropout: float) -> None:
        encoder = create_model(base, num_classes=num_classes, frames=frames, size=size)
        if not isinstance(getattr(encoder, "head", None), nn.Linear):
            raise ValueError(f"jedi_student needs an expert preset with a linear `head`; {base!r} has none")
        super().__init__(num_classes=num_classes, modality="rgb", input_kind=encoder.input_kind, frames=frames, size=size,
                         feature_dim=encoder.feature_dim)
        encoder.head = nn.Identity()  # the encoder's second output is the embedding the head reads
        self.encoder = encoder
        # a fresh preset initialises like any other (its weights come from JEDI's training, `JEDI.export_model`)
        self.student = AdjustedHead(encoder.feature_dim, num_classes, hidden=hidden, dropout=adjust_dropout, zero_init=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB `(B, 3, T, H, W)` in [0, 1] -> `(logits (B, K), adjusted embeddings (B, D))`."""
        _, e = self.encoder(x)  # (B, D), the embedding JEDI caches
        return self.student(e)


@register_model
def jedi_student(*, num_classes: int, frames: int = 8, size: int = 56, modality: str = "rgb",
                 base: str = "r2plus1d_student", hidden: int = 8, adjust_dropout: float = 0.75) -> JEDIStudent:
    """JEDI's exported student (RGB): the `base` expert encoder, an adjustment module of width `hidden`, a head."""
    assert modality == "rgb", modality
    return JEDIStudent(num_classes=num_classes, frames=frames, size=size, base=base, hidden=hidden,
                       adjust_dropout=adjust_dropout)


def expert_parts(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an expert's state dict (a zoo model with a linear `head`) into `(encoder, head)` state dicts."""
    encoder = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    head = {k.removeprefix("head."): v for k, v in state_dict.items() if k.startswith("head.")}
    if set(head) != {"weight", "bias"}:
        raise ValueError(f"the expert has no linear head (head keys: {sorted(head)})")
    return encoder, head
