"""Dynamic batching shared by the REST and gRPC front ends.

Concurrent requests are put on one asyncio queue; a worker gathers them for up to `max_wait_ms`
or `max_batch` clips, runs ONNX Runtime once on the concatenated batch (in a thread, so the event
loop keeps accepting requests), and hands each request its own rows. Up to `inflight` batches run
at once, so the next batch gathers while one is in ONNX Runtime. Without batching each request
runs ONNX Runtime on its own, also in a thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from vidistill.serve.metrics import ServerMetrics

RunFn = Callable[[np.ndarray], dict[str, np.ndarray]]


class Runner:
    """Runs the model for the front ends, with or without dynamic batching.

    Args:
        run: the model call, (B, 3, T, H, W) float32 -> {output name: (B, ...)}.
        metrics: where batch sizes and inference times go.
        batching: gather concurrent requests into one call.
        max_batch: clips per gathered batch (a single larger request still runs whole).
        max_wait_ms: how long the first request of a batch waits for others, in ms.
        inflight: batches in ONNX Runtime at once (the next batch gathers while they run).
    """

    def __init__(self, run: RunFn, metrics: ServerMetrics, *, batching: bool, max_batch: int, max_wait_ms: float,
                 inflight: int = 2) -> None:
        self._run = run
        self.metrics = metrics
        self.batching = batching
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.inflight = inflight
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] | None = None
        self.task: asyncio.Task | None = None

    def _timed_run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        outs = self._run(x)
        self.metrics.inference.observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(x.shape[0])
        return outs

    def start(self) -> None:
        """Start the batching worker on the running loop (no-op without batching)."""
        if self.batching and self.task is None:
            self.queue = asyncio.Queue()
            self.task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None

    async def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on `x` (B, 3, T, H, W); returns this request's outputs only."""
        if self.queue is None:
            return await asyncio.to_thread(self._timed_run, x)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, fut))
        return await fut

    async def _worker(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.inflight)
        running: set[asyncio.Task] = set()
        while True:
            await slots.acquire()  # at most `inflight` batches in ONNX Runtime; the next one gathers meanwhile
            items = [await self.queue.get()]
            total = items[0][0].shape[0]
            deadline = loop.time() + self.max_wait
            while total < self.max_batch:
                if self.queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), remaining)
                    except TimeoutError:
                        break
                else:
                    item = self.queue.get_nowait()
                items.append(item)
                total += item[0].shape[0]
            task = loop.create_task(self._run_batch(items, slots))
            running.add(task)
            task.add_done_callback(running.discard)

    async def _run_batch(self, items: list[tuple[np.ndarray, asyncio.Future]], slots: asyncio.Semaphore) -> None:
        try:
            batch = items[0][0] if len(items) == 1 else np.concatenate([x for x, _ in items])  # (sum B, 3, T, H, W)
            try:
                outs = await asyncio.to_thread(self._timed_run, batch)
            except Exception as e:  # an ONNX Runtime failure goes to every waiting request
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                return
            start = 0
            for x, fut in items:
                n = x.shape[0]
                if not fut.done():
                    fut.set_result({k: v[start : start + n] for k, v in outs.items()})
                start += n
        finally:
            slots.release()
