"""Model zoo: every registered preset x modality is built, run forward/backward and exported to ONNX.

In the spirit of timm's tests/test_models.py: the cases follow the registry, so a new preset is
tested without touching this file.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vidistill.models import (
    FLOW_BOUND,
    RGB_MEAN,
    create_model,
    input_shape,
    list_models,
    model_modalities,
    register_model,
)

NUM_CLASSES = 5
CASES = [(name, modality) for name in list_models() for modality in model_modalities(name)]
IDS = [f"{name}-{modality}" for name, modality in CASES]
VIT_NAMES = [name for name in list_models() if name.startswith("vit_")]
# ONNX export takes 5-20 s per model on 2 cores; the default run exports what the pipeline ships
# (RGB students, the MVD ViTs); the others (teachers, flow streams) run with `-m slow`.
EXPORT_FAST = {("r2plus1d_student", "rgb"), ("vit_video_tiny", "rgb"), ("vit_image_tiny", "rgb")}
EXPORT_CASES = [
    pytest.param(name, modality, id=f"{name}-{modality}", marks=() if (name, modality) in EXPORT_FAST else pytest.mark.slow)
    for name, modality in CASES
]


def _build(name: str, modality: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A preset in eval mode whose BN running statistics moved off their init with one training batch."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=NUM_CLASSES, modality=modality, **kwargs)
    model.train()
    with torch.no_grad():
        model(model.example_input(batch=2))
    return model.eval()


def test_required_presets_are_registered():
    names = list_models()
    for required in ("r2plus1d_student", "r2plus1d_teacher", "vit_video_tiny", "vit_image_tiny"):
        assert required in names
    assert model_modalities("r2plus1d_student") == ("rgb", "flow")
    assert model_modalities("r2plus1d_teacher") == ("rgb", "flow")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'") as info:
        create_model("resnet9000", num_classes=3)
    for name in list_models():
        assert name in str(info.value)


@pytest.mark.parametrize("modality", ["depth", "RGB", ""])
def test_unknown_modality_is_refused(modality):
    with pytest.raises(ValueError, match="unknown modality"):
        create_model("r2plus1d_student", num_classes=3, modality=modality)


def test_unsupported_modality_is_refused():
    with pytest.raises(ValueError, match="does not take modality 'flow'"):
        create_model("vit_video_tiny", num_classes=3, modality="flow")


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("r2plus1d_student", {"num_classes": 0}, "num_classes"),
        ("r2plus1d_student", {"num_classes": 3, "frames": 1, "modality": "flow"}, "frames"),
        ("r2plus1d_student", {"num_classes": 3, "size": 4}, "size"),
        ("r2plus1d_student", {"num_classes": 3, "widths": (8, 16), "depths": (1,)}, "one entry per stage"),
        ("r2plus1d_student", {"num_classes": 3, "dropout": 1.5}, "dropout"),
        ("vit_video_tiny", {"num_classes": 3, "frames": 7}, "tubelet"),
        ("vit_video_tiny", {"num_classes": 3, "size": 60}, "multiple of the patch"),
        ("vit_image_tiny", {"num_classes": 3, "pool": "max"}, "pool"),
        ("vit_image_tiny", {"num_classes": 3, "heads": 5}, "divide"),
    ],
)
def test_bad_arguments_are_refused(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(name, **kwargs)


def test_duplicate_registration_is_refused():
    def r2plus1d_student(**kwargs):  # same name as a registered preset
        raise AssertionError("never built")

    before = list_models()
    with pytest.raises(ValueError, match="'r2plus1d_student' is already registered"):
        register_model(r2plus1d_student)
    with pytest.raises(ValueError, match="modalities"):
        register_model(modalities=("rgb", "depth"))
    assert list_models() == before


@pytest.mark.parametrize(("name", "modality"), CASES, ids=IDS)
def test_forward_shapes_and_attributes(name, modality):
    model = _build(name, modality)
    x = model.example_input(batch=2)
    assert tuple(x.shape[1:]) == input_shape(model)
    if model.input_kind == "image":
        assert input_shape(model) == (3, 56, 56)
    elif modality == "flow":
        assert input_shape(model) == (2, 7, 56, 56)
    else:
        assert input_shape(model) == (3, 8, 56, 56)
    logits, features = model(x)
    assert logits.shape == (2, NUM_CLASSES) and features.shape == (2, model.feature_dim)
    assert model.num_classes == NUM_CLASSES and model.modality == modality
    assert model.input_kind in ("video", "image")
    assert torch.isfinite(logits).all() and torch.isfinite(features).all()


@pytest.mark.parametrize(("name", "modality"), CASES, ids=IDS)
def test_backward_reaches_every_parameter(name, modality):
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, modality=modality).train()
    logits, features = model(model.example_input(batch=2))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])) + features.pow(2).mean()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient (unused parameter?)"


@pytest.mark.parametrize(("name", "modality"), CASES, ids=IDS)
def test_eval_is_deterministic_and_batch_independent(name, modality):
    model = _build(name, modality)
    x = model.example_input(batch=2)
    with torch.no_grad():
        logits_a, features_a = model(x)
        logits_b, features_b = model(x)
        logits_0, _ = model(x[:1])
    assert torch.equal(logits_a, logits_b) and torch.equal(features_a, features_b)
    torch.testing.assert_close(logits_0, logits_a[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_init_is_deterministic_under_seed(name):
    def weights(seed):
        torch.manual_seed(seed)
        return create_model(name, num_classes=NUM_CLASSES).state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_create_kwargs_rebuild_the_model():
    model = _build("r2plus1d_student", "flow", frames=6, size=48)
    rebuilt = create_model(**model.create_kwargs).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = model.example_input(batch=2)
    assert x.shape == (2, 2, 5, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x)[0], rebuilt(x)[0])


def test_cnn_is_shape_generic():
    """Adaptive pooling: the same weights run at other T and sizes than built for."""
    model = _build("r2plus1d_student", "rgb")
    with torch.no_grad():
        for shape in [(1, 3, 12, 64, 64), (2, 3, 4, 40, 40)]:
            logits, features = model(torch.rand(shape))
            assert logits.shape == (shape[0], NUM_CLASSES) and features.shape == (shape[0], model.feature_dim)


def test_normalisation_lives_inside_the_model():
    rgb = create_model("r2plus1d_student", num_classes=3, modality="rgb")
    mean_clip = torch.tensor(RGB_MEAN).view(1, 3, 1, 1, 1).expand(1, 3, 2, 4, 4)
    torch.testing.assert_close(rgb.normalize(mean_clip), torch.zeros(1, 3, 2, 4, 4))
    flow = create_model("r2plus1d_student", num_classes=3, modality="flow")
    torch.testing.assert_close(flow.normalize(torch.full((1, 2, 1, 2, 2), FLOW_BOUND)), torch.ones(1, 2, 1, 2, 2))
    torch.testing.assert_close(flow.normalize(torch.full((1, 2, 1, 2, 2), -10.0)), torch.full((1, 2, 1, 2, 2), -0.5))
    # constants, not state: checkpoints hold learned weights only
    assert not any("normalize" in k for k in rgb.state_dict())


# ----------------------------------------------------------------------------------------------
# token features and masking (MVD)


@pytest.mark.parametrize("name", VIT_NAMES)
def test_forward_tokens_shape_and_grid(name):
    model = _build(name, "rgb")
    n = int(np.prod(model.grid))
    expected_grid = (4, 7, 7) if model.input_kind == "video" else (7, 7)
    assert model.grid == expected_grid and model.num_tokens == n
    with torch.no_grad():
        tokens = model.forward_tokens(model.example_input(batch=2))
        all_visible = model.forward_tokens(model.example_input(batch=2), torch.zeros(2, n, dtype=torch.bool))
    assert tokens.shape == (2, n, model.feature_dim) and all_visible.shape == tokens.shape


@pytest.mark.parametrize("name", VIT_NAMES)
def test_forward_tokens_before_the_final_norm(name):
    """`final_norm=False` gives the last block's tokens (MVD's targets); the final LayerNorm maps them to the
    default output, and `forward`'s features pool the normed tokens."""
    model = _build(name, "rgb")
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)  # a non-trivial final norm, so the two outputs must differ
        model.norm.bias.uniform_(-0.5, 0.5)
        x = model.example_input(batch=2)
        raw = model.forward_tokens(x, final_norm=False)
        normed = model.forward_tokens(x)
        _, features = model(x)
    assert raw.shape == normed.shape == (2, model.num_tokens, model.feature_dim)
    assert (raw - normed).abs().max() > 0.1
    torch.testing.assert_close(model.norm(raw), normed, rtol=1e-5, atol=1e-5)
    if model.pool_kind == "mean":
        torch.testing.assert_close(normed.mean(dim=1), features, rtol=1e-5, atol=1e-5)
    mask = _tube_mask(model.grid, 2, keep=5, seed=0) if model.input_kind == "video" else torch.rand(2, model.num_tokens, generator=torch.Generator().manual_seed(0)).argsort(1) >= 5
    with torch.no_grad():
        visible_raw = model.forward_tokens(x, mask, final_norm=False)
    assert visible_raw.shape[1] == int((~mask[0]).sum())


R2_NAMES = [name for name in list_models() if name.startswith("r2plus1d_")]


@pytest.mark.parametrize("name", R2_NAMES)
@pytest.mark.parametrize("modality", ["rgb", "flow"])
def test_forward_map_is_the_map_the_features_pool(name, modality):
    """`forward_map` returns the last stage before pooling `(B, D, T', H', W')`; its mean is `forward`'s features."""
    model = _build(name, modality)
    x = model.example_input(batch=2)
    with torch.no_grad():
        fmap = model.forward_map(x)
        logits, features = model(x)
    assert fmap.dim() == 5 and fmap.shape[:2] == (2, model.feature_dim)
    if name == "r2plus1d_teacher" and modality == "rgb":
        assert tuple(fmap.shape) == (2, 192, 2, 2, 2)  # SAKD's DPP features: d = 1,536 per clip at 8x56x56
    torch.testing.assert_close(fmap.mean(dim=(2, 3, 4)), features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.head(features), logits, rtol=1e-5, atol=1e-6)


def _tube_mask(grid: tuple[int, ...], batch: int, keep: int, seed: int) -> torch.Tensor:
    """VideoMAE tube masking: the same spatial mask on every time slice, `keep` visible per slice."""
    g = torch.Generator().manual_seed(seed)
    spatial = grid[-2] * grid[-1]
    slices = int(np.prod(grid[:-2]))
    rows = []
    for _ in range(batch):
        m = torch.ones(spatial, dtype=torch.bool)
        m[torch.randperm(spatial, generator=g)[:keep]] = False
        rows.append(m.repeat(slices))
    return torch.stack(rows)  # (B, N)


@pytest.mark.parametrize("name", VIT_NAMES)
def test_masked_tokens_never_reach_the_encoder(name):
    model = _build(name, "rgb")
    mask = _tube_mask(model.grid, batch=2, keep=12, seed=0)
    x = model.example_input(batch=2)
    # change every pixel of the masked patches: visible token features must not move
    ph, pw = model.size // model.grid[-2], model.size // model.grid[-1]
    pixel_mask = mask.view(2, *model.grid)
    if model.input_kind == "video":
        pt = model.frames // model.grid[0]
        pixel_mask = pixel_mask.repeat_interleave(pt, 1).repeat_interleave(ph, 2).repeat_interleave(pw, 3)[:, None]
    else:
        pixel_mask = pixel_mask.repeat_interleave(ph, 1).repeat_interleave(pw, 2)[:, None]
    x_changed = torch.where(pixel_mask, torch.rand_like(x), x)
    assert not torch.equal(x, x_changed)
    with torch.no_grad():
        visible = model.forward_tokens(x, mask)
        visible_changed = model.forward_tokens(x_changed, mask)
        unmasked = model.forward_tokens(x)
        unmasked_changed = model.forward_tokens(x_changed)
    n_visible = 12 * (model.grid[0] if model.input_kind == "video" else 1)
    assert visible.shape == (2, n_visible, model.feature_dim)
    torch.testing.assert_close(visible, visible_changed, rtol=0, atol=1e-6)
    assert (unmasked - unmasked_changed).abs().max() > 1e-3  # without the mask the change is seen


@pytest.mark.parametrize("name", VIT_NAMES)
def test_bad_masks_are_refused(name):
    model = _build(name, "rgb")
    x = model.example_input(batch=2)
    n = model.num_tokens
    with pytest.raises(ValueError, match="bool tensor of shape"):
        model.forward_tokens(x, torch.zeros(2, n - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        model.forward_tokens(x, torch.zeros(2, n))
    uneven = torch.zeros(2, n, dtype=torch.bool)
    uneven[0, :3] = True
    with pytest.raises(ValueError, match="same number"):
        model.forward_tokens(x, uneven)
    with pytest.raises(ValueError, match="same number"):
        model.forward_tokens(x, torch.ones(2, n, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# ONNX export (dynamo exporter, dynamic batch) + ONNX Runtime parity


@pytest.mark.parametrize(("name", "modality"), EXPORT_CASES)
def test_onnx_export_with_dynamic_batch_matches_torch(name, modality, tmp_path):
    model = _build(name, modality)
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        model,
        (model.example_input(batch=2),),  # batch >= 2, or the exporter specialises it to 1
        path,
        dynamo=True,
        input_names=["input"],
        output_names=["logits", "features"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "input" and dims[0].dim_param and not dims[0].dim_value, "batch axis is not dynamic"
    assert tuple(d.dim_value for d in dims[1:]) == input_shape(model)
    assert [o.name for o in proto.graph.output] == ["logits", "features"]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = model.example_input(batch=batch)
        with torch.no_grad():
            logits, features = model(x)
        onnx_logits, onnx_features = session.run(["logits", "features"], {"input": x.numpy()})
        assert onnx_logits.shape == (batch, NUM_CLASSES)
        np.testing.assert_allclose(onnx_logits, logits.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(onnx_features, features.numpy(), rtol=0, atol=1e-4)
        assert (onnx_logits.argmax(1) == logits.numpy().argmax(1)).all()
