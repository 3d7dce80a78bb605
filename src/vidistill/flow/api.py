"""`tvl1`: dual TV-L1 optical flow for stacks of frame pairs, torch or OpenCV backend."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vidistill.flow.fused import COMPILE_CHOICES
from vidistill.flow.opencv_tvl1 import tvl1_opencv
from vidistill.flow.params import TVL1Params, prepare_pairs
from vidistill.flow.torch_tvl1 import tvl1_torch

BACKENDS = ("torch", "opencv")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`/"auto" -> "cuda" when available, else "cpu"; other values as torch devices.

    Raises:
        ValueError: for an unknown device name or CUDA asked for on a machine without it.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"tvl1: unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"tvl1: device {device!r} asked for but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def tvl1(
    frames0: Any,
    frames1: Any,
    *,
    backend: str = "torch",
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    compile: str = "off",
    **params: Any,
) -> np.ndarray:
    """Dual TV-L1 optical flow from `frames0[i]` to `frames1[i]`.

    The flow (u, v) at pixel (y, x) satisfies `frames1[y + v, x + u] ≈ frames0[y, x]`.

    Args:
        frames0, frames1: (N, H, W) grayscale or (N, H, W, 3) RGB frames, uint8 (0..255) or float
            (0..1, OpenCV's convention: floats are scaled by 255).
        backend: "torch" (batched, CPU or CUDA) or "opencv" (`cv2.optflow.DualTVL1OpticalFlow`, the
            reference, over a process pool).
        device: torch backend: "auto"/None (CUDA if available), "cpu", "cuda[:N]" or a torch.device.
        batch_size: torch backend: pairs solved together (bounds memory); default about 64k
            pixels per batch on CPU, 16M on GPU.
        workers: torch on CPU: threads (default `torch.get_num_threads()`); opencv: processes
            (default all cores; 1 computes in this process).
        compile: torch backend: "off" (eager kernels, the default), "on" (the fused iteration of
            `vidistill.flow.fused`, compiled by `torch.compile`), "graphs" (the same replayed as CUDA
            graphs; CUDA only) or "auto" ("on" on CUDA with Triton, else "off"; falls back to
            eager if compiling fails).
        **params: TV-L1 parameters with OpenCV's names and defaults (see `TVL1Params`): tau,
            lambda_ (or lambda), theta, nscales, warps, epsilon, inner_iterations,
            outer_iterations, scale_step, median_filtering.

    Returns:
        (N, 2, H, W) float32 flow in pixels; channel 0 horizontal (x), channel 1 vertical (y).

    Raises:
        ValueError: on bad frames (shape mismatch, empty, NaN/Inf, unsupported dtype, smaller than
            the pyramid needs), an unknown backend, device, compile mode or parameter.
    """
    if backend not in BACKENDS:
        raise ValueError(f"tvl1: backend must be one of {BACKENDS}, got {backend!r}")
    for name, value in (("batch_size", batch_size), ("workers", workers)):
        if value is not None and not (isinstance(value, int | np.integer) and value >= 1):
            raise ValueError(f"tvl1: {name} must be an integer >= 1 or None, got {value!r}")
    if compile not in COMPILE_CHOICES:
        raise ValueError(f"tvl1: compile must be one of {COMPILE_CHOICES}, got {compile!r}")
    p = TVL1Params.from_kwargs(**params)
    gray0, gray1 = prepare_pairs(frames0, frames1, p)
    if backend == "opencv":
        return tvl1_opencv(gray0, gray1, p, workers=workers)
    return tvl1_torch(gray0, gray1, p, device=resolve_device(device), batch_size=batch_size, threads=workers,
                      compile=compile)
