"""Small R(2+1)D networks (Tran et al., "A Closer Look at Spatiotemporal Convolutions", CVPR 2018).

Every 3D convolution is factorised into a spatial `1 x k x k` convolution and a temporal `k x 1 x 1`
one with BN + ReLU between; the intermediate width follows the paper (sec. 3.5) so a (2+1)D block
has the parameter count of the full `k x k x k` convolution it replaces. Residual basic blocks,
global `AdaptiveAvgPool3d` (no pool sized from the input, so ONNX export stays shape-generic).
The same network takes RGB (3 channels) or TV-L1 flow (2 channels, T-1 steps) through its stem.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from vidistill.models.base import MODALITIES, Normalize, ZooModel
from vidistill.models.registry import register_model

NormLayer = Callable[[int], nn.Module]
Activation = Callable[[], nn.Module]
Stride = tuple[int, int, int]


def _mid_channels(in_ch: int, out_ch: int, k: int) -> int:
    # M = floor(t d^2 N_in N_out / (d^2 N_in + t N_out)), t = d = k (Tran et al. 2018, sec. 3.5)
    return (k * k * k * in_ch * out_ch) // (k * k * in_ch + k * out_ch)


class Conv2Plus1d(nn.Sequential):
    """`(B, C_in, T, H, W) -> (B, C_out, T/s_t, H/s_h, W/s_w)`: spatial conv, norm, act, temporal conv.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        stride: (temporal, height, width) stride.
        kernel: k of the `1 x k x k` and `k x 1 x 1` kernels.
        norm: builds the norm layer between the two convolutions from a channel count.
        activation: builds the activation between the two convolutions.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: Stride = (1, 1, 1), kernel: int = 3, norm: NormLayer, activation: Activation) -> None:
        mid = _mid_channels(in_ch, out_ch, kernel)
        p = kernel // 2
        super().__init__(
            nn.Conv3d(in_ch, mid, (1, kernel, kernel), stride=(1, stride[1], stride[2]), padding=(0, p, p), bias=False),
            norm(mid),
            activation(),
            nn.Conv3d(mid, out_ch, (kernel, 1, 1), stride=(stride[0], 1, 1), padding=(p, 0, 0), bias=False),
        )


class BasicBlock(nn.Module):
    """Residual block of two (2+1)D convolutions; a strided 1x1x1 projection when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: Stride, norm: NormLayer, activation: Activation) -> None:
        super().__init__()
        self.conv1 = Conv2Plus1d(in_ch, out_ch, stride=stride, norm=norm, activation=activation)
        self.norm1 = norm(out_ch)
        self.act1 = activation()
        self.conv2 = Conv2Plus1d(out_ch, out_ch, norm=norm, activation=activation)
        self.norm2 = norm(out_ch)
        self.act2 = activation()
        self.shortcut: nn.Module = nn.Identity()
        if stride != (1, 1, 1) or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False), norm(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act2(y + self.shortcut(x))


class R2Plus1d(ZooModel):
    """R(2+1)D classifier: normalise, stem, residual stages, global average pool, linear head.

    Built by `create_r2plus1d`; see there for the arguments.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        modality: str,
        frames: int,
        size: int,
        stem_width: int,
        widths: Sequence[int],
        depths: Sequence[int],
        strides: Sequence[Stride],
        dropout: float,
        norm: NormLayer,
        activation: Activation,
    ) -> None:
        super().__init__(num_classes=num_classes, modality=modality, input_kind="video", frames=frames, size=size, feature_dim=widths[-1])
        in_ch = 3 if modality == "rgb" else 2
        self.normalize = Normalize(modality=modality, spatial_dims=3)
        # stem: (B, C, T, S, S) -> (B, stem_width, T, S/2, S/2)
        self.stem = nn.Sequential(
            Conv2Plus1d(in_ch, stem_width, stride=(1, 2, 2), norm=norm, activation=activation),
            norm(stem_width),
            activation(),
        )
        stages: list[nn.Module] = []
        prev = stem_width
        for width, depth, stride in zip(widths, depths, strides, strict=True):
            blocks = [BasicBlock(prev if i == 0 else width, width, stride=stride if i == 0 else (1, 1, 1), norm=norm, activation=activation) for i in range(depth)]
            stages.append(nn.Sequential(*blocks))
            prev = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(prev, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's spatio-temporal feature map, before pooling (e.g. SAKD's DPP features, eq. 7).

        Args:
            x: RGB `(B, 3, T, H, W)` in [0, 1] or flow `(B, 2, T-1, H, W)` in pixels.

        Returns:
            `(B, D, T', H', W')`; its mean over `(T', H', W')` is the `features` of `forward`. For
            `r2plus1d_teacher` on 8×56×56 clips: `(B, 192, 2, 2, 2)`.
        """
        return self.stages(self.stem(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`x`: RGB `(B, 3, T, H, W)` in [0, 1] or flow `(B, 2, T-1, H, W)` in pixels.

        Returns:
            `(logits (B, K), features (B, D))`, features = pooled last-stage activations.
        """
        x = self.forward_map(x)  # (B, D, T', H', W')
        features = self.pool(x).flatten(1)  # (B, D)
        return self.head(self.dropout(features)), features


def create_r2plus1d(
    *,
    num_classes: int,
    modality: str = "rgb",
    frames: int = 8,
    size: int = 56,
    stem_width: int = 16,
    widths: Sequence[int] = (16, 32, 64),
    depths: Sequence[int] = (1, 1, 1),
    strides: Sequence[Stride] = ((1, 2, 2), (2, 2, 2), (2, 2, 2)),
    dropout: float = 0.0,
    norm: NormLayer = nn.BatchNorm3d,
    activation: Activation = nn.ReLU,
) -> R2Plus1d:
    """Build an R(2+1)D network.

    Args:
        num_classes: K.
        modality: "rgb" (3-channel input in [0, 1]) or "flow" (2-channel input in pixels).
        frames: T of the RGB clip (flow: T-1 steps).
        size: H = W of the input.
        stem_width: channels after the stem (which halves H and W).
        widths: channels of each residual stage; the last is the feature dimension D.
        depths: residual blocks per stage.
        strides: (t, h, w) stride of the first block of each stage.
        dropout: dropout before the linear head.
        norm: builds a normalisation layer from a channel count.
        activation: builds an activation layer.

    Returns:
        The model.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; choose one of: {', '.join(MODALITIES)}")
    if not (len(widths) == len(depths) == len(strides)) or not widths:
        raise ValueError(f"widths, depths and strides need one entry per stage, got {len(widths)}, {len(depths)}, {len(strides)}")
    if min(depths) < 1 or min(widths) < 1 or stem_width < 1:
        raise ValueError(f"widths, depths and stem_width must be >= 1, got widths={widths}, depths={depths}, stem_width={stem_width}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return R2Plus1d(
        num_classes=num_classes,
        modality=modality,
        frames=frames,
        size=size,
        stem_width=stem_width,
        widths=tuple(widths),
        depths=tuple(depths),
        strides=tuple(tuple(s) for s in strides),
        dropout=dropout,
        norm=norm,
        activation=activation,
    )


@register_model(modalities=("rgb", "flow"))
def r2plus1d_student(**kwargs) -> R2Plus1d:
    """Small, CPU-fast student: stem 16, stages 16-32-64, one block each (~0.2 M params)."""
    return create_r2plus1d(**{"stem_width": 16, "widths": (16, 32, 64), "depths": (1, 1, 1), **kwargs})


@register_model(modalities=("rgb", "flow"))
def r2plus1d_teacher(**kwargs) -> R2Plus1d:
    """Wider, deeper teacher (RGB or flow stream): stem 24, stages 24-48-96-192 with 1-2-2-1 blocks (~2.6 M params)."""
    return create_r2plus1d(
        **{
            "stem_width": 24,
            "widths": (24, 48, 96, 192),
            "depths": (1, 2, 2, 1),
            "strides": ((1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
            "dropout": 0.2,
            **kwargs,
        }
    )
