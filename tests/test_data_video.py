"""vidistill.data.video: frame counts, sampling, short-video policies, resize/crop, broken files."""

from __future__ import annotations

import numpy as np
import pytest

from helpers_video import counter_frames, frame_numbers, moving_frames, write_video
from vidistill.data.video import (VideoError, decode_frames, eval_indices, frame_count, load_clips, probe, resize_crop,
                                  train_indices, video_rng)


@pytest.fixture(scope="module")
def counter20(tmp_path_factory):
    """A 20-frame video whose frame t is grey level 10 t + 5."""
    return write_video(tmp_path_factory.mktemp("v") / "c20.avi", counter_frames(20))


@pytest.mark.parametrize("suffix", [".avi", ".mp4", ".mkv"])
def test_frame_count_all_containers(tmp_path, suffix):
    path = write_video(tmp_path / f"v{suffix}", moving_frames(13))
    assert frame_count(path) == 13
    info = probe(path)
    assert (info.width, info.height) == (64, 48)


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
