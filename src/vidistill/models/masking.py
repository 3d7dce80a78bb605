"""Token masks for masked modelling: random patch masking (MAE) and tube masking (VideoMAE, MVD).

A mask is a bool tensor `(B, N)` over a model's token grid in row-major order (time first), True =
masked. Every sample masks the same number of tokens, so the visible tokens of a batch stack into
`(B, N_visible, D)` (what `VisionTransformer.forward_tokens(x, mask)` requires).

Sources:
* random masking: MAE (He et al., CVPR 2022), sec. 3 "Masking"; ratio 0.75 (`main_pretrain.py`,
  `--mask_ratio 0.75`); int(ratio·N) tokens masked (`RandomMaskingGenerator` of the VideoMAE and
  MVD releases, `masking_generator.py`).
* tube masking: VideoMAE (Tong et al., NeurIPS 2022), sec. 3.3, and MVD (Wang et al., CVPR 2023),
  sec. 3.3 "Mask strategy": one random 2-D mask of int(ratio·h·w) tokens, repeated over all t time
  slices (`TubeMaskingGenerator`, `masking_generator.py` of `ruiwang2021/mvd`); ratio 0.9
  (`--mask_type tube --mask_ratio 0.9`, `scripts/*/pretrain_mvd_*.sh`).
"""

from __future__ import annotations

import torch


def _masked_count(ratio: float, n: int, what: str) -> int:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    k = int(ratio * n)
    if k < 1 or k >= n:
        raise ValueError(f"mask ratio {ratio} masks {k} of the {n} tokens of {what}; at least one token must be "
                         "masked and one visible: pick another ratio")
    return k


def _random_rows(batch: int, n: int, k: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """`(batch, n)` bool with exactly `k` True per row at uniformly random positions."""
    noise = torch.rand(batch, n, generator=generator)  # on the CPU: the same masks on every device for a seed
    ranks = noise.argsort(dim=1).argsort(dim=1)  # the rank of each position's noise
    return (ranks < k).to(device)


def random_mask(batch: int, num_tokens: int, ratio: float, *, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """MAE's random patch masking: int(ratio·N) of the N tokens masked per sample, independently.

    Args:
        batch: B.
        num_tokens: N.
        ratio: the masked fraction, in (0, 1) (MAE: 0.75).
        generator: random source (default: torch's global one).
        device: where the mask goes.

    Returns:
        Bool `(B, N)`, True = masked.

    Raises:
        ValueError: the ratio leaves no masked or no visible token.
    """
    k = _masked_count(ratio, num_tokens, f"{num_tokens} tokens")
    return _random_rows(batch, num_tokens, k, generator, device)


def tube_mask(batch: int, grid: tuple[int, int, int], ratio: float, *, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Tube masking: one random 2-D mask of int(ratio·h·w) tokens per sample, the same in every time slice.

    Args:
        batch: B.
        grid: the token grid `(t, h, w)` (time slices of tubelets, rows, columns).
        ratio: the masked fraction of each slice, in (0, 1) (VideoMAE/MVD: 0.9).
        generator: random source (default: torch's global one).
        device: where the mask goes.

    Returns:
        Bool `(B, t·h·w)`, True = masked; `mask.view(B, t, h·w)` is identical along t.

    Raises:
        ValueError: a grid that is not 3-D, or a ratio that leaves no masked or no visible token per slice.
    """
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"tube masking needs a (t, h, w) token grid of positive sizes, got {grid}")
    t, h, w = grid
    k = _masked_count(ratio, h * w, f"a {h}x{w} time slice")
    slice_mask = _random_rows(batch, h * w, k, generator, device)  # (B, h·w)
    return slice_mask.unsqueeze(1).expand(batch, t, h * w).reshape(batch, t * h * w)


def masked_per_sample(mask: torch.Tensor) -> int:
    """The number of masked tokens of every sample of a `(B, N)` mask (the same for all, checked)."""
    counts = mask.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"every sample must mask the same number of tokens, got {counts.tolist()}")
    return int(counts[0])

