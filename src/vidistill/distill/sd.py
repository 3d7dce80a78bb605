"""Self-distillation guided transfer learning (../shared/papers/sd_self_distillation_transfer.md).

The student's encoder f_θ starts from an encoder pre-trained on a source task; its classification
head g_φ is new. At the start of every epoch t a frozen copy f'_θ^{t−1} of the encoder is taken
(epoch 1: the pre-trained encoder, Algorithm 1 line 3) and the fine-tuning loss is

    L_CE(X | φ, θ) = −Σ log g_φ^{y_i}(f_θ(x_i))                   (eq. 1)
    L_SD(X | θ^t) = Σ_i ‖f_θ^t(x_i) − f'_θ^{t−1}(x_i)‖²            (eq. 2)
    L = L_CE + λ · L_SD                                            (eq. 3)

Both sums are taken as means over the batch (the usual mini-batch estimate). f is the student's
pooled feature (the input of the linear head). The paper sweeps λ from 0.1 to 1000 (Table 2) with
its best UCF101 results at λ = 100; λ = 0 is plain fine-tuning, the baseline.

Normalisation of the snapshot (`snapshot_norm`). The paper copies the encoder and freezes its
parameters; it does not say how the copy's BatchNorm layers normalise. With `"batch"` (the default)
the frozen copy normalises each batch with that batch's statistics, as the training student does, so
eq. 2 measures only how far θ^t has moved from θ^{t−1}. With `"running"` the copy runs in eval mode on
its running statistics; at epoch 1 those are the *source* domain's, so eq. 2 starts far from zero and
pulls the student's train-mode features toward eval-mode ones, which is not parameter drift. On our
data, at λ = 100, L_SD ended training at 0.7-13 per clip with running statistics and about 1e-6 with
batch statistics (README, "Method comparison").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vidistill.distill.base import Distiller, register_method
from vidistill.errors import ConfigError
from vidistill.train.loop import load_checkpoint


def sd_loss(features: torch.Tensor, snapshot_features: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 distance of encoder features (eq. 2 before the sum), shape (B,)."""
    return (features - snapshot_features).pow(2).sum(dim=1)


SNAPSHOT_NORMS = ("batch", "running")


@dataclass
class SDParams:
    """SD eq. 3 and the snapshot's normalisation.

    Attributes:
        lambda_: λ >= 0 of eq. 3; 100 is the best R(2+1)D/UCF101 value of Table 2; 0 is plain fine-tuning.
        snapshot_norm: how the frozen snapshot's BatchNorm layers normalise: "batch" (each batch's
            statistics, as the training student does) or "running" (eval mode, running statistics).
    """

    lambda_: float = 100.0
    snapshot_norm: str = "batch"

    def validate(self) -> None:
        if self.lambda_ < 0:
            raise ConfigError(f"distill.methods.sd.lambda_ must be >= 0, got {self.lambda_}")
        if self.snapshot_norm not in SNAPSHOT_NORMS:
            raise ConfigError(f"distill.methods.sd.snapshot_norm must be one of {', '.join(SNAPSHOT_NORMS)}, "
                              f"got {self.snapshot_norm!r}")


def _batch_norms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def load_encoder(student: torch.nn.Module, path: str) -> list[str]:
    """Copy every pre-trained weight whose name and shape match (the encoder), leaving the new head.

    Returns the names of the student's parameters that were not initialised from `path`.
    """
    if not Path(path).exists():
        raise ConfigError(f"pre-trained model {path} does not exist; train one with `vidistill teach` on the source data")
    saved = load_checkpoint(path)
    own = student.state_dict()
    taken = {k: v for k, v in saved["state_dict"].items() if k in own and own[k].shape == v.shape}
    if not taken:
        raise ConfigError(f"{path} ({saved['name']}) shares no weights with the student; pre-train the same architecture")
    own.update(taken)
    student.load_state_dict(own)
    return sorted(set(own) - set(taken))


@register_method("sd")
class SelfDistillation(Distiller):
    """Fine-tune a pre-trained encoder while distilling from its own previous-epoch snapshot.

    The snapshot is a frozen module: it is not checkpointed; after a resume `on_epoch_start` copies it
    from the restored student, as in an uninterrupted run. `vidistill bench methods` trains λ = 0
    (plain fine-tuning), 0.1 and 100, and λ = 100 with a running-statistics snapshot, by default.
    """

    Params = SDParams
    needs = ("pretrained",)
    bench_variants = ({"lambda_": 0.0}, {"lambda_": 0.1}, {"lambda_": 100.0},
                      {"lambda_": 100.0, "snapshot_norm": "running"})

    def __init__(self, student, params: SDParams, ctx) -> None:
        super().__init__(student, params, ctx)
        self.fresh = load_encoder(student, ctx.pretrained)  # the new head (and nothing else, for the same architecture)
        snapshot = self.add_teacher("snapshot", copy.deepcopy(student))
        if params.snapshot_norm == "batch":
            for bn in _batch_norms(snapshot):
                bn.track_running_stats = False  # normalise with the batch's statistics and never update the buffers
        self.snapshot_epoch = -1

    def train(self, mode: bool = True) -> SelfDistillation:
        super().train(mode)  # teachers to eval mode
        if mode and self.params.snapshot_norm == "batch":
            for bn in _batch_norms(self.teachers["snapshot"]):
                bn.train()  # with track_running_stats off: batch statistics, buffers untouched
        return self

    def on_epoch_start(self, epoch: int) -> None:
        """f' ← f_θ^{t−1}: freeze a copy of the current encoder (Algorithm 1, line 5)."""
        self.teachers["snapshot"].load_state_dict(self.student.state_dict())
        self.snapshot_epoch = epoch

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One step: L = L_CE + λ·(1/B)·Σ_i ‖f_θt(x_i) − f'_θt−1(x_i)‖² (eq. 1-3).

        Args:
            batch: `rgb` `(B, 3, T, H, W)` in [0, 1] (student and snapshot see the same clip),
                `label` `(B,)` int64.

        Returns:
            `loss` (scalar), `logits` `(B, K)`, `ce` (eq. 1, with label smoothing) and `sd` (eq. 2 as
            a mean over the batch; 0 when λ = 0, where the snapshot is not run).
        """
        logits, feats = self.student(batch["rgb"])  # (B, K), (B, D)
        ce = self.ce(logits, batch)
        if self.params.lambda_ == 0:
            zero = logits.new_zeros(())
            return {"loss": ce, "logits": logits, "ce": ce, "sd": zero}
        with torch.no_grad():
            _, snap = self.teachers["snapshot"](batch["rgb"])
        sd = sd_loss(feats, snap).mean()
        return {"loss": ce + self.params.lambda_ * sd, "logits": logits, "ce": ce, "sd": sd}
