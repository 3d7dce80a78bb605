"""Process pools and progress bars shared by the data stages."""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator

import cv2
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class InProcess:
    """`Executor.map` in this process: small jobs do not pay for starting worker processes."""

    def __enter__(self) -> "InProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
        return map(fn, items)


def single_thread_worker() -> None:
    """Worker initializer: one OpenCV thread per process (the processes are the parallelism)."""
    cv2.setNumThreads(1)


#: Fewer work items than this run in-process: starting a pool costs about a second.
PARALLEL_MIN_JOBS = 32

#: Modules the forkserver imports once, so that each worker process starts without importing them.
PRELOAD = ["vidistill.data.prep", "vidistill.data.synthetic"]


def use_pool(workers: int, jobs: int) -> bool:
    """Whether `executor(workers, jobs)` starts worker processes."""
    return workers > 1 and jobs >= PARALLEL_MIN_JOBS


def executor(workers: int, jobs: int) -> Executor | InProcess:
    """A pool of `workers` processes for `jobs` work items, or in-process work (`workers <= 1` or few jobs).

    The pool uses the forkserver start method: workers never inherit the parent's threads (the
    progress bar's refresh thread, BLAS and OpenMP pools, tracking clients), which `fork` could
    leave in a locked state; the server preloads `PRELOAD` so workers start in milliseconds.
    """
    if not use_pool(workers, jobs):
        return InProcess()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=single_thread_worker)


def ordered_map(pool: Executor | InProcess, fn: Callable[[Any], Any], items: list[Any], *,
                chunksize: int = 1) -> Iterator[Any]:
    """`pool.map(fn, items)` (results in order), with a clear message when a worker process dies.

    Raises:
        RuntimeError: a worker process died: most often a script that starts work at import time
            without an `if __name__ == "__main__":` guard (the workers import the main module).
    """
    try:
        yield from pool.map(fn, items, chunksize=chunksize)
    except BrokenProcessPool as e:
        raise RuntimeError("a worker process died. If this runs from a script, put its entry point under "
                           "`if __name__ == \"__main__\":` (worker processes import the main module), or use "
                           "workers=1; otherwise the process ran out of memory or crashed") from e


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar (a no-op display when `enabled` is False)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not enabled)
