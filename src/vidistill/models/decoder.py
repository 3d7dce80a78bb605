"""The shallow decoder of masked modelling, shared by the MAE/VideoMAE pixel decoders and MVD's two
feature decoders, and its fixed sin-cos position embeddings.

`MaskedDecoder` follows `PretrainVisionTransformerDecoder` and the decoder half of
`PretrainMaskedVideoStudent.forward` in the MVD release (`modeling_student.py` of
`ruiwang2021/mvd`), which is VideoMAE's decoder (`modeling_pretrain.py` of `MCG-NJU/VideoMAE`):

1. a Linear from the encoder width to the decoder width (`down_img` / `encoder_to_decoder`);
2. the visible tokens plus their fixed sin-cos position embeddings, followed by one learnable mask
   token plus the position embedding of each masked position;
3. transformer blocks of the encoder's type (MVD: 2, `--decoder_depth 2`);
4. LayerNorm and a Linear to the target width, applied to the masked positions only, which come out
   in grid order.

Position embeddings: 3-D grids use MVD's `get_3d_sincos_pos_embed` (`modeling_finetune.py`: a
quarter of the channels for time, three quarters for the 2-D spatial embedding); 2-D grids use MAE's
`get_2d_sincos_pos_embed` (`util/pos_embed.py` of `facebookresearch/mae`: half the channels per axis).
Both are built from the 1-D embedding [sin(p·ω), cos(p·ω)] with ω_i = 10000^(−i/(D/2)) (Vaswani et
al. 2017, sec. 3.5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vidistill.models.vit import Block


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """`(P,)` positions -> `(P, dim)` embedding [sin(p·ω), cos(p·ω)], ω_i = 10000^(−i/(dim/2)).

    Raises:
        ValueError: `dim` is odd.
    """
    if dim % 2:
        raise ValueError(f"a sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angles = positions.double()[:, None] * omega[None]  # (P, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_pos_embed(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """Fixed position embeddings of a token grid, row-major (time first): `(N, dim)`.

    Args:
        grid: `(h, w)` (MAE's 2-D embedding, dim/2 channels per axis) or `(t, h, w)` (MVD's 3-D
            embedding: dim/4 channels for t, then 3·dim/4 for the 2-D spatial embedding).
        dim: the embedding width D.

    Raises:
        ValueError: a grid of another rank, or a width the split leaves odd.
    """
    if len(grid) == 2:
        h, w = grid
        if dim % 4:
            raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        # MAE's order: the column coordinate's half first (its `np.meshgrid(grid_w, grid_h)`, "w goes first")
        return torch.cat([sincos_1d(cols.flatten(), dim // 2), sincos_1d(rows.flatten(), dim // 2)], dim=1)
    if len(grid) == 3:
        t, h, w = grid
        if dim % 16:
            raise ValueError(f"a 3-D sin-cos embedding needs a width divisible by 16, got {dim}")
        temporal = sincos_1d(torch.arange(t), dim // 4)  # (t, D/4)
        spatial = sincos_pos_embed((h, w), dim // 4 * 3)  # (h·w, 3D/4)
        return torch.cat([temporal[:, None].expand(t, h * w, -1), spatial[None].expand(t, h * w, -1)],
                         dim=2).reshape(t * h * w, dim)
    raise ValueError(f"sin-cos position embeddings are defined for (h, w) and (t, h, w) grids, got {grid}")


class MaskedDecoder(nn.Module):
    """Predicts a target for every masked token from the encoder's visible tokens.

    Args:
        enc_dim: width of the encoder's tokens.
        dec_dim: decoder width (MVD: the encoder's; `feat_decoder_embed_dim` defaults to it).
        depth: transformer blocks (MVD: 2).
        heads: attention heads (must divide `dec_dim`).
        out_dim: width of each prediction (pixels of a patch, or a teacher's token width).
        grid: the token grid, `(h, w)` or `(t, h, w)`; fixes the position embeddings.
        mlp_ratio: MLP hidden width as a multiple of `dec_dim`.

    Attributes:
        mask_token: `(1, 1, dec_dim)`, learnable, one per decoder.
        pos_embed: `(N, dec_dim)` fixed sin-cos buffer (not trained, not saved).
    """

    def __init__(self, *, enc_dim: int, dec_dim: int, depth: int, heads: int, out_dim: int, grid: tuple[int, ...],
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if depth < 1 or dec_dim % heads or out_dim < 1:
            raise ValueError(f"decoder needs depth >= 1, heads dividing its width and out_dim >= 1; got depth {depth}, "
                             f"dec_dim {dec_dim}, heads {heads}, out_dim {out_dim}")
        self.grid = tuple(grid)
        self.num_tokens = math.prod(self.grid)
        self.embed = nn.Linear(enc_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, dec_dim), persistent=False)
        self.blocks = nn.Sequential(*[Block(dec_dim, heads=heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.head = nn.Linear(dec_dim, out_dim)
        for m in self.modules():  # MVD/VideoMAE decoders: xavier-uniform linears, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, visible: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predictions at the masked positions.

        Args:
            visible: the encoder's visible tokens `(B, N_visible, enc_dim)`, in grid order (as
                `forward_tokens(x, mask)` returns them).
            mask: bool `(B, N)`, True = masked; N_visible = N − masked per sample.

        Returns:
            `(B, N_masked, out_dim)`: one prediction per masked position, in grid order.

        Raises:
            ValueError: a mask that does not fit the grid or the number of visible tokens.
        """
        b, n_vis, _ = visible.shape
        if tuple(mask.shape) != (b, self.num_tokens) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool (B, N) = ({b}, {self.num_tokens}), got {mask.dtype} {tuple(mask.shape)}")
        if int((~mask[0]).sum()) != n_vis:
            raise ValueError(f"{n_vis} visible tokens given but the mask leaves {int((~mask[0]).sum())} visible")
        x = self.embed(visible)  # (B, N_vis, D_d)
        d = x.shape[-1]
        pos = self.pos_embed.to(x.dtype).expand(b, -1, -1)  # (B, N, D_d)
        pos_visible = pos[~mask].view(b, n_vis, d)
        pos_masked = pos[mask].view(b, -1, d)  # (B, N_mask, D_d), grid order
        x = torch.cat([x + pos_visible, self.mask_token + pos_masked], dim=1)  # (B, N, D_d)
        x = self.blocks(x)
        n_masked = pos_masked.shape[1]
        return self.head(self.norm(x[:, -n_masked:]))  # (B, N_mask, out_dim)
