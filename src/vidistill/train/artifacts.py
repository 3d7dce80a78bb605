"""The trained-model file (`model.pt`): weights plus what is needed to rebuild the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from vidistill.errors import CheckpointError, ConfigError
from vidistill.train.checkpoint import atomic_save, load_checkpoint


def save_model(path: str | Path, model: nn.Module, *, classes: list[str], name: str | None = None,
               kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Save `model` with its registry name and builder kwargs so `load_model` can rebuild it.

    Args:
        path: the `model.pt` to write (atomically).
        model: a model built by `vidistill.models.create_model` (a plain or a composite preset).
        classes: class names in label order.
        name: the preset name; default: the one `create_model` recorded (`model.create_kwargs`).
        kwargs: the builder arguments; default: the ones `create_model` recorded, builder-specific
            ones (e.g. a composite preset's `base`, `hidden`) included.
        extra: anything else to keep (method, modality, run id).

    Raises:
        ValueError: no `name` was given and the model was not built by `create_model`.
    """
    recorded = dict(getattr(model, "create_kwargs", None) or {})
    if name is None:
        if "name" not in recorded:
            raise ValueError(f"{type(model).__name__} was not built by vidistill.models.create_model, so model.pt could not "
                             "rebuild it; register it as a preset (register_model) and build it with create_model")
        name = recorded["name"]
    if kwargs is None:
        kwargs = {k: v for k, v in recorded.items() if k != "name"}
    path = Path(path)
    atomic_save({"name": name, "kwargs": dict(kwargs), "classes": list(classes), "extra": dict(extra or {}),
                 "state_dict": model.state_dict()}, path)
    return path


def load_model(path: str | Path, *, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by `save_model`; returns `(model in eval mode, info)`.

    Presets of plugins (composite students of out-of-tree methods) are found through their entry
    points (`vidistill.plugins`).

    Raises:
        FileNotFoundError: `path` does not exist.
        vidistill.errors.CheckpointError: the file is empty, truncated, corrupt, a training checkpoint
            rather than a model file, or its weights do not fit its recorded preset.
    """
    from vidistill.models import create_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist; train one with `vidistill teach` or `vidistill distill`")
    state = load_checkpoint(path)
    missing = [k for k in ("name", "kwargs", "classes", "state_dict") if k not in state]
    if missing:
        hint = " (it is a training checkpoint; the model file is model.pt beside checkpoints/)" if "task" in state else ""
        raise CheckpointError(f"{path} is not a vidistill model file: it has no {', '.join(missing)}{hint}; "
                              "point to the model.pt that `vidistill teach` or `vidistill distill` wrote")
    state.setdefault("extra", {})
    model = create_model(state["name"], **state["kwargs"])
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: its weights do not fit the preset {state['name']!r} it names "
                              f"({str(exc).splitlines()[0][:120]}); the file is corrupt, retrain it") from None
    model.to(device).eval()
    info = {k: state[k] for k in ("name", "kwargs", "classes", "extra")}
    return model, info


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's classification head (`model.head`), g_φ."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ConfigError(f"a pre-trained encoder initialises a model with a classification head `head`; "
                          f"{type(model).__name__} has none")
    return {f"head.{k}" for k in head.state_dict()}


def load_encoder(student: nn.Module, path: str) -> list[str]:
    """Copy every pre-trained encoder weight whose name and shape match; the head is never copied (SD's
    Algorithm 1 line 2; `teach --init`, e.g. JEDI's experts from the pace encoder).

    Returns the names of the student's state-dict entries that were not initialised from `path` (the
    head, and anything the source model lacks).

    Raises:
        ConfigError: `path` missing, or it shares no encoder weight with the student.
    """
    if not Path(path).exists():
        raise ConfigError(f"pre-trained model {path} does not exist; train one with `vidistill teach` on the source data")
    saved = load_checkpoint(path)
    own = student.state_dict()
    head = _head_keys(student)
    taken = {k: v for k, v in saved["state_dict"].items() if k in own and k not in head and own[k].shape == v.shape}
    if not taken:
        raise ConfigError(f"{path} ({saved['name']}) shares no weights with the student; pre-train the same architecture")
    own.update(taken)
    student.load_state_dict(own)
    return sorted(set(own) - set(taken))
