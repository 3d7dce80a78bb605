"""Registry of named model presets (in the style of timm's `register_model` / `create_model`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from vidistill.models.base import MODALITIES, ZooModel

Builder = Callable[..., ZooModel]
B = TypeVar("B", bound=Builder)


@dataclass(frozen=True)
class _Entry:
    builder: Builder
    modalities: tuple[str, ...]


_REGISTRY: dict[str, _Entry] = {}


@overload
def register_model(fn: B) -> B: ...
@overload
def register_model(*, modalities: tuple[str, ...] = ("rgb",)) -> Callable[[B], B]: ...
def register_model(fn: B | None = None, *, modalities: tuple[str, ...] = ("rgb",)) -> B | Callable[[B], B]:
    """Register a preset under its function name: `@register_model` or `@register_model(modalities=...)`.

    The preset is called as `fn(*, num_classes, frames, size, modality, **kwargs)` and returns a
    `ZooModel`.

    Args:
        fn: the preset function (when used without parentheses).
        modalities: the input modalities the preset supports.

    Returns:
        The function itself (registration is a side effect).
    """
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")

    def add(f: B) -> B:
        name = f.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered; give the preset another function name")
        _REGISTRY[name] = _Entry(builder=f, modalities=tuple(modalities))
        return f

    return add(fn) if fn is not None else add


def _load_plugins() -> None:
    """Presets of other packages: the `vidistill.models` entry points, and the `vidistill.methods` ones
    (a method's module may register the composite student it trains), once per process."""
    from vidistill.plugins import METHODS_GROUP, MODELS_GROUP, load_entry_points

    load_entry_points(MODELS_GROUP)
    load_entry_points(METHODS_GROUP)


def list_models() -> list[str]:
    """Names of all registered presets (built-in and from plugins, see `vidistill.plugins`), sorted."""
    _load_plugins()
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_modalities(name: str) -> tuple[str, ...]:
    """The modalities ("rgb", "flow") preset `name` accepts."""
    return _entry(name).modalities


def create_model(name: str, *, num_classes: int, frames: int = 8, size: int = 56, modality: str = "rgb", **kwargs: Any) -> ZooModel:
    """Build a registered preset.

    Args:
        name: preset name, one of `list_models()`.
        num_classes: K, the number of output logits.
        frames: T, frames of the RGB clip (flow models take T-1 flow frames); ignored by image models.
        size: H = W of the input.
        modality: "rgb" or "flow" (see `model_modalities(name)`).
        **kwargs: passed to the preset's builder (e.g. `dropout=0.2`).

    Returns:
        The model; `model.create_kwargs` holds the arguments that rebuild it
        (`create_model(**model.create_kwargs)`).
    """
    entry = _entry(name)
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; choose one of: {', '.join(MODALITIES)}")
    if modality not in entry.modalities:
        raise ValueError(f"model {name!r} does not take modality {modality!r}; it takes: {', '.join(entry.modalities)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if frames < 1 or (modality == "flow" and frames < 2):
        raise ValueError(f"frames must be >= 1 (>= 2 for flow, which has frames-1 steps), got {frames}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    model = entry.builder(num_classes=num_classes, frames=frames, size=size, modality=modality, **kwargs)
    assert isinstance(model, ZooModel), f"preset {name} built a {type(model).__name__}, not a ZooModel"
    model.create_kwargs = dict(name=name, num_classes=num_classes, frames=frames, size=size, modality=modality, **kwargs)
    return model
