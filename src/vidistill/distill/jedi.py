"""JEDI: Joint Expert Distillation in a semi-supervised multi-dataset student-teacher scenario
(Bicsi, Alexe, Ionescu, Leordeanu), eq. 1-5.

Setting: n datasets D_1..D_n with their own label sets and one expert per dataset (an encoder and a linear
head), trained by `vidistill experts`, which also caches every expert's embedding of every dataset's
clips (the encoders are frozen, sec. 3.3). JEDI trains, jointly and end to end (sec. 3.1-3.2):

* per expert j an adjustment module A_j (`vidistill.models.jedi.Adjustment`, eq. 3): ẽ_j = A_j(e_j);
* students M_j(x) = h_j(ẽ_j(x)), h_j initialised from expert j's head (sec. 4.4: "we fine-tune only their
  classification heads");
* teachers E_i(x) = Linear_i(Dropout_{p_i}([ẽ_1(x); ...; ẽ_n(x)])) with p_i = max(0, 1 − k·K_i/d) (eq. 4,
  k = 10, d = Σ_j d_j), trained with a hinge loss (sec. 4.4);
* for a clip x of D_i with label y (eq. 1, 2):
  L = α·CE(M_i(x), y) + β·hinge(E_i(x), y) + γ·Σ_j w_ij·L_kd(M_j(x), E_j(x)),
  w_ij = 1 if i = j else |D_j| / Σ_k |D_k|,
  L_kd(M, E) = −T²·Σ_c softmax(E/T)_c · log softmax(M/T)_c, with E detached (pseudo-labels), T = 1.
  For every model j ≠ i the clip is unlabelled: only the KD term reaches M_j (the semi-supervised part).

The product is the main dataset's student (dataset 0 of the experts folder): `export_model` assembles it
with its frozen encoder as the `jedi_student` preset. The other students and every teacher are scored on
each epoch's end (`<name>_student_top1`, `<name>_teacher_top1`).

Readings where the paper leaves a choice (the methods brief, section 2.4, and ours):

* eq. 2 is taken literally: w_ij uses |D_j|, the size of the *model's* dataset (the text says "w_i");
* the pseudo-labels are detached (`kd_detach_teacher`); teachers and students stay coupled through the
  shared adjustment modules, which the teachers' hinge loss trains too (the "bidirectional" case of §5.1);
* hinge = multi-class Weston-Watkins hinge, `F.multi_margin_loss(p=1, margin=1)` (Σ_{c≠y} max(0, 1 − E_y + E_c)/K);
* the adjustment's hidden width keeps the paper's 12-25 % ratio of the embedding width rather than its
  absolute 256 (`adjust_ratio`, default 1/8: 8 units for 64-wide features); its output layer starts at 0,
  so training starts at the experts; the teachers' layers get PyTorch's default initialisation;
* batches mix the datasets (a uniform shuffle over the union: "the sum of the combined losses over all
  training samples of all datasets"), and a batch's loss is the mean of eq. 1 over its clips;
* the KD term is off (γ = 0) for the first `burn_in` epochs (25), then γ;
* the optimisation follows the paper (sec. 4.4), not `distill.train`: AdamW, constant learning rate
  `lr` = 1e-5, weight decay 3e-3, `epochs` = 500, no warm-up, no gradient clipping; the batch size, seed and
  device come from `distill.train`. The paper chose them "on a validation set obtained by retaining 15 % of
  the videos from the training set of each dataset"; `vidistill bench jedi` picks our learning rate that way
  (`vidistill.data.multi.holdout_split`, with experts that never saw the validation videos).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vidistill.distill.base import DistillContext, Distiller, register_method
from vidistill.errors import ConfigError
from vidistill.models.jedi import AdjustedHead, adjust_hidden, expert_parts


def dataset_weights(sizes: list[int], *, own_only: bool = False) -> torch.Tensor:
    """Eq. 2: `(n, n)` w with w[i, j] = 1 if i = j, else |D_j| / Σ_k |D_k| (0 off the diagonal with `own_only`:
    Table 3's "single dataset" scenario). Row i: the clip's dataset; column j: the model."""
    n = torch.tensor(sizes, dtype=torch.float64)
    w = (n / n.sum()).expand(len(sizes), len(sizes)).clone()
    if own_only:
        w.zero_()
    w.fill_diagonal_(1.0)
    return w.float()


def ensemble_dropout(num_classes: int, width: int, k: float = 10.0) -> float:
    """Eq. 4: p_i = max(0, 1 − k·K_i / d), so that d·(1 − p_i) = k·K_i inputs stay active on average (eq. 5)."""
    return max(0.0, 1.0 - k * num_classes / width)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-sample KD loss `(B,)`: −T²·Σ_c softmax(t/T)_c · log softmax(s/T)_c (Hinton et al.'s soft-target
    cross-entropy, JEDI sec. 4.4 with T = 1)."""
    target = F.softmax(teacher_logits / temperature, dim=1)
    return -(target * F.log_softmax(student_logits / temperature, dim=1)).sum(dim=1) * temperature**2


class Ensemble(nn.Module):
    """A JEDI teacher E_i: dropout p_i (eq. 4), then a linear meta-classifier `(B, D) -> (B, K_i)` (sec. 4.4)."""

    def __init__(self, width: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(x))


@dataclass
class JEDIParams:
    """JEDI's hyperparameters (paper values, sec. 4.4; eq. numbers of the module docstring).

    Attributes:
        alpha: α, weight of the students' cross-entropy (eq. 1).
        beta: β, weight of the teachers' hinge loss (eq. 1).
        gamma: γ, weight of the KD term (eq. 1); 0 is Table 3's "no distillation".
        temperature: T of the soft pseudo-labels.
        ensemble_k: k of eq. 4.
        adjust_ratio: hidden width of each adjustment module as a fraction of its embedding width (paper:
            256 of 1024-2048, "around 12-25 %"); 0 removes the adjustment modules.
        adjust_dropout: dropout on the adjustment (0.75).
        ensemble_input: "adjusted" (the proposed model) or "base" (the teachers see the unadjusted
            embeddings: Table 3's "base features").
        kd_data: "all" (every dataset's clips distil into every student) or "own" (each student only on its
            own dataset: Table 3's "single dataset").
        kd_detach_teacher: the pseudo-labels carry no gradient.
        hinge_margin: margin of the teachers' hinge loss.
        burn_in: epochs with the KD term off (25).
        epochs: training epochs (500).
        lr: AdamW's constant learning rate (1e-5).
        weight_decay: AdamW's weight decay (3e-3).
    """

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.4
    temperature: float = 1.0
    ensemble_k: float = 10.0
    adjust_ratio: float = 0.125
    adjust_dropout: float = 0.75
    ensemble_input: str = "adjusted"
    kd_data: str = "all"
    kd_detach_teacher: bool = True
    hinge_margin: float = 1.0
    burn_in: int = 25
    epochs: int = 500
    lr: float = 1e-5
    weight_decay: float = 3e-3

    def validate(self) -> None:
        p = "distill.methods.jedi."
        for name in ("alpha", "beta", "gamma", "adjust_ratio", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{p}{name} must be >= 0, got {getattr(self, name)}")
        for name in ("temperature", "ensemble_k", "hinge_margin", "lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{p}{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.adjust_dropout < 1:
            raise ConfigError(f"{p}adjust_dropout must be in [0, 1), got {self.adjust_dropout}")
        if self.ensemble_input not in ("adjusted", "base"):
            raise ConfigError(f"{p}ensemble_input must be 'adjusted' or 'base', got {self.ensemble_input!r}")
        if self.kd_data not in ("all", "own"):
            raise ConfigError(f"{p}kd_data must be 'all' or 'own', got {self.kd_data!r}")
        if self.epochs < 1 or self.burn_in < 0:
            raise ConfigError(f"{p}epochs must be >= 1 and burn_in >= 0, got {self.epochs}, {self.burn_in}")


def _experts(ctx: DistillContext) -> dict[str, Any]:
    """The experts manifest, checked against the main dataset `ctx` describes."""
    from vidistill.data.multi import read_experts

    manifest = read_experts(ctx.experts)
    main = manifest["datasets"][0]
    if list(main["classes"]) != list(ctx.classes):
        raise ConfigError(f"the experts in {ctx.experts} were trained with main dataset {main['name']!r} of classes "
                          f"{main['classes']}, but the distilled clips have {ctx.classes}; rerun `vidistill experts` "
                          "on these clips")
    return manifest


def _load_expert(folder: str, entry: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    from vidistill.train.artifacts import load_model

    return load_model(Path(folder) / entry["expert"])


@register_method("jedi")
class JEDI(Distiller):
    """JEDI: students (adjusted expert heads) and ensemble teachers trained jointly on the experts' cached embeddings."""

    Params = JEDIParams
    needs = ("experts",)
    student_preset = "jedi_student"
    frozen_modules = ("teachers",)  # the experts' encoders (with their heads), loaded from the experts folder

    @classmethod
    def train_config(cls, params: JEDIParams, train: Any) -> Any:
        """The paper's optimisation (sec. 4.4) over `distill.train`: AdamW, constant `lr`, `weight_decay`,
        `epochs`, no warm-up, no clipping, and no training views.

        JEDI trains on embeddings the experts cached once from unaugmented clips (sec. 3.3; the paper's
        experts were fine-tuned *with* augmentation, JEDI itself trains without), so `distill.train`'s
        `hflip` and `crop_scale` do not apply to it: they are set to off here (the experts' own views are
        `experts.train.hflip` / `crop_scale`). Before, `hflip: true` was refused and `crop_scale < 1` made
        the loop crop a batch of embeddings (a `KeyError` on `rgb`), so jedi could not run with the
        repository's params.yaml (issue 26).
        """
        return dataclasses.replace(train, epochs=params.epochs, lr=params.lr, weight_decay=params.weight_decay,
                                   optimizer="adamw", schedule="constant", warmup_epochs=0, grad_clip=0.0,
                                   hflip=False, crop_scale=1.0)

    @classmethod
    def build_student(cls, params: JEDIParams, ctx: DistillContext, *, default: str) -> nn.Module:
        """The main dataset's trainable student: adjustment + the main expert's head (an `AdjustedHead` on
        embeddings; `export_model` puts the frozen encoder in front)."""
        manifest = _experts(ctx)
        entry = manifest["datasets"][0]
        expert, _ = _load_expert(ctx.experts, entry)
        return cls._student_for(params, entry, expert)

    @staticmethod
    def _student_for(params: JEDIParams, entry: dict[str, Any], expert: nn.Module) -> AdjustedHead:
        d = int(entry["feature_dim"])
        student = AdjustedHead(d, len(entry["classes"]), hidden=adjust_hidden(d, params.adjust_ratio),
                               dropout=params.adjust_dropout)
        student.head.load_state_dict(expert_parts(expert.state_dict())[1])
        return student

    def __init__(self, student: nn.Module, params: JEDIParams, ctx: DistillContext) -> None:
        super().__init__(student, params, ctx)
        manifest = _experts(ctx)
        self.entries = manifest["datasets"]
        self.names = [e["name"] for e in self.entries]
        self.widths = [int(e["feature_dim"]) for e in self.entries]
        self.num_classes = [len(e["classes"]) for e in self.entries]
        width = sum(self.widths)
        self.others = nn.ModuleDict()
        for i, entry in enumerate(self.entries):
            expert, _ = _load_expert(ctx.experts, entry)
            self.add_teacher(entry["name"], expert)  # frozen: its encoder makes the embeddings of a clip batch
            if i:
                self.others[entry["name"]] = self._student_for(params, entry, expert)
        self.ensembles = nn.ModuleDict({e["name"]: Ensemble(width, k, ensemble_dropout(k, width, params.ensemble_k))
                                        for e, k in zip(self.entries, self.num_classes)})
        sizes = [int(e["splits"]["train"]["clips"]) for e in self.entries]
        self.register_buffer("weights", dataset_weights(sizes, own_only=params.kd_data == "own"), persistent=False)
        self.epoch = 0
        self.eval_set: Any = None

    @property
    def students(self) -> list[nn.Module]:
        """M_0..M_{n-1} (M_0 = `self.student`, the product)."""
        return [self.student, *(self.others[n] for n in self.names[1:])]

    # --- data -----------------------------------------------------------------------------

    def train_dataset(self, default: Any) -> Any:
        """The experts' cached training embeddings of every dataset (`EmbeddingSet`), after checking that
        `default` (the distilled clips) is the main dataset the experts were built on."""
        from vidistill.data.multi import EmbeddingSet

        digest = getattr(default, "manifest", {}).get("hash")
        if digest and digest != self.entries[0].get("data_hash"):
            raise ConfigError(f"the experts in {self.ctx.experts} were built on other clips of the main dataset "
                              f"(data hash {self.entries[0].get('data_hash')!r}, these clips {digest!r}); rerun "
                              "`vidistill experts` on them")
        self.eval_set = EmbeddingSet(self.ctx.experts, "test")
        return EmbeddingSet(self.ctx.experts, "train")

    def setup(self, train_set: Any, *, epochs: int) -> None:
        """Eq. 2's sizes |D_i| are the clips of each dataset the loop trains on."""
        sizes = getattr(train_set, "sizes", None)
        if sizes is not None:
            self.weights = dataset_weights(sizes, own_only=self.params.kd_data == "own").to(self.weights.device)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    # --- the model ------------------------------------------------------------------------

    def embeddings(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(emb (B, D), dataset (B,))` of a batch: the cached embeddings, or for a clip batch of the main
        dataset (`rgb` `(B, 3, T, H, W)`) every frozen expert's embedding of it (no gradient)."""
        if "emb" in batch:
            return batch["emb"], batch["dataset"]
        with torch.no_grad():
            emb = torch.cat([self.teachers[n](batch["rgb"])[1] for n in self.names], dim=1)
        return emb, torch.zeros(emb.shape[0], dtype=torch.long, device=emb.device)

    def outputs(self, emb: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every student's and teacher's logits, `[(B, K_j)]` each, from embeddings `(B, D)`."""
        parts = emb.split(self.widths, dim=1)
        students, adjusted = zip(*(m(e) for m, e in zip(self.students, parts)))
        inputs = torch.cat(adjusted if self.params.ensemble_input == "adjusted" else parts, dim=1)  # (B, D)
        return list(students), [self.ensembles[n](inputs) for n in self.names]

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One step of eq. 1, averaged over the batch.

        Args:
            batch: cached embeddings (`EmbeddingSet`): `emb` `(B, D)`, `dataset` `(B,)` and `label` `(B,)`
                (in each clip's own dataset's label space); or clips of the main dataset: `rgb`
                `(B, 3, T, H, W)` in [0, 1] and `label` `(B,)` (the frozen experts embed them).

        Returns:
            `loss`; `logits`: each clip's own student's logits, `(B, K_0)` for clip batches, else
            `(B, max_i K_i)` padded with −inf; `ce` (α's term: the students' cross-entropy with
            `label_smoothing`), `hinge` (β's term), `kd` (γ·Σ_j w_ij·L_kd, exactly 0 during the burn-in) and
            `kd_div` (Σ_j w_ij·L_kd, the students' divergence from their teachers, logged in every epoch).
        """
        emb, ds = self.embeddings(batch)
        student_logits, teacher_logits = self.outputs(emb)
        label, b = batch["label"], emb.shape[0]
        ce = emb.new_zeros(())
        hinge = emb.new_zeros(())
        kd_div = emb.new_zeros(())
        for j, (s, t) in enumerate(zip(student_logits, teacher_logits)):
            own = (ds == j).float()  # (B,): the clips labelled for model j
            y = torch.where(ds == j, label, torch.zeros_like(label))  # a valid class everywhere, masked out
            ce = ce + self.ce(s, {"label": y}, weights=own)  # Σ_{clips of D_j} CE / B, with label smoothing
            margin = F.multi_margin_loss(t, y, p=1, margin=self.params.hinge_margin, reduction="none")
            hinge = hinge + (own * margin).sum() / b
            target = t.detach() if self.params.kd_detach_teacher else t
            kd_div = kd_div + (self.weights[ds, j] * soft_cross_entropy(s, target, self.params.temperature)).sum() / b
        on = self.epoch >= self.params.burn_in and self.params.gamma > 0
        kd = self.params.gamma * kd_div if on else emb.new_zeros(())
        loss = self.params.alpha * ce + self.params.beta * hinge + kd
        if "emb" in batch:
            logits = torch.full((b, max(self.num_classes)), float("-inf"), device=emb.device)
            for j, s in enumerate(student_logits):
                rows = ds == j
                logits[rows, : s.shape[1]] = s[rows].detach()
        else:
            logits = student_logits[0]
        return {"loss": loss, "logits": logits, "ce": ce, "hinge": hinge, "kd": kd, "kd_div": kd_div.detach()}

    # --- scoring and the product -----------------------------------------------------------

    @torch.no_grad()
    def scores(self, dataset: Any) -> dict[str, dict[str, np.ndarray]]:
        """Every student's and teacher's softmax probabilities on its own dataset's part of `dataset` (an
        `EmbeddingSet`), in eval mode: name -> `{"student", "teacher"}` `(N_i, K_i)`, `labels`, `video_ids`."""
        was = self.training
        self.eval()
        out = {}
        device = self.weights.device
        for i, name in enumerate(self.names):
            part = dataset.of(i)
            s, t = self.outputs(part["emb"].to(device))
            out[name] = {"student": s[i].softmax(1).cpu().numpy(), "teacher": t[i].softmax(1).cpu().numpy(),
                         "labels": part["label"].numpy(), "video_ids": part["video_id"].numpy()}
        self.train(was)
        return out

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Top-1 of every student and teacher on its own dataset's test split (of the experts folder):
        `<name>_student_top1`, `<name>_teacher_top1`."""
        if self.eval_set is None:
            return {}
        metrics = {}
        for name, s in self.scores(self.eval_set).items():
            for who in ("student", "teacher"):
                metrics[f"{name}_{who}_top1"] = float((s[who].argmax(1) == s["labels"]).mean())
        return metrics

    def export_model(self) -> nn.Module:
        """The main dataset's student as one `jedi_student` preset: the main expert's frozen encoder, the trained
        adjustment module and head. In eval mode it equals the cached-embedding path."""
        from vidistill.models import create_model

        expert = self.teachers[self.names[0]]
        hidden = self.student.adjust.hidden
        model = create_model("jedi_student", num_classes=self.num_classes[0], frames=self.ctx.frames, size=self.ctx.size,
                             base=expert.create_kwargs["name"], hidden=hidden, adjust_dropout=self.params.adjust_dropout)
        encoder, _ = expert_parts(expert.state_dict())
        model.encoder.load_state_dict(encoder)
        model.student.load_state_dict(self.student.state_dict())
        return model.to(self.weights.device).eval()
