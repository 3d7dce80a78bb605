"""Video decoding and clip sampling (PyAV + OpenCV): the frames a player shows.

A video's frames are its **presentation**, what a standard player (ffplay, mpv, a browser) shows,
not the decoder's raw output nor the container's declared counts:

    * **Edit lists** (MP4/MOV): a cut made without re-encoding keeps the packets back to the previous
      keyframe and hides them with an edit list. FFmpeg marks those packets `is_discard` and the
      decoder drops the frames they decode to; they are not frames of the video and are not counted.
    * **Display matrix**: the rotation and mirroring a player applies (`AV_FRAME_DATA_DISPLAYMATRIX`
      side data of each decoded frame, from the MP4 `tkhd` matrix or the bitstream; PyAV's
      `VideoFrame.rotation` is its angle) is applied to every frame: a phone video stored as
      160x90 landscape pixels with a -90 degree rotation comes out 90x160 portrait. All eight
      axis-aligned orientations are exact; other angles are rotated about the centre in a frame of
      the same size, filled black, as FFmpeg's `rotate` filter does.
    * **Sample aspect ratio** (non-square pixels, `VideoStream.sample_aspect_ratio`): a stored
      width `W` is displayed `W * SAR` wide.
    * **Stream choice**: the best video stream that is not a still picture (cover art,
      `attached_pic`); files FFmpeg opens as still images (`image2`, `*_pipe`) or as text art
      (`tty`: a `.txt` file opens as a 1-stream "video") are not videos.

The short-side resize and the centre crop are computed on the displayed size.

Frame counts: declared counts (container headers, stream metadata) are hints. A video has the frames
its demuxer returns that no edit list hides (`probe`, no decoding); when the decoder runs out before
them, the frames that decode. A file is **truncated** only when its content ends before its declared
duration by more than `TRUNCATION_TOLERANCE` of it (and two frame intervals): an AVI whose header
counts "null" frames the demuxer does not return, or an MP4 whose header counts packets hidden by an
edit list, is complete and used with the frames it has; `Clips.notes` says when a file had fewer
frames than declared. A video is refused only when no frame is usable (the short-video policies
work with one frame).

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

Decoding stops after the last needed frame; only needed frames are converted to RGB, resized so the
displayed short side is `short_side` (`cv2.resize`, `INTER_AREA`), oriented by the display matrix and
centre-cropped to `crop x crop`. Any problem with a file raises `VideoError` with a one-line reason
(the prep stage records it and goes on; serving answers 400 with it).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from av.sidedata.sidedata import SideDataContainer
from av.sidedata.sidedata import Type as SideDataType

#: A file is truncated when its content ends before its declared duration by more than this
#: fraction of that duration (and by more than two frame intervals).
TRUNCATION_TOLERANCE = 0.05

#: Codecs of FFmpeg's text-art demuxers (`tty`, `bin`, `xbin`, `idf`): a `.txt` or `.nfo` file opens
#: as a "video" rendered from its characters.
TEXT_ART_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})


class VideoError(Exception):
    """A video file cannot be used; the message is a one-line reason."""


@dataclass(frozen=True)
class VideoInfo:
    """What demuxing a video finds (no decoding): presentable frames, declared counts, geometry, times."""

    frames: int  # presentable frames: video packets the demuxer returns that no edit list hides
    declared_frames: int  # frame count the header declares (0 when it has none): a hint
    hidden: int  # packets an edit list hides (`Packet.is_discard`)
    width: int  # stored (coded) width, pixels
    height: int  # stored (coded) height, pixels
    sar: float  # sample aspect ratio: a stored pixel is displayed `sar` times as wide as high
    fps: float  # average frame rate, frames/s (0 when unknown)
    start: float  # declared start time, s
    duration: float | None  # declared duration, s (None: the container declares none)
    content: float | None  # duration the presentable packets cover, s (None: no timestamps)
    others_end: float | None  # end of the other streams' packets, s, when the declared duration covers them
    format: str  # container format, as FFmpeg names it
    #: presentation timestamps of the presentable packets, sorted (stream time base; empty when some are unknown)
    pts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False, compare=False)

    @property
    def declared(self) -> tuple[float, float] | None:
        """`(start, end)` of the declared duration, s (None: none declared)."""
        return None if self.duration is None else (self.start, self.start + self.duration)


@dataclass(frozen=True)
class Clips:
    """The clips of one video (`load_video`)."""

    clips: np.ndarray  # uint8 (clips, T, S, S, 3) RGB, as displayed
    decoded: int  # frames the decoder produced (both passes, when a second was needed)
    frames: int  # frames of the video that the sampling used (presentable, decodable)
    declared_frames: int  # the header's count (0: none)
    notes: tuple[str, ...] = field(default=())  # why fewer frames than declared, etc.


def video_rng(seed: int, relpath: str) -> np.random.Generator:
    """A generator seeded by `(seed, relpath)`: the same video draws the same clips everywhere."""
    digest = hashlib.sha256(relpath.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _msg(e: Exception) -> str:
    """FFmpeg errors carry the file name; keep only the reason."""
    return getattr(e, "strerror", None) or str(e)


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The stream a player would show: the best video stream that is not a still picture.

    Raises:
        VideoError: the file is a still image, text art, or has no moving-picture video stream.
    """
    fmt = container.format.name
    if fmt == "image2" or fmt.endswith("_pipe"):
        raise VideoError(f"a still image ({fmt}), not a video")
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        pics = " and a cover picture" if container.streams.video else ""
        raise VideoError(f"no video stream ({', '.join(kinds)}{pics})")
    if streams[0].codec_context.name in TEXT_ART_CODECS:
        raise VideoError(f"a text file ({fmt} demuxer renders its characters), not a video")
    try:
        best = container.streams.best("video")
    except (av.FFmpegError, ValueError):
        best = None
    return best if best in streams else streams[0]


def _open(path: str | Path) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    path = Path(path)
    if not path.is_file():
        raise VideoError("file not found")
    if path.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"not a readable video: {_msg(e)}") from None
    try:
        return container, _video_stream(container)
    except VideoError:
        container.close()
        raise


def video_problem(path: str | Path) -> str | None:
    """Why `path` is not a video PyAV can open (a one-line reason), or None when it is one.

    Opens the file and reads its headers only (about 1 ms); the layouts use it to find videos by
    content, whatever their extension (`.MOV`, `.m4v`, `.mpg`, `.3gp`, ...).
    """
    try:
        container, _ = _open(path)
    except VideoError as e:
        return str(e)
    container.close()
    return None


def _declared(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> tuple[float, float] | None:
    """`(start, end)` of the declared duration, s: the stream's, else the container's; None if none.

    Elementary streams without timestamps (`.m4v`/`.h264`/`.m1v` raw video) declare nothing: FFmpeg's
    duration for them is a guess from the bit rate, so it is not used.
    """
    if container.format.flags & av.format.Flags.no_timestamps.value:
        return None
    if stream.duration:
        tb = stream.time_base
        start = stream.start_time or 0
        return float(start * tb), float((start + stream.duration) * tb)
    if container.duration:
        start = (container.start_time or 0) / av.time_base
        return start, start + container.duration / av.time_base
    return None


def probe(path: str | Path) -> VideoInfo:
    """Count the presentable frames of a video by demuxing its packets (no decoding).

    Packets hidden by an edit list (`is_discard`) and empty packets are not frames. The file is
    truncated when its presentable packets end before the declared duration by more than
    `TRUNCATION_TOLERANCE` of it; a header that declares more frames than the demuxer returns
    (AVI null frames, an edit list) is not truncation.

    Raises:
        VideoError: the file is missing, empty, not a video, truncated, or has no frames.
    """
    container, stream = _open(path)
    with container:
        tb = stream.time_base
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate or 0
        fps = float(rate)
        step = round(1 / (rate * tb)) if rate and tb else 0  # one frame interval in stream time
        declared = _declared(container, stream)
        # without a stream duration the container's covers every stream (an audio track may run longer)
        every = not stream.duration and len(container.streams) > 1
        n = hidden = 0
        first = end = None
        other_end = None  # end of the other streams' packets, s (only when `every`)
        stamps: list[int] = []
        try:
            for packet in container.demux(*(() if every else (stream,))):
                if not packet.size:
                    continue
                if every and packet.stream is not stream:
                    ts = packet.pts if packet.pts is not None else packet.dts
                    if ts is not None and packet.time_base:
                        e = float((ts + (packet.duration or 0)) * packet.time_base)
                        other_end = e if other_end is None else max(other_end, e)
                    continue
                if packet.is_discard:
                    hidden += 1
                    continue
                n += 1
                pts = packet.pts
                stamps.append(-1 if pts is None else pts)
                ts = pts if pts is not None else packet.dts
                if ts is not None:
                    if first is None or ts < first:
                        first = ts
                    e = ts + (packet.duration or step)
                    if end is None or e > end:
                        end = e
        except av.FFmpegError as e:
            raise VideoError(f"demuxing failed after {n} packets: {_msg(e)}") from None
        sar = stream.sample_aspect_ratio
        info = VideoInfo(
            frames=n, declared_frames=int(stream.frames or 0), hidden=hidden,
            width=stream.codec_context.width, height=stream.codec_context.height,
            sar=float(sar) if sar and sar > 0 else 1.0, fps=fps, start=declared[0] if declared else 0.0,
            duration=declared[1] - declared[0] if declared else None,
            content=float((end - first) * tb) if end is not None else None, others_end=other_end,
            format=container.format.name,
            pts=np.sort(np.array(stamps, dtype=np.int64)) if -1 not in stamps else np.zeros(0, np.int64))
    if n == 0:
        raise VideoError("zero video frames in the file" + (f" (an edit list hides all {hidden})" if hidden else ""))
    if declared and end is not None:
        content_end = float(end * tb)
        if other_end is not None:
            content_end = max(content_end, other_end)
        _check_truncation(content_end, declared, fps, n)
    return info


def _check_truncation(content_end: float, declared: tuple[float, float], fps: float, frames: int,
                      detail: str = "") -> None:
    """Raise `VideoError` when the content ends before the declared end by more than the tolerance."""
    start, stop = declared
    tolerance = max(TRUNCATION_TOLERANCE * (stop - start), 2.0 / fps if fps else 0.0)
    if content_end < stop - tolerance:
        raise VideoError(f"truncated: its {frames} frames end at {content_end - start:.2f} s but the file declares "
                         f"{stop - start:.2f} s{detail}")


def frame_count(path: str | Path) -> int:
    """Presentable frames in a video (see `probe`)."""
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


def display_matrix(frame: av.VideoFrame) -> np.ndarray | None:
    """The frame's display matrix (FFmpeg `AV_FRAME_DATA_DISPLAYMATRIX`, 9 int32), or None when it has none.

    Reads the side data through a container of its own: `frame.side_data` caches one on the frame,
    a reference cycle that keeps every such frame's buffers until the garbage collector runs
    (measured on 20 videos of 320x240, 8 frames each: +66 MiB peak RSS, about +10 % CPU).
    """
    try:
        data = bytes(SideDataContainer(frame)[SideDataType.DISPLAYMATRIX])
    except KeyError:
        return None
    return np.frombuffer(data, dtype=np.int32) if len(data) == 36 else None


def orient(frame: np.ndarray, matrix: np.ndarray | None) -> np.ndarray:
    """Apply a display matrix to a `(H, W, C)` frame, as a player shows it.

    FFmpeg's matrix (`libavutil/display.h`) maps a source pixel `(x, y)` (x right, y down) to
    `(a x + c y, b x + d y)` with `a, b, c, d = m[0], m[1], m[3], m[4]` in 16.16 fixed point. Axis-
    aligned matrices (rotations by multiples of 90 degrees, with or without a mirror) are applied
    exactly; other angles rotate about the centre into a frame of the same size, filled black
    (FFmpeg's `rotate` filter, which `ffmpeg` inserts for them). Scaling is ignored, as FFmpeg does.

    Returns:
        The displayed frame (contiguous): `(W, H, C)` when the matrix swaps the axes.
    """
    if matrix is None:
        return frame
    a, b, c, d = (float(v) / 65536.0 for v in matrix[[0, 1, 3, 4]])
    scale = math.sqrt(abs(a * d - b * c)) or 1.0
    a, b, c, d = a / scale, b / scale, c / scale, d / scale
    tol = 1e-3
    if abs(b) < tol and abs(c) < tol:  # identity or mirrors
        out = frame[:: -1 if d < 0 else 1, :: -1 if a < 0 else 1]
    elif abs(a) < tol and abs(d) < tol:  # quarter turns (x' = c y, y' = b x)
        out = frame.transpose(1, 0, *range(2, frame.ndim))[:: -1 if b < 0 else 1, :: -1 if c < 0 else 1]
    else:
        h, w = frame.shape[:2]
        centre = np.array([(w - 1) / 2, (h - 1) / 2])
        lin = np.array([[a, c], [b, d]])
        m = np.hstack([lin, (centre - lin @ centre)[:, None]])
        out = cv2.warpAffine(frame, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out if out.flags.c_contiguous else np.ascontiguousarray(out)


def resize_crop(frame: np.ndarray, *, short_side: int, crop: int, sar: float = 1.0,
                matrix: np.ndarray | None = None) -> np.ndarray:
    """Resize a stored frame so its displayed short side is `short_side`, orient it, centre-crop it.

    Args:
        frame: `(H, W, 3)` stored pixels.
        short_side: target of the displayed short side, pixels.
        crop: square centre-crop size, pixels.
        sar: sample aspect ratio: the frame is displayed `W * sar` wide.
        matrix: display matrix (`display_matrix`), applied after resizing (see `orient`).

    Returns:
        `(crop, crop, 3)` as displayed (`INTER_AREA` resize).
    """
    h, w = frame.shape[:2]
    dw = w * sar  # displayed width in the stored orientation
    scale = short_side / min(h, dw)
    nh, nw = max(crop, round(h * scale)), max(crop, round(dw * scale))
    if (nh, nw) != (h, w):
        frame = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA)
    frame = orient(frame, matrix)
    nh, nw = frame.shape[:2]
    y0, x0 = (nh - crop) // 2, (nw - crop) // 2
    return frame[y0:y0 + crop, x0:x0 + crop]


@dataclass
class _Decoded:
    frames: dict[int, np.ndarray]  # index -> (crop, crop, 3)
    count: int  # frames the decoder produced
    exhausted: bool  # the decoder ran to its end (or an error) instead of stopping after the last needed frame
    end: float | None  # end time of the last decoded frame, s
    error: str | None  # the decoder's error, when one stopped it


def _decode(path: str | Path, wanted: np.ndarray, *, short_side: int, crop: int, sar: float, threads: int,
            expect: np.ndarray | None = None) -> _Decoded:
    """Decode the frames `wanted` (decode-order indices). `expect`: the presentable packets' sorted
    timestamps; a decoded frame whose timestamp differs from its slot's means frames before it did
    not decode, so decoding goes on to the end to count the frames that do."""
    need = set(int(i) for i in np.unique(wanted))
    last = max(need)
    out: dict[int, np.ndarray] = {}
    n = 0
    end = None
    error = None
    exhausted = True
    container, stream = _open(path)
    with container:
        stream.thread_type = "AUTO" if threads != 1 else "SLICE"
        stream.codec_context.thread_count = threads
        try:
            for frame in container.decode(stream):
                if n in need:
                    rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3) stored
                    out[n] = resize_crop(rgb, short_side=short_side, crop=crop, sar=sar, matrix=display_matrix(frame))
                pts = frame.pts
                if expect is not None and pts is not None and n < len(expect) and expect[n] >= 0 and pts != expect[n]:
                    last, expect = 1 << 62, None  # frames went missing: count them all
                n += 1
                if pts is not None and frame.time_base:
                    end = float((pts + (frame.duration or 0)) * frame.time_base)
                if n > last:
                    exhausted = False
                    break
        except av.FFmpegError as e:  # the decodable content ends here
            error = _msg(e)
    return _Decoded(out, n, exhausted, end, error)


def decode_frames(path: str | Path, wanted: np.ndarray, *, short_side: int, crop: int,
                  threads: int = 0) -> tuple[dict[int, np.ndarray], int]:
    """Decode the displayed frames whose indices are in `wanted`, stopping after the last one.

    Args:
        path: the video file.
        wanted: frame indices (any shape, repeats allowed).
        short_side: resize target of the displayed short side.
        crop: centre-crop size.
        threads: decoder threads (0: let FFmpeg choose; 1: no threading).

    Returns:
        `({index: (crop, crop, 3) uint8 RGB}, frames decoded)`; indices past the end are absent.

    Raises:
        VideoError: the file cannot be opened.
    """
    sar = probe_sar(path)
    got = _decode(path, wanted, short_side=short_side, crop=crop, sar=sar, threads=threads)
    return got.frames, got.count


def probe_sar(path: str | Path) -> float:
    """The sample aspect ratio of the video stream (1.0 for square pixels or none declared)."""
    container, stream = _open(path)
    with container:
        sar = stream.sample_aspect_ratio
    return float(sar) if isinstance(sar, Fraction) and sar > 0 else 1.0


def _indices(n: int, *, train: bool, frames: int, stride: int, clips: int, policy: str, seed: int,
             relpath: str) -> np.ndarray:
    if train:
        return train_indices(n, frames=frames, stride=stride, clips=clips, rng=video_rng(seed, relpath), policy=policy)
    return eval_indices(n, frames=frames, stride=stride, clips=clips, policy=policy)


def load_video(path: str | Path, *, relpath: str, train: bool, frames: int, stride: int, clips: int,
               short_side: int, crop: int, policy: str = "loop", seed: int = 0, threads: int = 0) -> Clips:
    """Sample and decode the clips of one video as a player shows it (see the module docstring).

    Args:
        path: the video file.
        relpath: its path relative to the dataset root (seeds the train sampling).
        train: random segments (True) or uniformly spread clips (False).
        frames: T.
        stride: temporal stride between sampled frames.
        clips: clips per video.
        short_side: resize target of the displayed short side.
        crop: square crop size S.
        policy: `"loop"` or `"pad"` for videos shorter than a clip.
        seed: sampling seed.
        threads: decoder threads (0: FFmpeg chooses).

    Returns:
        `Clips` with uint8 `(clips, T, S, S, 3)` RGB clips and notes on declared counts.

    Raises:
        VideoError: the file is unusable: missing, empty, not a video, truncated, or no frame
            decodes (the message says why).
    """
    info = probe(path)
    n = info.frames
    kw = dict(train=train, frames=frames, stride=stride, clips=clips, policy=policy, seed=seed, relpath=relpath)
    idx = _indices(n, **kw)
    got = _decode(path, idx, short_side=short_side, crop=crop, sar=info.sar, threads=threads, expect=info.pts)
    decoded = got.count
    undecodable = 0
    if got.exhausted and got.count < n:  # the decoder ran out before the packets did: use what decodes
        why = f" (decoding stopped: {got.error})" if got.error else ""
        if got.count == 0:
            raise VideoError(f"no frame decodes{why or ' (the decoder returned none)'}")
        if info.declared and got.end is not None:
            _check_truncation(max(got.end, info.others_end or 0.0), info.declared, info.fps, got.count,
                              f"; {n - got.count} of {n} frames do not decode{why}")
        undecodable = n - got.count
        n = got.count
        idx = _indices(n, **kw)
        got = _decode(path, idx, short_side=short_side, crop=crop, sar=info.sar, threads=threads)
        decoded += got.count
    missing = [int(i) for i in np.unique(idx) if int(i) not in got.frames]
    if missing:  # the second pass decoded fewer frames than the first: a decoder that is not deterministic
        raise VideoError(f"frames {missing[:3]} of {n} did not decode on a second pass")
    out = np.stack([np.stack([got.frames[int(i)] for i in row]) for row in idx])  # (clips, T, S, S, 3)
    return Clips(out, decoded, n, info.declared_frames, _notes(info, n, undecodable, got.error))


def _notes(info: VideoInfo, used: int, undecodable: int, error: str | None) -> tuple[str, ...]:
    """Say why a video has fewer frames than declared (or than its packets)."""
    reasons = []
    if info.hidden:
        reasons.append(f"an edit list hides {info.hidden} (a cut made without re-encoding)")
    if undecodable:
        reasons.append(f"{undecodable} do not decode" + (f" ({error})" if error else ""))
    declared = info.declared_frames
    absent = declared - used - info.hidden - undecodable
    if absent > 0:
        if info.format == "avi":
            why = "AVI null frames: the header counts them, the file holds no picture for them"
        elif info.format.startswith("mov,mp4"):
            why = "outside the edit list: the header counts every stored sample"
        else:
            why = "the header counts more frames than the file holds"
        reasons.append(f"{absent} are not shown ({why})")
    if declared > used:
        return (f"{declared} frames declared, {used} used: {'; '.join(reasons)}",)
    if undecodable:
        return (f"{used + undecodable} frames in the file, {used} used: {'; '.join(reasons)}",)
    return ()


def load_clips(path: str | Path, *, relpath: str, train: bool, frames: int, stride: int, clips: int,
               short_side: int, crop: int, policy: str = "loop", seed: int = 0,
               threads: int = 0) -> tuple[np.ndarray, int]:
    """`load_video` returning `(clips uint8 (clips, T, S, S, 3) RGB, frames decoded)` (prep and serving).

    Raises:
        VideoError: the file is unusable (the message says why).
    """
    got = load_video(path, relpath=relpath, train=train, frames=frames, stride=stride, clips=clips,
                     short_side=short_side, crop=crop, policy=policy, seed=seed, threads=threads)
    return got.clips, got.decoded
