"""Dataset layouts: find the videos of a dataset, their labels and their split.

Each parser returns a `Layout`: the videos as `(relpath, label, split)` items, the class names in
label order, and a list of problems (`{"file", "reason"}`) for every input it could not use:
split-list lines naming missing files, unknown class names, unparsable lines, labels out of range,
duplicates. A problem never stops parsing; a layout that cannot be parsed at all (root missing, no
class index, no split files, no classes) raises `ConfigError` naming what was expected and where.

Supported layouts:
    * ``ucf101``: `ROOT/UCF-101/<Class>/*.avi` (or `ROOT/<Class>/*.avi`), split lists in
      `ucfTrainTestlist/` (`classInd.txt`, `trainlist0N.txt`, `testlist0N.txt`) at `ROOT`, next to
      the video folder or in `ROOT/..`. Train lines carry a 1-based label (checked against the
      class directory); test lines take their label from the class directory name through
      `classInd.txt`. Paths are matched case-insensitively when the exact name is not on disk.
    * ``hmdb51``: `ROOT/hmdb51/<class>/*.avi` (or `ROOT/<class>/*.avi`), split files
      `testTrainMulti_7030_splits/<class>_test_splitN.txt` with lines `name.avi 1|2|0`
      (train | test | unused).
    * ``folder``: `ROOT/<class>/<video>`; every file that PyAV opens as a video is one, whatever
      its extension (`.mp4 .MOV .m4v .mpg .3gp .avi .mkv .webm ...`, or none): the files are probed
      (`video.video_problem`, headers only, in threads), and the others (text, images, audio,
      unreadable files) are listed as problems with the reason. A seeded stratified split with
      `test_fraction` of each class in test (a class with >= 2 videos gets at least one video in
      each split; a class with one video is train only).
    * ``synthetic``: `vidistill.data.synthetic.generate` into `ROOT` (skipped when the videos there
      were made with the same parameters), then parsed as ``folder``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vidistill.config import PrepConfig
from vidistill.data.video import video_problem, video_rng
from vidistill.errors import ConfigError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class VideoItem:
    """One video: its path relative to `Layout.root`, its label and its split."""

    relpath: str
    label: int
    split: str


@dataclass
class Layout:
    """A parsed dataset."""

    dataset: str
    root: Path  # video relpaths are relative to this directory
    classes: list[str]
    items: list[VideoItem]
    problems: list[dict[str, str]] = field(default_factory=list)

    def split(self, name: str) -> list[VideoItem]:
        """The items of split `name`, in layout order."""
        return [it for it in self.items if it.split == name]

    def fingerprint(self) -> str:
        """16 hex digits that change when the dataset does: a video added, removed, renamed, relabelled,
        moved between splits, resized or rewritten (its size and modification time), a class added.

        Cheap (a `stat` per video, no decoding or hashing of contents), so a pipeline can compute it on
        every run outside its cache and key prep's cache with it (issue 25.4: a new class folder under the
        same root was served from the cache and silently dropped). prep's own `manifest.json` keeps the
        content hash (sha256 of every video) for lineage.
        """
        h = hashlib.sha256(json.dumps([self.dataset, self.classes]).encode())
        for it in sorted(self.items, key=lambda i: i.relpath):
            try:
                st = (self.root / it.relpath).stat()
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            h.update(f"{it.relpath}\0{it.label}\0{it.split}\0{stamp}\n".encode())
        return h.hexdigest()[:16]


def _problem(file: Path | str, reason: str, line: int | None = None) -> dict[str, str]:
    return {"file": f"{file}:{line}" if line is not None else str(file), "reason": reason}


def _require_root(root: Path, dataset: str) -> None:
    if not root.is_dir():
        raise ConfigError(f"{dataset}: dataset root {root} does not exist or is not a directory; set prep.root")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_in(d: Path) -> list[Path]:
    """The regular files of directory `d`, sorted (candidates: the layouts name or probe them)."""
    return sorted(p for p in d.iterdir() if p.is_file())


def probe_files(paths: list[Path]) -> dict[Path, str | None]:
    """`video.video_problem` of each path (None: a video), probed in threads (PyAV opens files
    without holding the GIL; about 1 ms a file)."""
    if len(paths) < 16:
        return {p: video_problem(p) for p in paths}
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(paths, pool.map(video_problem, paths)))


def _video_root(root: Path, names: tuple[str, ...]) -> Path:
    """The first of `root/<name>` that is a directory, else `root` itself."""
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root


def _find_dir(name: str, candidates: list[Path]) -> Path | None:
    for c in candidates:
        if (c / name).is_dir():
            return c / name
    return None


class _Files:
    """Video files under a root (one directory level), looked up exactly or case-insensitively."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.by_lower: dict[str, str] = {}
        for d in _class_dirs(root):
            for p in _files_in(d):
                rel = f"{d.name}/{p.name}"
                self.by_lower[rel.lower()] = rel

    def find(self, rel: str) -> str | None:
        rel = rel.replace("\\", "/").strip("/")
        if (self.root / rel).is_file():
            return rel
        return self.by_lower.get(rel.lower())


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines with 1-based numbers (CRLF and a UTF-8 BOM tolerated)."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    return [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]


# ----------------------------------------------------------------------------------------------
# UCF101


def parse_ucf101(root: str | Path, *, split: int = 1) -> Layout:
    """Parse the UCF101 layout (official train/test list `split`, 1-3)."""
    root = Path(root)
    _require_root(root, "ucf101")
    vroot = _video_root(root, ("UCF-101", "UCF101"))
    lists = _find_dir("ucfTrainTestlist", [root, vroot, root.parent, vroot.parent])
    if lists is None:
        raise ConfigError(f"ucf101: expected a ucfTrainTestlist/ directory (classInd.txt, trainlist0{split}.txt, "
                          f"testlist0{split}.txt) in {root} or {root.parent}")
    class_ind = lists / "classInd.txt"
    if not class_ind.is_file():
        raise ConfigError(f"ucf101: expected {class_ind} (lines like '1 ApplyEyeMakeup')")
    problems: list[dict[str, str]] = []
    numbered: dict[int, str] = {}
    for ln, line in _read_lines(class_ind):
        m = re.fullmatch(r"(\d+)\s+(\S+)", line)
        if not m:
            problems.append(_problem(class_ind, f"unparsable line {line!r} (expected '<index> <ClassName>')", ln))
            continue
        numbered[int(m.group(1))] = m.group(2)
    if not numbered:
        raise ConfigError(f"ucf101: no classes in {class_ind} (expected lines like '1 ApplyEyeMakeup')")
    if sorted(numbered) != list(range(1, len(numbered) + 1)):
        raise ConfigError(f"ucf101: class indices in {class_ind} must be 1..{len(numbered)} without gaps")
    classes = [numbered[i] for i in range(1, len(numbered) + 1)]
    by_name = {c.lower(): k for k, c in enumerate(classes)}

    files = {s: lists / f"{s}list0{split}.txt" for s in SPLITS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"ucf101: split {split} list file(s) not found: {', '.join(missing)}")
    disk = _Files(vroot)
    items: list[VideoItem] = []
    seen: dict[str, str] = {}
    for s, list_file in files.items():
        for ln, line in _read_lines(list_file):
            parts = line.split()
            if s == "train" and (len(parts) != 2 or not parts[1].lstrip("-").isdigit()):
                problems.append(_problem(list_file, f"unparsable line {line!r} (expected '<Class>/<video>.avi <label>')", ln))
                continue
            if s == "test" and len(parts) != 1:
                problems.append(_problem(list_file, f"unparsable line {line!r} (expected '<Class>/<video>.avi')", ln))
                continue
            name = parts[0].replace("\\", "/")
            if "/" not in name:
                problems.append(_problem(list_file, f"unparsable path {name!r} (expected '<Class>/<video>.avi')", ln))
                continue
            dir_class = name.split("/")[0]
            if dir_class.lower() not in by_name:
                problems.append(_problem(list_file, f"unknown class {dir_class!r} (not in {class_ind.name})", ln))
                continue
            label = by_name[dir_class.lower()]
            if s == "train" and int(parts[1]) - 1 != label:
                reason = (f"label {parts[1]} out of range 1..{len(classes)}" if not 1 <= int(parts[1]) <= len(classes)
                          else f"label {parts[1]} ({classes[int(parts[1]) - 1]}) disagrees with the class directory")
                problems.append(_problem(list_file, f"{reason} for {name}", ln))
                continue
            rel = disk.find(name)
            if rel is None:
                problems.append(_problem(list_file, f"names a missing video {vroot / name}", ln))
                continue
            if rel in seen:
                problems.append(_problem(list_file, f"{rel} is listed again (first in {seen[rel]}); the repeat is ignored", ln))
                continue
            seen[rel] = f"{list_file.name}:{ln}"
            items.append(VideoItem(rel, label, s))
    for rel in sorted(set(disk.by_lower.values()) - set(seen)):
        problems.append(_problem(vroot / rel, f"not named by {files['train'].name} or {files['test'].name}; not used"))
    return Layout("ucf101", vroot, classes, items, problems)


# ----------------------------------------------------------------------------------------------
# HMDB51


def parse_hmdb51(root: str | Path, *, split: int = 1) -> Layout:
    """Parse the HMDB51 layout (official split `split`, 1-3; id 1 = train, 2 = test, 0 = unused)."""
    root = Path(root)
    _require_root(root, "hmdb51")
    vroot = _video_root(root, ("hmdb51", "hmdb51_org"))
    sdir = _find_dir("testTrainMulti_7030_splits", [root, vroot, root.parent, vroot.parent])
    if sdir is None:
        raise ConfigError(f"hmdb51: expected a testTrainMulti_7030_splits/ directory (<class>_test_split{split}.txt) "
                          f"in {root} or {root.parent}")
    suffix = f"_test_split{split}.txt"
    split_files = sorted(p for p in sdir.iterdir() if p.name.endswith(suffix))
    if not split_files:
        raise ConfigError(f"hmdb51: no split files <class>{suffix} in {sdir}")
    classes = [p.name[: -len(suffix)] for p in split_files]
    problems: list[dict[str, str]] = []
    disk = _Files(vroot)
    items: list[VideoItem] = []
    seen: set[str] = set()
    for label, (cls, sf) in enumerate(zip(classes, split_files)):
        for ln, line in _read_lines(sf):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                problems.append(_problem(sf, f"unparsable line {line!r} (expected '<video>.avi 0|1|2')", ln))
                continue
            if parts[1] == "0":
                continue  # not used in this split, by the dataset's definition
            rel = disk.find(f"{cls}/{parts[0]}")
            if rel is None:
                problems.append(_problem(sf, f"names a missing video {vroot / cls / parts[0]}", ln))
                continue
            if rel in seen:
                problems.append(_problem(sf, f"{rel} is listed twice; the repeat is ignored", ln))
                continue
            seen.add(rel)
            items.append(VideoItem(rel, label, "train" if parts[1] == "1" else "test"))
    known = {c.lower() for c in classes}
    for d in _class_dirs(vroot):
        if d.name.lower() not in known and _files_in(d):
            problems.append(_problem(d, f"unknown class {d.name!r}: no {d.name}{suffix} in {sdir}; its videos are not used"))
    return Layout("hmdb51", vroot, classes, items, problems)


# ----------------------------------------------------------------------------------------------
# folder (Kinetics-style) and synthetic


def test_videos(n: int, test_fraction: float) -> int:
    """How many of a class's `n` videos the folder split puts in test: `round(n * test_fraction)`, at least
    one and at most n - 1 (a class with fewer than 2 videos has no test video)."""
    return min(max(round(n * test_fraction), 1), n - 1) if n >= 2 else 0


def parse_folder(root: str | Path, *, test_fraction: float = 0.3, seed: int = 0, dataset: str = "folder") -> Layout:
    """Parse `ROOT/<class>/<video>` (every file PyAV opens as a video) with a seeded stratified train/test split."""
    root = Path(root)
    _require_root(root, dataset)
    problems: list[dict[str, str]] = []
    dirs = _class_dirs(root)
    in_dirs = {d: _files_in(d) for d in dirs}
    at_root = _files_in(root)
    verdict = probe_files(at_root + [p for files in in_dirs.values() for p in files])
    for p in at_root:  # other files at the root (a README, synth.json) are not inputs
        if verdict[p] is None:
            problems.append(_problem(p, "video directly under the root, not in a class directory; not used"))
    per_class: list[tuple[str, list[Path]]] = []
    for d in dirs:
        vids = [p for p in in_dirs[d] if verdict[p] is None]
        problems += [_problem(p, f"{verdict[p]}; not used") for p in in_dirs[d] if verdict[p] is not None]
        if vids:
            per_class.append((d.name, vids))
        else:
            what = f"none of its {len(in_dirs[d])} files is a video" if in_dirs[d] else "empty directory"
            problems.append(_problem(d, f"class directory without videos ({what}); class not used"))
    if not per_class:
        raise ConfigError(f"{dataset}: no class directories with videos under {root}; expected ROOT/<class>/<video> "
                          "(any file PyAV opens as a video)")
    items: list[VideoItem] = []
    for label, (cls, vids) in enumerate(per_class):
        n = len(vids)
        n_test = test_videos(n, test_fraction)
        test = set(video_rng(seed, cls).permutation(n)[:n_test].tolist())
        items += [VideoItem(f"{cls}/{p.name}", label, "test" if i in test else "train") for i, p in enumerate(vids)]
    return Layout(dataset, root, [c for c, _ in per_class], items, problems)


def parse_synthetic(cfg: PrepConfig, *, progress: bool = False) -> Layout:
    """Generate the synthetic dataset into `cfg.root` (unless already there) and parse it as a folder."""
    from vidistill.data.synthetic import generate

    root = generate(dataclasses.replace(cfg.synth, out=cfg.root), progress=progress)
    return parse_folder(root, test_fraction=cfg.test_fraction, seed=cfg.seed, dataset="synthetic")


LAYOUTS: dict[str, Callable[[PrepConfig, bool], Layout]] = {
    "ucf101": lambda cfg, progress: parse_ucf101(cfg.root, split=cfg.split),
    "hmdb51": lambda cfg, progress: parse_hmdb51(cfg.root, split=cfg.split),
    "folder": lambda cfg, progress: parse_folder(cfg.root, test_fraction=cfg.test_fraction, seed=cfg.seed),
    "synthetic": lambda cfg, progress: parse_synthetic(cfg, progress=progress),
}


def parse_layout(cfg: PrepConfig, *, progress: bool = False) -> Layout:
    """Parse the layout `cfg.dataset` under `cfg.root`.

    Raises:
        ConfigError: unknown dataset or a layout that cannot be parsed.
    """
    if cfg.dataset not in LAYOUTS:
        raise ConfigError(f"prep.dataset must be one of {', '.join(LAYOUTS)}, got {cfg.dataset!r}")
    return LAYOUTS[cfg.dataset](cfg, progress)
