"""The prep stage: videos -> fixed-size uint8 clip shards + index + manifest (the data contract).

Output (`cfg.out`):
    * `manifest.json`: format, dataset, classes, frames T, size S, per-split counts, skipped inputs
      (layout problems, unusable files and removed classes, each `{"file", "reason"}`), notes on
      used files (`{"file", "note"}`: fewer frames than declared, ...), the parameters, a hash of
      the sources (relpath, size, sha256 of every video) and a hash of the shards.
    * `<split>/clips-NNNNN.npy`: uint8 `(n, T, S, S, 3)` RGB, `cfg.shard_size` clips per file.
    * `<split>/index.json`: one entry per clip in order: video relpath, video_id, label, clip
      number within its video, shard number, row in the shard.

Videos are decoded in `cfg.workers` processes (in this process for fewer than
`parallel.PARALLEL_MIN_JOBS` videos), one work item per video; results are written in
layout order, so the output does not depend on the number of workers. Everything is written to
a temporary directory beside `cfg.out` and moved into place at the end: an interrupted prep leaves
no half output. A file that cannot be used (empty, truncated, not a video, no decodable frames)
is recorded in `skipped` and the stage goes on. Frames are what a player shows (`video.load_video`:
edit lists, display rotation, non-square pixels); a file with fewer frames than its header declares
is used with the frames it has and noted in `notes`.

A class left without a usable training video (every video skipped, or none listed for train) is
removed before anything trains on it: it is listed in `skipped`, its test videos are not written,
and the remaining labels are renumbered in class order. When that leaves fewer than two classes,
the stage stops with a one-line `ConfigError` naming them.

Class balance is reported, not corrected (`class_balance`): the summary and the manifest carry
`warnings` for a class removed for lack of training clips, a class without test clips (its accuracy
cannot be measured), and a split whose largest class has `IMBALANCE_WARN` times the clips of its
smallest or more, with the top-1 a model answering only the majority class would score. Read mean
class accuracy beside top-1 on such data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import av
import cv2
import numpy as np

from vidistill.config import PrepConfig
from vidistill.data.layouts import SPLITS, Layout, parse_layout
from vidistill.data.parallel import executor, ordered_map, progress_bar, use_pool
from vidistill.data.video import VideoError, load_video
from vidistill.errors import ConfigError

FORMAT = 1
IMBALANCE_WARN = 3.0  # warn when a split's largest class has this many times the clips of its smallest


@dataclass(frozen=True)
class _Job:
    """One video to decode (picklable: sent to a worker process)."""

    video_id: int
    path: str
    relpath: str
    label: int
    split: str
    clips: int
    frames: int
    stride: int
    short_side: int
    crop: int
    policy: str
    seed: int
    threads: int


def _file_digest(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def decode_job(job: _Job) -> dict[str, Any]:
    """Decode the clips of one video (runs in a worker process).

    Returns:
        `{"clips": uint8 (clips, T, S, S, 3) | None, "decoded": frames decoded, "error": reason | None,
        "notes": [str], "size": bytes, "sha256": hex, "rss_kb": peak resident memory of the process}`.
    """
    result: dict[str, Any] = {"clips": None, "decoded": 0, "error": None, "notes": [], "size": 0, "sha256": "",
                              "rss_kb": 0}
    try:
        result["size"], result["sha256"] = _file_digest(job.path)
        got = load_video(job.path, relpath=job.relpath, train=job.split == "train", frames=job.frames,
                         stride=job.stride, clips=job.clips, short_side=job.short_side, crop=job.crop,
                         policy=job.policy, seed=job.seed, threads=job.threads)
        result["clips"], result["decoded"], result["notes"] = got.clips, got.decoded, list(got.notes)
    except VideoError as e:
        result["error"] = str(e)
    except (av.FFmpegError, cv2.error, OSError, ValueError, MemoryError) as e:  # a file the libraries choke on
        result["error"] = f"{type(e).__name__}: {e}"
    result["rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak of this (worker) process
    return result


class _ShardWriter:
    """Buffers clips of one split and writes `clips-NNNNN.npy` files of `shard_size` rows."""

    def __init__(self, directory: Path, shard_size: int, frames: int, size: int) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True)
        self.buf = np.empty((shard_size, frames, size, size, 3), dtype=np.uint8)  # (n, T, S, S, 3)
        self.fill = 0
        self.shard = 0
        self.index: list[dict[str, Any]] = []
        self.files: list[Path] = []

    def add(self, clips: np.ndarray, *, relpath: str, video_id: int, label: int) -> None:
        for k, clip in enumerate(clips):
            self.buf[self.fill] = clip
            self.index.append({"video": relpath, "video_id": video_id, "label": label, "clip": k,
                               "shard": self.shard, "offset": self.fill})
            self.fill += 1
            if self.fill == len(self.buf):
                self._flush()

    def _flush(self) -> None:
        path = self.dir / f"clips-{self.shard:05d}.npy"
        np.save(path, self.buf[: self.fill])
        self.files.append(path)
        self.shard += 1
        self.fill = 0

    def close(self) -> None:
        if self.fill:
            self._flush()
        (self.dir / "index.json").write_text(json.dumps(self.index))


def _jobs(cfg: PrepConfig, layout: Layout, threads: int) -> list[_Job]:
    jobs = []
    for video_id, it in enumerate(layout.items):
        clips = cfg.clips_per_video_train if it.split == "train" else cfg.clips_per_video_test
        jobs.append(_Job(video_id, str(layout.root / it.relpath), it.relpath, it.label, it.split, clips, cfg.frames,
                         cfg.stride, cfg.short_side, cfg.crop, cfg.short_policy, cfg.seed, threads))
    return sorted(jobs, key=lambda j: SPLITS.index(j.split))  # train first, layout order within a split


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "manifest.json").is_file())):
        raise ConfigError(f"prep.out {out} exists and is not a prep output (no manifest.json); "
                          "choose an empty or new directory")


def _shards_hash(writers: dict[str, _ShardWriter]) -> str:
    h = hashlib.sha256()
    for split, w in writers.items():
        h.update(split.encode())
        h.update((w.dir / "index.json").read_bytes())
        for f in w.files:
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`, replacing a previous output."""
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _classes_without_training(layout: Layout, jobs: list[_Job], usable_train: Counter[int]) -> dict[int, str]:
    """Labels without a usable training video, with the reason each is removed."""
    listed = Counter((j.label, j.split) for j in jobs)
    removed = {}
    for label, cls in enumerate(layout.classes):
        if usable_train[label]:
            continue
        n_train, n_test = listed[label, "train"], listed[label, "test"]
        if not n_train:
            why = "no video of it is listed for training"
        else:
            why = f"none of its {n_train} training video(s) is usable (each is listed with its reason)"
        if n_test:
            why += f"; its {n_test} test video(s) are not used either"
        removed[label] = f"class {cls!r} removed: {why}"
    return removed


def class_balance(splits: dict[str, dict[str, Any]], removed: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Class balance of a prep output, and the warnings it deserves.

    Args:
        splits: per split `{"per_class": {class: clips}}` (the summary's `splits`).
        removed: classes removed for lack of a usable training video.

    Returns:
        `(balance, warnings)`: balance holds `without_test` (classes with no test clip), per split the
        ratio of largest to smallest class (`<split>_ratio`) and the share of the largest class
        (`<split>_majority`: the top-1 of a model that always answers it); warnings are one line each.
    """
    warnings = [f"class {c!r} has no usable training clip and was removed (see the skipped list)" for c in removed or []]
    balance: dict[str, Any] = {"without_test": [], "removed": list(removed or [])}
    test = splits.get("test", {}).get("per_class", {})
    balance["without_test"] = [c for c, n in test.items() if n == 0]
    if balance["without_test"]:
        warnings.append(f"class(es) {', '.join(map(repr, balance['without_test']))} have no test clip: their accuracy "
                        "cannot be measured and mAP leaves them out; add test videos of them (folder layouts: enough "
                        "videos that prep.test_fraction gives each class one)")
    for split, info in splits.items():
        counts = {c: n for c, n in info.get("per_class", {}).items() if n > 0}
        if len(counts) < 2:
            continue
        big, small = max(counts, key=counts.get), min(counts, key=counts.get)
        ratio = counts[big] / counts[small]
        majority = counts[big] / sum(counts.values())
        balance[f"{split}_ratio"], balance[f"{split}_majority"] = ratio, majority
        if ratio >= IMBALANCE_WARN:
            warnings.append(f"{split} split is imbalanced: {counts[big]} clips of {big!r} against {counts[small]} of "
                            f"{small!r} ({ratio:.1f}:1); always answering {big!r} scores top-1 {majority:.3f} there, "
                            "so read mean class accuracy beside top-1")
    return balance, warnings


def run_prep(cfg: PrepConfig, *, progress: bool = True,
             decoded_by: Callable[[list[_Job]], Iterable[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Run the prep stage (see the module docstring).

    Args:
        cfg: the stage parameters.
        progress: show a progress bar.
        decoded_by: where the decoded videos come from: called with every job in write order, it
            yields `decode_job`'s result for each; default: decode them here. The sharded prep's
            merge (`vidistill.data.shards.merge_prep`) passes the shards' results, so a sharded run
            writes exactly what an unsharded one writes.

    Returns:
        Summary: `dataset`, `out`, `classes` (after removals), `removed_classes`, `splits` (per split
        `clips`, `videos`, `per_class`), `skipped` (`[{"file", "reason"}]`), `notes`
        (`[{"file", "note"}]`: used files with fewer frames than declared), `frames_decoded`,
        `seconds`, `frames_per_s`, `clips_per_s`, `peak_rss_mb` (`main` process, largest `worker`).

    Raises:
        ConfigError: bad parameters, a layout that cannot be parsed, an output directory that is
            not a prep output, a split left without any usable video, or fewer than two classes
            left after removing those without a usable training video.
    """
    cfg.validate()
    t0 = time.perf_counter()
    out = Path(cfg.out)
    _check_out(out)
    layout = parse_layout(cfg, progress=progress)
    workers = min(cfg.workers, len(layout.items))
    cpus = os.cpu_count() or 1
    threads = max(1, cpus // workers) if use_pool(workers, len(layout.items)) else cpus  # decoder threads per process
    jobs = _jobs(cfg, layout, threads)
    skipped: list[dict[str, str]] = list(layout.problems)
    notes: list[dict[str, str]] = []
    sources: list[tuple[str, int, str]] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    decoded = 0
    worker_rss_kb = 0
    usable_train: Counter[int] = Counter()
    removed: dict[int, str] | None = None  # decided once every training video is decoded (train jobs come first)
    try:
        writers = {s: _ShardWriter(tmp / s, cfg.shard_size, cfg.frames, cfg.crop) for s in SPLITS}
        videos = {s: 0 for s in SPLITS}
        chunk = max(1, min(8, len(jobs) // (8 * max(workers, 1))))
        with progress_bar(progress) as bar, executor(workers if decoded_by is None else 1, len(jobs)) as pool:
            task = bar.add_task(f"prep {cfg.dataset}", total=len(jobs), info="")
            results = ordered_map(pool, decode_job, jobs, chunksize=chunk) if decoded_by is None else decoded_by(jobs)
            for job, res in zip(jobs, results, strict=True):
                if job.split != "train" and removed is None:
                    removed = _classes_without_training(layout, jobs, usable_train)
                if res["sha256"]:
                    sources.append((job.relpath, res["size"], res["sha256"]))
                decoded += res["decoded"]
                worker_rss_kb = max(worker_rss_kb, res["rss_kb"])
                if res["error"]:
                    skipped.append({"file": job.path, "reason": res["error"]})
                elif removed and job.label in removed:
                    pass  # a test video of a class that nothing trains on
                else:
                    notes += [{"file": job.path, "note": n} for n in res["notes"]]
                    writers[job.split].add(res["clips"], relpath=job.relpath, video_id=job.video_id, label=job.label)
                    videos[job.split] += 1
                    usable_train[job.label] += job.split == "train"
                bar.update(task, advance=1, info=f"{decoded / (time.perf_counter() - t0):.0f} frames/s")
        if removed is None:
            removed = _classes_without_training(layout, jobs, usable_train)
        keep = [label for label in range(len(layout.classes)) if label not in removed]
        classes = [layout.classes[label] for label in keep]
        if removed and len(keep) < 2:
            gone = ", ".join(repr(layout.classes[label]) for label in removed)
            raise ConfigError(f"prep: no usable training video for class(es) {gone} under {layout.root}, which leaves "
                              f"{len(keep)} class(es) ({', '.join(map(repr, classes)) or 'none'}); a classifier needs "
                              "at least two: replace the skipped videos (see the skipped list) or add a class")
        skipped += [{"file": str(layout.root / layout.classes[label]), "reason": why} for label, why in removed.items()]
        relabel = {old: new for new, old in enumerate(keep)}
        for w in writers.values():
            for e in w.index:
                e["label"] = relabel[e["label"]]
        for s in SPLITS:
            if videos[s] == 0:
                listed = sum(j.split == s for j in jobs)
                bad = [f"{d['file']}: {d['reason']}" for d in skipped][:3]
                raise ConfigError(f"no usable videos in split {s!r} under {layout.root}: {listed} listed, "
                                  f"{len(skipped)} skipped (see: {'; '.join(bad) or 'no videos in this split'})")
            writers[s].close()
        splits = {}
        for s, w in writers.items():
            per_class = {c: 0 for c in classes}
            for e in w.index:
                per_class[classes[e["label"]]] += 1
            splits[s] = {"clips": len(w.index), "videos": videos[s], "per_class": per_class}
        src_hash = hashlib.sha256(json.dumps(sorted(sources)).encode()).hexdigest()
        balance, warnings = class_balance(splits, [layout.classes[label] for label in removed])
        manifest = {
            "format": FORMAT, "dataset": cfg.dataset, "root": str(layout.root), "classes": classes,
            "frames": cfg.frames, "size": cfg.crop, "splits": splits, "skipped": skipped, "notes": notes,
            "balance": balance, "warnings": warnings,
            "params": dataclasses.asdict(cfg),
            "sources": {"count": len(sources), "bytes": sum(s[1] for s in sources), "hash": src_hash},
            "hash": _shards_hash(writers),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    total_clips = sum(v["clips"] for v in splits.values())
    return {"dataset": cfg.dataset, "out": str(out), "classes": classes,
            "removed_classes": [layout.classes[label] for label in removed], "splits": splits, "skipped": skipped,
            "notes": notes, "balance": balance, "warnings": warnings, "frames_decoded": decoded, "seconds": seconds,
            "frames_per_s": decoded / seconds if seconds > 0 else 0.0,
            "clips_per_s": total_clips / seconds if seconds > 0 else 0.0,
            "peak_rss_mb": {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "worker": worker_rss_kb / 1024}}
