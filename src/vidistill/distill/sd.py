"""Self-distillation guided transfer learning (../shared/papers/sd_self_distillation_transfer.md).

The student's encoder f_θ starts from an encoder pre-trained on a source task; its classification
head g_φ is new (Algorithm 1 line 2: never copied from the source model, even where its shape fits).
At the start of every epoch t a frozen copy f'_θ^{t−1} of the encoder is taken (epoch 1: the
pre-trained encoder, Algorithm 1 line 3) and the fine-tuning loss is

    L_CE(X | φ, θ) = −Σ log g_φ^{y_i}(f_θ(x_i))                   (eq. 1)
    L_SD(X | θ^t) = Σ_i ‖f_θ^t(x_i) − f'_θ^{t−1}(x_i)‖²            (eq. 2)
    L = L_CE + λ · L_SD                                            (eq. 3)

Both sums over clips are taken as means over the batch (the usual mini-batch estimate). f is the
encoder's output *before pooling* (`features="map"`, the default): the paper's R(2+1)D representation
is a 32 × 512 map (sec. 4.2), so the distance runs over every position and channel of the last stage's
map `(D, T', H', W')`; `features="pooled"` keeps the reading of the pooled `(D,)` vector (the input of
the linear head).

Units of λ (`reduction`, a reading: the paper has no code). Eq. 2 writes ‖·‖², but the paper's grid,
λ from 0.1 to 1000 (Table 2) with its best R(2+1)D results at λ = 100 (UCF101) and 1000 (HMDB51), at
SGD lr 0.1, is only plausible when the squared distance is *mean*-reduced over the map's elements (as
`nn.MSELoss()` does): summed over 32 × 512 numbers, λ = 1000 at lr 0.1 is a stiff quadratic that
diverges. Ours confirmed it: with the sum over our 2,048-element map, the paper's optimiser collapsed
to chance from λ = 0.1 and gave NaN from λ = 10 (README, "SD λ sweep", measured in sum units). So
`reduction="mean"` (the default) averages over every element of f, and λ is in the paper's units;
`reduction="sum"` is the literal ‖·‖² (the reading before issue 26), where our λ is the paper's λ
divided by the map size (2,048 for `r2plus1d_student` at 8 × 56 × 56: the former default λ = 100 in
sum units was ≈ 2 × 10⁵ in mean units). λ = 0 is plain fine-tuning, the baseline. The paper's grid
is `PAPER_LAMBDAS`: `vidistill bench methods --set sweep.sd.lambda_=0,0.1,1,10,100,1000`.

Optimisation (sec. 4.2, `optimizer="paper"`, the default): SGD with learning rate 0.1 for R(2+1)D
(0.005 for C3D), momentum 0.9 (classical, not Nesterov; the paper names no variant), no gradient
clipping and weight decay 1e-4, whatever `distill.train` says about them; epochs, batch size, warm-up
and views still come from `distill.train`. The paper names no weight decay; 1e-4 is the fine-tuning
recipe of the baseline it re-runs ("RSPNet*": `PeihaoChen/RSPNet` `config/optimizer/sgd.libsonnet`,
with `config/finetune/ucf101_r2plus1d.jsonnet`), where `distill.train`'s 5e-4 is ours.
`optimizer="train"` trains with `distill.train` unchanged.

Labelled clips per epoch (`labelled`). The snapshot is taken once per epoch, so the number of steps an
epoch has sets how far the student may drift before its anchor moves: the paper's UCF101 split 1 is
9,537 clips at batch 8, ≈ 1,190 steps per epoch; `make demo`'s students see 10 labelled videos per
class (`distill.student_videos_per_class`), 80 clips, 5 steps per epoch. `labelled="all"` trains on
every labelled video of the clips' training split (28 per class in params.yaml: 224 clips, 14 steps
per epoch) whatever `student_videos_per_class` says; `"subset"` (the default) keeps the subset every
other student of the comparison sees, so that SD is not compared on more labels than `none`.

Normalisation of the snapshot (`snapshot_norm`). The paper copies the encoder and freezes its
parameters; it does not say how the copy's BatchNorm layers normalise. With `"batch"` (the default)
the frozen copy normalises each batch with that batch's statistics, as the training student does, so
eq. 2 measures only how far θ^t has moved from θ^{t−1}. With `"running"` the copy runs in eval mode on
its running statistics; at epoch 1 those are the *source* domain's, so eq. 2 starts far from zero and
pulls the student's train-mode features toward eval-mode ones, which is not parameter drift. On our
data, at λ = 100 (sum units), L_SD ended training at 0.7-13 per clip with running statistics and about
1e-6 with batch statistics (README, "Method comparison").
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from vidistill.distill.base import Distiller, register_method
from vidistill.errors import ConfigError
from vidistill.train.artifacts import load_encoder  # noqa: F401  (shared with `teach --init`; imported from here before)


def sd_loss(features: torch.Tensor, snapshot_features: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Per-sample squared L2 distance of encoder outputs: eq. 2's ‖f_θt(x_i) − f'_θt−1(x_i)‖² before the
    sum over samples.

    Args:
        features: `(B, ...)`: pooled features `(B, D)` or a feature map `(B, D, T', H', W')`.
        snapshot_features: the frozen snapshot's, the same shape.
        reduction: "sum" over every position and channel (eq. 2's ‖·‖² literally) or "mean" over them
            (the squared error per element: the units of the paper's λ grid, see the module docstring).

    Returns:
        `(B,)`.
    """
    squared = (features - snapshot_features).pow(2).flatten(1)
    return squared.mean(dim=1) if reduction == "mean" else squared.sum(dim=1)


PAPER_LAMBDAS = (0.0, 0.1, 1.0, 10.0, 100.0, 1000.0)  # Table 2's λ grid (0: plain fine-tuning), in mean units
SNAPSHOT_NORMS = ("batch", "running")
FEATURES = ("map", "pooled")
OPTIMIZERS = ("paper", "train")
REDUCTIONS = ("mean", "sum")
LABELLED = ("subset", "all")


@dataclass
class SDParams:
    """SD eq. 3, what eq. 2 reads and in which units, the snapshot's normalisation, the paper's optimisation
    and the labelled clips an epoch trains on.

    Attributes:
        lambda_: λ >= 0 of eq. 3, in the units of `reduction`; 100 is the best R(2+1)D/UCF101 value of
            Table 2 (in the paper's units, `reduction: mean`); 0 is plain fine-tuning.
        reduction: how eq. 2's squared distance is reduced over the elements of f: "mean" (the paper's λ
            units, our reading) or "sum" (‖·‖² literally; λ_sum = λ_mean / elements of f).
        features: what f(x) of eq. 2 is: "map", the encoder's last feature map before pooling
            `(D, T', H', W')` (the paper's 32 × 512 R(2+1)D representation), or "pooled", its mean `(D,)`.
        snapshot_norm: how the frozen snapshot's BatchNorm layers normalise: "batch" (each batch's
            statistics, as the training student does) or "running" (eval mode, running statistics).
        optimizer: "paper": SGD at `lr`, momentum 0.9 (not Nesterov), no gradient clipping, weight decay
            `weight_decay` (sec. 4.2); "train": `distill.train` as it is.
        lr: the "paper" optimizer's learning rate (0.1 for R(2+1)D, 0.005 for C3D, sec. 4.2).
        weight_decay: the "paper" optimizer's weight decay: 1e-4, RSPNet's fine-tuning recipe (the paper
            names none).
        labelled: "subset": the labelled clips `distill.student_videos_per_class` gives every student;
            "all": every labelled video of the training split (more steps per epoch between snapshots).
    """

    lambda_: float = 100.0
    reduction: str = "mean"
    features: str = "map"
    snapshot_norm: str = "batch"
    optimizer: str = "paper"
    lr: float = 0.1
    weight_decay: float = 1e-4
    labelled: str = "subset"

    def validate(self) -> None:
        if self.lambda_ < 0:
            raise ConfigError(f"distill.methods.sd.lambda_ must be >= 0, got {self.lambda_}")
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"distill.methods.sd.reduction must be one of {', '.join(REDUCTIONS)} (mean: the paper's λ "
                              f"units; sum: ‖·‖² over every element), got {self.reduction!r}")
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
        if self.weight_decay < 0:
            raise ConfigError(f"distill.methods.sd.weight_decay must be >= 0, got {self.weight_decay}")
        if self.labelled not in LABELLED:
            raise ConfigError(f"distill.methods.sd.labelled must be one of {', '.join(LABELLED)} (subset: "
                              f"distill.student_videos_per_class; all: every labelled video), got {self.labelled!r}")


def _batch_norms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


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
    (plain fine-tuning, the control), 1 and 100 (mean units) with the paper's optimiser, and λ = 0 and
    100 with `distill.train`'s (what params.yaml gives `make demo`); the paper's whole grid
    (`PAPER_LAMBDAS`) is `--set sweep.sd.lambda_=0,0.1,1,10,100,1000`.
    """

    Params = SDParams
    needs = ("pretrained",)
    bench_variants = ({"lambda_": 0.0}, {"lambda_": 1.0}, {"lambda_": 100.0},
                      {"lambda_": 0.0, "optimizer": "train"}, {"lambda_": 100.0, "optimizer": "train"})

    @classmethod
    def train_config(cls, params: SDParams, train: Any) -> Any:
        """`distill.train` with the paper's optimiser (sec. 4.2) when `params.optimizer == "paper"`: SGD at
        `params.lr`, momentum 0.9, not Nesterov, no gradient clipping, weight decay `params.weight_decay`
        (1e-4: the RSPNet* fine-tuning recipe the paper re-runs, see the module docstring)."""
        if params.optimizer == "train":
            return train
        return dataclasses.replace(train, optimizer="sgd", lr=params.lr, momentum=0.9, nesterov=False, grad_clip=0.0,
                                   weight_decay=params.weight_decay)

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

    def train_dataset(self, default: Any) -> Any:
        """`default` (the labelled subset every student sees), or with `labelled: all` every labelled video of
        the same clips' training split."""
        if self.params.labelled == "subset" or not hasattr(default, "root"):
            return default
        from vidistill.data import ClipDataset

        return ClipDataset(default.root, default.split, flow_root=default.flow_root)

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
        """One step of eq. 3: L = L_CE + λ·(1/B)·Σ_i d(f_θt(x_i), f'_θt−1(x_i)), with eq. 2's squared distance d
        averaged (`reduction: mean`, the paper's λ units) or summed (`sum`) over the elements of f.

        Args:
            batch: `rgb` `(B, 3, T, H, W)` in [0, 1] (student and snapshot see the same clip),
                `label` `(B,)` int64.

        Returns:
            `loss` (scalar), `logits` `(B, K)`, `ce` (eq. 1, with label smoothing) and `sd` (eq. 2 as a
            mean over the batch of the squared distance, reduced over every position and channel of the
            map, or over the pooled vector's channels, by `reduction`; 0 when λ = 0, where the snapshot is
            not run).
        """
        logits, feats = encode(self.student, batch["rgb"], self.params.features)  # (B, K), (B, D, T', H', W') or (B, D)
        ce = self.ce(logits, batch)
        if self.params.lambda_ == 0:
            zero = logits.new_zeros(())
            return {"loss": ce, "logits": logits, "ce": ce, "sd": zero}
        with torch.no_grad():
            _, snap = encode(self.teachers["snapshot"], batch["rgb"], self.params.features)
        sd = sd_loss(feats, snap, self.params.reduction).mean()
        return {"loss": ce + self.params.lambda_ * sd, "logits": logits, "ce": ce, "sd": sd}
