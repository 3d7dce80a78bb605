"""SAKD: Sample-level Adaptive Knowledge Distillation (Li, Ping, Wang & Song;
../shared/papers/sakd_sample_level_adaptive_kd.md), around Hinton KD (`kd_loss`).

Each selection round (every epoch, or every `select_every` epochs: the paper's "Ours*") runs a
no-grad scoring pass over all N training clips and then trains the epoch on round(r·N) of them:

1. The clips are *interrupted* (sec. III-C) at rate β(n) = 1 − (1 − n/N_epoch)^θ (eq. 4): while
   β < η, round(β·T) random frames of each clip are dropped (set to black, or the mean colour:
   `drop_fill`); once β ≥ η, round(η·B·T)
   random (clip, frame) slots of the scoring batch swap their contents, so frames move across clips
   of different actions.
2. The frozen teacher and the student (eval mode: parameters and BatchNorm statistics untouched)
   give L̃_i = τ²·KL(σ(t/τ) ‖ σ(s/τ)) on the interrupted clip (eq. 2), and the teacher's last
   spatio-temporal feature map F_i (before pooling).
3. Selection probability p_i = 1/(ω̂_i + ε) (eq. 5) from the selection counts ω; difficulty
   ζ_i = 1/(p_i·L̃_i) (eq. 3): a *larger* KD loss means an *easier* sample to transfer, the paper's
   stated direction; distillation strength α_i ← λ·α_i + (1 − λ)·β(n)/ζ_i (eq. 6); features
   F̃_i ← λ·F̃_i + (1 − λ)·F_i (eq. 7).
4. Greedy DPP MAP (Chen et al. 2018, `vidistill.distill.dpp`) picks A, |A| = round(r·N), maximising
   γ·Σ_A 1/ζ + (1 − γ)·ln det Λ_A with Λ = F̂F̂ᵀ (eq. 8); ω_i += 1 for i ∈ A.
5. The epoch trains on A only, on the *clean* clips, with (eq. 9)
   L = (1/|B|) Σ_j (1 − α_j)·CE_j + α_j·τ²·KL_j.

Readings taken where the paper is ambiguous (../shared/methods-brief.md sec. 1.4, checked against the
paper; all are the brief's recommended readings):

* n is 1-based (n = epoch + 1), so β ∈ (0, 1] as the paper states and β(N_epoch) = 1. "Ours*" uses
  β(n) of the selection epoch; between rounds the subset and α are reused (that is where its time
  saving comes from).
* Dropout zeros round(β·T) frames per clip ([0, 1] space, before the model's normalisation); with
  T = 8 the first epochs drop none. Shuffle permutes round(η·B·T) uniformly chosen (clip, frame)
  slots of the scoring batch; the scoring order is a fresh random permutation each round, so a batch
  mixes classes ("where there exist different actions").
* Interruption is for scoring only: eq. 3 uses L̃ (interrupted), eq. 9 uses L (no tilde), and
  Table II gives the frozen-model pass its own batch size. Training sees the clean clip.
* "The vector ω is normalised": ω̂ = ω / max(1, rounds done), the selection frequency, so
  p ∈ [1/(1 + ε), 1/ε].
* α must stay in (0, 1) (eq. 9), but τ²·KL is unbounded (τ² = 16). So 1/ζ is normalised by its
  maximum over the N samples each round, q = (1/ζ)/max(1/ζ) ∈ [0, 1], and q replaces 1/ζ in eq. 6 and
  eq. 8. Then α ≤ λ·α_prev + (1 − λ)·β < 1 from α_0 = 0 (a sample not yet scored, e.g. a forward
  before `setup`, has α = 0: cross-entropy only).
* γ is not given by the paper. Default 0.5: with q ∈ [0, 1] and L2-normalised feature rows
  (Λ_ii = 1, so every ln d_i² ≤ 0, "angles" between features in the paper) the two terms are on
  comparable scales; γ = 1 is top-k by q (no diversity). Λ gets a 1e-6·I jitter.
* F̃ starts at F on the first round; the feature map is the teacher's last stage before pooling
  (`forward_map`; the paper's Fig. 4 shows an intermediate block, but only as a visualisation).
* The paper's λ = 0.5 (sec. IV-B) is the default, although Table VIII's best is λ = 0.1.

The scale of α, the dropped frames' colour and the loss weights, stated and selectable (issue 26; the
authors' release is `mlvccn/SAKD_ActionRec`, `ucf101_slowfast_ac.py`, which departs from the paper text in
each of them; the defaults follow the paper text):

* `alpha_scale: paper` (default): q = (1/ζ)/max(1/ζ), α_0 = 0 and eq. 6 with β(n) from the first round.
  So α stays small: α ≤ β(n) and, with mean q ≈ 0.3 and N_epoch = 60, α ≈ 0.04 at epoch 10, 0.13 at 30
  and 0.29 at 60, ≈ 0.14 on average (methods review, SAKD-2), against `kd`'s fixed 0.5: SAKD trains
  mostly on cross-entropy. `alpha_scale: code` is the release's: q min-max normalised over the N samples
  (`(loss − min)/(max − min)`), and the first round sets α = q without β (`hisloss[idx] = sample.loss`
  when `i == 1`); later rounds follow eq. 6 with β(n) as ours (the release also uses n − 1 and clips β at
  0.5, and its λ is 0.1: set `lambda_: 0.1`). The release's α loop reads only its last scoring batch
  (a bug, review §3); ours updates every sample.
* `drop_fill: black` (default, our reading of "dropout frames"): a dropped frame is 0 in [0, 1] space,
  ≈ −1.8 after the models' normalisation. `drop_fill: mean`: the frame takes the normalisation's mean
  colour (`RGB_MEAN`), 0 after normalisation, as the release zeroes frames of normalised clips.
* `kd_weights: paper` (default): eq. 9, (1 − α)·CE + α·τ²·KL. `kd_weights: code`: the release's
  2·((1 − α)·0.1·CE + α·0.9·τ²·KL) (its vanilla-KD distiller weighs CE 0.1 and KD 0.9, and its training
  loss is `2*((1-diff)*ce_loss + diff*kd_loss)`). The release's vanilla KD alone, 0.1·CE + 0.9·KD, is
  `kd` with `alpha: 0.9` (and here `adaptive_alpha: false, alpha: 0.9` with `kd_weights: paper`).

Not in this version: feature KD (eq. 1; the headline rows are logit KD) and interrupting the
training clips. `selection: random` and `adaptive_alpha: false` (with a fixed `alpha`) give the
controls: random r·N per epoch + KD at fixed α is the same method with other params.

Distributed (torchrun): the scoring batches are dealt out to the ranks (batch b to rank b mod W;
each batch, and so its interruption, is the same as in a single process), the per-sample KD losses
and feature maps are summed over ranks (every sample is scored by one rank), every rank updates the
same per-sample state from them, and rank 0's selection is broadcast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vidistill.distill.base import Distiller, register_method, weighted_mean
from vidistill.distill.dpp import feature_kernel, greedy_map
from vidistill.distill.kd import kd_loss
from vidistill.errors import ConfigError
from vidistill.models.base import RGB_MEAN
from vidistill.train.artifacts import load_model
from vidistill.train.loop import scan, supervised_loss

SELECTIONS = ("dpp", "random")
ALPHA_SCALES = ("paper", "code")
DROP_FILLS = ("black", "mean")
KD_WEIGHTS = {"paper": (1.0, 1.0), "code": (0.2, 1.8)}  # (CE, KD) factors of eq. 9: the release's 2·(0.1, 0.9)


def round_half_up(x: float) -> int:
    """round(x) with halves rounded up (Python's `round` rounds halves to even)."""
    return int(math.floor(x + 0.5))


def interruption_rate(n: int, epochs: int, theta: float) -> float:
    """β(n) = 1 − (1 − n/N_epoch)^θ (eq. 4).

    Args:
        n: the epoch, 1-based (1 ≤ n ≤ N_epoch).
        epochs: N_epoch.
        theta: θ (0.9, after the poly learning-rate policy).

    Returns:
        β in (0, 1]; 1 at n = N_epoch.
    """
    return 1.0 - (1.0 - n / epochs) ** theta


def selection_probability(omega: torch.Tensor, rounds: int, eps: float) -> torch.Tensor:
    """p = 1/(ω̂ + ε) (eq. 5), with ω̂ = ω / max(1, rounds) the normalised selection count.

    Args:
        omega: `(N,)` how many rounds selected each sample.
        rounds: selection rounds done so far.
        eps: ε > 0.

    Returns:
        `(N,)` float64 p in [1/(1 + ε), 1/ε].
    """
    return 1.0 / (omega.double() / max(1, rounds) + eps)


def transfer_ease(kd_scores: torch.Tensor, p_sel: torch.Tensor, norm: str = "max") -> torch.Tensor:
    """q, the normalised 1/ζ with 1/ζ = p·L̃ (eq. 3, normalised to [0, 1], see the module docstring).

    Args:
        kd_scores: `(N,)` L̃, the KD loss τ²·KL of each interrupted clip (≥ 0).
        p_sel: `(N,)` selection probabilities (eq. 5).
        norm: "max": q = (1/ζ)/max(1/ζ) (ours, `alpha_scale: paper`); "minmax": q = (1/ζ − min)/(max − min)
            (the release's, `alpha_scale: code`).

    Returns:
        `(N,)` float64 q in [0, 1]; all zero when every 1/ζ is the same (minmax) or 0 (max).
    """
    inv_zeta = p_sel.double() * kd_scores.double()
    low = float(inv_zeta.min()) if norm == "minmax" else 0.0
    span = float(inv_zeta.max()) - low
    return (inv_zeta - low) / span if span > 0 else torch.zeros_like(inv_zeta)


def update_alpha(alpha: torch.Tensor, q: torch.Tensor, beta: float, lambda_: float, *, first: bool = False,
                 scale: str = "paper") -> torch.Tensor:
    """α_n = λ·α_{n−1} + (1 − λ)·β(n)·q (eq. 6, with 1/ζ normalised to q); with `scale="code"` the first round
    sets α = q instead (the release's `hisloss[idx] = sample.loss`).

    Args:
        alpha: `(N,)` α of the previous round (0 before the first).
        q: `(N,)` normalised 1/ζ in [0, 1].
        beta: β(n).
        lambda_: λ in [0, 1).
        first: this is the first selection round.
        scale: "paper" or "code" (`SAKDParams.alpha_scale`).

    Returns:
        `(N,)` α, same dtype as `alpha`, in [0, 1].
    """
    if first and scale == "code":
        return q.to(alpha.dtype).clone()
    return (lambda_ * alpha.double() + (1.0 - lambda_) * beta * q.double()).to(alpha.dtype)


def interrupt(rgb: torch.Tensor, beta: float, eta: float, generator: torch.Generator, *,
              fill: str = "black") -> torch.Tensor:
    """The dynamic temporal interruption of sec. III-C: frame dropout while β < η, else frame shuffling.

    Args:
        rgb: `(B, 3, T, H, W)` clips in [0, 1].
        beta: β(n), the interruption rate (eq. 4).
        eta: η, the threshold between the two modes.
        generator: CPU generator that draws the frames (same generator state, same interruption).
        fill: a dropped frame's colour: "black" (0 in [0, 1] space) or "mean" (`RGB_MEAN`, the models'
            normalisation mean, i.e. 0 after normalisation, as the release drops frames).

    Returns:
        A new `(B, 3, T, H, W)` tensor: while β < η, round(β·T) random frames of every clip take the `fill`
        colour; once β ≥ η, round(η·B·T) random (clip, frame) slots of the batch hold a random permutation
        of their own contents (frames cross clips).
    """
    b, c, t, h, w = rgb.shape
    if beta < eta:
        k = min(t, round_half_up(beta * t))
        out = rgb.clone()
        if k:
            drop = torch.rand(b, t, generator=generator).argsort(dim=1)[:, :k]  # (B, k)
            mask = torch.zeros(b, t, dtype=torch.bool).scatter_(1, drop, True).view(b, 1, t, 1, 1).to(rgb.device)
            colour = torch.tensor(RGB_MEAN if fill == "mean" else (0.0,) * c, dtype=rgb.dtype, device=rgb.device)
            out = torch.where(mask, colour.view(1, c, 1, 1, 1), out)
        return out
    k = min(b * t, round_half_up(eta * b * t))
    slots = torch.randperm(b * t, generator=generator)[:k]  # (k,) flat (clip, frame) positions
    sources = slots[torch.randperm(k, generator=generator)]  # (k,) where each slot's new frame comes from
    frames = rgb.transpose(1, 2).reshape(b * t, c, h, w)  # (B·T, 3, H, W), a copy
    out = frames.clone()
    out[slots.to(rgb.device)] = frames[sources.to(rgb.device)]
    return out.view(b, t, c, h, w).transpose(1, 2).contiguous()


def sakd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor,
              *, tau: float, label_smoothing: float = 0.0, weights: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Eq. 9 on a batch: (1/B) Σ_j w_ce·(1 − α_j)·CE_j + w_kd·α_j·τ²·KL(σ(t_j/τ) ‖ σ(s_j/τ)).

    Args:
        student_logits: `(B, K)`.
        teacher_logits: `(B, K)`.
        labels: `(B,)` int64.
        alpha: `(B,)` per-sample distillation strength in [0, 1].
        tau: τ > 0.
        label_smoothing: ε of the shared supervised term.
        weights: `(w_ce, w_kd)`: (1, 1) is eq. 9; `KD_WEIGHTS["code"]` = (0.2, 1.8) the release's.

    Returns:
        The scalar loss.
    """
    w_ce, w_kd = weights
    ce = supervised_loss(student_logits, labels, label_smoothing=label_smoothing, weights=w_ce * (1.0 - alpha))
    return ce + weighted_mean(kd_loss(student_logits, teacher_logits, tau), w_kd * alpha)


@dataclass
class SAKDParams:
    """SAKD hyperparameters; defaults are the paper's (sec. IV-B), γ is ours (see the module docstring).

    Attributes:
        tau: τ of the KD term (eq. 2), 4.
        r: selection ratio, round(r·N) samples train per epoch; 0.1 (UCF101, Kinetics-400).
        lambda_: λ of eq. 6 and eq. 7, in [0, 1); 0.5.
        eta: η, the interruption threshold between frame dropout and shuffling, in (0, 1]; 0.5.
        theta: θ of eq. 4 (> 0); 0.9.
        eps: ε of eq. 5 (> 0); 1.
        gamma: γ of eq. 8 in [0, 1]: weight of ease (1/ζ) against diversity (ln det); 0.5 (not given
            by the paper).
        select_every: a selection round every this many epochs: 1 ("Ours"), 5 ("Ours*").
        selection: "dpp" (eq. 8) or "random" (round(r·N) uniformly at random: the control).
        adaptive_alpha: per-sample α of eq. 6 (True) or the fixed `alpha` for every sample (False).
        alpha: the fixed α when `adaptive_alpha` is False (Hinton KD's 0.5).
        score_batch: clips per batch of the no-grad scoring pass (also the shuffling group).
        jitter: added to the DPP kernel's diagonal (≥ 0).
        alpha_scale: "paper" (q normalised by its maximum, α_0 = 0, eq. 6 from the first round) or "code"
            (the release's: min-max q, first round α = q); see the module docstring for the resulting scale.
        drop_fill: a dropped frame's colour in the scoring pass: "black" (our reading of the text) or
            "mean" (the normalisation's mean colour, the release's).
        kd_weights: "paper" (eq. 9) or "code" (the release's 2·((1 − α)·0.1·CE + α·0.9·KD)).
    """

    tau: float = 4.0
    r: float = 0.1
    lambda_: float = 0.5
    eta: float = 0.5
    theta: float = 0.9
    eps: float = 1.0
    gamma: float = 0.5
    select_every: int = 1
    selection: str = "dpp"
    adaptive_alpha: bool = True
    alpha: float = 0.5
    score_batch: int = 32
    jitter: float = 1e-6
    alpha_scale: str = "paper"
    drop_fill: str = "black"
    kd_weights: str = "paper"

    def validate(self) -> None:
        """Raises `ConfigError` naming the first bad hyperparameter."""
        key = "distill.methods.sakd."
        checks = [
            (self.tau > 0, f"{key}tau must be > 0, got {self.tau}"),
            (0 < self.r <= 1, f"{key}r must be in (0, 1], got {self.r}"),
            (0 <= self.lambda_ < 1, f"{key}lambda_ must be in [0, 1), got {self.lambda_}"),
            (0 < self.eta <= 1, f"{key}eta must be in (0, 1], got {self.eta}"),
            (self.theta > 0, f"{key}theta must be > 0, got {self.theta}"),
            (self.eps > 0, f"{key}eps must be > 0, got {self.eps}"),
            (0 <= self.gamma <= 1, f"{key}gamma must be in [0, 1], got {self.gamma}"),
            (self.select_every >= 1, f"{key}select_every must be >= 1, got {self.select_every}"),
            (self.selection in SELECTIONS, f"{key}selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}"),
            (0 <= self.alpha <= 1, f"{key}alpha must be in [0, 1], got {self.alpha}"),
            (self.score_batch >= 1, f"{key}score_batch must be >= 1, got {self.score_batch}"),
            (self.jitter >= 0, f"{key}jitter must be >= 0, got {self.jitter}"),
            (self.alpha_scale in ALPHA_SCALES, f"{key}alpha_scale must be one of {', '.join(ALPHA_SCALES)} (paper: the "
                                               f"paper text; code: the authors' release), got {self.alpha_scale!r}"),
            (self.drop_fill in DROP_FILLS, f"{key}drop_fill must be one of {', '.join(DROP_FILLS)} (black; mean: the "
                                           f"release's mean colour), got {self.drop_fill!r}"),
            (self.kd_weights in KD_WEIGHTS, f"{key}kd_weights must be one of {', '.join(KD_WEIGHTS)} (paper: eq. 9; code: "
                                            f"the release's 0.1 CE / 0.9 KD, times 2), got {self.kd_weights!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def _world() -> tuple[int, int]:
    """(world size, rank) of the process group `fit` started, or (1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


@register_method("sakd")
class SAKD(Distiller):
    """SAKD around Hinton KD from the RGB teacher (`teacher_rgb`), training on a selected subset per epoch.

    Per-sample state, in registered buffers (checkpointed, so `--resume` is bit-exact): `alpha` (N,)
    α of eq. 6, `omega` (N,) selection counts, `kd_score` (N,) L̃ of the last round, `features`
    (N, d) F̃ of eq. 7 (DPP selection only), `selected` (M,) the current subset, `selections` (E, M)
    the subset every epoch trained on (−1: not reached yet), `rounds` and the `seed` of the
    interruption and scoring order.
    """

    Params = SAKDParams
    needs = ("teacher_rgb",)
    bench_variants = ({}, {"select_every": 5},
                      {"selection": "random", "adaptive_alpha": False})

    def __init__(self, student: nn.Module, params: SAKDParams, ctx) -> None:
        super().__init__(student, params, ctx)
        teacher = self.add_teacher("rgb", load_model(ctx.teacher_rgb)[0])
        if params.selection == "dpp" and not (hasattr(teacher, "forward_map") and isinstance(getattr(teacher, "pool", None), nn.Module)):
            raise ConfigError(f"sakd's DPP selection needs the teacher's feature map before pooling (forward_map), "
                              f"which {type(teacher).__name__} lacks; use an R(2+1)D teacher (r2plus1d_teacher) "
                              "or distill.methods.sakd.selection=random")
        self.train_set = None
        self.epochs = 0
        for name, dtype in (("alpha", torch.float32), ("omega", torch.int64), ("kd_score", torch.float32),
                            ("features", torch.float32), ("selected", torch.int64), ("selections", torch.int64),
                            ("rounds", torch.int64), ("seed", torch.int64)):
            self.register_buffer(name, torch.zeros(0, dtype=dtype))

    # --- what the scoring pass needs ----------------------------------------------------------

    @property
    def needs_scores(self) -> bool:
        return self.params.selection == "dpp" or self.params.adaptive_alpha

    def _teacher(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher logits `(B, K)` and, for DPP selection, its feature map before pooling `(B, D, T', H', W')`
        (the input of its `pool`, i.e. `forward_map(x)`), from one forward."""
        teacher = self.teachers["rgb"]
        if self.params.selection != "dpp":
            return teacher(x)[0], None
        seen: dict[str, torch.Tensor] = {}
        handle = teacher.pool.register_forward_pre_hook(lambda _m, args: seen.__setitem__("map", args[0]))
        try:
            logits, _ = teacher(x)
        finally:
            handle.remove()
        return logits, seen["map"]

    # --- hooks --------------------------------------------------------------------------------

    def setup(self, train_set, *, epochs: int) -> None:
        """Allocate the per-sample state for the N clips of `train_set` (restored afterwards on `--resume`)."""
        n = len(train_set)
        self.train_set, self.epochs = train_set, epochs
        device = next(self.student.parameters()).device
        m = self.epoch_size(n)
        dim = 0
        if self.params.selection == "dpp":
            with torch.no_grad():
                dim = int(self.teachers["rgb"].forward_map(train_set[0]["rgb"][None].to(device))[0].numel())
        self.alpha = torch.zeros(n, device=device)
        self.omega = torch.zeros(n, dtype=torch.int64, device=device)
        self.kd_score = torch.zeros(n, device=device)
        self.features = torch.zeros(n, dim, device=device)
        self.selected = torch.arange(m, dtype=torch.int64, device=device)
        self.selections = torch.full((epochs, m), -1, dtype=torch.int64, device=device)
        self.rounds = torch.zeros((), dtype=torch.int64, device=device)
        self.seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64).to(device)  # the run's seed drives this draw

    def epoch_size(self, num_samples: int) -> int:
        """M = round(r·N), at least 1."""
        return max(1, round_half_up(self.params.r * num_samples))

    def beta(self, epoch: int) -> float:
        """β(n) of the round that chose epoch `epoch`'s samples (0-based epoch; n of the selection epoch)."""
        first = epoch - epoch % self.params.select_every
        return interruption_rate(first + 1, self.epochs, self.params.theta)

    @torch.no_grad()
    def score(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The scoring pass of round `epoch`: L̃ `(N,)` and the teacher's flattened feature maps `(N, d)`
        (`(N, 0)` without DPP) on the interrupted clips, with the student in eval mode, no gradients.

        Under torchrun each rank scores the batches b with b mod W = rank, and the results are summed
        over ranks.
        """
        n, device = len(self.train_set), self.alpha.device
        beta, p = self.beta(epoch), self.params
        order = torch.randperm(n, generator=_generator(int(self.seed), epoch, 0))
        batches = order.split(p.score_batch)
        world, rank = _world()
        kd = torch.zeros(n, device=device)
        feats = torch.zeros(n, self.features.shape[1], device=device)
        was_training = self.student.training
        self.student.eval()
        try:
            for b, idx in enumerate(batches):
                if b % world != rank:
                    continue
                batch = next(scan(self.train_set, batch_size=len(idx), indices=idx.tolist(), device=device))
                x = interrupt(batch["rgb"], beta, p.eta, _generator(int(self.seed), epoch, b + 1), fill=p.drop_fill)
                t_logits, fmap = self._teacher(x)
                s_logits, _ = self.student(x)
                rows = idx.to(device)
                kd[rows] = kd_loss(s_logits, t_logits, p.tau)
                if fmap is not None:
                    feats[rows] = fmap.flatten(1)
        finally:
            self.student.train(was_training)
        if world > 1:
            dist.all_reduce(kd)
            dist.all_reduce(feats)
        return kd, feats

    def on_epoch_start(self, epoch: int) -> None:
        """A selection round at epochs 0, s, 2s, ... (s = `select_every`); otherwise the subset is reused."""
        if self.train_set is None:  # a forward without `fit` (no training set): α stays 0
            return
        if epoch % self.params.select_every == 0:
            self._select(epoch)
        self.selections[epoch] = self.selected

    def _select(self, epoch: int) -> None:
        p, n, m = self.params, len(self.train_set), self.selected.numel()
        rounds = int(self.rounds)
        q = None
        if self.needs_scores:
            kd, feats = self.score(epoch)
            self.kd_score = kd
            q = transfer_ease(kd, selection_probability(self.omega, rounds, p.eps),
                              norm="minmax" if p.alpha_scale == "code" else "max")
            if p.adaptive_alpha:
                self.alpha = update_alpha(self.alpha, q, self.beta(epoch), p.lambda_, first=rounds == 0,
                                          scale=p.alpha_scale)
            if p.selection == "dpp":
                self.features = feats if rounds == 0 else p.lambda_ * self.features + (1 - p.lambda_) * feats
        if p.selection == "dpp":
            picks = greedy_map(feature_kernel(self.features, jitter=p.jitter), m, quality=q, gamma=p.gamma)
        else:
            picks = torch.randperm(n, generator=_generator(int(self.seed), epoch, 2**40))[:m]
        picks = picks.to(self.selected.device)
        world, _ = _world()
        if world > 1:  # one selection for every rank: rank 0's
            dist.broadcast(picks, src=0)
        self.selected = picks
        self.omega[picks] += 1
        self.rounds += 1

    def epoch_indices(self, epoch: int) -> torch.Tensor | None:
        """The round's selection, round(r·N) distinct indices."""
        return self.selected if self.train_set is not None else None

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """`beta` of the round, and with a scoring pass `kd_scored` (mean L̃ over N) and, with adaptive α,
        `alpha_selected` (mean α of the trained samples)."""
        if self.train_set is None:
            return {}
        out = {"beta": self.beta(epoch)}
        if self.needs_scores:
            out["kd_scored"] = float(self.kd_score.mean())
        if self.params.adaptive_alpha:
            out["alpha_selected"] = float(self.alpha[self.selected].mean())
        return out

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One step of eq. 9 on the clean clips of the selected samples.

        Args:
            batch: `rgb` `(B, 3, T, H, W)` in [0, 1] (student and teacher see the same, clean clip),
                `label` `(B,)` int64, `index` `(B,)` the samples' indices (for their α).

        Returns:
            `loss` (eq. 9, scalar), `logits` `(B, K)`, `ce` and `kd` (unweighted batch means, with label
            smoothing and τ²·KL) and `alpha` (the batch's mean α).
        """
        logits, _ = self.student(batch["rgb"])  # (B, K)
        with torch.no_grad():
            t_logits, _ = self.teachers["rgb"](batch["rgb"])  # (B, K)
        if not self.params.adaptive_alpha:
            alpha = torch.full((logits.shape[0],), self.params.alpha, device=logits.device)
        elif self.alpha.numel():
            alpha = self.alpha[batch["index"].to(self.alpha.device)]
        else:  # no per-sample state yet (a forward outside `fit`): α_0 = 0
            alpha = torch.zeros(logits.shape[0], device=logits.device)
        loss = sakd_loss(logits, t_logits, batch["label"], alpha, tau=self.params.tau,
                         label_smoothing=self.ctx.label_smoothing, weights=KD_WEIGHTS[self.params.kd_weights])
        ce = self.ce(logits, batch)
        kd = kd_loss(logits, t_logits, self.params.tau).mean()
        return {"loss": loss, "logits": logits, "ce": ce.detach(), "kd": kd.detach(), "alpha": alpha.mean()}
