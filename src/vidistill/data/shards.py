"""Sharded prep: decode the video list in N independent pieces, then merge them into exactly what
one unsharded `vidistill prep` writes (same shards, index and manifest hash).

Assignment: video `relpath` goes to shard `int(sha256(relpath)[:8], 16) % shards`. It depends only
on the path, so it is the same on every machine and run, and adding videos to a dataset moves no
existing video to another shard (the other shards stay cached).

A shard (`prep_shard`) decodes its videos with the same `decode_job` the unsharded prep uses and
stores each video's result as `videos/<video_id>.npy` (uint8 `(clips, T, S, S, 3)`) plus
`videos/<video_id>.json` (frames decoded, error, notes, size, sha256), the JSON written last and
atomically: a rerun after an interruption skips every video already stored. The merge
(`merge_prep`) runs `run_prep` with the shards' results in place of decoding, so class removal,
relabelling, shard packing and the manifest are computed by the one code path both runs share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vidistill.config import PrepConfig
from vidistill.data.layouts import parse_layout
from vidistill.data.parallel import executor, ordered_map, progress_bar
from vidistill.data.prep import _Job, _jobs, decode_job, run_prep
from vidistill.errors import ConfigError

PART_FORMAT = 1
# PrepConfig fields that say where things go or how fast, not what is written
_PLACE = ("out", "workers")


def shard_of(relpath: str, shards: int) -> int:
    """The shard (0-based) of video `relpath` among `shards`."""
    return int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) % shards


def check_shard(shard: int, shards: int) -> None:
    """Raises `ConfigError` unless 1 <= shards and 0 <= shard < shards."""
    if not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"pipeline.shards must be an integer >= 1, got {shards!r}")
    if not isinstance(shard, int) or not 0 <= shard < shards:
        raise ConfigError(f"shard must be in 0..{shards - 1}, got {shard!r}")


def _content_params(cfg: PrepConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _PLACE}


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prep_shard(cfg: PrepConfig, *, shard: int, shards: int, out: str | Path, progress: bool = False) -> dict[str, Any]:
    """Decode the videos of shard `shard` of `shards` into `out` (resumable).

    Args:
        cfg: the prep parameters (as for `run_prep`; `cfg.out` is not used).
        shard, shards: which piece of the video list.
        out: the shard's folder: `part.json` and `videos/`.
        progress: show a progress bar.

    Returns:
        `shard`, `shards`, `videos` (this shard's), `decoded` (now), `resumed` (already stored),
        `errors` (unusable videos), `frames_decoded`, `seconds`.

    Raises:
        ConfigError: bad shard numbers or prep parameters, a layout that cannot be parsed.
    """
    cfg.validate()
    check_shard(shard, shards)
    t0 = time.perf_counter()
    layout = parse_layout(cfg, progress=False)
    jobs = [j for j in _jobs(cfg, layout, threads=1) if shard_of(j.relpath, shards) == shard]
    videos = Path(out) / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not (videos / f"{j.video_id}.json").is_file()]
    cpus = os.cpu_count() or 1
    workers = max(1, min(cfg.workers, len(todo)))
    todo = [dataclasses.replace(j, threads=max(1, cpus // workers)) for j in todo]
    frames = errors = 0
    with progress_bar(progress) as bar, executor(workers, len(todo)) as pool:
        task = bar.add_task(f"prep shard {shard}/{shards}", total=len(todo), info="")
        for job, res in zip(todo, ordered_map(pool, decode_job, todo, chunksize=1), strict=True):
            if res["clips"] is not None:
                _atomic(videos / f"{job.video_id}.npy", lambda f, a=res["clips"]: np.save(f, a))
            meta = {k: v for k, v in res.items() if k not in ("clips", "rss_kb")} | {"relpath": job.relpath,
                                                                                   "has_clips": res["clips"] is not None}
            _atomic(videos / f"{job.video_id}.json", lambda f, m=meta: f.write(json.dumps(m).encode()))
            frames += res["decoded"]
            errors += bool(res["error"])
            bar.update(task, advance=1)
    part = {"format": PART_FORMAT, "shard": shard, "shards": shards, "params": _content_params(cfg),
            "videos": sorted(j.video_id for j in jobs)}
    _atomic(Path(out) / "part.json", lambda f: f.write(json.dumps(part, indent=1).encode()))
    return {"shard": shard, "shards": shards, "videos": len(jobs), "decoded": len(todo), "resumed": len(jobs) - len(todo),
            "errors": errors, "frames_decoded": frames, "seconds": time.perf_counter() - t0}


def merge_prep(cfg: PrepConfig, parts: list[str | Path], *, progress: bool = False) -> dict[str, Any]:
    """Merge the shards' decoded videos into `cfg.out`, exactly as `run_prep(cfg)` would write it.

    Args:
        cfg: the prep parameters the shards ran with (`cfg.out`: where the merged clips go).
        parts: every shard's folder (`prep_shard`'s `out`), in any order.
        progress: show a progress bar.

    Returns:
        `run_prep`'s summary (its manifest's `hash` equals an unsharded run's).

    Raises:
        ConfigError: a part of another format or parameters, a shard missing or given twice, a
            video in no part (the parts were made from another video list), and what `run_prep` raises.
    """
    cfg.validate()
    owner: dict[int, Path] = {}
    seen: dict[int, Path] = {}
    shards = None
    for part in map(Path, parts):
        meta_path = part / "part.json"
        if not meta_path.is_file():
            raise ConfigError(f"prep merge: {part} has no part.json; it is not a finished prep shard (rerun that shard)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != PART_FORMAT or meta.get("params") != _content_params(cfg):
            raise ConfigError(f"prep merge: {part} was made with other prep parameters or format; rerun its shard "
                              "with the parameters of this merge")
        if shards is not None and meta["shards"] != shards:
            raise ConfigError(f"prep merge: {part} is shard {meta['shard']} of {meta['shards']}, others of {shards}")
        shards = meta["shards"]
        if meta["shard"] in seen:
            raise ConfigError(f"prep merge: shard {meta['shard']} given twice ({seen[meta['shard']]} and {part})")
        seen[meta["shard"]] = part
        owner.update({vid: part for vid in meta["videos"]})
    if shards is None or sorted(seen) != list(range(shards)):
        missing = sorted(set(range(shards or 1)) - set(seen))
        raise ConfigError(f"prep merge: shard(s) {missing} of {shards or '?'} missing; merge needs every shard's output")

    def decoded_by(jobs: list[_Job]) -> Iterator[dict[str, Any]]:
        for job in jobs:
            part = owner.get(job.video_id)
            if part is None:
                raise ConfigError(f"prep merge: video {job.relpath} (id {job.video_id}) is in no shard; the shards were "
                                  "made from another video list: rerun them")
            meta = json.loads((part / "videos" / f"{job.video_id}.json").read_text())
            if meta["relpath"] != job.relpath:
                raise ConfigError(f"prep merge: video id {job.video_id} is {meta['relpath']} in {part} but {job.relpath} "
                                  "here; the video list changed since the shards ran: rerun them")
            clips = np.load(part / "videos" / f"{job.video_id}.npy") if meta["has_clips"] else None
            yield {**{k: v for k, v in meta.items() if k not in ("relpath", "has_clips")}, "clips": clips, "rss_kb": 0}

    return run_prep(cfg, progress=progress, decoded_by=decoded_by)
