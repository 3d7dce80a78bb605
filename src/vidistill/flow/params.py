"""TV-L1 parameters and input checks shared by the torch and OpenCV backends.

Parameter names and defaults mirror OpenCV's `cv2.optflow.DualTVL1OpticalFlow_create`
(opencv_contrib `modules/optflow/src/tvl1flow.cpp`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

# OpenCV's DualTVL1 stops building its pyramid once a level is narrower or shorter than this.
MIN_LEVEL_SIZE = 16


@dataclass(frozen=True)
class TVL1Params:
    """Dual TV-L1 parameters (OpenCV DualTVL1 names and defaults).

    Attributes:
        tau: time step of the numerical scheme (stable for tau <= 0.25).
        lambda_: weight of the data term (OpenCV `lambda`); smaller gives smoother flow.
        theta: coupling weight between the primal flow u and the auxiliary field v.
        nscales: number of pyramid levels.
        warps: warps of the second frame per pyramid level.
        epsilon: stop when the mean squared flow update of an iteration is below epsilon**2.
        inner_iterations: dual/primal iterations between two median filterings.
        outer_iterations: median filterings (outer loops) per warp.
        scale_step: size ratio between consecutive pyramid levels.
        median_filtering: median filter size applied to the flow in each outer loop (0 or 1: off).
    """

    tau: float = 0.25
    lambda_: float = 0.15
    theta: float = 0.3
    nscales: int = 5
    warps: int = 5
    epsilon: float = 0.01
    inner_iterations: int = 30
    outer_iterations: int = 10
    scale_step: float = 0.8
    median_filtering: int = 5

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.tau > 0, f"tvl1: tau must be > 0, got {self.tau}")
        need(self.lambda_ > 0, f"tvl1: lambda_ must be > 0, got {self.lambda_}")
        need(self.theta > 0, f"tvl1: theta must be > 0, got {self.theta}")
        need(self.epsilon >= 0, f"tvl1: epsilon must be >= 0, got {self.epsilon}")
        for name in ("nscales", "warps", "inner_iterations", "outer_iterations"):
            value = getattr(self, name)
            need(isinstance(value, int | np.integer) and value >= 1, f"tvl1: {name} must be an integer >= 1, got {value!r}")
        need(0 < self.scale_step < 1, f"tvl1: scale_step must be in (0, 1), got {self.scale_step}")
        need(
            self.median_filtering in (0, 1, 3, 5),
            f"tvl1: median_filtering must be 0, 1 (off), 3 or 5, got {self.median_filtering!r}",
        )

    @classmethod
    def from_kwargs(cls, **params: Any) -> TVL1Params:
        """Build from keyword arguments, accepting `lambda` as an alias of `lambda_`.

        Raises:
            ValueError: on an unknown name or an invalid value.
        """
        if "lambda" in params:
            params["lambda_"] = params.pop("lambda")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"tvl1: unknown parameter(s) {unknown}; known: {sorted(names)}")
        return cls(**params)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def level_sizes(height: int, width: int, params: TVL1Params) -> list[tuple[int, int]]:
    """Sizes `(h, w)` of the pyramid levels, finest first, as OpenCV's `resize(fx=fy=scale_step)` makes them."""
    sizes = [(height, width)]
    for _ in range(1, params.nscales):
        h, w = sizes[-1]
        # cv::resize with fx/fy: dsize = saturate_cast<int>(size * scale), i.e. round half to even
        sizes.append((round(h * params.scale_step), round(w * params.scale_step)))
    return sizes


def min_frame_size(params: TVL1Params) -> int:
    """Smallest square frame side whose coarsest pyramid level is still `MIN_LEVEL_SIZE` pixels."""
    side = MIN_LEVEL_SIZE
    while min(level_sizes(side, side, params)[-1]) < MIN_LEVEL_SIZE:
        side += 1
    return side


def check_size(height: int, width: int, params: TVL1Params) -> None:
    """Refuse frames too small for `params.nscales` levels of `params.scale_step`.

    OpenCV silently drops the levels below 16 pixels; here the caller is told instead, so both
    backends always run the pyramid they were asked for.

    Raises:
        ValueError: naming the frame size, the minimum, and how to proceed.
    """
    sizes = level_sizes(height, width, params)
    usable = sum(1 for h, w in sizes if min(h, w) >= MIN_LEVEL_SIZE)  # sizes shrink monotonically
    if usable < params.nscales:
        side = min_frame_size(params)
        hint = f"use nscales <= {usable} or larger frames" if usable else "use larger frames"
        raise ValueError(
            f"tvl1: frames of {height}x{width} (HxW) are too small for nscales={params.nscales}, "
            f"scale_step={params.scale_step}: the coarsest level would be {sizes[-1][0]}x{sizes[-1][1]}, "
            f"under the {MIN_LEVEL_SIZE}x{MIN_LEVEL_SIZE} minimum, so frames need at least "
            f"{side}x{side} pixels; {hint}"
        )


def _as_gray(frames: Any, name: str) -> np.ndarray:
    """(N, H, W) or (N, H, W, 3) RGB, uint8 or float in [0, 1] -> (N, H, W) uint8 or float32."""
    arr = np.asarray(frames)
    if arr.dtype == np.uint8:
        pass
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise ValueError(f"tvl1: {name} contains NaN or Inf values; clean or drop those frames first")
    else:
        raise ValueError(
            f"tvl1: {name} has dtype {arr.dtype}; use uint8 (0..255) or float (0..1) grayscale or RGB frames"
        )
    if arr.ndim == 4 and arr.shape[-1] == 3:
        n, h, w, _ = arr.shape
        if n == 0 or h == 0 or w == 0:
            raise ValueError(f"tvl1: {name} is empty (shape {arr.shape})")
        import cv2  # imported on use: the stage configs import this module

        # one tall image through cvtColor: OpenCV's exact RGB->gray weights and rounding
        arr = cv2.cvtColor(np.ascontiguousarray(arr).reshape(n * h, w, 3), cv2.COLOR_RGB2GRAY).reshape(n, h, w)
    elif arr.ndim != 3:
        raise ValueError(f"tvl1: {name} must be (N, H, W) grayscale or (N, H, W, 3) RGB, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"tvl1: {name} is empty (shape {arr.shape})")
    return np.ascontiguousarray(arr)


def prepare_pairs(frames0: Any, frames1: Any, params: TVL1Params) -> tuple[np.ndarray, np.ndarray]:
    """Validate two frame stacks and convert them to grayscale `(N, H, W)` of one dtype.

    Returns:
        `(gray0, gray1)`, both uint8 or both float32 in [0, 1].

    Raises:
        ValueError: on a shape mismatch, empty input, NaN/Inf, an unsupported dtype or frames too
            small for the pyramid.
    """
    shape0, shape1 = np.shape(frames0), np.shape(frames1)
    if shape0 != shape1:
        raise ValueError(f"tvl1: frames0 and frames1 must have the same shape, got {shape0} and {shape1}")
    g0, g1 = _as_gray(frames0, "frames0"), _as_gray(frames1, "frames1")
    if g0.dtype != g1.dtype:
        # mixed uint8/float: compare on OpenCV's common 0..1 float scale
        g0 = g0.astype(np.float32) / 255.0 if g0.dtype == np.uint8 else g0
        g1 = g1.astype(np.float32) / 255.0 if g1.dtype == np.uint8 else g1
    check_size(g0.shape[1], g0.shape[2], params)
    return g0, g1
