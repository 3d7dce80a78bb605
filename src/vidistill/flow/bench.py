"""Speed and accuracy of the TV-L1 backends, in one run, on photos warped by known smooth flow.

`bench_flow()` times torch on CPU, torch on CUDA (when available), OpenCV in one process and
OpenCV over a process pool on the same pairs, and reports pairs/s, end-point error (EPE) against
the true flow, peak memory and ratios against single-process OpenCV (the reference).
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


def bench_flow(
    sizes: Sequence[tuple[int, int]] = ((112, 112), (320, 240)),
    pairs: int = 16,
    backends: Sequence[str] = BACKENDS,
    *,
    workers: int | None = None,
    max_flow: float = 3.0,
    seed: int = 0,
    **params: Any,
) -> dict[str, Any]:
    """Time every backend on the same warped-photo pairs, per size, in one run.

    Args:
        sizes: frame sizes as (width, height).
        pairs: pairs per size; 16 fill two threads of cache-sized batches (OpenCV takes ~0.3 s per 112x112 pair and ~1.3 s per 320x240 on 2 cores).
        backends: any of "torch-cpu", "torch-cuda" (skipped without CUDA), "opencv" (one process,
            OpenCV's default threading) and "opencv-mp" (one single-threaded process per worker).
        workers: CPU threads for torch-cpu and processes for opencv-mp; default all cores.
        max_flow: scale of the true flow in pixels.
        seed: seed of the crops and flows.
        **params: TV-L1 parameters (OpenCV defaults).

    Returns:
        {"rows": [...], "workers": workers, "reference": "opencv"}, one row per (size, backend): {"size": "WxH", "backend", "pairs", "seconds", "pairs_per_s",
        "epe" (vs the true flow), "epe_vs_opencv" (mean EPE between this flow and OpenCV's),
        "speedup" and "epe_ratio" (vs single-process OpenCV, when it ran), "batch_size",
        "peak_mib" (peak memory of the call: RSS growth on CPU, allocated on CUDA; None for the
        process pool)}.

    Raises:
        ValueError: on an unknown backend name.
    """
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ValueError(f"bench_flow: unknown backends {unknown}; choose from {BACKENDS}")
    p = TVL1Params.from_kwargs(**params)
    workers = workers or os.cpu_count() or 1
    rows: list[dict[str, Any]] = []
    # first calls (process pool start, torch's lazy initialisation) stay outside the timings
    warm, tiny = np.zeros((2 * workers, 48, 48), np.uint8), TVL1Params(nscales=1, warps=1)
    if "opencv-mp" in backends:
        tvl1_opencv(warm, warm, tiny, workers=workers)
    if "torch-cpu" in backends:
        tvl1_torch(warm, warm, tiny, device=torch.device("cpu"), threads=workers)
    if "torch-cuda" in backends and torch.cuda.is_available():
        tvl1_torch(warm, warm, tiny, device=torch.device("cuda"))
    for width, height in sizes:
        f0, f1, gt = warped_pairs(pairs, height, width, max_flow=max_flow, seed=seed)
        g0, g1 = prepare_pairs(f0, f1, p)
        runs: dict[str, tuple[Callable[[], np.ndarray], str, int | None]] = {}
        for name in backends:
            if name == "torch-cpu":
                bs = default_batch_size(height, width, torch.device("cpu"), pairs=pairs, threads=workers)
                runs[name] = (lambda bs=bs: tvl1_torch(g0, g1, p, device=torch.device("cpu"), batch_size=bs, threads=workers), "rss", bs)
            elif name == "torch-cuda" and torch.cuda.is_available():
                bs = default_batch_size(height, width, torch.device("cuda"), pairs=pairs)
                runs[name] = (lambda bs=bs: tvl1_torch(g0, g1, p, device=torch.device("cuda"), batch_size=bs), "cuda", bs)
            elif name == "opencv":
                runs[name] = (lambda: tvl1_opencv(g0, g1, p, workers=1), "rss", 1)
            elif name == "opencv-mp":
                runs[name] = (lambda: tvl1_opencv(g0, g1, p, workers=workers), "none", 1)
        results = {name: _measure(fn, memory) for name, (fn, memory, _) in runs.items()}
        ref = results.get("opencv")
        ref_epe = epe(ref[0], gt) if ref is not None else None
        for name, (flow, seconds, peak) in results.items():
            flow_epe = epe(flow, gt)
            row: dict[str, Any] = {
                "size": f"{width}x{height}",
                "backend": name,
                "pairs": pairs,
                "seconds": round(seconds, 3),
                "pairs_per_s": round(pairs / seconds, 3),
                "epe": round(flow_epe, 4),
                "batch_size": runs[name][2],
                "peak_mib": None if peak is None else round(peak, 1),
            }
            if ref is not None and ref_epe is not None:
                row["epe_vs_opencv"] = round(epe(flow, ref[0]), 4)
                row["speedup"] = round(ref[1] / seconds, 2)
                row["epe_ratio"] = round(flow_epe / max(ref_epe, 1e-9), 3)
            rows.append(row)
    return {"rows": rows, "workers": workers, "reference": "opencv"}


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows of `bench_flow` as an aligned text table."""
    keys = ["size", "backend", "pairs", "seconds", "pairs_per_s", "speedup", "epe", "epe_ratio", "epe_vs_opencv", "batch_size", "peak_mib"]
    keys = [k for k in keys if any(k in r for r in rows)]
    cells = [keys] + [[str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells)


if __name__ == "__main__":
    print(format_rows(bench_flow()["rows"]))
