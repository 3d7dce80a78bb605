"""Greedy MAP inference for a determinantal point process with a per-item quality term.

Chen, Zhang & Zhou, "Fast Greedy MAP Inference for Determinantal Point Process to Improve
Recommendation Diversity", NeurIPS 2018, Algorithm 1: the greedy algorithm that grows the selected
set A one item at a time and keeps the Cholesky factor of the kernel's submatrix Λ_A up to date
incrementally, so each step costs O(N·|A|) instead of a log-determinant per candidate.

SAKD (Li et al., eq. 8) selects the training subset with it, maximising

    f(A) = γ · Σ_{j ∈ A} q_j + (1 − γ) · ln det(Λ_A)

under |A| = k. With the Cholesky factorisation Λ_A = C Cᵀ built in the greedy order, ln det(Λ_A) =
Σ_t ln d_t², where d_t² is the residual variance of the t-th pick given the earlier ones; adding
item i to A therefore raises f by γ·q_i + (1 − γ)·ln d_i², and Algorithm 1 keeps d_i² for every
candidate. (Eq. 8's − ln det(Λ + I) is a constant and is left out.) This module is not a sampler:
it returns the greedy approximation of the most likely set, as the paper uses it.

The kernel itself is built by `feature_kernel`: L2-normalised feature rows (the paper compares the
angles between feature vectors) plus a small jitter on the diagonal, so that Λ_A stays positive
definite when two items have identical features or the feature dimension is below k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# d_i² is clamped here before the log: a candidate whose features lie in the span of the picks has
# d_i² = 0 in exact arithmetic (−inf gain), a rounding error may make it slightly negative.
_MIN_RESIDUAL = 1e-300


def feature_kernel(features: torch.Tensor, *, jitter: float = 1e-6) -> torch.Tensor:
    """The DPP kernel Λ = F̂ F̂ᵀ + jitter · I of SAKD eq. 8, from L2-normalised feature rows.

    Args:
        features: `(N, d)` one flattened feature vector per item (SAKD: the EMA of the teacher's
            spatio-temporal feature map, eq. 7).
        jitter: added to the diagonal (≥ 0), keeps Λ_A positive definite for duplicate rows or d < |A|.

    Returns:
        `(N, N)` float64 symmetric positive semi-definite kernel with diagonal 1 + jitter (0 + jitter for
        an all-zero row).

    Raises:
        ValueError: `features` is not 2-D or `jitter` is negative.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {tuple(features.shape)}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    f = torch.nn.functional.normalize(features.double(), dim=1)  # (N, d), unit rows
    kernel = f @ f.T  # (N, N)
    kernel.diagonal().add_(jitter)
    return kernel


def greedy_map(kernel: torch.Tensor, k: int, *, quality: torch.Tensor | None = None, gamma: float = 0.0) -> torch.Tensor:
    """Greedy MAP of γ·Σ_{A} q + (1 − γ)·ln det(Λ_A) over sets of size k (Chen et al. 2018, Algorithm 1).

    At every step the candidate with the largest gain γ·q_i + (1 − γ)·ln d_i² joins A (ties: the
    lowest index), then every remaining candidate's Cholesky row and residual are updated:
    e_i = (Λ_{j,i} − ⟨c_j, c_i⟩) / d_j, c_i ← [c_i, e_i], d_i² ← d_i² − e_i² (Algorithm 1, lines 5-7).

    Args:
        kernel: `(N, N)` symmetric positive semi-definite Λ (see `feature_kernel`).
        k: |A|, the number of items to pick, 1 ≤ k ≤ N.
        quality: `(N,)` per-item quality q (SAKD: the normalised 1/ζ of eq. 3); None = zeros.
        gamma: γ in [0, 1]: 1 = top-k by quality, 0 = plain diversity (log-determinant) MAP.

    Returns:
        `(k,)` int64 indices into the N items, in the order they were picked.

    Raises:
        ValueError: a non-square kernel, a quality vector of another length, k outside [1, N] or γ
            outside [0, 1].
    """
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be square (N, N), got shape {tuple(kernel.shape)}")
    n = kernel.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of items), got {k}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    lam = kernel.double()
    q = torch.zeros(n, dtype=torch.float64, device=lam.device) if quality is None else quality.double().to(lam.device)
    if q.shape != (n,):
        raise ValueError(f"quality must have shape ({n},), got {tuple(q.shape)}")
    chol = torch.zeros(k, n, dtype=torch.float64, device=lam.device)  # row t: the t-th Cholesky column, all items
    d2 = lam.diagonal().clone()  # (N,) residual variance of each item given the picks so far
    taken = torch.zeros(n, dtype=torch.bool, device=lam.device)
    picks: list[int] = []
    for t in range(k):
        gain = gamma * q
        if gamma < 1.0:
            gain = gain + (1.0 - gamma) * d2.clamp_min(_MIN_RESIDUAL).log()
        j = int(gain.masked_fill(taken, -torch.inf).argmax())  # first maximum on ties
        picks.append(j)
        taken[j] = True
        if t == k - 1:
            break
        dj = d2[j].clamp_min(_MIN_RESIDUAL).sqrt()
        e = (lam[j] - chol[:t].T @ chol[:t, j]) / dj  # (N,)
        chol[t] = e
        d2 = d2 - e * e
    return torch.tensor(picks, dtype=torch.int64)


def dpp_objective(kernel: torch.Tensor, indices: Sequence[int] | torch.Tensor, *, quality: torch.Tensor | None = None,
                  gamma: float = 0.0) -> float:
    """γ·Σ_{j ∈ A} q_j + (1 − γ)·ln det(Λ_A), computed directly (`torch.logdet`), for checking a selection.

    Args:
        kernel: `(N, N)` Λ.
        indices: the set A (k distinct item indices).
        quality: `(N,)` q; None = zeros.
        gamma: γ in [0, 1].

    Returns:
        The objective value (−inf when Λ_A is singular and γ < 1).
    """
    idx = torch.as_tensor(list(map(int, indices)), dtype=torch.int64)
    value = 0.0
    if quality is not None:
        value += gamma * float(quality.double()[idx].sum())
    if gamma < 1.0:
        value += (1.0 - gamma) * float(torch.logdet(kernel.double()[idx][:, idx]))
    return value
