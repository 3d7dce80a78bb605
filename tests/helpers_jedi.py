"""A tiny experts folder (`vidistill experts`' output) for unit tests of multi-dataset methods: untrained
`r2plus1d_student` experts on random clips, their embeddings cached by the real `cache_embeddings`
(`vidistill.data.multi.random_experts`)."""

from __future__ import annotations

from pathlib import Path

from vidistill.data.multi import RandomClips, random_experts


def tiny_experts(folder: str | Path, *, classes: tuple[list[str], ...] = (list("abc"), ["x", "y"]),
                 train: tuple[int, ...] = (12, 6), test: tuple[int, ...] = (6, 4), frames: int = 4, size: int = 32,
                 seed: int = 0) -> tuple[Path, list[dict[str, RandomClips]]]:
    """Two datasets by default: the main one (3 classes, 12 train clips) and another (2 classes, 6 train clips)."""
    return random_experts(folder, classes=classes, frames=frames, size=size, train=train, test=test, seed=seed)
