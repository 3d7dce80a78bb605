"""Model zoo: small R(2+1)D CNNs (RGB or flow input) and tiny video/image ViTs, as named presets.

    from vidistill.models import create_model, list_models
    model = create_model("r2plus1d_student", num_classes=10, frames=8, size=56, modality="rgb")
    logits, features = model(model.example_input(batch=2))  # (2, 10), (2, model.feature_dim)

Every model takes RGB in [0, 1] `(B, 3, T, H, W)` (images: `(B, 3, H, W)`) or flow in pixels
`(B, 2, T-1, H, W)`, normalises inside, and returns `(logits (B, K), features (B, D))`.
"""

from vidistill.models import jedi, r2plus1d, vit  # noqa: F401  (importing registers the presets)
from vidistill.models.base import FLOW_BOUND, MODALITIES, RGB_MEAN, RGB_STD, Normalize, ZooModel, input_shape
from vidistill.models.r2plus1d import R2Plus1d, create_r2plus1d
from vidistill.models.registry import create_model, list_models, model_modalities, register_model
from vidistill.models.vit import VisionTransformer, create_vit

__all__ = [
    "FLOW_BOUND",
    "MODALITIES",
    "RGB_MEAN",
    "RGB_STD",
    "Normalize",
    "R2Plus1d",
    "VisionTransformer",
    "ZooModel",
    "create_model",
    "create_r2plus1d",
    "create_vit",
    "input_shape",
    "list_models",
    "model_modalities",
    "register_model",
]
