"""Speed and accuracy of the TV-L1 backends, in one run, on photos warped by known smooth flow.

`bench_flow()` times torch on CPU, torch on CUDA (when available; eager and compiled, per batch
size), OpenCV in one process and OpenCV over a process pool on the same pairs, and reports pairs/s,
end-point error (EPE) against the true flow, peak memory and ratios against single-process OpenCV
(the reference).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch

from vidistill.flow.fused import COMPILE_CHOICES
from vidistill.flow.opencv_tvl1 import tvl1_opencv
from vidistill.flow.params import TVL1Params, prepare_pairs
from vidistill.flow.torch_tvl1 import default_batch_size, tvl1_torch

BACKENDS = ("torch-cpu", "torch-cuda", "opencv", "opencv-mp")
_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "brick")


def _photos() -> list[np.ndarray]:
    """scikit-image's bundled photos as uint8 gray (the `bench` extra, imported on use)."""
    try:
        import skimage.data
    except ImportError:
        raise ImportError("the flow benchmark warps scikit-image's bundled photos: pip install 'vidistill[bench]' "
                          "(or scikit-image)") from None

    out = []
    for name in _PHOTOS:
        img = getattr(skimage.data, name)()
        out.append(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img)
    return out


def smooth_flow(height: int, width: int, rng: np.random.Generator, *, max_flow: float = 3.0) -> np.ndarray:
    """A random smooth flow field (2, H, W) float32: a translation plus low-frequency waves."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    fields = []
    for _ in range(2):
        a, b, c, d = rng.uniform(-1, 1, 4)
        wave = a * np.sin(2 * np.pi * (xx / width * rng.uniform(0.3, 1.0) + c)) + b * np.cos(
            2 * np.pi * (yy / height * rng.uniform(0.3, 1.0) + d)
        )
        fields.append(0.5 * max_flow * (wave / 2 + rng.uniform(-1, 1)))
    return np.stack(fields).astype(np.float32)


def warped_pairs(
    n: int, height: int, width: int, *, max_flow: float = 3.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of photo crops related by a known smooth flow.

    frames1 is a crop of a photo; frames0[y, x] = photo(x + u, y + v) (bicubic, cv2.remap), so
    that frames1[y + v, x + u] = frames0[y, x] with the returned flow (u, v).

    Returns:
        (frames0, frames1, flow): (n, H, W) uint8, (n, H, W) uint8, (n, 2, H, W) float32 pixels.
    """
    rng = np.random.default_rng(seed)
    photos = _photos()
    margin = int(np.ceil(max_flow)) + 2
    f0 = np.empty((n, height, width), np.uint8)
    f1 = np.empty((n, height, width), np.uint8)
    gt = np.empty((n, 2, height, width), np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        photo = photos[i % len(photos)].astype(np.float32)
        if photo.shape[0] < height + 2 * margin or photo.shape[1] < width + 2 * margin:
            raise ValueError(f"warped_pairs: {height}x{width} crops do not fit the {photo.shape} photo")
        y0 = int(rng.integers(margin, photo.shape[0] - height - margin + 1))
        x0 = int(rng.integers(margin, photo.shape[1] - width - margin + 1))
        flow = smooth_flow(height, width, rng, max_flow=max_flow)
        warped = cv2.remap(photo, xx + x0 + flow[0], yy + y0 + flow[1], cv2.INTER_CUBIC)
        f0[i] = np.clip(np.rint(warped), 0, 255)
        f1[i] = photo[y0 : y0 + height, x0 : x0 + width]
        gt[i] = flow
    return f0, f1, gt


def epe(flow: np.ndarray, reference: np.ndarray) -> float:
    """Mean end-point error between two (N, 2, H, W) flows, in pixels."""
    return float(np.sqrt(((flow - reference) ** 2).sum(axis=1)).mean())


class _PeakRSS:
    """Peak resident memory of this process above its level at entry, sampled every 2 ms."""

    def __enter__(self) -> _PeakRSS:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _measure(fn: Callable[[], np.ndarray], memory: str) -> tuple[np.ndarray, float, float | None]:
    """Run `fn`; return (flow, seconds, peak MiB) with memory "rss", "cuda" or "none"."""
    if memory == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        flow = fn()
        torch.cuda.synchronize()
        return flow, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20
    if memory == "rss" and os.path.exists("/proc/self/statm"):
        with _PeakRSS() as peak:
            start = time.perf_counter()
            flow = fn()
            seconds = time.perf_counter() - start
        return flow, seconds, peak.mib
    start = time.perf_counter()
    flow = fn()
    return flow, time.perf_counter() - start, None


# float32 reads + writes per pixel and iteration, counted from the code (see vidistill.flow.fused):
# the bandwidth a run implies is pixel-iterations x these bytes / seconds (an estimate, not a counter)
BYTES_PER_PIXEL_ITERATION = {"eager": 94 * 4, "fused": 16 * 4}


def _parse_size(size: str | tuple[int, int]) -> tuple[int, int]:
    """"320x240" or (320, 240) -> (width, height)."""
    if isinstance(size, str):
        w, sep, h = size.lower().partition("x")
        if not sep or not (w.strip().isdigit() and h.strip().isdigit()):
            raise ValueError(f"bench_flow: a size is WIDTHxHEIGHT, e.g. 320x240; got {size!r}")
        return int(w), int(h)
    return int(size[0]), int(size[1])


def bench_flow(
    sizes: Sequence[str | tuple[int, int]] = ("112x112", "320x240"),
    pairs: int = 16,
    backends: Sequence[str] = BACKENDS,
    *,
    workers: int | None = None,
    reference_pairs: int = 0,
    compile_modes: Sequence[str] = ("off",),
    batch_sizes: Sequence[int] = (0,),
    repeats: int = 1,
    max_flow: float = 3.0,
    seed: int = 0,
    **params: Any,
) -> dict[str, Any]:
    """Time every backend on the same warped-photo pairs, per size, in one run.

    Args:
        sizes: frame sizes, "WIDTHxHEIGHT" (or (width, height)).
        pairs: pairs per size; 16 fill two threads of cache-sized batches (OpenCV takes ~0.3 s per 112x112 pair and ~1.3 s per 320x240 on 2 cores).
            A GPU needs hundreds to fill its default batch (218 pairs of 320x240).
        backends: any of "torch-cpu", "torch-cuda" (skipped without CUDA), "opencv" (one process,
            OpenCV's default threading) and "opencv-mp" (one single-threaded process per worker).
        workers: CPU threads for torch-cpu and processes for opencv-mp; default all cores.
        reference_pairs: OpenCV rows run on the first `reference_pairs` pairs only (0: all), so a
            GPU run of many pairs keeps a short CPU reference; EPE ratios and `epe_vs_opencv` then
            compare every backend on those same pairs, and `speedup` compares pairs/s.
        compile_modes: torch rows per `tvl1(compile=...)` value ("off", "on", "graphs", "auto").
        batch_sizes: torch-cuda rows per batch size (0: `default_batch_size`), with peak memory each.
        repeats: timed runs of each torch-cuda row; the fastest is reported, and `first_seconds`
            is the first run (compilation and CUDA-graph recording included).
        max_flow: scale of the true flow in pixels.
        seed: seed of the crops and flows.
        **params: TV-L1 parameters (OpenCV defaults).

    Returns:
        {"rows": [...], "workers", "reference" (the OpenCV backend the ratios use), "errors": [...], "warmup_seconds" (per
        device/compile mode: the first call on tiny frames, compilation included)}; one row per (size,
        backend, compile mode, batch size): "size" ("WxH"), "backend", "compile", "path" (what
        ran: "eager" or the torch.compile mode), "pairs", "seconds", "pairs_per_s", "epe" (vs the true
        flow, all pairs), "batch_size", "peak_mib" (RSS growth on CPU, allocated on CUDA; None for the
        process pool); torch rows add "pixel_iterations_per_pair" and "model_gb_s" (the memory
        traffic those iterations imply, from `BYTES_PER_PIXEL_ITERATION`, per second); with an
        OpenCV row (single-process "opencv" if it ran, else "opencv-mp": the same flow), every row
        adds "epe_ref" (EPE on the reference pairs), "epe_ratio" (over OpenCV's there),
        "epe_vs_opencv" (mean distance to OpenCV's flow there) and "speedup" (pairs/s over OpenCV's). A row that failed carries "error" instead
        of timings, and the run goes on.

    Raises:
        ValueError: on an unknown backend or compile mode, or a bad size, count or batch size.
    """
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ValueError(f"bench_flow: unknown backends {unknown}; choose from {BACKENDS}")
    bad = sorted(set(compile_modes) - set(COMPILE_CHOICES))
    if bad or not compile_modes:
        raise ValueError(f"bench_flow: compile_modes must be some of {COMPILE_CHOICES}, got {tuple(compile_modes)}")
    if pairs < 1 or reference_pairs < 0 or repeats < 1 or any(b < 0 for b in batch_sizes) or not batch_sizes:
        raise ValueError(f"bench_flow: need pairs >= 1, reference_pairs >= 0, repeats >= 1 and batch sizes >= 0 "
                         f"(0 = default); got pairs={pairs}, reference_pairs={reference_pairs}, repeats={repeats}, "
                         f"batch_sizes={tuple(batch_sizes)}")
    size_list = [_parse_size(s) for s in sizes]
    p = TVL1Params.from_kwargs(**params)
    workers = workers or os.cpu_count() or 1
    cuda = "torch-cuda" in backends and torch.cuda.is_available()
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    reference = None
    # first calls (process pool start, torch's lazy initialisation) stay outside the timings
    warm, tiny = np.zeros((2 * workers, 48, 48), np.uint8), TVL1Params(nscales=1, warps=1)
    if "opencv-mp" in backends:
        tvl1_opencv(warm, warm, tiny, workers=workers)
    warmup_seconds: dict[str, float] = {}
    for device in [torch.device("cpu")] * ("torch-cpu" in backends) + [torch.device("cuda")] * cuda:
        # 3 pairs of 40x56: no size-1 or H == W specialisation in the shapes torch.compile first sees
        warm3 = np.zeros((3, 40, 56), np.uint8)
        for mode in compile_modes:
            start = time.perf_counter()
            try:
                tvl1_torch(warm3, warm3, tiny, device=device, threads=workers, compile=mode)
            except Exception as e:  # noqa: BLE001 - recorded; the timed rows of this mode fail alike and say so
                errors.append(f"warm-up {device.type} compile={mode}: {type(e).__name__}: {e}".splitlines()[0][:300])
            warmup_seconds[f"{device.type}/{mode}"] = round(time.perf_counter() - start, 2)
    for width, height in size_list:
        f0, f1, gt = warped_pairs(pairs, height, width, max_flow=max_flow, seed=seed)
        g0, g1 = prepare_pairs(f0, f1, p)
        k = min(reference_pairs or pairs, pairs)
        # (backend, compile mode, batch size, callable returning (flow, stats), memory kind, repeats)
        runs: list[tuple[str, str, int, Callable[[], tuple[np.ndarray, dict[str, Any]]], str, int]] = []

        def torch_run(device: torch.device, bs: int, mode: str) -> Callable[[], tuple[np.ndarray, dict[str, Any]]]:
            def run() -> tuple[np.ndarray, dict[str, Any]]:
                st: dict[str, Any] = {}
                flow = tvl1_torch(g0, g1, p, device=device, batch_size=bs, threads=workers, compile=mode, stats=st)
                return flow, st
            return run

        for name in backends:
            if name == "torch-cpu":
                bs = default_batch_size(height, width, torch.device("cpu"), pairs=pairs, threads=workers)
                runs += [(name, mode, bs, torch_run(torch.device("cpu"), bs, mode), "rss", 1) for mode in compile_modes]
            elif name == "torch-cuda" and cuda:
                for b in batch_sizes:
                    bs = b or default_batch_size(height, width, torch.device("cuda"), pairs=pairs)
                    runs += [(name, mode, bs, torch_run(torch.device("cuda"), bs, mode), "cuda", repeats) for mode in compile_modes]
            elif name == "opencv":
                runs.append((name, "", 1, lambda: (tvl1_opencv(g0[:k], g1[:k], p, workers=1), {}), "rss", 1))
            elif name == "opencv-mp":
                runs.append((name, "", 1, lambda: (tvl1_opencv(g0[:k], g1[:k], p, workers=workers), {}), "none", 1))
        results = []
        for name, mode, bs, fn, memory, reps in runs:
            row: dict[str, Any] = {"size": f"{width}x{height}", "backend": name, "compile": mode or None,
                                   "pairs": k if name.startswith("opencv") else pairs, "batch_size": bs}
            try:
                timings = []
                for _ in range(reps):
                    out: dict[str, Any] = {}
                    flow, seconds, peak = _measure(lambda out=out: _store(out, fn()), memory)
                    timings.append((seconds, peak))
                stats = out["stats"]
            except Exception as e:  # noqa: BLE001 - one failing configuration must not hide the others
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                errors.append(f"{row['size']} {name} compile={mode or '-'} batch={bs}: {row['error']}")
                rows.append(row)
                if memory == "cuda":
                    torch.cuda.empty_cache()
                continue
            seconds, peak = min(timings)
            row.update({"seconds": round(seconds, 3), "pairs_per_s": round(row["pairs"] / seconds, 3),
                        "epe": round(epe(flow, gt[: len(flow)]), 4), "peak_mib": None if peak is None else round(peak, 1)})
            if reps > 1:
                row["first_seconds"] = round(timings[0][0], 3)
            if "pixel_iterations" in stats:
                row["path"] = stats["path"]
                per_pair = stats["pixel_iterations"] / pairs
                bytes_per = BYTES_PER_PIXEL_ITERATION["eager" if stats["path"] == "eager" else "fused"]
                row["pixel_iterations_per_pair"] = round(per_pair)
                row["model_gb_s"] = round(stats["pixel_iterations"] * bytes_per / seconds / 1e9, 1)
            results.append((row, flow))
            rows.append(row)
        # the reference: single-process OpenCV, else the process pool (the same flow: one OpenCV per pair)
        ref = next(((r, f) for name in ("opencv", "opencv-mp") for r, f in results if r["backend"] == name), None)
        if ref is not None:
            ref_row, ref_flow = ref
            ref_epe = epe(ref_flow, gt[:k])
            reference = ref_row["backend"]
            for row, flow in results:
                row["epe_ref"] = round(epe(flow[:k], gt[:k]), 4)
                row["epe_ratio"] = round(row["epe_ref"] / max(ref_epe, 1e-9), 3)
                row["epe_vs_opencv"] = round(epe(flow[:k], ref_flow), 4)
                row["speedup"] = round(row["pairs_per_s"] / ref_row["pairs_per_s"], 2)
    return {"rows": rows, "workers": workers, "reference": reference, "errors": errors, "warmup_seconds": warmup_seconds}


def _store(out: dict[str, Any], result: tuple[np.ndarray, dict[str, Any]]) -> np.ndarray:
    """Keep a run's stats in `out` and hand its flow to `_measure`."""
    flow, out["stats"] = result
    return flow


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows of `bench_flow` as an aligned text table."""
    keys = ["size", "backend", "compile", "path", "pairs", "seconds", "first_seconds", "pairs_per_s", "speedup", "epe", "epe_ref",
            "epe_ratio", "epe_vs_opencv", "batch_size", "peak_mib", "pixel_iterations_per_pair", "model_gb_s", "error"]
    keys = [k for k in keys if any(k in r for r in rows)]
    cells = [keys] + [[str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells)


if __name__ == "__main__":
    print(format_rows(bench_flow()["rows"]))
