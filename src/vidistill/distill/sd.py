"""Self-distillation guided transfer learning (../shared/papers/sd_self_distillation_transfer.md).

The student's encoder f_θ starts from an encoder pre-trained on a source task; its classification
head g_φ is new (Algorithm 1 line 2: never copied from the source model, even where its shape fits).
At the start of every epoch t a frozen copy f'_θ^{t−1} of the encoder is taken (epoch 1: the
pre-trained encoder, Algorithm 1 line 3) and the fine-tuning loss is

    L_CE(X | φ, θ) = −Σ log g_φ^{y_i}(f_θ(x_i))                   (eq. 1)
    L_SD(X | θ^t) = Σ_i ‖f_θ^t(x_i) − f'_θ^{t−1}(x_i)‖²            (eq. 2)
    L = L_CE + λ · L_SD                                            (eq. 3)

Both sums are taken as means over the batch (the usual mini-batch estimate). f is the encoder's
output *before pooling* (`features="map"`, the default): the paper's R(2+1)D representation is a
32 × 512 map (sec. 4.2), so ‖·‖² runs over every position and channel of the last stage's map
`(D, T', H', W')`; `features="pooled"` keeps the reading of the pooled `(D,)` vector (the input of
the linear head). The paper sweeps λ from 0.1 to 1000 (Table 2) with its best UCF101 results at
λ = 100; λ = 0 is plain fine-tuning, the baseline.

Optimisation (sec. 4.2, `optimizer="paper"`, the default): SGD with learning rate 0.1 for R(2+1)D
(0.005 for C3D), momentum 0.9 (classical, not Nesterov; the paper names no variant) and no gradient
clipping, whatever `distill.train` says about optimizer, lr, momentum and clipping; epochs, batch size,
weight decay, warm-up and views still come from `distill.train`. `optimizer="train"` trains with
`distill.train` unchanged.

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
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vidistill.distill.base import Distiller, register_method
from vidistill.errors import ConfigError
from vidistill.train.loop import load_checkpoint


def sd_loss(features: torch.Tensor, snapshot_features: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 distance of encoder outputs (eq. 2 before the sum over samples).

    Args:
        features: `(B, ...)`: pooled features `(B, D)` or a feature map `(B, D, T', H', W')`.
        snapshot_features: the frozen snapshot's, the same shape.

    Returns:
        `(B,)`: Σ over every position and channel of the squared difference.
    """
    return (features - snapshot_features).pow(2).flatten(1).sum(dim=1)


SNAPSHOT_NORMS = ("batch", "running")
FEATURES = ("map", "pooled")
OPTIMIZERS = ("paper", "train")


@dataclass
class SDParams:
    """SD eq. 3, what eq. 2 reads, the snapshot's normalisation and the paper's optimisation.

    Attributes:
        lambda_: λ >= 0 of eq. 3; 100 is the best R(2+1)D/UCF101 value of Table 2; 0 is plain fine-tuning.
        features: what f(x) of eq. 2 is: "map", the encoder's last feature map before pooling
            `(D, T', H', W')` (the paper's 32 × 512 R(2+1)D representation), or "pooled", its mean `(D,)`.
        snapshot_norm: how the frozen snapshot's BatchNorm layers normalise: "batch" (each batch's
            statistics, as the training student does) or "running" (eval mode, running statistics).
        optimizer: "paper": SGD at `lr`, momentum 0.9 (not Nesterov), no gradient clipping (sec. 4.2);
            "train": `distill.train` as it is.
        lr: the "paper" optimizer's learning rate (0.1 for R(2+1)D, 0.005 for C3D, sec. 4.2).
    """

    lambda_: float = 100.0
    features: str = "map"
    snapshot_norm: str = "batch"
    optimizer: str = "paper"
    lr: float = 0.1

    def validate(self) -> None:
        if self.lambda_ < 0:
            raise ConfigError(f"distill.methods.sd.lambda_ must be >= 0, got {self.lambda_}")
        if self.features not in FEATURES:
            raise ConfigError(f"distill.methods.sd.features must be one of {', '.join(FEATURES)}, got {self.features!r}")
        if self.snapshot_norm not in SNAPSHOT_NORMS:
            raise ConfigError(f"distill.methods.sd.snapshot_norm must be one of {', '.join(SNAPSHOT_NORMS)}, "
                              f"got {self.snapshot_norm!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"distill.methods.sd.optimizer must be one of {', '.join(OPTIMIZERS)} (paper: SGD, momentum "
                              f"0.9, no clipping; train: distill.train), got {self.optimizer!r}")
        if self.lr <= 0:
            raise ConfigError(f"distill.methods.sd.lr must be > 0, got {self.lr}")


def _batch_norms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _head_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the model's classification head (`model.head`), g_φ."""
    head = getattr(model, "head", None)
    if not isinstance(head, torch.nn.Module):
        raise ConfigError(f"sd fine-tunes a model with a classification head `head`; {type(model).__name__} has none")
    return {f"head.{k}" for k in head.state_dict()}


def load_encoder(student: torch.nn.Module, path: str) -> list[str]:
    """Copy every pre-trained encoder weight whose name and shape match; the head g_φ is never copied.

    Returns the names of the student's state-dict entries that were not initialised from `path` (the
    head, and anything the source model lacks).

    Raises:
        ConfigError: `path` missing, or it shares no encoder weight with the student.
    """
    if not Path(path).exists():
        raise ConfigError(f"pre-trained model {path} does not exist; train one with `vidistill teach` on the source data")
    saved = load_checkpoint(path)
    own = student.state_dict()
    head = _head_keys(student)
    taken = {k: v for k, v in saved["state_dict"].items() if k in own and k not in head and own[k].shape == v.shape}
    if not taken:
        raise ConfigError(f"{path} ({saved['name']}) shares no weights with the student; pre-train the same architecture")
    own.update(taken)
    student.load_state_dict(own)
    return sorted(set(own) - set(taken))


def encode(model: torch.nn.Module, x: torch.Tensor, features: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the encoder output eq. 2 reads, in one pass.

    Args:
        model: a zoo model; "map" needs `forward_map`, `pool`, `dropout` and `head` (R(2+1)D).
        x: RGB `(B, 3, T, H, W)` in [0, 1].
        features: "map" or "pooled".

    Returns:
        `(logits (B, K), f)` with `f` `(B, D, T', H', W')` for "map", `(B, D)` for "pooled". The logits
        are those of `model(x)`.
    """
    if features == "pooled":
        return model(x)
    fmap = model.forward_map(x)  # (B, D, T', H', W')
    return model.head(model.dropout(model.pool(fmap).flatten(1))), fmap


@register_method("sd")
class SelfDistillation(Distiller):
    """Fine-tune a pre-trained encoder while distilling from its own previous-epoch snapshot.

    The snapshot is a frozen module: it is not checkpointed; after a resume `on_epoch_start` copies it
    from the restored student, as in an uninterrupted run. `vidistill bench methods` trains λ = 0
    (plain fine-tuning, the control), 0.1 and 100 with the paper's optimiser, and λ = 0 and 100 with
    `distill.train`'s (what params.yaml gives `make demo`); the paper's sweep is
    `--set sweep.sd.lambda_=0,0.1,1,10,100,1000`.
    """

    Params = SDParams
    needs = ("pretrained",)
    bench_variants = ({"lambda_": 0.0}, {"lambda_": 0.1}, {"lambda_": 100.0},
                      {"lambda_": 0.0, "optimizer": "train"}, {"lambda_": 100.0, "optimizer": "train"})

    @classmethod
    def train_config(cls, params: SDParams, train: Any) -> Any:
        """`distill.train` with the paper's optimiser (sec. 4.2) when `params.optimizer == "paper"`: SGD at
        `params.lr`, momentum 0.9, not Nesterov, no gradient clipping."""
        if params.optimizer == "train":
            return train
        return dataclasses.replace(train, optimizer="sgd", lr=params.lr, momentum=0.9, nesterov=False, grad_clip=0.0)

    def __init__(self, student, params: SDParams, ctx) -> None:
        super().__init__(student, params, ctx)
        if params.features == "map" and not all(hasattr(student, a) for a in ("forward_map", "pool", "dropout", "head")):
            raise ConfigError(f"distill.methods.sd.features 'map' reads the feature map before pooling, which "
                              f"{type(student).__name__} does not expose (forward_map); use features: pooled")
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
            a mean over the batch of the squared distance summed over every position and channel of the
            map, or over the pooled vector's channels; 0 when λ = 0, where the snapshot is not run).
        """
        logits, feats = encode(self.student, batch["rgb"], self.params.features)  # (B, K), (B, D, T', H', W') or (B, D)
        ce = self.ce(logits, batch)
        if self.params.lambda_ == 0:
            zero = logits.new_zeros(())
            return {"loss": ce, "logits": logits, "ce": ce, "sd": zero}
        with torch.no_grad():
            _, snap = encode(self.teachers["snapshot"], batch["rgb"], self.params.features)
        sd = sd_loss(feats, snap).mean()
        return {"loss": ce + self.params.lambda_ * sd, "logits": logits, "ce": ce, "sd": sd}
