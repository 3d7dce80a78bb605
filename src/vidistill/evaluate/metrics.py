"""Classification metrics for action recognition: top-k, mAP, per-class accuracy, confusion matrix.

All functions take class scores `(N, K)` (logits or probabilities; ranking is what matters) and
integer labels `(N,)` as NumPy arrays, so they are easy to check by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of samples whose label is among the k highest scores (ties broken by index)."""
    scores, labels = _check(scores, labels)
    k = min(k, scores.shape[1])
    topk = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((topk == labels[:, None]).any(axis=1).mean())


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Non-interpolated AP of one class: mean precision at the rank of each positive.

    Returns NaN when the class has no positives (it is then left out of the mean).
    """
    positives = positives.astype(bool)
    n_pos = int(positives.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positives[order]
    cum_hits = np.cumsum(hits)
    ranks = np.arange(1, len(scores) + 1)
    return float((cum_hits[hits] / ranks[hits]).sum() / n_pos)


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes (with at least one positive) of one-vs-rest average precision."""
    scores, labels = _check(scores, labels)
    aps = [average_precision(scores[:, c], labels == c) for c in range(scores.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """`(K, K)` counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels.astype(np.int64), preds.astype(np.int64)), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall per class from a confusion matrix (NaN for classes without samples)."""
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(cm) / np.maximum(totals, 1), np.nan)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def aggregate_videos(probs: np.ndarray, labels: np.ndarray, video_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multi-clip evaluation: average the clip probabilities of each video."""
    uniq, inverse = np.unique(video_ids, return_inverse=True)
    sums = np.zeros((len(uniq), probs.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, probs)
    counts = np.bincount(inverse, minlength=len(uniq))[:, None]
    vid_labels = np.zeros(len(uniq), dtype=np.int64)
    vid_labels[inverse] = labels
    return sums / counts, vid_labels


def classification_metrics(scores: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """All metrics as a JSON-ready dict (the confusion matrix as a nested list)."""
    scores, labels = _check(scores, labels)
    k = scores.shape[1]
    if len(classes) != k:
        raise ValueError(f"{len(classes)} class names for scores with {k} columns")
    preds = scores.argmax(axis=1)
    cm = confusion_matrix(labels, preds, k)
    pca = per_class_accuracy(cm)
    return {
        "top1": topk_accuracy(scores, labels, 1),
        "top5": topk_accuracy(scores, labels, 5),
        "mAP": mean_average_precision(scores, labels),
        "mean_class_accuracy": float(np.nanmean(pca)) if np.isfinite(pca).any() else float("nan"),
        "per_class_accuracy": {c: (None if np.isnan(a) else float(a)) for c, a in zip(classes, pca)},
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
        "n": int(len(labels)),
    }


def plot_confusion(cm: np.ndarray | list, classes: list[str], path: str | Path, *, title: str = "") -> Path:
    """Row-normalised confusion matrix as a PNG (counts written in the cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    k = len(classes)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=90 if k > 6 else 45, ha="right" if k <= 6 else "center", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or labels.ndim != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores must be (N, K) and labels (N,), got {scores.shape} and {labels.shape}")
    if scores.shape[0] == 0:
        raise ValueError("no samples to evaluate")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels must be in [0, {scores.shape[1]}), got range [{labels.min()}, {labels.max()}]")
    return scores, labels
