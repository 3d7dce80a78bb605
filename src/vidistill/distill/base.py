"""The distillation interface and its registry.

A method is one file in `vidistill/distill/` that registers a `Distiller` subclass under its key
(`@register_method("d3d")`). A distiller is a `TrainTask` (see `vidistill.train.loop`):

* it owns the student (a plain model that exports to ONNX on its own), its frozen teacher(s) and any
  extra trainable modules (decoders, adapters);
* `on_epoch_start(epoch)` may take snapshots (self-distillation) or select samples (SAKD);
* `forward(batch)` may change the student's input (masking, interruption) and returns
  `{"loss", "logits", <named terms>}`; per-sample weights are applied with `weighted_mean` using
  `batch["index"]`, so methods that weight samples fit the loop unchanged.

Hyperparameters live in a dataclass `Params` on the method class (defaults = the paper's values) and
in `params.yaml` under `distill.methods.<key>`. Nothing outside this package dispatches on keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vidistill.config import ConfigError, from_dict
from vidistill.train.loop import TrainTask

_METHODS: dict[str, type[Distiller]] = {}


@dataclass
class DistillContext:
    """What a method may need besides its hyperparameters."""

    num_classes: int
    classes: list[str]
    frames: int
    size: int
    teacher_rgb: str = ""  # model.pt of the RGB teacher
    teacher_flow: str = ""  # model.pt of the flow (temporal-stream) teacher
    pretrained: str = ""  # model.pt whose encoder initialises the student (transfer learning)
    num_samples: int = 0  # size of the training split (per-sample state, e.g. weights)
    extra: dict[str, Any] = field(default_factory=dict)


class Distiller(TrainTask):
    """Base class of every distillation method."""

    key: ClassVar[str] = ""
    Params: ClassVar[type] = type(None)
    needs_flow: ClassVar[bool] = False  # the batch must carry `flow` (the data loader reads it)
    needs: ClassVar[tuple[str, ...]] = ()  # DistillContext fields that must be set, e.g. ("teacher_flow",)

    def __init__(self, student: nn.Module, params: Any, ctx: DistillContext) -> None:
        super().__init__()
        missing = [n for n in self.needs if not getattr(ctx, n)]
        if missing:
            hints = {"teacher_rgb": "--teacher-rgb runs/teacher_rgb/model.pt (train it with `vidistill teach`)",
                     "teacher_flow": "--teacher-flow runs/teacher_flow/model.pt (train it with `vidistill teach --modality flow`)",
                     "pretrained": "--pretrained runs/pretrain/model.pt (an encoder trained on a source dataset)"}
            raise ConfigError(f"method {self.key!r} needs {', '.join(missing)}: pass " + "; ".join(hints.get(m, m) for m in missing))
        self.student = student
        self.params = params
        self.ctx = ctx
        self.teachers = nn.ModuleDict()

    # --- helpers for subclasses ----------------------------------------------------------

    def add_teacher(self, name: str, model: nn.Module) -> nn.Module:
        """Register a frozen teacher: no gradients, always in eval mode."""
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        self.teachers[name] = model
        return model

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teachers.eval()  # teachers never leave eval mode (BN statistics, dropout)
        return self

    def trainable_parameters(self):
        teacher_params = {id(p) for p in self.teachers.parameters()}
        return (p for p in self.parameters() if p.requires_grad and id(p) not in teacher_params)


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of a per-sample loss `(B,)`, optionally weighted per sample `(B,)` (sum of w·l / B)."""
    if weights is None:
        return per_sample.mean()
    return (weights.to(per_sample) * per_sample).sum() / per_sample.shape[0]


# ----------------------------------------------------------------------------------------------
# registry


def register_method(key: str):
    """Class decorator: `@register_method("kd")` makes the method available as `--method kd`."""

    def add(cls: type[Distiller]) -> type[Distiller]:
        if key in _METHODS:
            raise ValueError(f"distillation method {key!r} is already registered by {_METHODS[key].__name__}")
        if not dataclasses.is_dataclass(cls.Params):
            raise TypeError(f"{cls.__name__}.Params must be a dataclass of the method's hyperparameters")
        cls.key = key
        _METHODS[key] = cls
        return cls

    return add


def list_methods() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def get_method(key: str) -> type[Distiller]:
    _load_builtin()
    if key not in _METHODS:
        raise ConfigError(f"unknown distillation method {key!r}; valid methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[key]


def method_params(key: str, data: dict[str, Any] | None) -> Any:
    """The method's hyperparameter dataclass from `params.yaml` `distill.methods.<key>` (validated)."""
    cls = get_method(key)
    params = from_dict(cls.Params, data or {}, where=f"distill.methods.{key}.")
    if hasattr(params, "validate"):
        params.validate()
    return params


def create_distiller(key: str, student: nn.Module, ctx: DistillContext, params: dict[str, Any] | None = None) -> Distiller:
    """Build method `key` around `student`; unknown key -> error listing the valid keys."""
    return get_method(key)(student, method_params(key, params), ctx)


def _load_builtin() -> None:
    """Import the method files so they register themselves."""
    import importlib
    import pkgutil

    import vidistill.distill as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base",) and not mod.name.startswith("_"):
            importlib.import_module(f"vidistill.distill.{mod.name}")
