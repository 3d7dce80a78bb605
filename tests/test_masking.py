"""Mask generators (`vidistill.models.masking`) and the shared `MaskedDecoder` with its sin-cos position embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidistill.models import create_model
from vidistill.models.decoder import MaskedDecoder, sincos_pos_embed
from vidistill.models.masking import masked_per_sample, random_mask, tube_mask


def test_tube_mask_is_one_2d_mask_repeated_over_time_with_int_ratio_hw_masked_per_slice():
    t, h, w = 4, 7, 7  # vit_video_tiny on 8x56x56 clips
    mask = tube_mask(16, (t, h, w), 0.9, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (16, t * h * w)
    slices = mask.view(16, t, h * w)
    assert torch.equal(slices, slices[:, :1].expand_as(slices)), "the mask differs between time slices"
    assert (slices.sum(dim=2) == int(0.9 * h * w)).all() and int(0.9 * h * w) == 44  # 44 of 49 per slice
    assert masked_per_sample(mask) == 4 * 44
    assert len({tuple(m.tolist()) for m in slices[:, 0]}) > 1, "every sample got the same mask"


def test_random_mask_masks_int_ratio_n_per_sample_independently_of_position():
    mask = random_mask(4000, 49, 0.75, generator=torch.Generator().manual_seed(1))
    assert (mask.sum(dim=1) == int(0.75 * 49)).all()
    freq = mask.float().mean(dim=0)  # every position is masked with probability 36/49 = 0.735
    assert float((freq - 36 / 49).abs().max()) < 0.04


def test_masks_are_reproducible_from_a_generator_and_refuse_degenerate_ratios():
    a = tube_mask(3, (2, 4, 4), 0.9, generator=torch.Generator().manual_seed(5))
    b = tube_mask(3, (2, 4, 4), 0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="masks 0 of the 16 tokens"):
        tube_mask(1, (2, 4, 4), 0.05)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        random_mask(1, 16, 1.0)
    with pytest.raises(ValueError, match="same number"):
        masked_per_sample(torch.tensor([[True, False], [True, True]]))


def _release_1d(dim, pos):  # MVD `get_1d_sincos_pos_embed_from_grid` (modeling_finetune.py), numpy
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _release_3d(dim, grid_size, t_size):  # MVD `get_3d_sincos_pos_embed`, numpy
    spatial_dim, temporal_dim = dim // 4 * 3, dim // 4
    g = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)), axis=0)
    spatial = np.concatenate([_release_1d(spatial_dim // 2, g[0]), _release_1d(spatial_dim // 2, g[1])], axis=1)
    temporal = _release_1d(temporal_dim, np.arange(t_size, dtype=np.float32))
    temporal = np.repeat(temporal[:, None], grid_size ** 2, axis=1)
    spatial = np.repeat(spatial[None], t_size, axis=0)
    return np.concatenate([temporal, spatial], axis=-1).reshape(-1, dim)


def test_sincos_position_embeddings_equal_the_release_formula():
    ours = sincos_pos_embed((4, 7, 7), 96)
    assert ours.shape == (196, 96)
    np.testing.assert_allclose(ours.numpy(), _release_3d(96, 7, 4), atol=1e-6)
    assert len({tuple(r) for r in ours.round(decimals=5).tolist()}) == 196  # every position distinct
    two_d = sincos_pos_embed((7, 7), 96)  # MAE: the 2-D embedding is the spatial part with all channels
    g = np.stack(np.meshgrid(np.arange(7.0), np.arange(7.0)), axis=0)
    np.testing.assert_allclose(two_d.numpy(), np.concatenate([_release_1d(48, g[0]), _release_1d(48, g[1])], 1), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 16"):
        sincos_pos_embed((2, 2, 2), 40)


def _decoder(seed=0, **kw):
    torch.manual_seed(seed)
    return MaskedDecoder(enc_dim=96, dec_dim=96, depth=2, heads=3, out_dim=kw.pop("out_dim", 10), grid=(2, 4, 4), **kw)


def test_decoder_predicts_the_masked_positions_in_grid_order_from_the_visible_tokens():
    dec = _decoder().eval()
    mask = tube_mask(3, (2, 4, 4), 0.75, generator=torch.Generator().manual_seed(0))  # 12 of 16 per slice
    visible = torch.randn(3, 8, 96)
    out = dec(visible, mask)
    assert out.shape == (3, 24, 10)
    # the mask token at position p carries p's embedding: swapping two masked positions' embeddings swaps their outputs
    pos = dec.pos_embed.clone()
    masked = mask[0].nonzero().flatten()
    i, j = int(masked[0]), int(masked[1])
    dec.pos_embed[[i, j]] = pos[[j, i]]
    swapped = dec(visible, mask)
    torch.testing.assert_close(swapped[0, [0, 1]], out[0, [1, 0]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="visible"):
        dec(visible[:, :7], mask)


def test_decoder_holds_a_learnable_mask_token_fixed_embeddings_and_only_trains_the_rest():
    dec = _decoder()
    names = {n for n, _ in dec.named_parameters()}
    assert "mask_token" in names and "pos_embed" not in names and "pos_embed" not in dec.state_dict()
    assert len([m for m in dec.blocks]) == 2
    vit = create_model("vit_video_tiny", num_classes=3, frames=4, size=32)
    assert type(dec.blocks[0]) is type(vit.blocks[0])  # blocks of the encoder's type (MVD sec. 3.3)
