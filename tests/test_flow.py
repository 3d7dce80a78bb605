"""TV-L1 flow: accuracy against the truth and OpenCV, conventions, input errors, the uint8 codec."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from vidistill.flow import TVL1Params, decode_flow, encode_flow, min_frame_size, tvl1
from vidistill.flow.bench import epe, warped_pairs
from vidistill.flow import torch_tvl1
from vidistill.flow.fused import FusedKernels, fused_kernels, median_network, median_sorting_network
from vidistill.flow.params import prepare_pairs
from vidistill.flow.torch_tvl1 import median_cv2, median_torch, resolve_compile, tvl1_torch

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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", ["on", "auto"])
def test_cuda_compiled_matches_opencv_accuracy(pairs, opencv_flow, compile: str) -> None:
    """The fused path compiled for the GPU (Triton kernels) meets the same bar, and really ran. (CUDA graphs,
    `compile="graphs"`, are checked by the GPU check's benchmark part, whose EPE gate is the same.)"""
    f0, f1, gt = pairs
    stats: dict = {}
    flow = tvl1_torch(*prepare_pairs(f0, f1, TVL1Params()), TVL1Params(), device=torch.device("cuda"), compile=compile, stats=stats)
    assert stats["path"] == {"on": "default", "graphs": "reduce-overhead", "auto": "default"}[compile], stats
    assert flow.shape == (3, 2, 80, 96) and np.isfinite(flow).all()
    assert epe(flow, gt) <= 1.05 * epe(opencv_flow, gt)
    assert epe(flow, opencv_flow) <= AGREEMENT_PX


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compiled_handles_single_pairs_and_odd_batches() -> None:
    """Batches of 1 (padded to 2 inside) and of a non-power-of-two size agree with the eager CUDA path."""
    f0, f1, _ = warped_pairs(5, 48, 64, seed=4)
    p = TVL1Params(nscales=3, warps=2)
    g0, g1 = prepare_pairs(f0, f1, p)
    eager = tvl1_torch(g0, g1, p, device=torch.device("cuda"))
    for bs in (1, 5):
        fused = tvl1_torch(g0, g1, p, device=torch.device("cuda"), batch_size=bs, compile="on")
        assert epe(fused, eager) <= AGREEMENT_PX


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


# ----------------------------------------------------------------------------------------------
# the fused path (vidistill.flow.fused): what can be checked without a GPU


@pytest.mark.parametrize("n", [9, 25])
def test_median_network_selects_the_median(n: int) -> None:
    ops, slot = median_network(n)
    rng = np.random.default_rng(n)
    values = np.concatenate([rng.normal(size=(2000, n)), rng.integers(0, 3, (2000, n))])  # with many ties
    v = [values[:, i].copy() for i in range(n)]
    for a, b, keep_min, keep_max in ops:
        v[a], v[b] = np.minimum(v[a], v[b]), np.maximum(v[a], v[b])
    np.testing.assert_array_equal(v[slot], np.median(values, axis=1))
    assert len(ops) < {9: 30, 25: 130}[n]  # pruned Batcher networks: 24 and 113 compare-exchanges


@pytest.mark.parametrize("ksize", [3, 5])
def test_sorting_network_median_matches_cv2(ksize: int) -> None:
    u = torch.randn(2, 2, 17, 23)
    expected = np.stack([[cv2.medianBlur(u[b, c].numpy(), ksize) for c in range(2)] for b in range(2)])
    np.testing.assert_array_equal(median_sorting_network(u, ksize).numpy(), expected)


def test_fused_path_matches_eager_path_and_opencv(pairs) -> None:
    """The fused algorithm (masked per-pair stopping, checks every few iterations, compaction), run
    without compiling, against the eager kernels and OpenCV on the same pairs."""
    f0, f1, gt = pairs
    p = TVL1Params(nscales=2, warps=2)
    g0, g1 = prepare_pairs(f0, f1, p)
    eager_stats: dict = {}
    eager = torch_tvl1._solve_batch(g0, g1, p, torch.device("cpu"), stats=eager_stats)
    fused_stats: dict = {}
    fused = torch_tvl1._solve_batch(g0, g1, p, torch.device("cpu"), kernels=fused_kernels("eager"), stats=fused_stats)
    reference = tvl1(f0, f1, backend="opencv", workers=1, nscales=2, warps=2)
    assert epe(fused, eager) <= AGREEMENT_PX and epe(fused, reference) <= AGREEMENT_PX
    assert epe(fused, gt) <= 1.05 * epe(reference, gt)
    # frozen pairs wait for the next check and compaction: some extra work, bounded
    assert eager_stats["pixel_iterations"] <= fused_stats["pixel_iterations"] <= 1.6 * eager_stats["pixel_iterations"]


def test_fused_path_pads_a_single_pair(pairs) -> None:
    f0, f1, _ = pairs
    p = TVL1Params(nscales=2, warps=1, outer_iterations=2)
    g0, g1 = prepare_pairs(f0[:1], f1[:1], p)
    one = torch_tvl1._solve_batch(g0, g1, p, torch.device("cpu"), kernels=fused_kernels("eager"))
    assert one.shape == (1, 2, 80, 96)
    np.testing.assert_allclose(one, torch_tvl1._solve_batch(g0, g1, p, torch.device("cpu")), atol=0.05)


def test_compile_settings() -> None:
    cpu = torch.device("cpu")
    assert resolve_compile("off", cpu) is None and resolve_compile("auto", cpu) is None
    assert resolve_compile("on", cpu) == "default"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_compile("graphs", cpu)
    with pytest.raises(ValueError, match="compile must be one of"):
        tvl1(_frames(), _frames(), compile="fast")


def test_auto_falls_back_to_eager_when_compiling_fails(monkeypatch, pairs, caplog) -> None:
    """`compile="auto"` never fails where eager works; "on" reports the error."""

    def broken(*args, **kwargs):
        raise RuntimeError("inductor: no C compiler")

    monkeypatch.setattr(torch_tvl1, "resolve_compile", lambda compile, device: None if compile == "off" else "default")
    monkeypatch.setattr(torch_tvl1, "fused_kernels", lambda mode: FusedKernels(step=broken, median=broken, mode=mode))
    monkeypatch.setattr(torch_tvl1, "_AUTO_FAILED", [])
    f0, f1, _ = pairs
    p = TVL1Params(nscales=2, warps=1)
    g0, g1 = prepare_pairs(f0, f1, p)
    stats: dict = {}
    flow = tvl1_torch(g0, g1, p, device=torch.device("cpu"), compile="auto", stats=stats)
    assert stats["path"] == "eager" and "no C compiler" in caplog.text
    np.testing.assert_array_equal(flow, tvl1_torch(g0, g1, p, device=torch.device("cpu")))
    with pytest.raises(RuntimeError, match="no C compiler"):
        tvl1_torch(g0, g1, p, device=torch.device("cpu"), compile="on")


@pytest.mark.slow
def test_compiled_path_on_cpu_matches_eager() -> None:
    """torch.compile (inductor's C++ code on this CPU) of the fused step and median: one compilation
    serves every pyramid level and batch size (dynamic shapes), and the flow matches the eager path."""
    from torch._dynamo.utils import counters

    f0, f1, _ = warped_pairs(3, 40, 48, seed=1)
    p = TVL1Params(nscales=2, warps=2, outer_iterations=2, inner_iterations=10, median_filtering=3)
    g0, g1 = prepare_pairs(f0, f1, p)
    eager = tvl1_torch(g0, g1, p, device=torch.device("cpu"))
    counters.clear()
    stats: dict = {}
    compiled = tvl1_torch(g0, g1, p, device=torch.device("cpu"), compile="on", stats=stats)
    single = tvl1_torch(g0[:1], g1[:1], p, device=torch.device("cpu"), compile="on")  # padded to 2, compacted
    assert stats["path"] == "default"
    assert epe(compiled, eager) <= AGREEMENT_PX and epe(single, eager[:1]) <= AGREEMENT_PX
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # the step and the median, once each
