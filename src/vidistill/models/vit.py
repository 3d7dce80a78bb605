"""Tiny vision transformers: a video ViT with tubelet embedding (ViViT / VideoMAE style) and an image ViT.

Both expose `forward_tokens(x, mask=None, final_norm=True)` for masked feature distillation (MVD, Wang
et al. 2023): the boolean token mask (True = masked) drops tokens *before* the encoder, so the encoder
only sees the visible tokens, as in VideoMAE; `final_norm=False` gives the last block's tokens before
the final LayerNorm (MVD's teacher targets). Position embeddings are learned and sized for the given input,
so a model exports only at its fixed T and size (the batch stays dynamic).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vidistill.models.base import Normalize, ZooModel
from vidistill.models.registry import register_model

POOLS = ("mean", "cls", "fc_norm")


class Attention(nn.Module):
    """Multi-head self-attention `(B, N, D) -> (B, N, D)`."""

    def __init__(self, dim: int, *, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (3, B, h, N, D/h)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, h, N, D/h)
        return self.proj(y.transpose(1, 2).flatten(2))  # (B, N, D)


class Block(nn.Module):
    """Pre-norm transformer block: `x + attn(ln(x))`, then `x + mlp(ln(x))`."""

    def __init__(self, dim: int, *, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads=heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(ZooModel):
    """ViT over video tubelets (`patch` of 3 ints, Conv3d) or image patches (`patch` of 2 ints, Conv2d).

    Built by `create_vit`; see there for the arguments.

    Attributes:
        grid: the token grid, `(t, h, w)` for video and `(h, w)` for images; tokens are ordered
            row-major over it (time first).
        num_tokens: N, the product of `grid`.
    """

    def __init__(self, *, num_classes: int, frames: int, size: int, patch: tuple[int, ...], dim: int, depth: int, heads: int, mlp_ratio: float, pool: str) -> None:
        spatial_dims = len(patch)
        super().__init__(
            num_classes=num_classes, modality="rgb", input_kind="video" if spatial_dims == 3 else "image", frames=frames, size=size, feature_dim=dim
        )
        extent = (frames, size, size) if spatial_dims == 3 else (size, size)
        self.grid = tuple(e // p for e, p in zip(extent, patch, strict=True))
        self.num_tokens = math.prod(self.grid)
        self.pool_kind = pool
        self.normalize = Normalize(modality="rgb", spatial_dims=spatial_dims)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.patch_embed = conv(3, dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.blocks = nn.Sequential(*[Block(dim, heads=heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        # "fc_norm" (VideoMAE/MVD fine-tuning, `modeling_finetune.py`): no final per-token LayerNorm, a new one
        # after the mean pooling instead
        self.norm = nn.Identity() if pool == "fc_norm" else nn.LayerNorm(dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if pool == "fc_norm" else None
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer over the flattened patch (MAE)
        nn.init.zeros_(self.patch_embed.bias)

    def _encode(self, x: torch.Tensor, mask: torch.Tensor | None, *, final_norm: bool = True) -> torch.Tensor:
        """`x` -> encoder output `(B, [1 +] N_visible, D)` (the CLS token first if any), after the final
        LayerNorm unless `final_norm` is False."""
        tokens = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = tokens + self.pos_embed
        if mask is not None:
            tokens = self._drop_masked(tokens, mask)  # (B, N_visible, D)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = self.blocks(tokens)
        return self.norm(tokens) if final_norm else tokens

    def _drop_masked(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        if mask.dtype != torch.bool or tuple(mask.shape) != (b, n):
            raise ValueError(f"mask must be a bool tensor of shape (B, N) = ({b}, {n}) for grid {self.grid}, got {mask.dtype} {tuple(mask.shape)}")
        visible = (~mask).sum(dim=1)
        if not bool((visible == visible[0]).all()) or int(visible[0]) == 0:
            raise ValueError(f"every sample must keep the same number (>= 1) of visible tokens, got {visible.tolist()}; mask the same count per sample")
        return tokens[~mask].view(b, -1, d)  # keeps token order within each sample

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, final_norm: bool = True) -> torch.Tensor:
        """Per-token features of the (visible) tokens.

        Args:
            x: RGB in [0, 1], `(B, 3, T, H, W)` (video) or `(B, 3, H, W)` (image).
            mask: optional bool `(B, N)`, True = masked; masked tokens never reach the encoder. Each
                sample must keep the same number of visible tokens.
            final_norm: apply the encoder's final LayerNorm (True, as `forward` does). False returns the
                last block's output, which MVD's teachers give as targets (the authors' release,
                `modeling_teacher.py` / `modeling_video_teacher.py`, skip `self.norm`).

        Returns:
            `(B, N, D)` without a mask, `(B, N_visible, D)` with one, in grid order (no CLS token).
        """
        tokens = self._encode(x, mask, final_norm=final_norm)
        return tokens[:, 1:] if self.cls_token is not None else tokens

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(logits (B, K), features (B, D))`; features = CLS token or mean of tokens (then `fc_norm`
        with pool "fc_norm")."""
        tokens = self._encode(x, None)  # (B, [1 +] N, D)
        features = tokens[:, 0] if self.cls_token is not None else tokens.mean(dim=1)  # (B, D)
        if self.fc_norm is not None:
            features = self.fc_norm(features)
        return self.head(features), features


def create_vit(
    *,
    num_classes: int,
    frames: int = 8,
    size: int = 56,
    patch: tuple[int, ...] = (2, 8, 8),
    dim: int = 96,
    depth: int = 4,
    heads: int = 3,
    mlp_ratio: float = 4.0,
    pool: str = "mean",
) -> VisionTransformer:
    """Build a ViT; 3-int `patch` = video tubelets `(t, p, p)`, 2-int `patch` = image patches `(p, p)`.

    Args:
        num_classes: K.
        frames: T of the video clip (must be a multiple of the tubelet length; unused for images).
        size: H = W (must be a multiple of the patch size).
        patch: tubelet `(t, p, p)` or patch `(p, p)` size.
        dim: token width D (the feature dimension).
        depth: transformer blocks.
        heads: attention heads (must divide `dim`).
        mlp_ratio: MLP hidden width as a multiple of `dim`.
        pool: "mean" (the final LayerNorm on every token, then their mean), "fc_norm" (the mean of the last
            block's tokens, then a LayerNorm: VideoMAE's and MVD's fine-tuning, `use_mean_pooling`) or "cls" (a
            learned CLS token).

    Returns:
        The model.
    """
    if len(patch) not in (2, 3) or min(patch) < 1:
        raise ValueError(f"patch must be (t, p, p) for video or (p, p) for images with positive sizes, got {patch}")
    if size % patch[-1] or size % patch[-2]:
        raise ValueError(f"size {size} must be a multiple of the patch size {patch[-2:]}; pick a crop size divisible by it")
    if len(patch) == 3 and frames % patch[0]:
        raise ValueError(f"frames {frames} must be a multiple of the tubelet length {patch[0]}")
    if dim % heads or depth < 1:
        raise ValueError(f"heads ({heads}) must divide dim ({dim}) and depth ({depth}) must be >= 1")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    return VisionTransformer(num_classes=num_classes, frames=frames, size=size, patch=tuple(patch), dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, pool=pool)


@register_model
def vit_video_tiny(*, modality: str = "rgb", **kwargs) -> VisionTransformer:
    """Video ViT: tubelets 2x8x8, dim 96, 4 blocks, 3 heads, mean pooling (RGB only)."""
    assert modality == "rgb", modality  # the registry only routes "rgb" here
    return create_vit(**{"patch": (2, 8, 8), "dim": 96, "depth": 4, "heads": 3, "pool": "mean", **kwargs})


@register_model
def vit_image_tiny(*, modality: str = "rgb", **kwargs) -> VisionTransformer:
    """Image ViT over single frames `(B, 3, H, W)`: patches 8x8, dim 96, 4 blocks, 3 heads, CLS pooling."""
    assert modality == "rgb", modality  # the registry only routes "rgb" here
    return create_vit(**{"patch": (8, 8), "dim": 96, "depth": 4, "heads": 3, "pool": "cls", **kwargs})
