"""The trained-model file (`model.pt`): weights plus what is needed to rebuild the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from vidistill.train.loop import atomic_save, load_checkpoint


def save_model(path: str | Path, model: nn.Module, *, name: str, kwargs: dict[str, Any], classes: list[str],
               extra: dict[str, Any] | None = None) -> Path:
    """Save `model` with its registry name and builder kwargs so `load_model` can rebuild it."""
    path = Path(path)
    atomic_save({"name": name, "kwargs": dict(kwargs), "classes": list(classes), "extra": dict(extra or {}),
                 "state_dict": model.state_dict()}, path)
    return path


def load_model(path: str | Path, *, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by `save_model`; returns `(model in eval mode, info)`."""
    from vidistill.models import create_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist; train one with `vidistill teach` or `vidistill distill`")
    state = load_checkpoint(path)
    model = create_model(state["name"], **state["kwargs"])
    model.load_state_dict(state["state_dict"])
    model.to(device).eval()
    info = {k: state[k] for k in ("name", "kwargs", "classes", "extra")}
    return model, info
