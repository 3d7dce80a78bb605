"""Greedy DPP MAP inference (`vidistill.distill.dpp`, Chen et al. 2018) against direct computations.

The incremental-Cholesky greedy must pick exactly what a naive greedy picks that evaluates
γ·Σq + (1 − γ)·logdet(Λ_A) for every candidate at every step; its set's objective, computed directly,
must match the sum of its greedy gains and never exceed the brute-force optimum over all subsets.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from vidistill.distill.dpp import dpp_objective, feature_kernel, greedy_map


def _naive_greedy(kernel: torch.Tensor, k: int, quality: torch.Tensor, gamma: float) -> list[int]:
    picks: list[int] = []
    for _ in range(k):
        best, best_i = -float("inf"), -1
        for i in range(kernel.shape[0]):
            if i in picks:
                continue
            value = dpp_objective(kernel, [*picks, i], quality=quality, gamma=gamma)
            if value > best:  # strict: the first maximum, as greedy_map
                best, best_i = value, i
        picks.append(best_i)
    return picks


def _random_problem(seed: int, n: int = 6, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g, dtype=torch.float64)
    quality = torch.rand(n, generator=g, dtype=torch.float64)
    return feature_kernel(features), quality


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("seed", range(5))
def test_greedy_equals_a_naive_greedy_on_random_6x6_kernels(seed, gamma):
    kernel, quality = _random_problem(seed)
    for k in (1, 3, 5):
        fast = greedy_map(kernel, k, quality=quality, gamma=gamma).tolist()
        assert fast == _naive_greedy(kernel, k, quality, gamma), (seed, gamma, k)


def test_the_naive_greedy_differs_from_top_k_so_the_comparison_can_fail():
    """On at least one of the random kernels above, diversity changes the picks (the test is not vacuous)."""
    differ = 0
    for seed in range(5):
        kernel, quality = _random_problem(seed)
        differ += greedy_map(kernel, 3, quality=quality, gamma=0.5).tolist() != torch.topk(quality, 3).indices.tolist()
    assert differ >= 1


@pytest.mark.parametrize("seed", range(5))
def test_gamma_one_is_top_k_by_quality(seed):
    kernel, quality = _random_problem(seed)
    picks = greedy_map(kernel, 3, quality=quality, gamma=1.0)
    assert picks.tolist() == torch.topk(quality, 3).indices.tolist()


@pytest.mark.parametrize("gamma", [0.01, 0.5, 0.99])  # γ = 0 ignores quality
def test_orthonormal_features_are_top_k_by_quality_for_any_gamma(gamma):
    quality = torch.tensor([0.1, 0.9, 0.4, 0.7, 0.2, 0.5], dtype=torch.float64)
    kernel = feature_kernel(torch.eye(6))  # Λ = (1 + jitter)·I: every log det term is the same
    assert greedy_map(kernel, 4, quality=quality, gamma=gamma).tolist() == [1, 3, 5, 2]


def test_a_duplicated_row_is_never_picked_while_an_independent_row_remains():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, generator=g, dtype=torch.float64)  # 4 independent rows in R^6
    features = torch.cat([base, base[:2]])  # rows 4 and 5 copy rows 0 and 1
    quality = torch.tensor([0.2, 0.3, 0.1, 0.1, 1.0, 1.0], dtype=torch.float64)  # the copies look best
    kernel = feature_kernel(features)
    picks = greedy_map(kernel, 4, quality=quality, gamma=0.5).tolist()
    # one copy of each pair may be picked, never both copies
    assert not ({0, 4} <= set(picks) or {1, 5} <= set(picks)), picks
    assert sorted(picks) == [2, 3, 4, 5], picks  # the copies' quality wins them their pair; 2 and 3 follow
    # a 5th pick has only duplicates left: then, and only then, a row whose twin is in A is taken
    five = greedy_map(kernel, 5, quality=quality, gamma=0.5).tolist()
    assert five[:4] == picks and five[4] in (0, 1)


def test_brute_force_over_all_3_subsets_agrees_on_the_objective_value():
    for seed in range(5):
        kernel, quality = _random_problem(seed)
        picks = greedy_map(kernel, 3, quality=quality, gamma=0.5)
        # the greedy's own accounting: Σ_t gain_t with ln det Λ_A = Σ_t ln d_t² (Cholesky)
        direct = dpp_objective(kernel, picks, quality=quality, gamma=0.5)
        chol = torch.linalg.cholesky(kernel[picks][:, picks])
        by_cholesky = 0.5 * float(quality[picks].sum()) + 0.5 * float((chol.diagonal() ** 2).log().sum())
        assert direct == pytest.approx(by_cholesky, rel=1e-10, abs=1e-10)
        values = {s: dpp_objective(kernel, s, quality=quality, gamma=0.5) for s in itertools.combinations(range(6), 3)}
        assert len(values) == 20
        assert direct == pytest.approx(values[tuple(sorted(picks.tolist()))], abs=1e-12)
        assert direct <= max(values.values()) + 1e-12


def test_feature_kernel_normalises_rows_and_adds_jitter():
    f = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    kernel = feature_kernel(f, jitter=0.5)
    assert kernel.dtype == torch.float64
    torch.testing.assert_close(kernel, torch.tensor([[1.5, 0.8], [0.8, 1.5]], dtype=torch.float64))


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0}, r"k must be in \[1, 6\]"),
    ({"k": 7}, r"k must be in \[1, 6\]"),
    ({"k": 2, "gamma": 1.5}, r"gamma must be in \[0, 1\]"),
    ({"k": 2, "quality": torch.ones(5)}, r"quality must have shape \(6,\)"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        greedy_map(torch.eye(6), **kwargs)
