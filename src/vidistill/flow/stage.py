"""The `vidistill flow` stage: TV-L1 flow for every clip shard written by `vidistill prep`.

Input (data contract): `clips/manifest.json` and `clips/<split>/clips-NNNNN.npy`, uint8
(n, T, S, S, 3) RGB. Output: `out/<split>/flow-NNNNN.npy`, uint8 (n, T-1, S, S, 2) aligned row for
row with the clip shards, and `out/manifest.json`.

Resumable: shards are written atomically (temporary file + `os.replace`) and the manifest after
each shard, so a rerun with the same clips and parameters skips every shard already on disk. A clip
whose flow fails (an exception, or NaN/Inf in the result) is stored as zeros, which keeps the
alignment, and listed in the manifest's "failed" with the reason.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vidistill.config import ConfigError, FlowConfig
from vidistill.flow.api import resolve_device, tvl1
from vidistill.flow.codec import encode_flow
from vidistill.flow.params import TVL1Params, check_size

FORMAT = 1


def _atomic_write(path: Path, write: Any) -> None:
    """Write through `write(file)` to a temporary sibling of `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def _shards(split_dir: Path) -> list[tuple[int, Path]]:
    """(shard number, path) of `clips-NNNNN.npy` in a split folder, in shard order."""
    found = []
    for path in split_dir.glob("clips-*.npy"):
        try:
            found.append((int(path.stem.split("-", 1)[1]), path))
        except ValueError:
            continue
    return sorted(found)


def _shard_done(path: Path, shape: tuple[int, ...]) -> bool:
    """Whether a finished flow shard of `shape` is at `path` (atomic writes: present means whole)."""
    if not path.exists():
        return False
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == shape and arr.dtype == np.uint8


def _gray(clips: np.ndarray) -> np.ndarray:
    """(n, T, S, S, 3) uint8 RGB -> (n, T, S, S) uint8 gray with OpenCV's weights."""
    n, t, h, w, _ = clips.shape
    tall = np.ascontiguousarray(clips).reshape(n * t * h, w, 3)
    return cv2.cvtColor(tall, cv2.COLOR_RGB2GRAY).reshape(n, t, h, w)


class _FlowRunner:
    """Computes encoded flow for groups of clips, isolating the clips that fail.

    `processes`: how many worker processes `run_flow` spreads the groups over (the torch backend on CPU
    with `cfg.workers` > 1; 1 otherwise). Each process then solves its groups with one thread."""

    def __init__(self, cfg: FlowConfig, params: TVL1Params, *, in_worker: bool = False) -> None:
        self.cfg = cfg
        self.params = params
        self.kwargs: dict[str, Any] = {"backend": cfg.backend, "workers": cfg.workers, **params.as_dict()}
        self.processes = 1
        if cfg.backend == "torch":
            device = resolve_device(cfg.device)
            if device.type == "cpu" and cfg.workers > 1:
                # processes, not threads: at clip sizes the per-op overhead of the batched solver is Python
                # time, which threads serialise on the GIL (2 processes: 2.3x the pairs/s of 2 threads on
                # the demo's 56x56 clips, README "Results on this machine")
                self.processes = 1 if in_worker else cfg.workers
                self.kwargs["workers"] = 1
            self.kwargs["device"] = device
            self.kwargs["compile"] = cfg.tvl1_compile  # off | on | graphs | auto (flow/fused.py)
            # GPU: one batch per call; CPU: tvl1 splits each call into cache-sized batches
            if device.type != "cpu":
                self.kwargs["batch_size"] = cfg.batch_size

    def _flow(self, gray: np.ndarray) -> np.ndarray:
        """(k, T, S, S) gray clips -> (k, T-1, S, S, 2) float32 flow in pixels."""
        k, t, h, w = gray.shape
        f0 = gray[:, :-1].reshape(k * (t - 1), h, w)
        f1 = gray[:, 1:].reshape(k * (t - 1), h, w)
        flow = tvl1(f0, f1, **self.kwargs)
        return flow.reshape(k, t - 1, 2, h, w).transpose(0, 1, 3, 4, 2)

    def run(self, gray: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        """Encoded flow (k, T-1, S, S, 2) uint8 for k clips, and {row: reason} for failed clips."""
        k, t, h, w = gray.shape
        out = np.zeros((k, t - 1, h, w, 2), dtype=np.uint8)
        failed: dict[int, str] = {}
        try:
            flows = self._flow(gray)
        except Exception as e:  # noqa: BLE001 - a failing clip must not stop the stage; isolate it below
            if k == 1:
                return out, {0: f"{type(e).__name__}: {e}"}
            for i in range(k):  # find the clips that fail by computing them one at a time
                enc, bad = self.run(gray[i : i + 1])
                out[i] = enc[0]
                if bad:
                    failed[i] = bad[0]
            return out, failed
        for i, flow in enumerate(flows):
            if not np.isfinite(flow).all():
                failed[i] = "flow has NaN/Inf values"
                continue
            out[i] = encode_flow(flow, self.cfg.bound)
        return out, failed


_WORKER: _FlowRunner | None = None  # the runner of a flow worker process


def _init_worker(cfg: FlowConfig, params: TVL1Params) -> None:
    """Flow worker process: one torch and one OpenCV thread (the processes are the parallelism)."""
    global _WORKER
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    _WORKER = _FlowRunner(cfg, params, in_worker=True)


def _run_in_worker(gray: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    assert _WORKER is not None
    return _WORKER.run(gray)


MIN_GROUPS_FOR_PROCESSES = 4  # fewer groups of clips are solved in this process: a pool costs seconds to start


@contextmanager
def _solver(runner: _FlowRunner, cfg: FlowConfig, params: TVL1Params, processes: int) -> Iterator[Any]:
    """Yields `solve(groups)` -> `runner.run` results in order: in this process, or over `processes`
    worker processes (forkserver, as the data stages' pools)."""
    if processes <= 1:
        yield lambda groups: map(runner.run, groups)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from vidistill.data.parallel import ordered_map

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["vidistill.flow.stage"])
    pool = ProcessPoolExecutor(processes, mp_context=ctx, initializer=_init_worker, initargs=(cfg, params))
    try:
        yield lambda groups: ordered_map(pool, _run_in_worker, list(groups))
    finally:
        pool.shutdown(cancel_futures=True)


def run_flow(cfg: FlowConfig, *, progress: bool = True) -> dict[str, Any]:
    """Compute TV-L1 flow for every clip of `cfg.clips` into `cfg.out` (resumable).

    Args:
        cfg: the flow stage configuration (validated here).
        progress: show a rich progress bar.

    Returns:
        Summary: {"pairs": pairs computed in this run, "seconds", "pairs_per_s", "failed": clips
        failed so far, "shards": shards written, "skipped_shards": shards already done, "out"}.

    Raises:
        ConfigError: on invalid parameters or a missing/malformed clips folder.
    """
    cfg.validate()
    clips_root, out_root = Path(cfg.clips), Path(cfg.out)
    manifest_path = clips_root / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"flow.clips: no manifest.json in {clips_root}; run `vidistill prep` first or fix flow.clips")
    clips_manifest = json.loads(manifest_path.read_text())
    frames, size = int(clips_manifest.get("frames", 0)), int(clips_manifest.get("size", 0))
    if frames < 2:
        raise ConfigError(f"flow.clips: clips in {clips_root} have {frames} frames; flow needs at least 2")
    params = cfg.tvl1
    try:
        check_size(size, size, params)
    except ValueError as e:
        raise ConfigError(f"flow: clip size {size} does not fit the TV-L1 pyramid: {e}") from e

    run_params = {"backend": cfg.backend, **params.as_dict()}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "clips_hash": clips_manifest.get("hash"),
        "bound": cfg.bound,
        "params": run_params,
        "failed": [],
        "shards": {},
    }
    out_manifest_path = out_root / "manifest.json"
    if out_manifest_path.is_file():
        previous = json.loads(out_manifest_path.read_text())
        same = all(previous.get(key) == manifest[key] for key in ("format", "clips_hash", "bound", "params"))
        if same:  # resume: keep what finished shards reported
            manifest["failed"] = previous.get("failed", [])
            manifest["shards"] = previous.get("shards", {})

    splits = sorted(clips_manifest.get("splits", {}))
    work: list[tuple[str, int, Path, Path, tuple[int, ...], int]] = []
    skipped = 0
    for split in splits:
        first = 0  # global clip index of the shard's first row
        for number, clip_path in _shards(clips_root / split):
            n, t, h, w, c = np.load(clip_path, mmap_mode="r").shape
            if (t, h, w, c) != (frames, size, size, 3):
                raise ConfigError(f"flow.clips: {clip_path} has shape {(n, t, h, w, c)}, expected (n, {frames}, {size}, {size}, 3)")
            flow_path = out_root / split / f"flow-{number:05d}.npy"
            shape = (n, frames - 1, size, size, 2)
            key = f"{split}/{number:05d}"
            if key in manifest["shards"] and _shard_done(flow_path, shape):
                skipped += 1
            else:
                manifest["shards"].pop(key, None)
                manifest["failed"] = [f for f in manifest["failed"] if (f["split"], f["shard"]) != (split, number)]
                work.append((split, number, clip_path, flow_path, shape, first))
            first += n

    runner = _FlowRunner(cfg, params)
    clips_per_call = max(1, cfg.batch_size // (frames - 1))  # cfg.batch_size pairs per tvl1 call
    total_pairs = sum(shape[0] * shape[1] for *_, shape, _ in work)
    done_pairs = 0
    out_root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    columns = (TextColumn("[bold]flow[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("pairs"), TimeElapsedColumn(), TimeRemainingColumn())
    groups = sum(-(-shape[0] // clips_per_call) for *_, shape, _ in work)
    processes = runner.processes if groups >= MIN_GROUPS_FOR_PROCESSES else 1
    with Progress(*columns, disable=not progress) as bar, _solver(runner, cfg, params, processes) as solve:
        task = bar.add_task("", total=total_pairs)
        for split, number, clip_path, flow_path, shape, first in work:
            bar.update(task, description=f"{split}/{flow_path.name}")
            clips = np.load(clip_path)
            encoded = np.zeros(shape, dtype=np.uint8)
            shard_failed = []
            starts = range(0, shape[0], clips_per_call)
            for lo, (enc, bad) in zip(starts, solve(_gray(clips[lo : lo + clips_per_call]) for lo in starts)):
                encoded[lo : lo + len(enc)] = enc
                shard_failed += [
                    {"split": split, "index": first + lo + row, "shard": number, "offset": lo + row, "reason": reason}
                    for row, reason in sorted(bad.items())
                ]
                bar.advance(task, len(enc) * (frames - 1))
                done_pairs += len(enc) * (frames - 1)
            flow_path.parent.mkdir(parents=True, exist_ok=True)
            # manifest first: a crash before the shard lands only makes the rerun redo this shard
            manifest["failed"] += shard_failed
            manifest["shards"][f"{split}/{number:05d}"] = shape[0]
            _write_json(out_manifest_path, manifest)
            _atomic_write(flow_path, lambda f, arr=encoded: np.save(f, arr))
    _write_json(out_manifest_path, manifest)
    seconds = time.perf_counter() - start
    return {
        "pairs": done_pairs,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(done_pairs / seconds, 3) if done_pairs else 0.0,
        "failed": len(manifest["failed"]),
        "shards": len(work),
        "skipped_shards": skipped,
        "processes": processes,
        "out": str(out_root),
    }
