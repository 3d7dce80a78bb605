"""TV-L1 flow: accuracy against the truth and OpenCV, conventions, input errors, the uint8 codec."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from vidistill.flow import TVL1Params, decode_flow, encode_flow, min_frame_size, tvl1
from vidistill.flow.bench import epe, warped_pairs
from vidistill.flow.torch_tvl1 import median_cv2, median_torch

# Mean EPE allowed between the torch and OpenCV flows of the same pair. The algorithms match step for
# step; what differs is float summation order, torch's bicubic warp vs OpenCV's remap (which rounds
# coordinates to 1/32 px) and per-pair stopping decisions near the threshold (measured 0.005-0.025 px).
AGREEMENT_PX = 0.05


@pytest.fixture(scope="module")
def pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return warped_pairs(3, 80, 96, max_flow=3.0, seed=1)


@pytest.fixture(scope="module")
def opencv_flow(pairs) -> np.ndarray:
    f0, f1, _ = pairs
    return tvl1(f0, f1, backend="opencv", workers=1)


def test_torch_matches_opencv_accuracy(pairs, opencv_flow) -> None:
    f0, f1, gt = pairs
    flow = tvl1(f0, f1, backend="torch", device="cpu")
    assert flow.shape == (3, 2, 80, 96) and flow.dtype == np.float32
    e_torch, e_cv = epe(flow, gt), epe(opencv_flow, gt)
    assert e_cv < 0.5, f"OpenCV itself should recover the smooth flow, EPE {e_cv}"
    assert e_torch <= 1.05 * e_cv, f"torch EPE {e_torch:.4f} vs OpenCV {e_cv:.4f}"
    assert epe(flow, opencv_flow) <= AGREEMENT_PX


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_opencv_accuracy(pairs, opencv_flow) -> None:
    """The GPU path (batched, median by `median_torch`) meets the same accuracy bar as the CPU path."""
    f0, f1, gt = pairs
    flow = tvl1(f0, f1, backend="torch", device="cuda")
    assert flow.shape == (3, 2, 80, 96) and flow.dtype == np.float32
    assert epe(flow, gt) <= 1.05 * epe(opencv_flow, gt)
    assert epe(flow, opencv_flow) <= AGREEMENT_PX


def test_opencv_process_pool_equals_single_process(pairs, opencv_flow) -> None:
    f0, f1, _ = pairs
    np.testing.assert_array_equal(tvl1(f0, f1, backend="opencv", workers=2), opencv_flow)


def test_batching_and_threads_do_not_change_flow(pairs) -> None:
    f0, f1, _ = pairs
    params = dict(nscales=3, warps=2)
    one_by_one = np.concatenate([tvl1(f0[i : i + 1], f1[i : i + 1], device="cpu", workers=1, **params) for i in range(3)])
    batched = tvl1(f0, f1, device="cpu", batch_size=3, workers=1, **params)
    threaded = tvl1(f0, f1, device="cpu", batch_size=1, workers=2, **params)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-3)
    np.testing.assert_allclose(threaded, one_by_one, atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "opencv"])
@pytest.mark.parametrize("shift", [(2, 0), (0, -2)])
def test_translation_sign_convention(backend: str, shift: tuple[int, int]) -> None:
    """frames1 = frames0 moved by (dx, dy) pixels -> flow (u, v) = (dx, dy): channel 0 is x."""
    dx, dy = shift
    photo = warped_pairs(1, 100, 100, seed=3)[1][0]  # a 100x100 gray photo crop
    f0 = photo[10:74, 10:74]
    f1 = photo[10 - dy : 74 - dy, 10 - dx : 74 - dx]  # f1[y + dy, x + dx] == f0[y, x]
    flow = tvl1(f0[None], f1[None], backend=backend, workers=1)[0]
    inner = (slice(8, -8), slice(8, -8))
    assert np.median(flow[0][inner]) == pytest.approx(dx, abs=0.1)
    assert np.median(flow[1][inner]) == pytest.approx(dy, abs=0.1)


def test_float_and_rgb_inputs_follow_opencv_conventions(pairs) -> None:
    f0, f1, _ = pairs
    params = dict(nscales=2, warps=1, outer_iterations=2)
    ref = tvl1(f0, f1, device="cpu", **params)
    as_float = tvl1(f0 / 255.0, f1 / 255.0, device="cpu", **params)  # floats are 0..1
    np.testing.assert_allclose(as_float, ref, atol=1e-3)
    rgb0, rgb1 = (np.repeat(f[..., None], 3, axis=-1) for f in (f0, f1))  # gray RGB -> same gray
    np.testing.assert_array_equal(tvl1(rgb0, rgb1, device="cpu", **params), ref)


@pytest.mark.parametrize("ksize", [3, 5])
def test_median_filters_match_cv2(ksize: int) -> None:
    u = torch.randn(2, 2, 17, 23)
    expected = np.stack([[cv2.medianBlur(u[b, c].numpy(), ksize) for c in range(2)] for b in range(2)])
    np.testing.assert_array_equal(median_cv2(u, ksize).numpy(), expected)
    np.testing.assert_array_equal(median_torch(u, ksize).numpy(), expected)


def _frames(n: int = 2, h: int = 48, w: int = 48, dtype: type = np.uint8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (n, h, w)).astype(dtype)


@pytest.mark.parametrize(
    ("frames0", "frames1", "kwargs", "message"),
    [
        (_frames(), _frames(w=47), {}, "same shape"),
        (_frames(0), _frames(0), {}, "empty"),
        (_frames(h=0), _frames(h=0), {}, "empty"),
        (np.full((1, 48, 48), np.nan, np.float32), _frames(1, dtype=np.float32), {}, "NaN or Inf"),
        (_frames(1, dtype=np.float64), np.full((1, 48, 48), np.inf), {}, "NaN or Inf"),
        (_frames(dtype=np.complex64), _frames(dtype=np.complex64), {}, "dtype complex64"),
        (_frames().astype(object), _frames().astype(object), {}, "dtype object"),
        (_frames() > 3, _frames() > 3, {}, "dtype bool"),
        (_frames(dtype=np.int32), _frames(dtype=np.int32), {}, "dtype int32"),
        (_frames()[0], _frames()[0], {}, "(N, H, W)"),
        (_frames(h=30, w=30), _frames(h=30, w=30), {}, "need at least 39x39"),
        (_frames(h=30, w=30), _frames(h=30, w=30), {}, "nscales <= 3"),
        (_frames(h=12, w=60), _frames(h=12, w=60), {"nscales": 1}, "at least 16x16"),
        (_frames(), _frames(), {"backend": "cuda"}, "backend"),
        (_frames(), _frames(), {"device": "tpu"}, "unknown device"),
        (_frames(), _frames(), {"warps": 0}, "warps"),
        (_frames(), _frames(), {"scale_step": 1.2}, "scale_step"),
        (_frames(), _frames(), {"median_filtering": 4}, "median_filtering"),
        (_frames(), _frames(), {"gamma": 0.1}, "unknown parameter"),
        (_frames(), _frames(), {"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_input_raises(frames0, frames1, kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tvl1(frames0, frames1, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda_raises() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        tvl1(_frames(), _frames(), device="cuda")


def test_min_frame_size_is_the_boundary() -> None:
    p = TVL1Params()
    side = min_frame_size(p)
    assert side == 39  # 39 -> 31 -> 25 -> 20 -> 16 with OpenCV's rounding
    tvl1(_frames(1, side, side), _frames(1, side, side), device="cpu", warps=1, outer_iterations=1)
    with pytest.raises(ValueError, match="too small"):
        tvl1(_frames(1, side - 1, side), _frames(1, side - 1, side))


def test_codec_round_trip_and_clipping() -> None:
    rng = np.random.default_rng(0)
    inside = rng.uniform(-20, 20, (4, 2, 16, 16)).astype(np.float32)
    encoded = encode_flow(inside)
    assert encoded.dtype == np.uint8
    assert np.abs(decode_flow(encoded) - inside).max() <= 40 / 255 / 2 + 1e-5
    outside = np.array([-1e6, -25.0, -20.0, 0.0, 20.0, 31.0, 1e6], np.float32)
    enc = encode_flow(outside)
    np.testing.assert_array_equal(enc, [0, 0, 0, 128, 255, 255, 255])  # round(255 * 20 / 40) = 128
    np.testing.assert_allclose(decode_flow(enc)[[0, -1]], [-20.0, 20.0])
    assert np.abs(decode_flow(encode_flow(inside, bound=5.0), bound=5.0) - np.clip(inside, -5, 5)).max() <= 10 / 255 / 2 + 1e-5


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: encode_flow(np.array([np.nan], np.float32)), "NaN"),
        (lambda: encode_flow(np.zeros(3), bound=0), "bound"),
        (lambda: encode_flow(np.array(["a"])), "dtype"),
        (lambda: decode_flow(np.zeros(3, np.float32)), "uint8"),
    ],
)
def test_codec_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
