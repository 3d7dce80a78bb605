"""What every model of the zoo shares: input conventions, normalisation inside the model, attributes.

Input conventions (the data contract):
- RGB video: float in [0, 1], `(B, 3, T, H, W)`; images: `(B, 3, H, W)`.
- Flow video: TV-L1 flow in pixels, `(B, 2, T-1, H, W)` (channel 0 horizontal, 1 vertical).
Normalisation happens inside the model (`Normalize`), so exported ONNX files take the same inputs.
"""

from __future__ import annotations

import torch
from torch import nn

MODALITIES = ("rgb", "flow")
INPUT_KINDS = ("video", "image")

# Kinetics-400 statistics of RGB in [0, 1] (as used by torchvision's video models).
RGB_MEAN = (0.43216, 0.394666, 0.37645)
RGB_STD = (0.22803, 0.22145, 0.216989)
# Flow is stored clipped to +-20 px (see the flow codec); the model divides by this bound.
FLOW_BOUND = 20.0


class Normalize(nn.Module):
    """`(x - mean) / std` per channel with constant buffers; RGB statistics or flow scaling by 1/20.

    Args:
        modality: "rgb" (Kinetics mean/std) or "flow" (mean 0, std `FLOW_BOUND`).
        spatial_dims: 3 for `(B, C, T, H, W)` inputs, 2 for `(B, C, H, W)`.
    """

    def __init__(self, *, modality: str, spatial_dims: int) -> None:
        super().__init__()
        if modality == "rgb":
            mean, std = RGB_MEAN, RGB_STD
        else:
            mean, std = (0.0, 0.0), (FLOW_BOUND, FLOW_BOUND)
        shape = (1, len(mean)) + (1,) * spatial_dims
        # constants of the architecture, not learned state: kept out of the state dict
        self.register_buffer("mean", torch.tensor(mean).view(shape), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std).view(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class ZooModel(nn.Module):
    """Base of every zoo model: the attributes export, serving and distillation rely on.

    Subclasses implement `forward(x) -> (logits (B, K), features (B, D))`.

    Attributes:
        num_classes: K, the number of output logits.
        modality: "rgb" or "flow".
        input_kind: "video" (`(B, C, T, H, W)`) or "image" (`(B, C, H, W)`).
        frames: T of the RGB clip the model is built for (flow inputs have T-1 frames).
        size: H = W of the input.
        feature_dim: D, the width of the returned features.
        create_kwargs: the `create_model` arguments that rebuild this model (set by `create_model`).
    """

    def __init__(self, *, num_classes: int, modality: str, input_kind: str, frames: int, size: int, feature_dim: int) -> None:
        super().__init__()
        assert modality in MODALITIES and input_kind in INPUT_KINDS, (modality, input_kind)
        self.num_classes = num_classes
        self.modality = modality
        self.input_kind = input_kind
        self.frames = frames
        self.size = size
        self.feature_dim = feature_dim
        self.create_kwargs: dict = {}

    def example_input(self, batch: int = 2) -> torch.Tensor:
        """A random input of the right shape and range: RGB in [0, 1], flow in pixels (a few px).

        Args:
            batch: number of samples B.

        Returns:
            `(B, *input_shape(self))` float32 on the model's device.
        """
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        device = next(self.parameters()).device
        shape = (batch, *input_shape(self))
        if self.modality == "flow":
            return torch.randn(shape, device=device) * 3.0
        return torch.rand(shape, device=device)


def input_shape(model: nn.Module) -> tuple[int, ...]:
    """The input shape of a zoo model without the batch axis.

    Args:
        model: a model from `create_model` (needs `input_kind`, `modality`, `frames`, `size`).

    Returns:
        `(3, T, S, S)` for RGB video, `(2, T-1, S, S)` for flow, `(3, S, S)` for images.
    """
    missing = [a for a in ("input_kind", "modality", "frames", "size") if not hasattr(model, a)]
    if missing:
        raise ValueError(f"{type(model).__name__} lacks {', '.join(missing)}; build it with vidistill.models.create_model")
    size = model.size
    if model.input_kind == "image":
        return (3, size, size)
    if model.modality == "flow":
        return (2, model.frames - 1, size, size)
    return (3, model.frames, size, size)
