"""Sharded TV-L1 flow: each of N workers computes the flow of every N-th clip file, and a merge
assembles one flow folder identical to an unsharded `vidistill flow` run (same flow files, same
manifest bytes; `content_hash` proves it).

Clip file `<split>/clips-NNNNN.npy` belongs to flow shard `NNNNN % shards`. A worker runs the
ordinary `run_flow` on a view of the clips folder that holds only its files (symbolic links in a
temporary folder, never part of its output), so it resumes as `run_flow` does. Flow of a clip file
is computed in the same batches whichever worker computes it, so the bytes do not depend on the
sharding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vidistill.config import ConfigError, FlowConfig
from vidistill.flow.stage import FORMAT, _shards, _write_json, run_flow


def _clip_files(clips: Path) -> list[tuple[str, int, Path]]:
    manifest = json.loads((clips / "manifest.json").read_text())
    return [(split, number, path) for split in sorted(manifest.get("splits", {})) for number, path in _shards(clips / split)]


def flow_shard(cfg: FlowConfig, *, shard: int, shards: int, progress: bool = False) -> dict[str, Any]:
    """`run_flow` on the clip files of shard `shard` of `shards` (`cfg.out`: this shard's folder).

    Returns:
        `run_flow`'s summary plus `shard`, `shards`, `files` (clip files of this shard).

    Raises:
        ConfigError: bad shard numbers, and what `run_flow` raises.
    """
    from vidistill.data.shards import check_shard

    check_shard(shard, shards)
    clips = Path(cfg.clips)
    if not (clips / "manifest.json").is_file():
        raise ConfigError(f"flow.clips: no manifest.json in {clips}; run `vidistill prep` first or fix flow.clips")
    mine = [(split, path) for split, number, path in _clip_files(clips) if number % shards == shard]
    with tempfile.TemporaryDirectory(prefix="vidistill-flow-view-") as tmp:
        view = Path(tmp)
        shutil.copy2(clips / "manifest.json", view / "manifest.json")
        for split, path in mine:
            (view / split).mkdir(exist_ok=True)
            (view / split / path.name).symlink_to(path.resolve())
        summary = run_flow(dataclasses.replace(cfg, clips=str(view)), progress=progress)
    return {**summary, "shard": shard, "shards": shards, "files": len(mine)}


def merge_flow(cfg: FlowConfig, parts: list[str | Path]) -> dict[str, Any]:
    """Assemble the shards' flow into `cfg.out`, as one `run_flow(cfg)` writes it.

    Args:
        cfg: the flow parameters the shards ran with (`cfg.clips`: the clips they read).
        parts: every shard's folder, in any order.

    Returns:
        `pairs` (all frame pairs), `failed`, `shards` (flow files), `content_hash`, `out`.

    Raises:
        ConfigError: a part made from other clips or parameters, or a clip file no part computed.
    """
    cfg.validate()
    clips, out = Path(cfg.clips), Path(cfg.out)
    clips_manifest = json.loads((clips / "manifest.json").read_text())
    manifest: dict[str, Any] = {"format": FORMAT, "clips_hash": clips_manifest.get("hash"), "bound": cfg.bound,
                                "params": {"backend": cfg.backend, **cfg.tvl1.as_dict()}, "failed": [], "shards": {}}
    done: dict[str, tuple[Path, dict[str, Any]]] = {}
    for part in map(Path, parts):
        pm = json.loads((part / "manifest.json").read_text())
        for key in ("format", "clips_hash", "bound", "params"):
            if pm.get(key) != manifest[key]:
                raise ConfigError(f"flow merge: {part} has another {key} than these clips and parameters; rerun that shard")
        done.update({k: (part, pm) for k in pm["shards"]})
    pairs = 0
    for split, number, path in _clip_files(clips):
        key = f"{split}/{number:05d}"
        if key not in done:
            raise ConfigError(f"flow merge: no shard computed the flow of {split}/{path.name}; rerun the flow shards")
        part, pm = done[key]
        n, t = np.load(path, mmap_mode="r").shape[:2]
        (out / split).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(part / split / f"flow-{number:05d}.npy", out / split / f"flow-{number:05d}.npy")
        first = _first_index(clips / split, number)
        manifest["failed"] += [{**f, "index": first + f["offset"]}
                               for f in sorted(pm["failed"], key=lambda f: f["offset"])
                               if (f["split"], f["shard"]) == (split, number)]
        manifest["shards"][key] = pm["shards"][key]
        pairs += n * (t - 1)
    _write_json(out / "manifest.json", manifest)
    return {"pairs": pairs, "failed": len(manifest["failed"]), "shards": len(manifest["shards"]),
            "content_hash": content_hash(out), "out": str(out)}


def _first_index(split_dir: Path, number: int) -> int:
    """Global index (within its split) of the first clip of clip file `number`."""
    return sum(np.load(p, mmap_mode="r").shape[0] for k, p in _shards(split_dir) if k < number)


def content_hash(flow_dir: str | Path) -> str:
    """SHA-256 of a flow folder: its manifest's bytes and every flow file it lists, in order."""
    flow_dir = Path(flow_dir)
    h = hashlib.sha256((flow_dir / "manifest.json").read_bytes())
    for key in json.loads((flow_dir / "manifest.json").read_text())["shards"]:
        split, number = key.split("/")
        with open(flow_dir / split / f"flow-{number}.npy", "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()
