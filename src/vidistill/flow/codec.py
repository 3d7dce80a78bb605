"""uint8 storage of flow (the data contract): value = clip(round(255 * (f + bound) / (2 * bound)), 0, 255)."""

from __future__ import annotations

import numpy as np


def _check_bound(bound: float) -> None:
    if not bound > 0:
        raise ValueError(f"flow codec: bound must be > 0 pixels, got {bound}")


def encode_flow(flow: np.ndarray, bound: float = 20.0) -> np.ndarray:
    """Flow in pixels -> uint8, clipping to [-bound, bound] (step 2 * bound / 255 pixels).

    Args:
        flow: float array of any shape; NaN is refused.
        bound: clipping bound in pixels.

    Raises:
        ValueError: on NaN values, a non-float/int dtype or bound <= 0.
    """
    _check_bound(bound)
    arr = np.asarray(flow)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)) or arr.dtype == bool:
        raise ValueError(f"flow codec: flow must be a float array, got dtype {arr.dtype}")
    if np.isnan(arr).any():
        raise ValueError("flow codec: flow contains NaN; drop or zero those pairs before encoding")
    scaled = (arr.astype(np.float32) + bound) * (255.0 / (2.0 * bound))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def decode_flow(encoded: np.ndarray, bound: float = 20.0) -> np.ndarray:
    """uint8 -> float32 flow in pixels: value / 255 * 2 * bound - bound.

    Raises:
        ValueError: if `encoded` is not uint8 or bound <= 0.
    """
    _check_bound(bound)
    arr = np.asarray(encoded)
    if arr.dtype != np.uint8:
        raise ValueError(f"flow codec: encoded flow must be uint8, got dtype {arr.dtype}")
    return arr.astype(np.float32) * np.float32(2.0 * bound / 255.0) - np.float32(bound)
