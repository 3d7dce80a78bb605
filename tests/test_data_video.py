"""vidistill.data.video: frame counts, sampling, short-video policies, resize/crop, broken files, and
what a player shows: edit lists, display rotation, non-square pixels, declared counts that lie,
every container PyAV writes, files that are not videos (all written with PyAV here)."""

from __future__ import annotations

import numpy as np
import pytest

from fractions import Fraction

import av
import cv2

from helpers_video import (BLUE, CONTAINERS, GREEN, RED, barcode_frames, barcode_numbers, counter_frames,
                           edit_list_cut, frame_numbers, is_colour, moving_frames, pattern_colours, quadrant_pattern,
                           stored_for_display, truncate, write_video)
from vidistill.data.video import (VideoError, decode_frames, eval_indices, frame_count, load_clips, load_video, orient,
                                  probe, resize_crop, train_indices, video_problem, video_rng)

EVAL = dict(train=False, frames=4, stride=2, clips=1)


@pytest.fixture(scope="module")
def counter20(tmp_path_factory):
    """A 20-frame video whose frame t is grey level 10 t + 5."""
    return write_video(tmp_path_factory.mktemp("v") / "c20.avi", counter_frames(20))


@pytest.mark.parametrize("suffix, codec, fmt, size", CONTAINERS, ids=[c[0] or "no-extension" for c in CONTAINERS])
def test_every_container_decodes_the_right_frames(tmp_path, suffix, codec, fmt, size):
    """.mp4 .MOV .m4v .mpg .3gp .avi .mkv .webm .ts .flv .wmv, raw .h264 and no extension: frame counts (declared
    or not), the frames sampled, the stored size."""
    w, h = size
    path = write_video(tmp_path / f"v{suffix}", barcode_frames(20, height=h, width=w), fps=25, codec=codec, fmt=fmt)
    assert video_problem(path) is None
    info = probe(path)
    assert frame_count(path) == info.frames == 20 and (info.width, info.height) == (w, h)
    got = load_video(path, relpath=path.name, short_side=h, crop=h, **EVAL)
    assert got.frames == 20 and got.clips.shape == (1, 4, h, h, 3) and not got.notes
    assert barcode_numbers(got.clips[0]) == [6, 8, 10, 12]  # the centre clip: (20 - 7) // 2 = 6


def test_train_indices_seeded_per_video_and_strided():
    a = train_indices(100, frames=8, stride=2, clips=3, rng=video_rng(0, "x/a.avi"))
    b = train_indices(100, frames=8, stride=2, clips=3, rng=video_rng(0, "x/a.avi"))
    c = train_indices(100, frames=8, stride=2, clips=3, rng=video_rng(0, "x/b.avi"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (3, 8)
    assert (np.diff(a, axis=1) == 2).all() and a.min() >= 0 and a.max() <= 99


def test_eval_indices_spread_uniformly():
    one = eval_indices(20, frames=4, stride=2, clips=1)
    np.testing.assert_array_equal(one, [[6, 8, 10, 12]])  # centre clip: span 7, start (20 - 7) // 2
    three = eval_indices(20, frames=4, stride=2, clips=3)
    assert three[0, 0] == 0 and three[-1, -1] == 19  # first clip at the start, last at the end
    assert (np.diff(three[:, 0]) > 0).all()


def test_load_clips_eval_decodes_the_right_frames(counter20):
    clips, decoded = load_clips(counter20, relpath="c20.avi", train=False, frames=4, stride=2, clips=1,
                                short_side=48, crop=32)
    assert clips.shape == (1, 4, 32, 32, 3) and clips.dtype == np.uint8
    assert frame_numbers(clips[0]) == [6, 8, 10, 12]
    assert decoded == 13  # stopped after the last needed frame


def test_multi_clip_eval(counter20):
    clips, _ = load_clips(counter20, relpath="c20.avi", train=False, frames=4, stride=2, clips=3, short_side=48, crop=32)
    assert clips.shape[0] == 3
    assert [frame_numbers(c) for c in clips] == [[0, 2, 4, 6], [6, 8, 10, 12], [13, 15, 17, 19]]


def test_train_clip_is_a_strided_segment(counter20):
    clips, _ = load_clips(counter20, relpath="c20.avi", train=True, frames=5, stride=3, clips=2, short_side=48,
                          crop=32, seed=4)
    for c in clips:
        n = frame_numbers(c)
        assert np.diff(n).tolist() == [3, 3, 3, 3] and 0 <= n[0] and n[-1] <= 19


@pytest.mark.parametrize("policy, expected", [("loop", [0, 2, 4, 1, 3]), ("pad", [0, 2, 4, 4, 4])])
def test_short_video_policies(tmp_path, policy, expected):
    path = write_video(tmp_path / "short.avi", counter_frames(5))
    clips, _ = load_clips(path, relpath="short.avi", train=False, frames=5, stride=2, clips=1, short_side=48, crop=32,
                          policy=policy)
    assert frame_numbers(clips[0]) == expected
    train, _ = load_clips(path, relpath="short.avi", train=True, frames=5, stride=2, clips=4, short_side=48, crop=32,
                          policy=policy, seed=1)
    for c in train:
        n = frame_numbers(c)
        if policy == "pad":
            assert n == expected
        else:  # a cyclic segment: consecutive frames 2 apart modulo 5
            assert all((b - a) % 5 == 2 for a, b in zip(n, n[1:]))


def test_resize_short_side_and_centre_crop():
    frame = np.zeros((240, 320, 3), np.uint8)
    frame[:, 160:] = 200  # right half bright
    out = resize_crop(frame, short_side=64, crop=56)
    assert out.shape == (56, 56, 3)
    # 320x240 -> 85x64; the centre crop keeps columns 14..69, the bright half starts at 42.5
    assert out[:, :27].max() == 0 and out[:, 30:].min() == 200


def test_decode_stops_after_last_needed_frame(counter20):
    got, decoded = decode_frames(counter20, np.array([1, 3]), short_side=48, crop=32)
    assert sorted(got) == [1, 3] and decoded == 4


def test_broken_files(tmp_path):
    empty = tmp_path / "empty.avi"
    empty.touch()
    text = tmp_path / "text.avi"
    text.write_text("this is not a video\n" * 50)
    good = write_video(tmp_path / "good.avi", moving_frames(40))
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cut_mp4 = write_video(tmp_path / "good.mp4", moving_frames(40))
    cut_mp4.write_bytes(cut_mp4.read_bytes()[:-400])  # index (moov) damaged
    cases = {empty: "empty file", text: "not a readable video", truncated: "truncated", tmp_path / "nope.avi": "not found"}
    for path, reason in cases.items():
        with pytest.raises(VideoError, match=reason):
            load_clips(path, relpath=path.name, train=False, frames=4, stride=2, clips=1, short_side=48, crop=32)
    with pytest.raises(VideoError):
        load_clips(cut_mp4, relpath="good.mp4", train=False, frames=4, stride=2, clips=1, short_side=48, crop=32)


def _frames(path, **kw):
    args = {**dict(relpath=str(path), short_side=48, crop=48), **EVAL, **kw}
    return load_video(path, **args)


def test_edit_list_mp4_is_the_cut_a_player_shows(tmp_path):
    """Issue 16: 90 H.264 frames at 30 fps, one keyframe, remuxed with timestamps 2 s back: the MP4
    muxer writes an edit list; a player shows 1 s, 30 frames (source frames 60..89)."""
    src = write_video(tmp_path / "src.mp4", barcode_frames(90), fps=30, codec="libx264",
                      options={"g": "1000", "keyint_min": "1000", "sc_threshold": "0", "bf": "0"})
    cut = tmp_path / "cut.mp4"
    assert edit_list_cut(src, cut, 2.0) == 30
    info = probe(cut)
    assert (info.frames, info.declared_frames, info.hidden) == (30, 90, 60)
    assert info.duration == pytest.approx(1.0) and info.content == pytest.approx(1.0)
    got = _frames(cut, frames=8, stride=4, clips=2)
    assert got.frames == 30
    assert [barcode_numbers(c) for c in got.clips] == [[60 + i for i in range(0, 29, 4)], [61 + i for i in range(0, 29, 4)]]
    assert got.notes == ("90 frames declared, 30 used: an edit list hides 60 (a cut made without re-encoding)",)
    train = _frames(cut, train=True, frames=8, stride=4, clips=3, seed=3)
    assert all(60 <= min(barcode_numbers(c)) and max(barcode_numbers(c)) <= 89 for c in train.clips)


@pytest.mark.parametrize("rotation, hflip", [(-90, False), (90, False), (180, False), (0, True), (-90, True)])
def test_display_matrix_is_applied(tmp_path, rotation, hflip):
    """A phone video: pixels stored 160x90, a display rotation (and mirror) in the container. The
    pattern a viewer sees (top-left red, top-right green, bottom blue) stays put; the resize and the
    crop use the displayed size (portrait: width is the short side)."""
    shown = quadrant_pattern(160, 90)  # portrait, as the viewer sees it
    stored = stored_for_display(shown, rotation, hflip)
    path = write_video(tmp_path / "phone.mp4", np.stack([stored] * 6), fps=30, codec="libx264", rotation=rotation,
                       hflip=hflip)
    with av.open(str(path)) as c:
        first = next(c.decode(video=0))
    if not hflip:  # PyAV's angle; with a mirror it is ambiguous (0 + mirror reads -180), hence the whole matrix
        assert first.rotation % 360 == rotation % 360
    clip = _frames(path, short_side=45, crop=44, frames=2, stride=1).clips[0, 0]
    tl, tr, bottom = pattern_colours(clip)
    assert is_colour(tl, RED) and is_colour(tr, GREEN) and is_colour(bottom, BLUE), (tl, tr, bottom)
    # the displayed frame is 45 x 80: a centre crop of 44 keeps rows 18..61 of 80, so the top 44 % of the
    # crop is the pattern's top half; the stored geometry (80 x 45 after resizing) would give another split
    rows_red_or_green = int(sum(is_colour(tuple(int(v) for v in r.mean(0)), RED, 60) or
                                is_colour(tuple(int(v) for v in r.mean(0)), GREEN, 60)
                                for r in clip[:, 4:18]))
    assert abs(rows_red_or_green - (40 - 18)) <= 2
    # control: the raw decoder output is not what a viewer sees (so this test can fail)
    raw_clip = resize_crop(first.to_ndarray(format="rgb24"), short_side=45, crop=44)
    raw_tl, raw_tr, raw_bottom = pattern_colours(raw_clip)
    assert not (is_colour(raw_tl, RED) and is_colour(raw_tr, GREEN) and is_colour(raw_bottom, BLUE))


def test_orient_other_angles_rotate_about_the_centre():
    frame = np.full((40, 60, 3), 200, np.uint8)
    a = np.deg2rad(30)
    m = np.array([np.cos(a), -np.sin(a), 0, np.sin(a), np.cos(a), 0, 0, 0, 1 << 30]) * np.array([65536] * 6 + [1] * 3)
    out = orient(frame, m.astype(np.int32))
    assert out.shape == frame.shape and (out[20, 30] == 200).all() and (out[0, 0] == 0).all()
    identity = np.array([65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30], np.int32)
    assert orient(frame, identity) is frame or np.array_equal(orient(frame, identity), frame)


def test_non_square_pixels_are_resized_to_the_displayed_width(tmp_path):
    """SAR 2:1: 64x48 stored pixels are displayed 128x48. Vertical stripes 8 stored pixels wide are
    16 displayed pixels wide, so a 48-pixel crop holds 3 of them (6 if the SAR were ignored)."""
    stored = np.zeros((48, 64, 3), np.uint8)
    for x0 in range(0, 64, 16):
        stored[:, x0:x0 + 8] = 255
    path = write_video(tmp_path / "sar.mkv", np.stack([stored] * 4), fps=25, codec="libx264", sar=Fraction(2, 1))
    assert probe(path).sar == 2.0
    clip = _frames(path, frames=1, stride=1).clips[0, 0]

    def stripes(img):
        row = img[24, :, 0] > 128
        return int(np.count_nonzero(row[1:] != row[:-1])) + 1

    assert stripes(clip) in (3, 4)
    assert stripes(resize_crop(stored, short_side=48, crop=48)) >= 6  # control: square pixels


def test_header_that_overcounts_is_not_truncation(tmp_path):
    """An AVI whose encoder skipped time slots: the muxer writes null frames, the header counts 29,
    the demuxer returns the 20 real ones, the content runs to the declared end: complete, 20 frames."""
    pts = [t for t in range(30) if t % 3 != 2][:20]
    path = write_video(tmp_path / "nulls.avi", counter_frames(20), fps=10, pts=pts)
    info = probe(path)
    assert info.frames == 20 and info.declared_frames == pts[-1] + 1
    got = _frames(path)
    assert frame_numbers(got.clips[0]) == [6, 8, 10, 12] and got.frames == 20
    assert got.notes == (f"{pts[-1] + 1} frames declared, 20 used: {pts[-1] + 1 - 20} are not shown (AVI null frames: "
                         "the header counts them, the file holds no picture for them)",)


def test_frames_that_do_not_decode_are_not_used(tmp_path):
    """A stream copied without its first keyframe: 29 packets, the decoder shows 20 (from the second
    keyframe on). The content is complete, so the 20 are used; the clip is the centre of those."""
    src = write_video(tmp_path / "k.mkv", barcode_frames(30), fps=10, codec="libx264",
                      options={"g": "10", "bf": "0", "sc_threshold": "0"})
    dst = tmp_path / "nokey.mkv"
    with av.open(str(src)) as s, av.open(str(dst), "w") as d:
        out = d.add_stream_from_template(s.streams.video[0])
        for i, p in enumerate(p for p in s.demux(video=0) if p.size):
            if i:
                p.stream = out
                d.mux(p)
    assert probe(dst).frames == 29
    got = _frames(dst)
    assert got.frames == 20 and barcode_numbers(got.clips[0]) == [16, 18, 20, 22]  # 10 + (20 - 7) // 2 = 16
    assert got.notes == ("29 frames in the file, 20 used: 9 do not decode",)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_genuinely_truncated_file_is_refused(tmp_path, suffix):
    """Cut in half (index at the front, so it still opens): its content ends at about half the declared duration."""
    opts = {"movflags": "faststart"} if suffix == ".mp4" else None
    good = tmp_path / f"good{suffix}"
    with av.open(str(good), "w", options=opts or {}) as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for f in moving_frames(40):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))
    bad = truncate(good, tmp_path / f"cut{suffix}", 0.5)
    assert video_problem(bad) is None  # it opens: only its content tells
    with pytest.raises(VideoError, match=r"truncated: its \d+ frames end at 0\.\d\d s but the file declares 1\.60 s"):
        _frames(bad)
    assert _frames(good).frames == 40


def test_files_that_are_not_videos(tmp_path):
    """Probing by content: text (FFmpeg opens .txt as 'tty' text art), images, audio, subtitles, random bytes."""
    (tmp_path / "notes.txt").write_text("class notes\n" * 40)
    (tmp_path / "data.json").write_text('{"a": 1}')
    cv2.imwrite(str(tmp_path / "thumb.jpg"), np.full((48, 64, 3), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "thumb.png"), np.full((48, 64, 3), 90, np.uint8))
    (tmp_path / "sub.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nhello\n\n")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    with av.open(str(tmp_path / "tone.wav"), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    expected = {"notes.txt": "a text file (tty demuxer", "data.json": "not a readable video",
                "thumb.jpg": "a still image (jpeg_pipe)", "thumb.png": "a still image (png_pipe)",
                "sub.srt": "no video stream (subtitle)", "tone.wav": "no video stream (audio)",
                "noise.mp4": "not a readable video"}
    for name, reason in expected.items():
        assert (video_problem(tmp_path / name) or "").startswith(reason), (name, video_problem(tmp_path / name))
        with pytest.raises(VideoError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            _frames(tmp_path / name)
