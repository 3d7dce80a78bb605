"""Video decoding and clip sampling (PyAV + OpenCV).

A clip is `T` frames taken `stride` frames apart, so it spans `L = (T - 1) * stride + 1` source frames.

Sampling:
    * **train**: a random segment: the start is drawn uniformly from `[0, n - L]` by a generator
      seeded from `(seed, relpath)` (`video_rng`), so prep is deterministic and independent of the
      order or the process in which videos are decoded. `clips > 1` draws several segments.
    * **eval**: `clips` clips of the same `T` and `stride` (the temporal scale the model was trained
      at), their starts spread uniformly over the video (`linspace(0, n - L, clips)`); a single clip
      is the centre clip. Multi-clip evaluation averages over them.

Videos shorter than a clip (`n < L`), policy `short_policy`:
    * ``"loop"``: the video is treated as a cyclic sequence, frame `p` is `p mod n` (the frame
      sequence repeats); segment starts are drawn (train) or spread (eval) over `[0, n)`.
    * ``"pad"``: frame `p` is `min(p, n - 1)` (the last frame repeats); all clips start at frame 0.

Frame count: the number of video packets the demuxer finds (cheap, no decoding, correct for
containers whose header has no frame count such as mkv/webm). If the header declares a count and
fewer than 95% of those frames are present, the file is truncated and refused.

Decoding stops after the last needed frame; only needed frames are converted to RGB, resized
so the short side is `short_side` (`cv2.resize`, `INTER_AREA`) and centre-cropped to `crop x crop`.
Any problem with a file raises `VideoError` with a one-line reason (the prep stage records it and
goes on).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

#: Fraction of the header's frame count that must be present for a file not to count as truncated.
TRUNCATION_TOLERANCE = 0.95


class VideoError(Exception):
    """A video file cannot be used; the message is a one-line reason."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video (and how many frames it really holds)."""

    frames: int  # video packets found by the demuxer
    header_frames: int  # frame count the header declares (0 when it has none)
    width: int
    height: int
    fps: float


def video_rng(seed: int, relpath: str) -> np.random.Generator:
    """A generator seeded by `(seed, relpath)`: the same video draws the same clips everywhere."""
    digest = hashlib.sha256(relpath.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _open(path: str | Path) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise VideoError("file not found")
    if path.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as e:
        raise VideoError(f"not a readable video: {_msg(e)}") from None
    if not container.streams.video:
        container.close()
        raise VideoError("no video stream")
    return container


def _msg(e: Exception) -> str:
    """FFmpeg errors carry the file name; keep only the reason."""
    return getattr(e, "strerror", None) or str(e)


def probe(path: str | Path) -> VideoInfo:
    """Count the frames of a video by demuxing its packets (no decoding).

    Raises:
        VideoError: the file is missing, empty, not a video, truncated, or has no frames.
    """
    with _open(path) as container:
        stream = container.streams.video[0]
        header = int(stream.frames or 0)
        n = 0
        try:
            for packet in container.demux(stream):
                if packet.size:
                    n += 1
        except av.FFmpegError as e:
            raise VideoError(f"demuxing failed after {n} packets: {_msg(e)}") from None
        rate = stream.average_rate or stream.base_rate or 0
        info = VideoInfo(frames=n, header_frames=header, width=stream.codec_context.width,
                         height=stream.codec_context.height, fps=float(rate))
    if n == 0:
        raise VideoError("zero video frames in the file")
    if header > 0 and n < TRUNCATION_TOLERANCE * header:
        raise VideoError(f"truncated: the header declares {header} frames but only {n} are present")
    return info


def frame_count(path: str | Path) -> int:
    """Frames in a video (see `probe`)."""
    return probe(path).frames


def clip_span(frames: int, stride: int) -> int:
    """Source frames one clip spans: `(frames - 1) * stride + 1`."""
    return (frames - 1) * stride + 1


def _positions(starts: np.ndarray, n: int, frames: int, stride: int, policy: str) -> np.ndarray:
    """Frame indices `(clips, T)` for clip `starts`, mapped into `[0, n)` by `policy`."""
    pos = starts[:, None] + np.arange(frames)[None, :] * stride  # (clips, T)
    if policy == "loop":
        return pos % n
    if policy == "pad":
        return np.minimum(pos, n - 1)
    raise ValueError(f"short_policy must be 'loop' or 'pad', got {policy!r}")


def train_indices(n: int, *, frames: int, stride: int, clips: int, rng: np.random.Generator,
                  policy: str = "loop") -> np.ndarray:
    """Frame indices `(clips, T)` of `clips` random segments of a video with `n` frames."""
    span = clip_span(frames, stride)
    if n >= span:
        starts = rng.integers(0, n - span + 1, size=clips)
    elif policy == "loop":
        starts = rng.integers(0, n, size=clips)
    else:
        starts = np.zeros(clips, dtype=np.int64)
    return _positions(starts.astype(np.int64), n, frames, stride, policy)


def eval_indices(n: int, *, frames: int, stride: int, clips: int, policy: str = "loop") -> np.ndarray:
    """Frame indices `(clips, T)` of `clips` clips spread uniformly over a video with `n` frames."""
    span = clip_span(frames, stride)
    if n >= span:
        last = n - span
        starts = np.array([last // 2]) if clips == 1 else np.round(np.linspace(0, last, clips))
    elif policy == "loop":
        starts = np.floor(np.arange(clips) * n / clips)
    else:
        starts = np.zeros(clips)
    return _positions(starts.astype(np.int64), n, frames, stride, policy)


def resize_crop(frame: np.ndarray, *, short_side: int, crop: int) -> np.ndarray:
    """Resize `(H, W, 3)` so its short side is `short_side` (INTER_AREA), centre-crop `crop x crop`."""
    h, w = frame.shape[:2]
    scale = short_side / min(h, w)
    nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
    if (nh, nw) != (h, w):
        frame = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA)
    y0, x0 = (nh - crop) // 2, (nw - crop) // 2
    return frame[y0:y0 + crop, x0:x0 + crop]


def decode_frames(path: str | Path, wanted: np.ndarray, *, short_side: int, crop: int,
                  threads: int = 0) -> tuple[dict[int, np.ndarray], int]:
    """Decode the frames whose indices are in `wanted`, stopping after the last one.

    Args:
        path: the video file.
        wanted: frame indices (any shape, repeats allowed).
        short_side: resize target of the short side.
        crop: centre-crop size.
        threads: decoder threads (0: let FFmpeg choose; 1: no threading).

    Returns:
        `({index: (crop, crop, 3) uint8 RGB}, frames decoded)`; indices past the end are absent.

    Raises:
        VideoError: the file cannot be opened or the decoder fails.
    """
    need = set(int(i) for i in np.unique(wanted))
    last = max(need)
    out: dict[int, np.ndarray] = {}
    n = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if threads != 1 else "SLICE"
        stream.codec_context.thread_count = threads
        try:
            for frame in container.decode(stream):
                if n in need:
                    rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3)
                    out[n] = resize_crop(rgb, short_side=short_side, crop=crop)
                n += 1
                if n > last:
                    break
        except av.FFmpegError as e:
            raise VideoError(f"decoding failed after {n} frames: {_msg(e)}") from None
    return out, n


def load_clips(path: str | Path, *, relpath: str, train: bool, frames: int, stride: int, clips: int,
               short_side: int, crop: int, policy: str = "loop", seed: int = 0,
               threads: int = 0) -> tuple[np.ndarray, int]:
    """Sample and decode the clips of one video.

    Args:
        path: the video file.
        relpath: its path relative to the dataset root (seeds the train sampling).
        train: random segments (True) or uniformly spread clips (False).
        frames: T.
        stride: temporal stride between sampled frames.
        clips: clips per video.
        short_side: resize target of the short side.
        crop: square crop size S.
        policy: `"loop"` or `"pad"` for videos shorter than a clip.
        seed: sampling seed.
        threads: decoder threads (0: FFmpeg chooses).

    Returns:
        `(clips uint8 (clips, T, S, S, 3) RGB, frames decoded)`.

    Raises:
        VideoError: the file is unusable (the message says why).
    """
    info = probe(path)
    n = info.frames
    if train:
        idx = train_indices(n, frames=frames, stride=stride, clips=clips, rng=video_rng(seed, relpath), policy=policy)
    else:
        idx = eval_indices(n, frames=frames, stride=stride, clips=clips, policy=policy)
    got, decoded = decode_frames(path, idx, short_side=short_side, crop=crop, threads=threads)
    if decoded == 0:
        raise VideoError("zero decodable frames")
    if len(got) < len(np.unique(idx)):
        # Fewer frames decode than packets exist (e.g. undecodable tail): resample within what decodes.
        if decoded < TRUNCATION_TOLERANCE * n:
            raise VideoError(f"only {decoded} of {n} frames decode")
        n = decoded
        if train:
            idx = train_indices(n, frames=frames, stride=stride, clips=clips, rng=video_rng(seed, relpath), policy=policy)
        else:
            idx = eval_indices(n, frames=frames, stride=stride, clips=clips, policy=policy)
        got, more = decode_frames(path, idx, short_side=short_side, crop=crop, threads=threads)
        decoded += more
    out = np.stack([np.stack([got[int(i)] for i in row]) for row in idx])  # (clips, T, S, S, 3)
    return out, decoded
