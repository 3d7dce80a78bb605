"""Benchmark of the prep stage against a plain single-process PyAV loop (`vidistill bench prep`)."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from vidistill.config import PrepConfig
from vidistill.data.layouts import parse_folder
from vidistill.data.parallel import use_pool
from vidistill.data.prep import run_prep
from vidistill.data.synthetic import encode_video
from vidistill.data.video import eval_indices, train_indices, video_rng


def _moving_texture(rng: np.random.Generator, frames: int, height: int, width: int) -> np.ndarray:
    """A smooth colour texture panning a few pixels per frame, uint8 `(T, H, W, 3)`."""
    dx, dy = rng.integers(1, 4, 2)
    big = rng.integers(0, 256, (height // 8 + frames * dy // 8 + 2, width // 8 + frames * dx // 8 + 2, 3), np.uint8)
    big = cv2.resize(big, (big.shape[1] * 8, big.shape[0] * 8), interpolation=cv2.INTER_CUBIC)
    return np.stack([big[t * dy: t * dy + height, t * dx: t * dx + width] for t in range(frames)])


def _reference(cfg: PrepConfig, root: Path) -> tuple[float, int]:
    """The same clips with a plain loop: one process, decode every frame, convert every frame to RGB."""
    t0 = time.perf_counter()
    decoded = 0
    for vid, it in enumerate(parse_folder(root, test_fraction=cfg.test_fraction, seed=cfg.seed).items):
        with av.open(str(root / it.relpath)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        decoded += len(frames)
        n = len(frames)
        if it.split == "train":
            idx = train_indices(n, frames=cfg.frames, stride=cfg.stride, clips=cfg.clips_per_video_train,
                                rng=video_rng(cfg.seed, it.relpath), policy=cfg.short_policy)
        else:
            idx = eval_indices(n, frames=cfg.frames, stride=cfg.stride, clips=cfg.clips_per_video_test,
                               policy=cfg.short_policy)
        for i in idx.ravel():
            f = frames[i]
            s = cfg.short_side / min(f.shape[:2])
            cv2.resize(f, (round(f.shape[1] * s), round(f.shape[0] * s)), interpolation=cv2.INTER_AREA)
    return time.perf_counter() - t0, decoded


def bench_prep(*, videos: int = 40, width: int = 320, height: int = 240, frames: int = 150, workers: int = 2,
               repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Time `run_prep` on `videos` real `width x height` videos and a plain PyAV loop on the same ones.

    Prep and the reference run alternately `repeats` times; the median of each is reported (the
    first prep run includes starting the worker pool).

    Args:
        videos: videos to write (two classes, folder layout); from `parallel.PARALLEL_MIN_JOBS`
            on, prep decodes in a pool of `workers` processes.
        width: frame width.
        height: frame height.
        frames: frames per video (150 at 25 fps is about a UCF101 clip).
        workers: prep decoding processes.
        repeats: timed runs of each.
        seed: content and sampling seed.

    Returns:
        Flat headline numbers (`prep_s`, `prep_frames_per_s`, `reference_s`, `reference_frames_per_s`,
        `speedup`, `peak_rss_mb`, `peak_rss_mb_worker`), `machine`, `setup` (what was measured), `prep` and `reference` each with `seconds` (median),
        `seconds_all`, `frames_decoded`, `frames_per_s`, `videos_per_s`. `peak_rss_mb` is this
        process's `resource.getrusage` max RSS, `peak_rss_mb_worker` the largest decoding process's
        (reported by the workers themselves); `speedup` is reference seconds / prep seconds.
    """
    rng = np.random.default_rng(seed)
    prep_times, ref_times = [], []
    with tempfile.TemporaryDirectory(prefix="vidistill-bench-") as tmp:
        root = Path(tmp) / "videos"
        for i in range(videos):
            cls = f"class{i % 2}"
            (root / cls).mkdir(parents=True, exist_ok=True)
            encode_video(root / cls / f"v{i:03d}.avi", _moving_texture(rng, frames, height, width), fps=25, codec="mpeg4")
        cfg = PrepConfig(dataset="folder", root=str(root), out=str(Path(tmp) / "clips"), workers=workers, seed=seed)
        for _ in range(repeats):
            summary = run_prep(cfg, progress=False)
            prep_times.append(summary["seconds"])
            ref_s, ref_frames = _reference(cfg, root)
            ref_times.append(ref_s)
    prep_s, ref_s = float(np.median(prep_times)), float(np.median(ref_times))
    return {
        "prep_s": prep_s, "prep_frames_per_s": summary["frames_decoded"] / prep_s, "reference_s": ref_s,
        "reference_frames_per_s": ref_frames / ref_s, "speedup": ref_s / prep_s,
        "peak_rss_mb": summary["peak_rss_mb"]["main"], "peak_rss_mb_worker": summary["peak_rss_mb"]["worker"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
                   f"PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info})",
        "setup": {"videos": videos, "size": f"{width}x{height}", "frames_per_video": frames, "workers": workers,
                  "process_pool": use_pool(workers, videos),
                  "repeats": repeats, "clip": f"T={cfg.frames} stride={cfg.stride} short_side={cfg.short_side} crop={cfg.crop}"},
        "prep": {"seconds": prep_s, "seconds_all": prep_times, "frames_decoded": summary["frames_decoded"],
                 "frames_per_s": summary["frames_decoded"] / prep_s, "videos_per_s": videos / prep_s,
                 "peak_rss_mb": summary["peak_rss_mb"]["main"], "peak_rss_mb_worker": summary["peak_rss_mb"]["worker"],
                 "skipped": len(summary["skipped"])},
        "reference": {"seconds": ref_s, "seconds_all": ref_times, "frames_decoded": ref_frames,
                      "frames_per_s": ref_frames / ref_s, "videos_per_s": videos / ref_s,
                      "what": "1 process, decode + RGB-convert every frame, then sample the same clips"},
    }
