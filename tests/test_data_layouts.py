"""vidistill.data.layouts: UCF101, HMDB51, folder and synthetic layouts, their problems and failures.

UCF101 and HMDB51 parsing only looks at names (the split lists name the videos), so those layouts
are made of placeholder files; the folder layout probes every file's content, so its videos are
real (tiny, written with PyAV). `test_prep.py` runs the layouts end to end.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers_video import CONTAINERS, tiny_video
from vidistill.config import ConfigError, PrepConfig, SynthConfig
from vidistill.data.layouts import parse_folder, parse_hmdb51, parse_layout, parse_ucf101


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0")


def make_ucf(root: Path, *, nested: bool = True) -> Path:
    """UCF101-style tree: 3 classes x 3 groups, official-looking list files (CRLF, like the real ones)."""
    vroot = root / "UCF-101" if nested else root
    classes = ["ApplyEyeMakeup", "Archery", "HandstandPushups"]
    lists = (root if nested else root.parent) / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "classInd.txt").write_text("".join(f"{i} {c}\r\n" for i, c in enumerate(classes, 1)))
    train, test = [], []
    for i, c in enumerate(classes, 1):
        file_class = "HandStandPushups" if c == "HandstandPushups" else c  # the real dataset's case mismatch
        for g in (1, 2, 3):
            rel = f"{c}/v_{file_class}_g0{g}_c01.avi"
            _touch(vroot / rel)
            (train if g < 3 else test).append(rel)
    lines = [f"{r} {classes.index(r.split('/')[0]) + 1}" for r in train]
    lines += ["Archery/v_Archery_g09_c01.avi 2",  # names a missing file
              "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 7",  # label out of range (and a repeat)
              "Archery/v_Archery_g01_c01.avi 1",  # label disagrees with the class directory
              "garbage"]  # unparsable
    (lists / "trainlist01.txt").write_text("\r\n".join(lines) + "\r\n")
    test[-1] = test[-1].replace("HandstandPushups/", "HandStandPushups/")  # directory case differs from the disk
    (lists / "testlist01.txt").write_text("\n".join(test + ["Juggling/v_Juggling_g01_c01.avi"]) + "\n")  # unknown class
    return vroot


def _reasons(layout) -> str:
    return " | ".join(p["reason"] for p in layout.problems)


@pytest.mark.parametrize("nested", [True, False])
def test_ucf101(tmp_path, nested):
    root = tmp_path / "ucf"
    vroot = make_ucf(root, nested=nested)
    layout = parse_ucf101(root if nested else vroot, split=1)
    assert layout.classes == ["ApplyEyeMakeup", "Archery", "HandstandPushups"]
    assert layout.root == vroot
    assert Counter(it.split for it in layout.items) == {"train": 6, "test": 3}
    assert {it.label for it in layout.split("test")} == {0, 1, 2}
    for it in layout.items:  # every item names an existing file whose class directory matches the label
        assert (vroot / it.relpath).is_file() and it.relpath.split("/")[0] == layout.classes[it.label]
    reasons = _reasons(layout)
    assert len(layout.problems) == 5, reasons
    assert "missing video" in reasons and "out of range" in reasons and "unparsable" in reasons
    assert "label 1 (ApplyEyeMakeup) disagrees with the class directory" in reasons
    assert "unknown class 'Juggling'" in reasons
    assert any(p["file"].endswith("trainlist01.txt:7") for p in layout.problems)  # file:line of the missing video


def test_ucf101_layout_failures(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_ucf101(tmp_path / "nowhere")
    make_ucf(tmp_path / "a")
    (tmp_path / "a" / "ucfTrainTestlist" / "classInd.txt").unlink()
    with pytest.raises(ConfigError, match=r"expected .*classInd\.txt"):
        parse_ucf101(tmp_path / "a")
    make_ucf(tmp_path / "b")
    with pytest.raises(ConfigError, match="trainlist02.txt"):
        parse_ucf101(tmp_path / "b", split=2)
    (tmp_path / "c" / "UCF-101").mkdir(parents=True)
    with pytest.raises(ConfigError, match="ucfTrainTestlist"):
        parse_ucf101(tmp_path / "c")


def make_hmdb(root: Path) -> Path:
    vroot = root / "hmdb51"
    splits = root / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    for c in ("brush_hair", "cartwheel"):
        lines = []
        for k, sid in enumerate([1, 1, 2, 0]):
            _touch(vroot / c / f"{c}_{k}.avi")
            lines.append(f"{c}_{k}.avi {sid} ")
        (splits / f"{c}_test_split1.txt").write_text("\n".join(lines) + "\n")
    with (splits / "cartwheel_test_split1.txt").open("a") as fh:
        fh.write("cartwheel_gone.avi 1\nbad line here\n")
    _touch(vroot / "dive" / "dive_0.avi")  # a class directory without split file
    return vroot


def test_hmdb51(tmp_path):
    vroot = make_hmdb(tmp_path)
    layout = parse_hmdb51(tmp_path, split=1)
    assert layout.classes == ["brush_hair", "cartwheel"] and layout.root == vroot
    assert Counter((it.label, it.split) for it in layout.items) == {(0, "train"): 2, (0, "test"): 1,
                                                                   (1, "train"): 2, (1, "test"): 1}
    assert not any(it.relpath.endswith("_3.avi") for it in layout.items)  # id 0: unused
    reasons = _reasons(layout)
    assert len(layout.problems) == 3, reasons
    assert "missing video" in reasons and "unparsable" in reasons and "unknown class 'dive'" in reasons
    with pytest.raises(ConfigError, match="_test_split2.txt"):
        parse_hmdb51(tmp_path, split=2)
    with pytest.raises(ConfigError, match="testTrainMulti_7030_splits"):
        parse_hmdb51(vroot / "brush_hair")


def test_folder_stratified_seeded(tmp_path):
    sizes = {"a": 10, "b": 2, "c": 5, "single": 1}
    for c, n in sizes.items():
        for i in range(n):
            tiny_video(tmp_path / c / f"{c}{i}.{['mp4', 'avi', 'mkv', 'webm'][i % 4]}", frames=1)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "notes.txt").write_text("not a video")  # at the root: not an input, not a problem
    tiny_video(tmp_path / "stray.mp4", frames=1)
    layout = parse_folder(tmp_path, test_fraction=0.3, seed=0)
    assert layout.classes == ["a", "b", "c", "single"]
    counts = Counter((layout.classes[it.label], it.split) for it in layout.items)
    assert counts == {("a", "train"): 7, ("a", "test"): 3, ("b", "train"): 1, ("b", "test"): 1,
                      ("c", "train"): 3, ("c", "test"): 2, ("single", "train"): 1}
    reasons = _reasons(layout)
    assert len(layout.problems) == 2 and "without videos (empty directory)" in reasons
    assert "not in a class directory" in reasons
    again = parse_folder(tmp_path, test_fraction=0.3, seed=0)
    other = parse_folder(tmp_path, test_fraction=0.3, seed=1)
    assert again.items == layout.items
    assert {it.relpath for it in other.split("test")} != {it.relpath for it in layout.split("test")}


def test_folder_failures(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_folder(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("no videos here")
    with pytest.raises(ConfigError, match=r"no class directories with videos under .*any file PyAV opens as a video"):
        parse_folder(tmp_path)


def test_folder_finds_videos_by_content_not_extension(tmp_path):
    """Issue 16: `.MOV .m4v .mpg .3gp` next to `.mp4` (and every other container PyAV writes here, and
    a file without extension) are videos; files that are not are listed with the reason, never
    dropped silently; a class holding only the new extensions is a class."""
    files = [f"clip{k}{suffix}" for k, (suffix, *_) in enumerate(CONTAINERS)]
    for name in files:
        tiny_video(tmp_path / "mixed" / name, frames=2)
    for name in ("a.MOV", "b.m4v", "c.mpg", "d.3gp"):  # a class with only the extensions the old list missed
        tiny_video(tmp_path / "apple_and_mpeg" / name, frames=2)
    (tmp_path / "mixed" / "notes.txt").write_text("class notes\n" * 40)  # FFmpeg opens this as tty text art
    (tmp_path / "mixed" / "cover.png").write_bytes(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    (tmp_path / "mixed" / "empty.mp4").touch()
    (tmp_path / "text_only").mkdir()
    (tmp_path / "text_only" / "labels.csv").write_text("a,b\n1,2\n")
    layout = parse_folder(tmp_path, test_fraction=0.3, seed=0)
    assert layout.classes == ["apple_and_mpeg", "mixed"]
    assert sorted(it.relpath for it in layout.items) == sorted(
        [f"apple_and_mpeg/{n}" for n in ("a.MOV", "b.m4v", "c.mpg", "d.3gp")] + [f"mixed/{n}" for n in files])
    problems = {Path(p["file"]).name: p["reason"] for p in layout.problems}
    assert problems == {
        "notes.txt": "a text file (tty demuxer renders its characters), not a video; not used",
        "cover.png": "a still image (png_pipe), not a video; not used",
        "empty.mp4": "empty file (0 bytes); not used",
        "labels.csv": "not a readable video: Invalid data found when processing input; not used",
        "text_only": "class directory without videos (none of its 1 files is a video); class not used",
    }


def test_synthetic_layout_generates_then_parses(tmp_path):
    synth = SynthConfig(videos_per_class=2, frames=4, width=32, height=24)
    cfg = PrepConfig(dataset="synthetic", root=str(tmp_path / "syn"), synth=synth)
    layout = parse_layout(cfg)
    assert layout.dataset == "synthetic" and len(layout.classes) == 8
    assert Counter(it.split for it in layout.items) == {"train": 8, "test": 8}
    assert (tmp_path / "syn" / "synth.json").is_file() and not layout.problems
