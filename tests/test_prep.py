"""vidistill.data.prep and ClipDataset on real tiny videos: shards, index, manifest, bad inputs, notes on
declared counts, classes left without usable videos, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from helpers_video import (counter_frames, edit_list_cut, frame_numbers, moving_frames, stored_for_display, truncate,
                           write_video)
from vidistill.config import ConfigError, PrepConfig, SynthConfig
from vidistill.data import ClipDataset, run_prep
from vidistill.data.layouts import parse_folder
from vidistill.data.video import load_clips

T, S = 4, 24


def _cfg(root: Path, out: Path, **kw) -> PrepConfig:
    base = dict(dataset="folder", root=str(root), out=str(out), frames=T, stride=2, short_side=32, crop=S,
                shard_size=3, workers=1, test_fraction=0.4)
    return PrepConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Two classes of real videos plus the broken inputs prep must survive."""
    root = tmp_path_factory.mktemp("folder")
    for c, cls in enumerate(("jump", "walk")):
        for i in range(4):
            write_video(root / cls / f"{cls}{i}.avi", moving_frames(20, seed=10 * c + i, dx=1 + c))
    (root / "jump" / "empty.avi").touch()
    good = (root / "jump" / "jump0.avi").read_bytes()
    (root / "jump" / "truncated.avi").write_bytes(good[: len(good) // 2])
    (root / "walk" / "notes.avi").write_text("a text file with a video extension\n" * 20)
    write_video(root / "walk" / "short.mp4", counter_frames(3, height=48, width=64))
    # real-world files: a cut made without re-encoding (edit list) and a portrait phone video
    src = write_video(root.parent / "src.mp4", moving_frames(40, seed=7), fps=10, codec="libx264",
                      options={"g": "1000", "bf": "0", "sc_threshold": "0"})
    edit_list_cut(src, root / "jump" / "cut.mp4", 2.0)
    phone = np.stack([stored_for_display(f, -90) for f in moving_frames(16, height=64, width=48, seed=8)])
    write_video(root / "walk" / "phone.MOV", phone, fps=10, codec="libx264", rotation=-90)
    return root


@pytest.fixture(scope="module")
def prepped(videos, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "clips"
    return out, run_prep(_cfg(videos, out, clips_per_video_test=3), progress=False)


def test_manifest_counts_and_skipped(videos, prepped):
    out, summary = prepped
    m = json.loads((out / "manifest.json").read_text())
    assert (m["format"], m["dataset"], m["classes"], m["frames"], m["size"]) == (1, "folder", ["jump", "walk"], T, S)
    bad = {Path(s["file"]).name: s["reason"] for s in m["skipped"]}
    assert set(bad) == {"empty.avi", "truncated.avi", "notes.avi"}
    assert bad["empty.avi"] == "empty file (0 bytes); not used"  # found by the layout's probe
    assert bad["notes.avi"] == "not a readable video: Invalid data found when processing input; not used"
    assert bad["truncated.avi"].startswith("truncated: its ")  # found by decoding
    assert m["notes"] == summary["notes"] == [{"file": str(videos / "jump" / "cut.mp4"), "note":
                                               "40 frames declared, 20 used: an edit list hides 20 (a cut made without re-encoding)"}]
    layout = parse_folder(videos, test_fraction=0.4, seed=0)
    for split, per_video in (("train", 1), ("test", 3)):
        usable = [it for it in layout.split(split) if Path(it.relpath).name not in bad]
        s = m["splits"][split]
        assert s["videos"] == len(usable) and s["clips"] == per_video * len(usable)
        assert sum(s["per_class"].values()) == s["clips"]
        assert summary["splits"][split] == s
    decoded = [p for p in videos.rglob("*.*") if p.name not in ("empty.avi", "notes.avi")]  # the layout's videos
    assert m["sources"]["count"] == len(decoded) == 12
    assert m["sources"]["bytes"] == sum(p.stat().st_size for p in decoded)
    assert summary["classes"] == m["classes"] and summary["removed_classes"] == []
    assert m["params"]["shard_size"] == 3 and len(m["hash"]) == 64
    assert summary["skipped"] == m["skipped"] and summary["frames_decoded"] > 0 and summary["frames_per_s"] > 0
    assert not list(out.parent.glob(".clips.*"))  # no temporary directory left


def test_shards_and_index_follow_the_contract(videos, prepped):
    out, _ = prepped
    for split in ("train", "test"):
        index = json.loads((out / split / "index.json").read_text())
        shards = sorted((out / split).glob("clips-*.npy"))
        arrays = [np.load(p) for p in shards]
        assert [p.name for p in shards] == [f"clips-{k:05d}.npy" for k in range(len(shards))]
        assert all(a.dtype == np.uint8 and a.shape[1:] == (T, S, S, 3) and len(a) <= 3 for a in arrays)
        assert sum(len(a) for a in arrays) == len(index)
        assert [(e["shard"], e["offset"]) for e in index] == [(k, r) for k, a in enumerate(arrays) for r in range(len(a))]
        for e in index[:4]:  # the stored clip is what decoding that video gives
            clips, _ = load_clips(videos / e["video"], relpath=e["video"], train=split == "train", frames=T, stride=2,
                                  clips=1 if split == "train" else 3, short_side=32, crop=S)
            np.testing.assert_array_equal(arrays[e["shard"]][e["offset"]], clips[e["clip"]])
        if split == "test":  # multi-clip evaluation: clips 0, 1, 2 of every test video
            per_video: dict[int, list[int]] = {}
            for e in index:
                per_video.setdefault(e["video_id"], []).append(e["clip"])
            assert all(v == [0, 1, 2] for v in per_video.values())


def test_short_video_policies_in_prep(videos, tmp_path):
    for policy in ("loop", "pad"):
        out = tmp_path / policy
        run_prep(_cfg(videos, out, short_policy=policy), progress=False)
        found = 0
        for split in ("train", "test"):
            for e in json.loads((out / split / "index.json").read_text()):
                if e["video"].endswith("short.mp4"):  # 3 frames; a clip needs 7 at stride 2
                    n = frame_numbers(np.load(out / split / f"clips-{e['shard']:05d}.npy")[e["offset"]])
                    if policy == "pad":
                        assert n == [0, 2, 2, 2]
                    else:
                        assert all((b - a) % 3 == 2 for a, b in zip(n, n[1:])), n
                    found += 1
        assert found == 1


def test_deterministic_and_independent_of_workers(videos, prepped, tmp_path, monkeypatch):
    out, _ = prepped
    monkeypatch.setattr("vidistill.data.parallel.PARALLEL_MIN_JOBS", 1)  # a real process pool for 12 videos
    first = json.loads((out / "manifest.json").read_text())["hash"]
    run_prep(_cfg(videos, tmp_path / "again", clips_per_video_test=3, workers=2), progress=False)
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["hash"] == first
    run_prep(_cfg(videos, tmp_path / "seed1", clips_per_video_test=3, seed=1), progress=False)
    assert json.loads((tmp_path / "seed1" / "manifest.json").read_text())["hash"] != first


def test_no_usable_video_in_a_split(tmp_path):
    root = tmp_path / "data"
    write_video(root / "a" / "ok.avi", moving_frames(12))
    write_video(root / "b" / "ok.avi", moving_frames(12, seed=1))
    (root / "a" / "broken.avi").touch()  # not a video: the layout keeps one video per class, train only
    with pytest.raises(ConfigError, match=r"no usable videos in split 'test' under .*: 0 listed, "
                                          r"1 skipped \(see: .*broken\.avi: empty file"):
        run_prep(_cfg(root, tmp_path / "out", test_fraction=0.5), progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_output_replaced_atomically_and_foreign_dir_refused(videos, tmp_path):
    out = tmp_path / "clips"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a prep output"):
        run_prep(_cfg(videos, out), progress=False)
    assert (out / "mine.txt").read_text() == "keep"
    other = tmp_path / "clips2"
    run_prep(_cfg(videos, other, shard_size=100), progress=False)
    run_prep(_cfg(videos, other, shard_size=2), progress=False)  # replaces the previous output
    assert json.loads((other / "manifest.json").read_text())["params"]["shard_size"] == 2
    assert len(np.load(other / "train" / "clips-00000.npy")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips", "clips2"]


def test_clip_dataset_rgb_and_flow(prepped, tmp_path):
    out, _ = prepped
    ds = ClipDataset(out, "test")
    assert (ds.classes, ds.num_classes, ds.frames, ds.size) == (["jump", "walk"], 2, T, S)
    assert len(ds) == ds.manifest["splits"]["test"]["clips"] and ds.labels.dtype == np.int64
    item = ds[len(ds) - 1]
    e = ds.index[-1]
    assert item["rgb"].shape == (3, T, S, S) and item["rgb"].dtype == torch.float32
    raw = np.load(out / "test" / f"clips-{e['shard']:05d}.npy")[e["offset"]]
    torch.testing.assert_close(item["rgb"], torch.from_numpy(raw).permute(3, 0, 1, 2).float() / 255)
    assert item["label"].dtype == torch.int64 and int(item["label"]) == e["label"] and item["video_id"] == e["video_id"]
    assert item["index"] == len(ds) - 1

    flow = tmp_path / "flow"
    for k in sorted({x["shard"] for x in ds.index}):
        n = len(np.load(out / "test" / f"clips-{k:05d}.npy", mmap_mode="r"))
        code = np.zeros((n, T - 1, S, S, 2), np.uint8)
        code[..., 0], code[..., 1] = 255, 128  # u = +20 px, v = 128 / 255 * 40 - 20 px
        code[:, 0, 0, 0, 0] = 0  # one pixel at -20 px
        (flow / "test").mkdir(parents=True, exist_ok=True)
        np.save(flow / "test" / f"flow-{k:05d}.npy", code)
    (flow / "manifest.json").write_text(json.dumps({"format": 1, "clips_hash": ds.manifest["hash"], "bound": 20}))
    fds = ClipDataset(out, "test", flow_root=flow)
    f = fds[0]["flow"]
    assert f.shape == (2, T - 1, S, S) and f.dtype == torch.float32
    assert f[0, 0, 0, 0].item() == pytest.approx(-20.0) and f[0, 1, 5, 5].item() == pytest.approx(20.0)
    assert f[1].unique().tolist() == pytest.approx([128 / 255 * 40 - 20], abs=1e-5)
    batch = next(iter(DataLoader(fds, batch_size=4, num_workers=2)))  # shards opened lazily in the workers
    assert batch["rgb"].shape == (4, 3, T, S, S) and batch["flow"].shape == (4, 2, T - 1, S, S)

    (flow / "manifest.json").write_text(json.dumps({"format": 1, "clips_hash": "other", "bound": 20}))
    with pytest.raises(ConfigError, match="computed for other clips"):
        ClipDataset(out, "test", flow_root=flow)
    with pytest.raises(ConfigError, match="run `vidistill prep` first"):
        ClipDataset(tmp_path / "nothing", "train")
    with pytest.raises(ConfigError, match="split 'val'"):
        ClipDataset(out, "val")


def test_ucf101_end_to_end(tmp_path):
    root = tmp_path / "ucf"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 Archery\n2 Bowling\n")
    train, test = [], []
    for c, cls in enumerate(("Archery", "Bowling")):
        for g in (1, 2):
            rel = f"{cls}/v_{cls}_g0{g}_c01.avi"
            write_video(root / "UCF-101" / rel, moving_frames(12, seed=c * 2 + g))
            (train if g == 1 else test).append(rel)
    (lists / "trainlist01.txt").write_text("".join(f"{r} {i + 1}\n" for i, r in enumerate(train)) + "Bowling/v_gone.avi 2\n")
    (lists / "testlist01.txt").write_text("\n".join(test) + "\n")
    summary = run_prep(_cfg(root, tmp_path / "out", dataset="ucf101"), progress=False)
    assert {s: v["videos"] for s, v in summary["splits"].items()} == {"train": 2, "test": 2}
    assert [s["file"].endswith("trainlist01.txt:3") and "missing" in s["reason"] for s in summary["skipped"]] == [True]


def test_synthetic_prep_is_deterministic(tmp_path):
    synth = SynthConfig(videos_per_class=3, frames=10, width=48, height=36)
    kw = dict(dataset="synthetic", synth=synth, frames=4, stride=2, short_side=32, crop=24, workers=1)
    a = run_prep(PrepConfig(root=str(tmp_path / "raw"), out=str(tmp_path / "a"), **kw), progress=False)
    b = run_prep(PrepConfig(root=str(tmp_path / "raw"), out=str(tmp_path / "b"), **kw), progress=False)
    assert a["splits"]["train"]["videos"] == 16 and a["splits"]["test"]["videos"] == 8
    ha, hb = (json.loads((tmp_path / d / "manifest.json").read_text())["hash"] for d in "ab")
    assert ha == hb


def _broken_class(root: Path, name: str, n: int = 3) -> None:
    """A class whose every video opens but is cut off (the layout lists them; decoding refuses them)."""
    for i in range(n):
        good = write_video(root.parent / f"{name}{i}-full.mkv", moving_frames(30, seed=40 + i), codec="libx264")
        truncate(good, root / name / f"{name}{i}.mkv", 0.4)


def test_class_without_usable_videos_is_removed(tmp_path):
    """Issue 16: every video of 'fall' is skipped: the class is reported, left out of the class list
    and the labels, and nothing trains on it; the other classes keep their clips."""
    root = tmp_path / "data"
    for c, cls in enumerate(("jump", "walk")):
        for i in range(3):
            write_video(root / cls / f"{cls}{i}.avi", moving_frames(12, seed=10 * c + i))
    _broken_class(root, "fall")  # sorts first: label 0 in the layout
    summary = run_prep(_cfg(root, tmp_path / "out", test_fraction=0.34), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["classes"] == summary["classes"] == ["jump", "walk"] and summary["removed_classes"] == ["fall"]
    reasons = {Path(s["file"]).name: s["reason"] for s in m["skipped"]}
    assert reasons["fall"] == "class 'fall' removed: none of its 2 training video(s) is usable (each is listed with " \
                              "its reason); its 1 test video(s) are not used either"
    assert all(reasons[f"fall{i}.mkv"].startswith("truncated: ") for i in range(3))
    for split in ("train", "test"):
        index = json.loads((tmp_path / "out" / split / "index.json").read_text())
        assert {(e["video"].split("/")[0], e["label"]) for e in index} == {("jump", 0), ("walk", 1)}
        assert set(m["splits"][split]["per_class"]) == {"jump", "walk"}
    ds = ClipDataset(tmp_path / "out", "train")
    assert ds.num_classes == 2 and set(ds.labels.tolist()) == {0, 1}


def test_removing_classes_that_leaves_one_stops_with_one_line(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        write_video(root / "jump" / f"jump{i}.avi", moving_frames(12, seed=i))
    _broken_class(root, "fall")
    with pytest.raises(ConfigError) as err:
        run_prep(_cfg(root, tmp_path / "out"), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "no usable training video for class(es) 'fall'" in msg
    assert "leaves 1 class(es) ('jump'); a classifier needs at least two" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
