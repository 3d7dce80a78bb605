"""Synthetic motion dataset: classes that differ only by how things move.

Every video shows `N_OBJECTS` textured objects that move with the class motion and
`SynthConfig.distractors` (default 2) smaller ones that drift in random directions, over a textured background that
slowly translates. Everything a single frame shows is drawn from the same distribution in every
class of a domain: object positions are uniform on the frame (objects move on a torus, wrapping
at the borders), angles are uniform, and each object's size and opacity are one function of a
uniformly distributed "phase" (see `_size_alpha`). Only the change over time differs:

* translation (`left`, `right`, `up`, `down`, diagonals; `slow` vs `fast` in a random direction),
* rotation sense (`rotate_cw` / `rotate_ccw`; `spin` = fast rotation either way),
* `expand` / `shrink`: the phase advances or recedes, so objects grow (or shrink) and fade out at
  the end of their range while a new one fades in at the other end,
* periodic motion (`oscillate_*` along an axis, `orbit_cw` / `orbit_ccw` around a point, `pulse`
  in size) versus linear motion.

So one frame cannot tell the class (tested in `tests/test_synthetic.py`), while a small 3D CNN
sees the motion: at the default 96x72 objects move 3-5 pixels per frame.

Domains (`SynthConfig.domain`) have different class sets and looks (palette, texture, shapes,
background), giving several datasets for multi-dataset methods: 0 = 8 classes (four directions,
two rotation senses, expand/shrink), 1 = 6 classes (speed, oscillation axis, orbit sense),
2 = 6 classes (four diagonals, spin, pulse); domain k >= 3 picks 6 motions and a look at random
from seed k.

Appearance nuisance (`SynthConfig`, all off by default): `colour_jitter` recolours each video as a
whole (hue, saturation, channel order), `mixed_looks` draws every object's palette, texture and shape
and the background from the looks of domains 0-2, and `hue_drift` rotates each object's hue over time
at constant luma, a change in RGB that the grayscale input of TV-L1 does not contain (`iso_luma_rotation`).
`distractors` and `distractor_speed` set the motion clutter. They draw from a random stream of their
own, so with all of them at their defaults a video is the bytes generator version 1 wrote.

Output: `out/<class>/<class>_NNN.mp4` (codec `cfg.codec`, yuv420p) and `out/synth.json` holding
the parameters; `generate` does nothing when `synth.json` matches. Generation is deterministic
per seed: the same parameters give identical decoded frames.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import av
import cv2
import numpy as np

from vidistill.config import ConfigError, SynthConfig
from vidistill.data.parallel import executor, ordered_map, progress_bar

GENERATOR_VERSION = 2  # 2 adds the appearance options; with all of them at their defaults it writes version 1's bytes
N_OBJECTS = 4
NUISANCE_DEFAULTS = {"colour_jitter": 0.0, "mixed_looks": False, "hue_drift": 0.0, "distractors": 2, "distractor_speed": 1.5}

# ----------------------------------------------------------------------------------------------
# motions: (rng, t (T,), size (W, H)) -> centre offset (T, 2), angle offset (T,), phase offset (T,)
Motion = Callable[[np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]

SPEED = 3.0  # pixels per frame of the translation classes (at the default 96x72)
ROT = np.deg2rad(15.0)  # radians per frame of the rotation classes
SCALE_PERIOD = 12.0  # frames for a full grow (or shrink) of expand/shrink


def _still(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros((len(t), 2)), np.zeros(len(t)), np.zeros(len(t))


def _translate(angle: float | None, speed: float) -> Motion:
    """Linear motion in direction `angle` (image coordinates, y down; None: random per video)."""

    def motion(rng: np.random.Generator, t: np.ndarray):
        a = rng.uniform(0, 2 * np.pi) if angle is None else angle
        c, r, p = _still(t)
        return c + speed * t[:, None] * np.array([np.cos(a), np.sin(a)]), r, p

    return motion


def _rotate(omega: float | None) -> Motion:
    """Rotation in place (`omega` > 0 is clockwise on screen; None: random sense)."""

    def motion(rng: np.random.Generator, t: np.ndarray):
        w = omega if omega is not None else rng.choice([-1.0, 1.0]) * 2.0 * ROT
        c, _, p = _still(t)
        return c, w * t, p

    return motion


def _scale(sign: float) -> Motion:
    """Growth (`sign` 1) or shrinking (-1): the size/opacity phase moves through its range."""

    def motion(rng: np.random.Generator, t: np.ndarray):
        c, r, _ = _still(t)
        return c, r, sign * t / SCALE_PERIOD

    return motion


def _pulse(rng: np.random.Generator, t: np.ndarray):
    """Size oscillates periodically."""
    c, r, _ = _still(t)
    return c, r, 0.3 * np.sin(2 * np.pi * t / 10.0 + rng.uniform(0, 2 * np.pi))


def _oscillate(axis: tuple[float, float], amplitude: float = 9.0, period: float = 10.0) -> Motion:
    """Back-and-forth along `axis` (sinusoidal, random phase)."""

    def motion(rng: np.random.Generator, t: np.ndarray):
        c, r, p = _still(t)
        s = amplitude * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
        return c + s[:, None] * np.array(axis), r, p

    return motion


def _orbit(sign: float, radius: float = 8.0, period: float = 14.0) -> Motion:
    """Circles around a point (`sign` 1: clockwise on screen)."""

    def motion(rng: np.random.Generator, t: np.ndarray):
        c, r, p = _still(t)
        a = sign * 2 * np.pi * t / period + rng.uniform(0, 2 * np.pi)
        return c + radius * np.stack([np.cos(a), np.sin(a)], 1), r, p

    return motion


MOTIONS: dict[str, Motion] = {
    "left": _translate(np.pi, SPEED),
    "right": _translate(0.0, SPEED),
    "up": _translate(-np.pi / 2, SPEED),
    "down": _translate(np.pi / 2, SPEED),
    "up_left": _translate(-3 * np.pi / 4, SPEED),
    "up_right": _translate(-np.pi / 4, SPEED),
    "down_left": _translate(3 * np.pi / 4, SPEED),
    "down_right": _translate(np.pi / 4, SPEED),
    "slow": _translate(None, 1.0),
    "fast": _translate(None, 4.0),
    "rotate_cw": _rotate(ROT),
    "rotate_ccw": _rotate(-ROT),
    "spin": _rotate(None),
    "expand": _scale(1.0),
    "shrink": _scale(-1.0),
    "pulse": _pulse,
    "oscillate_horizontal": _oscillate((1.0, 0.0)),
    "oscillate_vertical": _oscillate((0.0, 1.0)),
    "orbit_cw": _orbit(1.0),
    "orbit_ccw": _orbit(-1.0),
}


# ----------------------------------------------------------------------------------------------
# looks


@dataclass(frozen=True)
class Look:
    """How a domain's videos look (shared by all its classes)."""

    saturation: tuple[float, float]  # HSV ranges of object colours
    value: tuple[float, float]
    bg_value: tuple[float, float]  # background brightness range
    bg_contrast: float  # amplitude of the background texture
    bg_freq: tuple[float, float]  # background texture frequencies, cycles per pixel
    texture: str  # "stripes" | "checker" | "blend"
    shapes: tuple[float, ...]  # superellipse exponents: 2 disk, 1 diamond, >4 rounded square
    radius: tuple[float, float]  # object radius range, fraction of the frame height
    tex_freq: tuple[float, float]  # texture cycles per object radius


DOMAINS: dict[int, tuple[tuple[str, ...], Look]] = {
    0: (("left", "right", "up", "down", "rotate_cw", "rotate_ccw", "expand", "shrink"),
        Look(saturation=(0.7, 1.0), value=(0.7, 1.0), bg_value=(0.25, 0.55), bg_contrast=0.12, bg_freq=(0.02, 0.07),
             texture="stripes", shapes=(2.0, 6.0), radius=(0.08, 0.28), tex_freq=(0.8, 1.6))),
    1: (("slow", "fast", "oscillate_horizontal", "oscillate_vertical", "orbit_cw", "orbit_ccw"),
        Look(saturation=(0.15, 0.45), value=(0.35, 0.75), bg_value=(0.6, 0.85), bg_contrast=0.15, bg_freq=(0.03, 0.09),
             texture="checker", shapes=(6.0,), radius=(0.10, 0.20), tex_freq=(0.8, 1.4))),
    2: (("up_left", "up_right", "down_left", "down_right", "spin", "pulse"),
        Look(saturation=(0.4, 0.7), value=(0.85, 1.0), bg_value=(0.1, 0.3), bg_contrast=0.08, bg_freq=(0.01, 0.04),
             texture="blend", shapes=(1.0, 2.0), radius=(0.12, 0.22), tex_freq=(0.6, 1.2))),
}


def domain_spec(domain: int) -> tuple[tuple[str, ...], Look]:
    """Class names (motions) and look of `domain`; domains >= 3 are drawn at random from seed `domain`."""
    if domain in DOMAINS:
        return DOMAINS[domain]
    rng = np.random.default_rng([domain, 7919])
    names = tuple(sorted(rng.choice(sorted(MOTIONS), size=6, replace=False).tolist()))
    lo = rng.uniform(0.1, 0.6)
    look = Look(saturation=(lo, lo + 0.3), value=tuple(sorted(rng.uniform(0.3, 1.0, 2))),  # type: ignore[arg-type]
                bg_value=tuple(sorted(rng.uniform(0.1, 0.9, 2))), bg_contrast=float(rng.uniform(0.05, 0.2)),  # type: ignore[arg-type]
                bg_freq=(0.02, float(rng.uniform(0.04, 0.12))), texture=str(rng.choice(["stripes", "checker", "blend"])),
                shapes=(float(rng.choice([1.0, 2.0, 6.0])), 6.0), radius=(0.10, 0.2), tex_freq=(0.8, 1.4))
    return names, look


def class_names(domain: int) -> list[str]:
    """The classes of `domain`, in label order."""
    return list(domain_spec(domain)[0])


# ----------------------------------------------------------------------------------------------
# drawing


def _colours(rng: np.random.Generator, n: int, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    """`n` random RGB colours in [0, 1], `(n, 3)`."""
    hsv = np.stack([rng.uniform(0, 180, n), rng.uniform(*sat, n) * 255, rng.uniform(*val, n) * 255], 1)
    return cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0].astype(np.float32) / 255


def _size_alpha(phase: np.ndarray, r_lo: float, r_hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Radius and opacity as one function of the phase (taken mod 1): both classes of a pair share it."""
    f = np.mod(phase, 1.0)
    return r_lo + (r_hi - r_lo) * f, np.minimum(1.0, 5.0 * np.sin(np.pi * f))


def _background(rng: np.random.Generator, look: Look, t: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A sum of `K` drifting colour sinusoids, `(T, H, W, 3)` float32.

    `cos(S(y, x) - w t) = cos S cos wt + sin S sin wt`, so the video is one `(T, 2K) x (2K, H*W*3)` product.
    """
    K = 5
    base = _colours(rng, 1, (0.1, 0.5), look.bg_value)[0]
    a = rng.uniform(0, 2 * np.pi)
    v = rng.uniform(0.2, 0.6) * np.array([np.cos(a), np.sin(a)])  # drift, pixels per frame
    b = rng.uniform(0, np.pi, K)
    f = rng.uniform(*look.bg_freq, K)[:, None] * np.stack([np.cos(b), np.sin(b)], 1)  # (K, 2) cycles per pixel
    colour = rng.uniform(-1, 1, (K, 3)) * look.bg_contrast  # (K, 3)
    shift = rng.uniform(0, 2 * np.pi, K)
    spatial = 2 * np.pi * (f[:, 0, None, None] * xx + f[:, 1, None, None] * yy)  # (K, H, W)
    temporal = 2 * np.pi * (f @ v)[None, :] * t[:, None] + shift  # (T, K)
    A = np.concatenate([np.cos(temporal), np.sin(temporal)], 1).astype(np.float32)  # (T, 2K)
    B = np.concatenate([np.cos(spatial), np.sin(spatial)])[..., None] * np.concatenate([colour, colour])[:, None, None]
    img = np.einsum("tk,kn->tn", A, B.reshape(2 * K, -1).astype(np.float32))  # (T, H*W*3); no BLAS threads
    return img.reshape(len(t), *yy.shape, 3) + base.astype(np.float32)


# BT.601 full-range RGB -> (Y', Cb, Cr) without offsets; its first row is the luma cv2.COLOR_RGB2GRAY computes
_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCC_INV = np.linalg.inv(_YCC)


def iso_luma_rotation(theta: float, saturation: float = 1.0) -> np.ndarray:
    """`(3, 3)` matrix `M` acting on RGB column vectors: the chroma `(Cb, Cr)` rotated by `theta` radians
    (a hue rotation) and scaled by `saturation`, the luma `Y' = 0.299 R + 0.587 G + 0.114 B` kept exactly."""
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    rot[1:, 1:] *= saturation
    return _YCC_INV @ rot @ _YCC


def _rotation_safe(colours: np.ndarray) -> np.ndarray:
    """Shrink the chroma of RGB colours `(n, 3)` in [0, 1] so that every hue rotation stays inside [0, 1].

    The rotated chroma sweeps a circle of radius rho, so channel j reaches `Y' ± rho·|row j of
    _YCC_INV[:, 1:]|`; rho is capped where the first channel would leave the cube. Luma is unchanged.
    """
    ycc = colours.astype(np.float64) @ _YCC.T  # (n, 3)
    reach = np.linalg.norm(_YCC_INV[:, 1:], axis=1)  # (3,)
    y = ycc[:, :1]
    rho_max = np.min(np.minimum(y, 1.0 - y) / reach, axis=1)  # (n,)
    rho = np.linalg.norm(ycc[:, 1:], axis=1)
    ycc[:, 1:] *= np.minimum(1.0, rho_max / np.maximum(rho, 1e-12))[:, None]
    return (ycc @ _YCC_INV.T).astype(np.float32)


def _colour_transform(rng: np.random.Generator, frames: np.ndarray, strength: float) -> np.ndarray:
    """A per-video colour transform of `frames` `(T, H, W, 3)` in [0, 1], constant in time: hue rotated by
    up to ±180°·strength, saturation scaled by [1 - 0.7·strength, 1 + 0.5·strength], the channels put in a
    random order with probability `strength`."""
    theta = rng.uniform(-np.pi, np.pi) * strength
    sat = rng.uniform(1.0 - 0.7 * strength, 1.0 + 0.5 * strength)
    perm = rng.permutation(3) if rng.uniform() < strength else np.arange(3)
    m = iso_luma_rotation(theta, sat)[perm].astype(np.float32)  # rows permuted: output channel order
    return np.clip(frames @ m.T, 0.0, 1.0)


def _mixed_look(rng: np.random.Generator) -> Look:
    """One of the base domains' looks (0-2), at random."""
    return DOMAINS[int(rng.integers(len(DOMAINS)))][1]


def _superellipse(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """`(|u|^p + |v|^p)^(1/p)`: 1 on the outline of the shape (fast paths for the common exponents)."""
    if p == 1.0:
        return np.abs(u) + np.abs(v)
    if p == 2.0:
        return np.sqrt(u * u + v * v)
    return (np.abs(u) ** p + np.abs(v) ** p) ** (1.0 / p)


def _draw_object(frames: np.ndarray, rng: np.random.Generator, look: Look, centre: np.ndarray, angle: np.ndarray,
                 phase: np.ndarray, radius_scale: float, hue_rate: float = 0.0) -> None:
    """Alpha-blend one textured superellipse into `frames` `(T, H, W, 3)` (in place), wrapping at borders.

    Only a `(T, P, P)` patch around the object is computed (P = 2 * max radius + 3). With `hue_rate`
    (radians per frame) the object's colours rotate in hue at constant luma over time; they are first
    made rotation-safe, so no rotation leaves the RGB cube and the luma stays exact.
    """
    T, H, W, _ = frames.shape
    c1, c2 = _colours(rng, 2, look.saturation, look.value)
    if hue_rate:
        c1, c2 = _rotation_safe(np.stack([c1, c2]))
    p = float(rng.choice(look.shapes))
    freq = rng.uniform(*look.tex_freq)
    beta = rng.uniform(0, np.pi)
    radius, alpha = _size_alpha(phase, look.radius[0] * H * radius_scale, look.radius[1] * H * radius_scale)
    half = min(int(np.ceil(radius.max() * 2 ** 0.5 if p > 2 else radius.max())) + 1, (min(H, W) - 1) // 2)
    steps = np.arange(-half, half + 1)
    base = np.floor(centre).astype(np.int64)  # (T, 2)
    xs, ys = (base[:, 0, None] + steps) % W, (base[:, 1, None] + steps) % H  # (T, P) pixel indices, wrapped
    dx = (steps[None] + base[:, 0, None] - centre[:, 0, None]).astype(np.float32)[:, None, :]  # (T, 1, P)
    dy = (steps[None] + base[:, 1, None] - centre[:, 1, None]).astype(np.float32)[:, :, None]  # (T, P, 1)
    ca, sa = np.cos(angle).astype(np.float32)[:, None, None], np.sin(angle).astype(np.float32)[:, None, None]
    r = radius.astype(np.float32)[:, None, None]
    u = (dx * ca + dy * sa) / r  # (T, P, P) object coordinates, in radii
    v = (dy * ca - dx * sa) / r
    mask = np.clip((1.0 - _superellipse(u, v, p)) * r + 0.5, 0.0, 1.0) * alpha.astype(np.float32)[:, None, None]
    s1 = np.cos(np.float32(np.pi * freq) * (u * np.float32(np.cos(beta)) + v * np.float32(np.sin(beta))))
    if look.texture == "stripes":
        tex = s1
    elif look.texture == "checker":
        tex = np.sign(s1 * np.cos(np.float32(np.pi * freq) * (v * np.float32(np.cos(beta)) - u * np.float32(np.sin(beta))))) * 0.8
    else:
        tex = 0.5 * s1 + 0.5 * np.cos(np.float32(2 * np.pi * freq) * u)
    colour = c1 + (c2 - c1) * (0.5 + 0.5 * tex)[..., None]  # (T, P, P, 3)
    if hue_rate:  # a linear map per frame: blends of rotation-safe colours stay in the cube
        rot = np.stack([iso_luma_rotation(hue_rate * k) for k in range(T)]).astype(np.float32)  # (T, 3, 3)
        colour = np.einsum("tij,tpqj->tpqi", rot, colour)
    at = (np.arange(T)[:, None, None], ys[:, :, None], xs[:, None, :])
    patch = frames[at]
    frames[at] = patch + mask[..., None] * (colour - patch)


def render_video(cfg: SynthConfig, class_index: int, video_index: int) -> np.ndarray:
    """The frames of one video, uint8 `(T, H, W, 3)` RGB (deterministic in the arguments)."""
    names, look = domain_spec(cfg.domain)
    motion = MOTIONS[names[class_index]]
    rng = np.random.default_rng([cfg.seed, cfg.domain, class_index, video_index])
    nuisance = np.random.default_rng([cfg.seed, cfg.domain, class_index, video_index, 1])  # the appearance options' own stream
    t = np.arange(cfg.frames, dtype=np.float64)
    yy, xx = np.mgrid[0:cfg.height, 0:cfg.width].astype(np.float32)
    frames = _background(rng, _mixed_look(nuisance) if cfg.mixed_looks else look, t, yy, xx)
    if cfg.hue_drift:
        np.clip(frames, 0.0, 1.0, out=frames)  # blends of in-gamut colours: the final clip cannot change luma
    scale = cfg.height / 72.0  # motions are defined at 96x72; scale them with the frame
    objects = [(motion, 1.0)] * N_OBJECTS + [(_translate(None, 0.0), 0.45)] * cfg.distractors
    order = rng.permutation(len(objects))  # draw order (who occludes whom) does not depend on the role
    for k in order:
        move, radius_scale = objects[k]
        start = rng.uniform(0, 1, 2) * (cfg.width, cfg.height)
        if radius_scale < 1.0:  # distractor: random direction and speed, random rotation
            move = _translate(None, rng.uniform(0.0, cfg.distractor_speed))
            spin = rng.uniform(-0.1, 0.1) * t
        else:
            spin = np.zeros_like(t)
        offset, turn, dphase = move(rng, t)
        centre = start + offset * scale
        angle = rng.uniform(0, 2 * np.pi) + turn + spin
        phase = rng.uniform(0, 1) + dphase
        obj_look = _mixed_look(nuisance) if cfg.mixed_looks else look
        hue_rate = 0.0
        if cfg.hue_drift:  # degrees per frame, in ±[hue_drift / 3, hue_drift]
            hue_rate = float(np.deg2rad(cfg.hue_drift) * nuisance.choice([-1.0, 1.0]) * nuisance.uniform(1 / 3, 1.0))
        _draw_object(frames, rng, obj_look, centre, angle, phase, radius_scale, hue_rate)
    frames = np.clip(frames, 0.0, 1.0)
    if cfg.colour_jitter:
        frames = _colour_transform(nuisance, frames, cfg.colour_jitter)
    return (frames * 255 + 0.5).astype(np.uint8)


def encode_video(path: str | Path, frames: np.ndarray, *, fps: int, codec: str) -> None:
    """Write `frames` uint8 `(T, H, W, 3)` RGB as a video file (yuv420p)."""
    T, H, W, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.bit_rate = int(W * H * fps * 2)  # ~2 bits/pixel: sharp at these sizes
        stream.thread_count = 1  # deterministic bitstream
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode(None))


# ----------------------------------------------------------------------------------------------


def _params(cfg: SynthConfig) -> dict:
    """What `synth.json` records: version 1's keys while every appearance option is at its default (the
    videos are version 1's bytes, so version 1 datasets stay up to date), else version 2 and all keys."""
    p = dataclasses.asdict(cfg)
    p.pop("out")
    if all(p[k] == v for k, v in NUISANCE_DEFAULTS.items()):
        return {"generator": 1, **{k: v for k, v in p.items() if k not in NUISANCE_DEFAULTS}}
    return {"generator": GENERATOR_VERSION, **p}


def _up_to_date(out: Path, cfg: SynthConfig) -> bool:
    meta = out / "synth.json"
    if not meta.is_file():
        return False
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("params") == _params(cfg) and all((out / f).is_file() for f in info.get("files", []))


def generate(cfg: SynthConfig, *, progress: bool = True, writer: str = "prep") -> Path:
    """Write the synthetic dataset of `cfg` to `cfg.out` (unless it is already there).

    The videos are written to a temporary directory beside `cfg.out` and moved into place at the
    end, so an interrupted run leaves no partial dataset. `synth.json` records who wrote them
    (`writer`): a dataset is only ever replaced by the same writer, so `vidistill prep` never deletes
    the videos `vidistill synth` made with other parameters (issue 25.10).

    Args:
        cfg: the dataset parameters.
        progress: show a progress bar.
        writer: "prep" (a prep stage generating its input) or "synth" (the `vidistill synth` command).

    Returns:
        `Path(cfg.out)`.

    Raises:
        ConfigError: invalid parameters, an unknown codec, `cfg.out` exists, is not empty and is not a
            synthetic dataset, or holds one another writer made with other parameters (it is never
            overwritten).
    """
    cfg.validate()
    out = Path(cfg.out)
    if _up_to_date(out, cfg):
        return out
    if out.exists() and any(out.iterdir()) and not (out / "synth.json").is_file():
        raise ConfigError(f"synth.out {out} exists and is not a synthetic dataset (no synth.json); "
                          "choose an empty or new directory")
    if (out / "synth.json").is_file():
        try:
            info = json.loads((out / "synth.json").read_text())
        except json.JSONDecodeError:
            info = {}
        owner = info.get("writer", "prep")  # a synth.json from before writers were recorded: prep's
        if owner != writer:
            old, new = info.get("params", {}), _params(cfg)
            differ = ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in sorted(set(old) | set(new))
                               if old.get(k) != new.get(k)) or "the same settings, but some of its videos are missing"
            raise ConfigError(f"{out} holds videos `vidistill {owner}` wrote with other settings ({differ}); {writer} will "
                              f"not replace them: read them as they are (prep.dataset: folder), set prep.synth.* to "
                              f"match, or choose another folder")
    try:
        av.codec.Codec(cfg.codec, "w")
    except (av.codec.codec.UnknownCodecError, av.FFmpegError):
        raise ConfigError(f"synth.codec {cfg.codec!r} is not an encoder this PyAV build has (try 'mpeg4')") from None
    names = class_names(cfg.domain)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    files: list[str] = []
    try:
        jobs = [(c, i, f"{names[c]}/{names[c]}_{i:03d}.mp4") for c in range(len(names)) for i in range(cfg.videos_per_class)]
        for name in names:
            (tmp / name).mkdir(parents=True)
        with progress_bar(progress) as bar, executor(min(os.cpu_count() or 1, 8), len(jobs)) as pool:
            task = bar.add_task(f"synth domain {cfg.domain}", total=len(jobs), info="")
            for rel in ordered_map(pool, _write_one, [(cfg, c, i, str(tmp / rel)) for c, i, rel in jobs], chunksize=4):
                files.append(rel)
                bar.advance(task)
        meta = {"params": _params(cfg), "classes": names, "files": files, "writer": writer}
        (tmp / "synth.json").write_text(json.dumps(meta, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_one(job: tuple[SynthConfig, int, int, str]) -> str:
    """Render and encode one video; returns its path relative to the dataset directory."""
    cfg, c, i, path = job
    encode_video(path, render_video(cfg, c, i), fps=cfg.fps, codec=cfg.codec)
    p = Path(path)
    return f"{p.parent.name}/{p.name}"
