"""Sharded prep and flow (vidistill.data.shards, vidistill.flow.shards): N shards merged give
byte-for-byte what one unsharded stage writes, broken inputs and class removal included."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from helpers_video import moving_frames, truncate, write_video

from vidistill.config import ConfigError, FlowConfig, PrepConfig
from vidistill.data import run_prep
from vidistill.data.shards import merge_prep, prep_shard, shard_of
from vidistill.flow.params import TVL1Params
from vidistill.flow.shards import content_hash, flow_shard, merge_flow
from vidistill.flow.stage import run_flow


def _cfg(root: Path, out: Path) -> PrepConfig:
    return PrepConfig(dataset="folder", root=str(root), out=str(out), frames=4, stride=2, short_side=32, crop=24,
                      shard_size=2, workers=1, test_fraction=0.4)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Three classes: two of real videos (one of them with an empty file), one whose every video is cut
    off (prep removes it and renumbers the labels)."""
    root = tmp_path_factory.mktemp("folder") / "data"
    for c, cls in enumerate(("jump", "walk")):
        for i in range(4):
            write_video(root / cls / f"{cls}{i}.avi", moving_frames(14, seed=10 * c + i, dx=1 + c))
    (root / "jump" / "empty.avi").parent.mkdir(parents=True, exist_ok=True)
    (root / "jump" / "empty.avi").touch()
    for i in range(2):
        good = write_video(root.parent / f"fall{i}-full.mkv", moving_frames(30, seed=40 + i), codec="libx264")
        truncate(good, root / "fall" / f"fall{i}.mkv", 0.4)
    return root


@pytest.fixture(scope="module")
def unsharded(videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "clips"
    run_prep(_cfg(videos, out), progress=False)
    return out


def _sharded(videos: Path, tmp: Path, shards: int) -> Path:
    cfg = _cfg(videos, tmp / "clips")
    parts = []
    for shard in reversed(range(shards)):  # the order shards finish in does not matter
        parts.append(tmp / f"part{shard}")
        assert prep_shard(cfg, shard=shard, shards=shards, out=parts[-1])["videos"] > 0  # every shard has work
    merge_prep(cfg, parts)
    return tmp / "clips"


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("shards", [1, 3])
def test_sharded_prep_equals_unsharded(videos, unsharded, tmp_path, shards):
    merged = _sharded(videos, tmp_path, shards)
    one, many = (json.loads((d / "manifest.json").read_text()) for d in (unsharded, merged))
    assert many["hash"] == one["hash"]
    assert many["classes"] == one["classes"] == ["jump", "walk"]  # `fall` removed in both
    assert {k: v for k, v in many.items() if k != "params"} == {k: v for k, v in one.items() if k != "params"}
    a, b = _tree(unsharded), _tree(merged)
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {k: v for k, v in b.items() if k != "manifest.json"}


def test_assignment_is_deterministic_and_spread() -> None:
    paths = [f"class{c}/video{i}.avi" for c in range(10) for i in range(100)]
    counts = np.bincount([shard_of(p, 4) for p in paths], minlength=4)
    assert counts.sum() == 1000 and counts.min() > 200  # roughly even
    assert [shard_of(p, 4) for p in paths[:5]] == [2, 0, 2, 1, 0]  # fixed by the path alone, on every machine


def test_shard_resumes_and_merge_refuses_incomplete(videos, tmp_path):
    cfg = _cfg(videos, tmp_path / "clips")
    first = prep_shard(cfg, shard=0, shards=2, out=tmp_path / "p0")
    assert first["decoded"] == first["videos"] > 0 and first["resumed"] == 0
    again = prep_shard(cfg, shard=0, shards=2, out=tmp_path / "p0")
    assert again["decoded"] == 0 and again["resumed"] == first["videos"]
    with pytest.raises(ConfigError, match=r"shard\(s\) \[1\] of 2 missing"):
        merge_prep(cfg, [tmp_path / "p0"])
    with pytest.raises(ConfigError, match="given twice"):
        merge_prep(cfg, [tmp_path / "p0", tmp_path / "p0"])
    other = dataclasses.replace(cfg, frames=6)
    with pytest.raises(ConfigError, match="other prep parameters"):
        merge_prep(other, [tmp_path / "p0"])
    with pytest.raises(ConfigError, match="shard must be in 0..1"):
        prep_shard(cfg, shard=2, shards=2, out=tmp_path / "p2")
    with pytest.raises(ConfigError, match="pipeline.shards must be an integer >= 1"):
        prep_shard(cfg, shard=0, shards=0, out=tmp_path / "p2")


def _flow_cfg(clips: Path, out: Path) -> FlowConfig:
    return FlowConfig(clips=str(clips), out=str(out), device="cpu", batch_size=6, workers=1,
                      tvl1=TVL1Params(nscales=2, warps=2, outer_iterations=2, inner_iterations=5))


def test_sharded_flow_equals_unsharded(unsharded, tmp_path):
    run_flow(_flow_cfg(unsharded, tmp_path / "one"), progress=False)
    parts = []
    for shard in range(2):
        parts.append(tmp_path / f"f{shard}")
        summary = flow_shard(_flow_cfg(unsharded, parts[-1]), shard=shard, shards=2)
        assert summary["files"] > 0
    assert not any(p.is_symlink() for part in parts for p in part.rglob("*")), "the clips view is not part of the output"
    merged = merge_flow(_flow_cfg(unsharded, tmp_path / "merged"), parts)
    assert merged["content_hash"] == content_hash(tmp_path / "one")
    assert _tree(tmp_path / "merged") == _tree(tmp_path / "one")
    with pytest.raises(ConfigError, match="no shard computed the flow"):
        merge_flow(_flow_cfg(unsharded, tmp_path / "m2"), parts[:1])
    # the hash sees a changed flow file
    f = next((tmp_path / "merged").rglob("flow-*.npy"))
    arr = np.load(f)
    arr.flat[0] ^= 1
    np.save(f, arr)
    assert content_hash(tmp_path / "merged") != content_hash(tmp_path / "one")
