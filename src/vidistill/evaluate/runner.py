"""Run models over a clip split and write metrics (JSON) and the confusion matrix (PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vidistill.evaluate.metrics import aggregate_videos, classification_metrics, plot_confusion, softmax
from vidistill.train.loop import collate, model_input, to_device


@torch.no_grad()
def predict(models: list[nn.Module], dataset: Dataset, *, batch_size: int = 32,
            device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Clip-level softmax probabilities of each model plus labels and video ids.

    Several models (e.g. the RGB and flow streams) run over the same batches, each reading its own
    input (`rgb` or `flow`), so a two-stream ensemble sees exactly the same clips.
    """
    device = torch.device(device)
    for m in models:
        m.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    probs: list[list[np.ndarray]] = [[] for _ in models]
    labels, videos = [], []
    for batch in loader:
        batch = to_device(batch, device)
        for i, m in enumerate(models):
            logits, _ = m(model_input(m, batch))
            probs[i].append(softmax(logits.float().cpu().numpy()))
        labels.append(batch["label"].cpu().numpy())
        videos.append(batch["video_id"].cpu().numpy())
    return {"probs": np.stack([np.concatenate(p) for p in probs]), "labels": np.concatenate(labels),
            "video_ids": np.concatenate(videos)}


def score(probs: np.ndarray, labels: np.ndarray, video_ids: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Clip-level and video-level (multi-clip averaged) metrics; `top1` etc. are video-level."""
    metrics = classification_metrics(*aggregate_videos(probs, labels, video_ids), classes)
    clip = classification_metrics(probs, labels, classes)
    metrics["clip_top1"] = clip["top1"]
    metrics["clip_top5"] = clip["top5"]
    metrics["clips"] = int(len(labels))
    return metrics


def write_report(metrics: dict[str, Any], out_dir: str | Path, *, title: str) -> dict[str, Path]:
    """`metrics.json` and `confusion.png` in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    png = plot_confusion(metrics["confusion_matrix"], metrics["classes"], out / "confusion.png", title=title)
    return {"metrics": out / "metrics.json", "confusion": png}


def plot_curves(history: list[dict[str, float]], path: str | Path, *, title: str = "") -> Path:
    """Per-term loss curves (and train accuracy) over epochs as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"epoch", "lr", "epoch_seconds", "train_acc"}
    terms = [k for k in history[0] if k not in skip]
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for k in terms:
        ax1.plot(epochs, [h[k] for h in history], marker="o", label=k)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend(fontsize=8)
    if "train_acc" in history[0]:  # pretext tasks without logits have none
        ax2.plot(epochs, [h["train_acc"] for h in history], marker="o", color="tab:green")
        ax2.set_ylabel("train accuracy")
        ax2.set_ylim(0, 1)
    ax2.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
