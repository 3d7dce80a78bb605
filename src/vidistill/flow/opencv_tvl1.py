"""Reference backend: OpenCV's `cv2.optflow.DualTVL1OpticalFlow`, spread over processes.

Each worker process runs single-threaded OpenCV (`cv2.setNumThreads(1)`) on its own pairs, which
uses every core without contention between OpenCV's internal thread pools.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np

from vidistill.flow.params import TVL1Params

_POOL: ProcessPoolExecutor | None = None
_POOL_WORKERS = 0
_SOLVERS: dict[TVL1Params, cv2.optflow.DualTVL1OpticalFlow] = {}


def _solver(params: TVL1Params) -> cv2.optflow.DualTVL1OpticalFlow:
    """One DualTVL1 object per parameter set per process (it keeps its buffers between calls)."""
    if params not in _SOLVERS:
        p = params
        # positional: the Python binding misspells one keyword (innnerIterations)
        _SOLVERS[params] = cv2.optflow.DualTVL1OpticalFlow_create(
            p.tau, p.lambda_, p.theta, p.nscales, p.warps, p.epsilon, p.inner_iterations,
            p.outer_iterations, p.scale_step, 0.0, p.median_filtering,
        )
    return _SOLVERS[params]


def _calc(gray0: np.ndarray, gray1: np.ndarray, params: TVL1Params) -> np.ndarray:
    """(B, H, W) pairs -> (B, 2, H, W) float32 flow, in this process."""
    solver = _solver(params)
    out = np.empty((gray0.shape[0], 2, *gray0.shape[1:]), dtype=np.float32)
    for i in range(gray0.shape[0]):
        out[i] = solver.calc(gray0[i], gray1[i], None).transpose(2, 0, 1)
    return out


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _shutdown() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(cancel_futures=True)
        _POOL = None


def process_pool(workers: int) -> ProcessPoolExecutor:
    """The module's shared pool of `workers` single-threaded OpenCV processes (made on first use).

    Workers are spawned, not forked: a forked child inherits OpenCV's and OpenMP's thread pools
    without their threads and deadlocks in them. As with any spawned pool, a script that calls
    this must guard its entry point with `if __name__ == "__main__":`.
    """
    global _POOL, _POOL_WORKERS
    if _POOL is None or _POOL_WORKERS != workers:
        _shutdown()
        ctx = multiprocessing.get_context("spawn")
        _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker)
        _POOL_WORKERS = workers
    return _POOL


atexit.register(_shutdown)


def tvl1_opencv(
    gray0: np.ndarray, gray1: np.ndarray, params: TVL1Params, *, workers: int | None = None
) -> np.ndarray:
    """TV-L1 flow with OpenCV for N pairs.

    Args:
        gray0, gray1: (N, H, W) uint8, or float32 in [0, 1] (validated by `prepare_pairs`).
        params: TV-L1 parameters.
        workers: processes; 1 computes in this process with OpenCV's own threading; default
            `os.cpu_count()`.

    Returns:
        (N, 2, H, W) float32 flow in pixels.
    """
    n = gray0.shape[0]
    workers = min(workers or os.cpu_count() or 1, n)
    if workers <= 1:
        return _calc(gray0, gray1, params)
    pool = process_pool(workers)
    # a few chunks per worker balances uneven convergence without much pickling
    bounds = np.linspace(0, n, min(n, 4 * workers) + 1).astype(int)
    futures = [pool.submit(_calc, gray0[a:b], gray1[a:b], params) for a, b in zip(bounds[:-1], bounds[1:])]
    return np.concatenate([f.result() for f in futures])
