"""The `vidistill flow` stage on tiny clip shards of moving textures written here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import vidistill.flow.stage as stage
from vidistill.config import ConfigError, FlowConfig
from vidistill.flow import TVL1Params, decode_flow

T, S = 3, 48
# (split, shard sizes); each clip moves by its own (dx, dy) pixels per frame
SHARDS = {"train": [2, 1], "test": [1]}


def _clip(dx: int, dy: int, seed: int) -> np.ndarray:
    """(T, S, S, 3) uint8 RGB: a smooth random texture translated by (dx, dy) per frame."""
    rng = np.random.default_rng(seed)
    big = cv2.GaussianBlur(rng.uniform(0, 255, (S + 40, S + 40, 3)).astype(np.float32), (0, 0), 2.0)
    big = cv2.normalize(big, None, 0, 255, cv2.NORM_MINMAX)
    frames = [big[20 - t * dy : 20 - t * dy + S, 20 - t * dx : 20 - t * dx + S] for t in range(T)]
    return np.stack(frames).astype(np.uint8)


def _motion(index: int) -> tuple[int, int]:
    return [(1, 0), (0, 2), (-1, 1), (2, -1)][index % 4]


def _write_clips(root: Path) -> Path:
    index = 0
    for split, sizes in SHARDS.items():
        (root / split).mkdir(parents=True)
        for number, n in enumerate(sizes):
            clips = np.stack([_clip(*_motion(index + i), seed=index + i) for i in range(n)])
            np.save(root / split / f"clips-{number:05d}.npy", clips)
            index += n
    splits = {split: {"clips": sum(sizes), "videos": sum(sizes), "per_class": {}} for split, sizes in SHARDS.items()}
    (root / "manifest.json").write_text(json.dumps({"format": 1, "frames": T, "size": S, "splits": splits, "hash": "abc"}))
    return root


@pytest.fixture()
def cfg(tmp_path: Path) -> FlowConfig:
    clips = _write_clips(tmp_path / "clips")
    return FlowConfig(clips=str(clips), out=str(tmp_path / "flow"), device="cpu", batch_size=4, workers=2,
                      tvl1=TVL1Params(nscales=3, warps=3))


def test_stage_writes_aligned_flow_shards(cfg: FlowConfig) -> None:
    summary = stage.run_flow(cfg, progress=False)
    assert summary["pairs"] == 4 * (T - 1) and summary["failed"] == 0 and summary["skipped_shards"] == 0
    assert summary["pairs_per_s"] > 0
    out = Path(cfg.out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["clips_hash"] == "abc" and manifest["bound"] == 20.0
    assert manifest["params"]["nscales"] == 3 and manifest["failed"] == []
    index = 0
    for split, sizes in SHARDS.items():
        for number, n in enumerate(sizes):
            flow = np.load(out / split / f"flow-{number:05d}.npy")
            assert flow.shape == (n, T - 1, S, S, 2) and flow.dtype == np.uint8
            for row in range(n):
                dx, dy = _motion(index + row)
                decoded = decode_flow(flow[row])[:, 8:-8, 8:-8]  # (T-1, h, w, 2), away from borders
                assert np.median(decoded[..., 0]) == pytest.approx(dx, abs=0.2)
                assert np.median(decoded[..., 1]) == pytest.approx(dy, abs=0.2)
            index += n


def test_stage_resumes_and_redoes_only_missing_shards(cfg: FlowConfig) -> None:
    stage.run_flow(cfg, progress=False)
    out = Path(cfg.out)
    kept = out / "train" / "flow-00000.npy"
    stamp = kept.stat().st_mtime_ns
    again = stage.run_flow(cfg, progress=False)
    assert again["pairs"] == 0 and again["skipped_shards"] == 3
    (out / "train" / "flow-00001.npy").unlink()
    redo = stage.run_flow(cfg, progress=False)
    assert redo["pairs"] == T - 1 and redo["skipped_shards"] == 2
    assert (out / "train" / "flow-00001.npy").exists() and kept.stat().st_mtime_ns == stamp
    assert not list(out.rglob("*.tmp"))
    cfg.tvl1 = dataclasses.replace(cfg.tvl1, warps=2)  # other parameters: every shard is stale
    assert stage.run_flow(cfg, progress=False)["skipped_shards"] == 0


def test_worker_processes_give_the_same_flow_bytes(cfg: FlowConfig, tmp_path: Path) -> None:
    """The torch backend on CPU spreads groups of clips over `workers` processes (one thread each): the
    flow files are byte-identical to one process's."""
    cfg.batch_size = T - 1  # one clip per group: 4 groups, enough for the pool
    pooled = stage.run_flow(cfg, progress=False)
    single = stage.run_flow(dataclasses.replace(cfg, workers=1, out=str(tmp_path / "single")), progress=False)
    assert (pooled["processes"], single["processes"]) == (2, 1)
    for split, sizes in SHARDS.items():
        for number in range(len(sizes)):
            name = f"{split}/flow-{number:05d}.npy"
            np.testing.assert_array_equal(np.load(Path(cfg.out) / name), np.load(tmp_path / "single" / name))
    assert (Path(cfg.out) / "manifest.json").read_bytes() == (tmp_path / "single" / "manifest.json").read_bytes()


def test_failed_clip_is_zeroed_and_reported(cfg: FlowConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the real tvl1 raises for any batch holding the texture of global clip 1."""
    marker = cv2.cvtColor(np.ascontiguousarray(_clip(*_motion(1), seed=1)[0]), cv2.COLOR_RGB2GRAY)
    real = stage.tvl1

    def tvl1_failing_on_clip1(f0, f1, **kwargs):
        if any(np.array_equal(frame, marker) for frame in f0):
            raise RuntimeError("injected failure")
        return real(f0, f1, **kwargs)

    monkeypatch.setattr(stage, "tvl1", tvl1_failing_on_clip1)
    cfg.workers = 1  # in this process, where the patch is
    summary = stage.run_flow(cfg, progress=False)
    assert summary["failed"] == 1
    manifest = json.loads((Path(cfg.out) / "manifest.json").read_text())
    assert manifest["failed"] == [
        {"split": "train", "index": 1, "shard": 0, "offset": 1, "reason": "RuntimeError: injected failure"}
    ]
    shard = np.load(Path(cfg.out) / "train" / "flow-00000.npy")
    assert not shard[1].any() and shard[0].any()  # failed clip zeros, its shard-mate computed
    # a rerun keeps the report of the skipped shard
    monkeypatch.setattr(stage, "tvl1", real)
    assert stage.run_flow(cfg, progress=False)["failed"] == 1


def test_missing_clips_and_bad_sizes_raise(tmp_path: Path, cfg: FlowConfig) -> None:
    with pytest.raises(ConfigError, match="manifest.json"):
        stage.run_flow(FlowConfig(clips=str(tmp_path / "nothing"), out=str(tmp_path / "o")), progress=False)
    cfg.tvl1 = dataclasses.replace(cfg.tvl1, nscales=8)  # 48 px clips cannot hold 8 levels
    with pytest.raises(ConfigError, match="too small"):
        stage.run_flow(cfg, progress=False)


def test_opencv_backend_stage(cfg: FlowConfig) -> None:
    cfg.backend = "opencv"
    summary = stage.run_flow(cfg, progress=False)
    assert summary["pairs"] == 4 * (T - 1) and summary["failed"] == 0
    flow = decode_flow(np.load(Path(cfg.out) / "test" / "flow-00000.npy"))
    dx, dy = _motion(3)
    assert np.median(flow[0][:, 8:-8, 8:-8, 0]) == pytest.approx(dx, abs=0.2)
    assert np.median(flow[0][:, 8:-8, 8:-8, 1]) == pytest.approx(dy, abs=0.2)


def test_cli_runs_the_stage_and_summarises(cfg: FlowConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vidistill import cli

    argv = ["flow", "--params", str(tmp_path / "none.yaml"), "--no-track", "--quiet", "--clips", cfg.clips, "--out", cfg.out,
            "--device", "cpu", "--tvl1-nscales", "3", "--set", "tvl1.warps=3"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"flow: {4 * (T - 1)} pairs in" in out and "0 clip(s) failed" in out
    assert cli.main(argv) == 0  # rerun: every shard is already done
    assert "flow: 0 pairs in" in capsys.readouterr().out
