"""ONNX export with a parity gate, and latency helpers (sessions: `vidistill.export.runtime`).

The exported graph takes `input` float32 (B, 3, T, H, W) RGB in [0, 1] (normalisation is inside
the model) and returns `logits` (B, K) and `features` (B, D). The batch axis is dynamic; T, H and W
are fixed at export time. What a consumer needs to feed the model (classes, layout, frames, size,
normalisation) is written into the ONNX file itself (`doc_string` and `metadata_props`), so a
`model.onnx` is self-describing for the server and for KServe.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from vidistill.export.runtime import INPUT_NAME, META_PREFIX, MODEL_FILE, OUTPUT_NAMES, make_session

INPUT_LAYOUT = "NCTHW"
PARITY_FILE = "parity.json"


class ExportError(RuntimeError):
    """The exported ONNX model does not reproduce the PyTorch model (message holds the numbers)."""


def _example_input(model: nn.Module, batch: int, frames: int | None, size: int | None) -> torch.Tensor:
    """(batch, 3, T, S, S) float32 in [0, 1] from `model.example_input` or from `frames`/`size`."""
    if frames is None and size is None and hasattr(model, "example_input"):
        x = model.example_input(batch)
        if not (isinstance(x, torch.Tensor) and x.dim() == 5 and x.shape[1] == 3):
            raise ValueError(
                f"{type(model).__name__}.example_input({batch}) must return a (B, 3, T, H, W) tensor for RGB export, "
                f"got {getattr(x, 'shape', type(x))}; pass frames= and size= instead"
            )
        return x.float()
    if frames is None or size is None:
        raise ValueError(
            f"{type(model).__name__} has no example_input(batch); pass frames= and size= to export_onnx"
        )
    gen = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, frames, size, size, generator=gen)  # (B, 3, T, S, S)


def _normalisation_note(model: nn.Module) -> str:
    """Mean/std of the model's internal normalisation: the first submodule holding `mean` and
    `std` (or `inv_std`) buffers (BatchNorm's `running_mean` does not match)."""
    inside = "normalisation (mean/std) is applied inside the graph"
    for module in model.modules():
        bufs = dict(module.named_buffers(recurse=False))
        mean = bufs.get("mean")
        std = bufs.get("std") if "std" in bufs else (1.0 / bufs["inv_std"] if "inv_std" in bufs else None)
        if mean is not None and std is not None:
            fmt = lambda t: [round(float(v), 6) for v in t.flatten()]  # noqa: E731
            return f"{inside}: mean={fmt(mean)}, std={fmt(std)}"
    return inside


def export_onnx(
    model: nn.Module,
    out_dir: str | Path,
    *,
    opset: int = 18,
    batch: int = 2,
    frames: int | None = None,
    size: int | None = None,
    classes: Sequence[str] | None = None,
    preprocess: dict[str, Any] | None = None,
    atol: float = 1e-4,
    parity_batch: int = 3,
) -> Path:
    """Export an RGB video classifier to `out_dir/model.onnx` and gate it on parity.

    Uses torch's dynamo exporter with a dynamic batch axis (exported at `batch` >= 2 so the axis
    stays symbolic) and a fixed T/H/W. After export, the ONNX Runtime outputs on `parity_batch` random
    clips (a batch size other than the export one, exercising the dynamic axis) are compared with
    eager PyTorch; the result is written to `out_dir/parity.json`.

    Args:
        model: module mapping (B, 3, T, H, W) float in [0, 1] to `(logits, features)`.
        out_dir: output directory (created).
        opset: ONNX opset version.
        batch: example batch size used for export; must be >= 2.
        frames: T, when the model has no `example_input(batch)` method.
        size: H = W, when the model has no `example_input(batch)` method.
        classes: class names in label order, stored in the model metadata.
        preprocess: how clips were made from videos (e.g. prep's `stride`, `short_side`,
            `short_policy`), stored as JSON so the server samples uploaded videos the same way.
        atol: parity tolerance on the largest absolute output difference.
        parity_batch: number of random clips in the parity check.

    Returns:
        Path of the written `model.onnx`.

    Raises:
        ExportError: parity failed (the message gives max_abs_diff, top-1 agreement and atol).
        ValueError: invalid arguments (batch < 2, classes of the wrong length, ...).
    """
    if batch < 2:
        raise ValueError(f"export batch must be >= 2 so the batch axis stays dynamic, got {batch}")
    if parity_batch < 1:
        raise ValueError(f"parity_batch must be >= 1, got {parity_batch}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_FILE
    model = model.eval()
    x = _example_input(model, batch, frames, size)  # (B, 3, T, H, W)
    _, _, t, h, w = x.shape
    with torch.no_grad():
        logits, _ = model(x)
    num_classes = int(logits.shape[1])
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"classes has {len(classes)} names but the model outputs {num_classes} logits")

    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model,
        (x,),
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=({0: batch_dim},),
        external_data=False,
        verbose=False,
    )
    proto = program.model_proto
    meta = {
        "classes": json.dumps(list(classes) if classes is not None else [str(i) for i in range(num_classes)]),
        "num_classes": str(num_classes),
        "input_layout": INPUT_LAYOUT,
        "input_range": "float32 RGB in [0, 1]",
        "normalization": _normalisation_note(model),
        "frames": str(t),
        "size": str(h),
        "opset": str(opset),
        "architecture": type(model).__name__,
        "preprocess": json.dumps(preprocess or {}, sort_keys=True),
    }
    proto.doc_string = (
        f"vidistill video classifier {type(model).__name__}. Input '{INPUT_NAME}': float32 (B, 3, T={t}, H={h}, W={w}) "
        f"RGB in [0, 1], layout {INPUT_LAYOUT}, dynamic batch; {meta['normalization']}. "
        f"Outputs: 'logits' (B, {num_classes}), 'features' (B, D). Classes in metadata_props '{META_PREFIX}classes'."
    )
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=META_PREFIX + key, value=value)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))

    gen = torch.Generator().manual_seed(1)
    probe = torch.rand(parity_batch, 3, t, h, w, generator=gen)  # (P, 3, T, H, W)
    parity = check_parity(model, path, probe, atol=atol)
    (out / PARITY_FILE).write_text(json.dumps(parity, indent=2))
    if not parity["passed"]:
        raise ExportError(
            f"ONNX parity failed for {path}: max_abs_diff={parity['max_abs_diff']:.3g} > atol={atol:g}, "
            f"top1_agreement={parity['top1_agreement']:.3f} over n={parity['n']} clips"
        )
    return path


def _as_batches(inputs: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]) -> list[np.ndarray]:
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = [inputs]
    batches = [np.ascontiguousarray(torch.as_tensor(b).detach().cpu().numpy(), dtype=np.float32) for b in inputs]
    for b in batches:
        if b.ndim != 5:
            raise ValueError(f"parity inputs must be (B, 3, T, H, W) batches, got shape {b.shape}")
    return batches


def check_parity(
    model: nn.Module,
    onnx_path: str | Path,
    inputs: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
    *,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Compare eager PyTorch with ONNX Runtime on the same clips.

    Args:
        model: the PyTorch model that was exported.
        onnx_path: the exported `model.onnx`.
        inputs: one (B, 3, T, H, W) batch or a sequence of batches (e.g. real test clips).
        atol: tolerance on the largest absolute difference over logits and features.

    Returns:
        `{"max_abs_diff": float, "top1_agreement": float, "passed": bool, "n": int, "atol": float}`;
        `passed` is `max_abs_diff <= atol` (finite).
    """
    if not atol >= 0:
        raise ValueError(f"parity atol must be >= 0, got {atol}")
    session = make_session(onnx_path)
    model = model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    max_diff, agree, n = 0.0, 0, 0
    for x in _as_batches(inputs):
        with torch.no_grad():
            ref = [t.cpu().numpy() for t in model(torch.from_numpy(x).to(device))]
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        for r, g in zip(ref, got, strict=True):
            if r.shape != g.shape:
                raise ExportError(f"ONNX output shape {g.shape} differs from PyTorch {r.shape} for input {x.shape}")
            max_diff = max(max_diff, float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))))
        agree += int(np.sum(ref[0].argmax(1) == got[0].argmax(1)))
        n += x.shape[0]
    passed = bool(np.isfinite(max_diff) and max_diff <= atol)
    return {"max_abs_diff": max_diff, "top1_agreement": agree / max(n, 1), "passed": passed, "n": n, "atol": atol}


def latency(
    target: nn.Module | ort.InferenceSession,
    x: torch.Tensor | np.ndarray,
    *,
    warmup: int = 3,
    iters: int = 20,
) -> dict[str, float]:
    """Wall-clock latency of one forward pass of `x` through a PyTorch module or an ORT session.

    Args:
        target: eager `nn.Module` (run under `torch.inference_mode`) or `ort.InferenceSession`.
        x: (B, 3, T, H, W) float32 batch.
        warmup: untimed calls first.
        iters: timed calls.

    Returns:
        `{"p50_ms", "p90_ms", "mean_ms", "per_clip_ms", "batch", "iters"}` (per_clip = p50 / B).
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"latency needs iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    arr = np.ascontiguousarray(torch.as_tensor(x).numpy(), dtype=np.float32)
    if isinstance(target, ort.InferenceSession):
        name = target.get_inputs()[0].name

        def call() -> None:
            target.run(None, {name: arr})

    elif isinstance(target, nn.Module):
        module = target.eval()
        device = next(module.parameters(), torch.empty(0)).device
        xt = torch.from_numpy(arr).to(device)

        def call() -> None:
            with torch.inference_mode():
                module(xt)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    else:
        raise TypeError(f"latency target must be an nn.Module or an onnxruntime.InferenceSession, got {type(target).__name__}")
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000.0)
    p50 = statistics.median(times)
    return {
        "p50_ms": p50,
        "p90_ms": float(np.percentile(times, 90)),
        "mean_ms": statistics.fmean(times),
        "per_clip_ms": p50 / arr.shape[0],
        "batch": int(arr.shape[0]),
        "iters": iters,
    }
