"""vidistill.data.synthetic: real videos, determinism, regeneration, domains, and that only motion tells the class."""

from __future__ import annotations

import json

import av
import cv2
import numpy as np
import pytest

from vidistill.config import ConfigError, SynthConfig
from vidistill.data.synthetic import class_names, generate, render_video

SMALL = dict(videos_per_class=2, frames=6, width=48, height=36)


def _decode_all(root) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(root.rglob("*.mp4")):
        with av.open(str(p)) as c:
            out[p.relative_to(root).as_posix()] = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    return out


def test_real_videos_and_metadata(tmp_path):
    cfg = SynthConfig(out=str(tmp_path / "s"), domain=1, **SMALL)
    root = generate(cfg, progress=False)
    names = class_names(1)
    assert sorted(d.name for d in root.iterdir() if d.is_dir()) == sorted(names)
    meta = json.loads((root / "synth.json").read_text())
    assert meta["classes"] == names and len(meta["files"]) == 2 * len(names)
    with av.open(str(root / meta["files"][0])) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.pix_fmt, s.width, s.height) == ("mpeg4", "yuv420p", 48, 36)
        assert sum(1 for _ in c.decode(s)) == 6
    assert not list(tmp_path.glob(".s.tmp-*"))  # the temporary directory is gone


def test_deterministic_per_seed(tmp_path, monkeypatch):
    a = _decode_all(generate(SynthConfig(out=str(tmp_path / "a"), **SMALL), progress=False))
    monkeypatch.setattr("vidistill.data.parallel.PARALLEL_MIN_JOBS", 1)  # the same through a process pool
    b = _decode_all(generate(SynthConfig(out=str(tmp_path / "b"), **SMALL), progress=False))
    c = _decode_all(generate(SynthConfig(out=str(tmp_path / "c"), seed=1, **SMALL), progress=False))
    assert a.keys() == b.keys() == c.keys() and len(a) == 16
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not any(np.array_equal(a[k], c[k]) for k in a)


def test_regenerates_only_when_params_change(tmp_path):
    cfg = SynthConfig(out=str(tmp_path / "s"), **SMALL)
    generate(cfg, progress=False)
    meta = tmp_path / "s" / "synth.json"
    stamp = meta.stat().st_mtime_ns
    generate(cfg, progress=False)
    assert meta.stat().st_mtime_ns == stamp  # up to date: nothing rewritten
    generate(SynthConfig(out=str(tmp_path / "s"), **{**SMALL, "frames": 5}), progress=False)
    assert json.loads(meta.read_text())["params"]["frames"] == 5
    with av.open(str(next((tmp_path / "s").rglob("*.mp4")))) as c:
        assert sum(1 for _ in c.decode(video=0)) == 5


def test_refuses_foreign_directory_and_bad_codec(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not a synthetic dataset"):
        generate(SynthConfig(out=str(tmp_path / "mine"), **SMALL), progress=False)
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"
    with pytest.raises(ConfigError, match="synth.codec 'nosuchcodec'"):
        generate(SynthConfig(out=str(tmp_path / "x"), codec="nosuchcodec", **SMALL), progress=False)


def test_domains_have_different_class_sets():
    sets = [set(class_names(d)) for d in range(5)]
    assert 6 <= len(sets[0]) <= 8 and all(len(s) >= 6 for s in sets)
    assert sets[0] != sets[1] != sets[2] and not sets[0] & sets[1]
    frame0 = [render_video(SynthConfig(domain=d, frames=1), 0, 0) for d in range(3)]
    assert len({f.tobytes() for f in frame0}) == 3


# ---------------------------------------------------------------------------------------------
# one frame cannot tell the class; frame pairs can


def _frame_features(f: np.ndarray) -> np.ndarray:
    """What a per-frame classifier could use: colour statistics, a 3x4 map of colour and edge energy, edge histogram."""
    g = cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float32)
    mag = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))
    H, W = g.shape
    edge_map = mag.reshape(3, H // 3, 4, W // 4).mean((1, 3)).ravel()
    colour_map = f.reshape(3, H // 3, 4, W // 4, 3).astype(np.float32).mean((1, 3)).ravel()
    hist = np.histogram(mag, bins=8, range=(0, 400))[0] / mag.size
    px = f.reshape(-1, 3).astype(np.float32)
    return np.concatenate([px.mean(0), px.std(0), edge_map, colour_map, hist])


def _motion_features(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense flow between two frames summarised as mean motion, divergence and curl of the moving pixels."""
    ga, gb = (cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) for x in (a, b))
    flow = cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, 3, 9, 3, 5, 1.1, 0)
    u, v = flow[..., 0], flow[..., 1]
    w = (np.hypot(u, v) > 1.0).astype(np.float32) + 1e-3
    (du_dy, du_dx), (dv_dy, dv_dx) = np.gradient(u), np.gradient(v)
    return np.array([np.average(x, weights=w) for x in (u, v, du_dx + dv_dy, dv_dx - du_dy)])


def _ridge_accuracy(x: np.ndarray, y: np.ndarray, k: int, lam: float) -> float:
    """Held-out accuracy of a one-vs-rest ridge classifier (every third sample held out)."""
    test = np.arange(len(y)) % 3 == 0
    mu, sd = x[~test].mean(0), x[~test].std(0) + 1e-6
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.linalg.solve(z[~test].T @ z[~test] + lam * np.eye(z.shape[1]), z[~test].T @ np.eye(k)[y[~test]])
    return float(((z[test] @ w).argmax(1) == y[test]).mean())


def test_one_frame_cannot_tell_the_class_but_motion_can():
    cfg = SynthConfig(domain=0, frames=5)
    k = len(class_names(0))
    videos = [(c, render_video(cfg, c, i)) for c in range(k) for i in range(18)]
    y = np.array([c for c, _ in videos])
    frame_x = np.stack([_frame_features(v[0]) for _, v in videos])
    motion_x = np.stack([np.mean([_motion_features(v[t], v[t + 2]) for t in range(3)], 0) for _, v in videos])
    frame_acc, motion_acc = _ridge_accuracy(frame_x, y, k, lam=10.0), _ridge_accuracy(motion_x, y, k, lam=1.0)
    chance = 1.0 / k
    assert frame_acc < chance + 0.15, f"a single frame predicts the class: {frame_acc:.2f} (chance {chance:.2f})"
    assert motion_acc > 0.5, f"frame pairs do not show the motion: {motion_acc:.2f} (chance {chance:.2f})"
    # control: the same per-frame classifier does see what a frame shows (domain 0 vs domain 1 looks)
    other = np.stack([_frame_features(render_video(SynthConfig(domain=1, frames=1), c % 6, i)[0]) for c, i in
                      zip(range(len(y)), range(len(y)))])
    look_acc = _ridge_accuracy(np.concatenate([frame_x, other]), np.repeat([0, 1], len(y)), 2, lam=10.0)
    assert look_acc > 0.9, f"the per-frame classifier cannot even tell two looks apart: {look_acc:.2f}"


# ---------------------------------------------------------------------------------------------
# appearance nuisance: off by default (version 1's bytes), iso-luma hue drift invisible in grayscale

# sha256 (first 16 hex digits) of render_video's frames written by generator version 1 (commit 2ea9644).
# Computed on x86-64 (AVX2); identical with numpy's AVX2 dispatch disabled (NPY_DISABLE_CPU_FEATURES=X86_V3).
VERSION_1 = {
    (0, 0, 0, ()): "38ec7e4589333635",
    (0, 5, 3, ()): "6461d3d328eb7b5a",
    (1, 2, 1, (("seed", 1),)): "9ff28ae7af0ca93e",
    (2, 4, 7, (("width", 64), ("height", 48))): "c29b5b99bcfc3c04",
    (3, 1, 2, (("frames", 12),)): "2543507c72b738b2",
}


def test_defaults_write_version_1_bytes_and_metadata(tmp_path):
    import hashlib

    for (domain, c, i, kw), digest in VERSION_1.items():
        frames = render_video(SynthConfig(domain=domain, **dict(kw)), c, i)
        assert hashlib.sha256(frames.tobytes()).hexdigest()[:16] == digest, f"domain {domain} class {c} video {i} changed"
    generate(SynthConfig(out=str(tmp_path / "v1"), **SMALL), progress=False)
    params = json.loads((tmp_path / "v1" / "synth.json").read_text())["params"]
    assert params["generator"] == 1 and "hue_drift" not in params  # a version-1 dataset stays up to date
    generate(SynthConfig(out=str(tmp_path / "v2"), hue_drift=10.0, **SMALL), progress=False)
    params = json.loads((tmp_path / "v2" / "synth.json").read_text())["params"]
    assert params["generator"] == 2 and params["hue_drift"] == 10.0


@pytest.mark.parametrize("option", [{"colour_jitter": 1.0}, {"mixed_looks": True}, {"hue_drift": 20.0},
                                    {"distractors": 5}, {"distractor_speed": 4.0}])
def test_each_appearance_option_changes_the_video_deterministically(option):
    cfg = SynthConfig(domain=0, frames=6, **option)
    base = render_video(SynthConfig(domain=0, frames=6), 2, 0)
    a, b = render_video(cfg, 2, 0), render_video(cfg, 2, 0)
    assert np.array_equal(a, b)
    assert (a != base).mean() > 0.01  # distractor_speed moves only the two small distractors: about 2 % of the values


def test_iso_luma_hue_drift_is_invisible_to_tvl1_grayscale(tmp_path):
    """TV-L1 reads grayscale (`prepare_pairs`, OpenCV's luma): two drift rates give the same gray frames."""
    from vidistill.data.synthetic import encode_video, iso_luma_rotation
    from vidistill.flow.params import TVL1Params, prepare_pairs

    rgb = np.random.default_rng(0).uniform(0, 1, (100, 3))
    luma = np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(rgb @ iso_luma_rotation(1.3).T @ luma, rgb @ luma, atol=1e-12)
    slow, fast = (render_video(SynthConfig(domain=0, frames=10, hue_drift=d), 3, 1) for d in (10.0, 30.0))
    gray = [prepare_pairs(v, v, TVL1Params())[0].astype(int) for v in (slow, fast)]
    assert np.abs(gray[0] - gray[1]).max() <= 1  # rounding to uint8 only
    colour = np.abs(slow.astype(int) - fast)
    assert colour[0].max() == 0 and colour[-1].mean() > 8  # the same start, then RGB drifts apart
    decoded = []  # through the codec (yuv420p): the luma plane carries almost nothing of the drift
    for i, v in enumerate((slow, fast)):
        path = str(tmp_path / f"{i}.mp4")
        encode_video(path, v, fps=12, codec="mpeg4")
        with av.open(path) as c:
            decoded.append(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]))
    gray = [prepare_pairs(v, v, TVL1Params())[0].astype(int) for v in decoded]
    assert np.abs(gray[0] - gray[1]).mean() < 1.5 < 5 < np.abs(decoded[0].astype(int) - decoded[1]).mean()


@pytest.mark.parametrize("bad, match", [({"colour_jitter": 1.5}, "synth.colour_jitter"), ({"hue_drift": -1.0}, "synth.hue_drift"),
                                        ({"distractors": -1}, "synth.distractors"), ({"distractor_speed": -2.0}, "synth.distractor_speed")])
def test_bad_appearance_options_are_refused(bad, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        generate(SynthConfig(out=str(tmp_path / "x"), **bad, **SMALL), progress=False)
    assert not (tmp_path / "x").exists()
