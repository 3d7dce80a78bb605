"""The distillation interface and its registry.

A method is one file in `vidistill/distill/` (or a module of another package, declared under the
`vidistill.methods` entry-point group, see `vidistill.plugins`) that registers a `Distiller` subclass
under its key (`@register_method("d3d")`). A distiller is a `TrainTask` (see `vidistill.train.loop`
for the hooks and their order):

* it owns the student (a plain model that exports to ONNX on its own), its frozen teacher(s)
  (`add_teacher`: loaded from their files, kept in eval mode, never trained, never checkpointed and
  kept out of DDP) and any extra trainable modules (decoders, adapters), which are checkpointed;
* `setup(train_set, epochs=E)`, `epoch_size(N)`, `on_epoch_start(e)`, `epoch_indices(e)` and
  `on_epoch_end(e)` let it see the training set, train on a per-epoch subset of it, take snapshots
  or run no-grad scoring passes (`vidistill.train.scan`);
* `forward(batch)` may change the student's input (masking, interruption) and returns
  `{"loss", "logits", <named terms>}`; every term is logged. The supervised term is `self.ce(...)`
  (cross-entropy with `distill.train.label_smoothing`), shared by every method; per-sample weights
  (e.g. from per-sample state looked up with `batch["index"]`) go through `weighted_mean`;
* per-sample state that must survive `--resume` is kept in registered buffers;
* `student_preset` (or a `student` field of its `Params`) names the model preset it trains when that
  is not `distill.student`, `build_student` builds it, and `export_model()` returns the module that
  is saved, evaluated and exported to ONNX (default: the student; a composite preset for methods
  whose product is assembled from several trained parts).

Hyperparameters live in a dataclass `Params` on the method class (defaults = the paper's values) and
in `params.yaml` under `distill.methods.<key>`. Nothing outside this package dispatches on keys: the
benchmark reads the `bench_*` class attributes, the stages read `needs`, `needs_flow` and the hooks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vidistill.errors import ConfigError
from vidistill.schema import from_dict
from vidistill.train.loop import TrainTask, supervised_loss

_METHODS: dict[str, type[Distiller]] = {}


@dataclass
class DistillContext:
    """What a method may need besides its hyperparameters.

    Attributes:
        num_classes: K.
        classes: class names in label order.
        frames: T of the RGB clips.
        size: H = W of the clips.
        teacher_rgb: `model.pt` of the RGB teacher.
        teacher_flow: `model.pt` of the flow (temporal-stream) teacher.
        pretrained: `model.pt` whose encoder initialises the student (transfer learning).
        mvd_encoder: `model.pt` of a masked-pre-trained video ViT that `mvd` fine-tunes (`teach --pretext mvd`,
            or `--pretext videomae` for its VideoMAE baseline).
        experts: the `vidistill experts` folder: one frozen expert per dataset and their cached embeddings
            of every dataset's clips (multi-dataset methods).
        label_smoothing: ε of the shared supervised loss (`distill.train.label_smoothing`).
    """

    num_classes: int
    classes: list[str]
    frames: int
    size: int
    teacher_rgb: str = ""
    teacher_flow: str = ""
    pretrained: str = ""
    mvd_encoder: str = ""
    experts: str = ""
    label_smoothing: float = 0.0


CONTEXT_FILES = ("teacher_rgb", "teacher_flow", "pretrained", "mvd_encoder")  # the DistillContext fields that name model files
_HINTS = {"teacher_rgb": "--teacher-rgb runs/teacher_rgb/model.pt (train it with `vidistill teach`)",
          "teacher_flow": "--teacher-flow runs/teacher_flow/model.pt (train it with `vidistill teach --modality flow`)",
          "pretrained": "--pretrained runs/pretrain/model.pt (an encoder trained on a source dataset)",
          "mvd_encoder": "--mvd-encoder runs/mvd/student/model.pt (train it with `vidistill teach --pretext mvd`)",
          "experts": "--experts runs/experts (one expert per dataset: `vidistill experts`)"}


class Distiller(TrainTask):
    """Base class of every distillation method.

    Class attributes a method sets:
        Params: dataclass of its hyperparameters (defaults = the paper's).
        needs: `DistillContext` fields it requires, e.g. `("teacher_flow",)`; the stages pass only
            those, and a missing one is refused before training with the flag to pass.
        needs_flow: the batch must carry `flow` (the data loader reads the flow directory).
        student_preset: the model preset it trains ("" = `distill.student`); a `student` field in
            `Params` overrides it.
        bench_variants: hyperparameter sets `vidistill bench methods` trains by default, e.g.
            `({"lambda_": 1.0}, {"lambda_": 0.1})` (empty: one run with the defaults).
        bench_ensembles: teachers (`needs`-style names) whose softmax average with this method's
            student is a reference row of the benchmark, e.g. `("teacher_flow",)`: the two-stream
            network at the student's size.
        bench_latency: the benchmark times this method's RGB-only student against the two-stream
            pipeline it replaces (TV-L1 on the clip + flow network + RGB network).
        labels_only: the student learns from the labels alone: the baseline a distilled student must
            beat (`none`); reports compare every other method with it.
    """

    key: ClassVar[str] = ""
    Params: ClassVar[type] = type(None)
    needs_flow: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = ()
    student_preset: ClassVar[str] = ""
    frozen_modules: ClassVar[tuple[str, ...]] = ("teachers",)
    bench_variants: ClassVar[tuple[dict[str, Any], ...]] = ()
    bench_ensembles: ClassVar[tuple[str, ...]] = ()
    bench_latency: ClassVar[bool] = False
    labels_only: ClassVar[bool] = False

    def __init__(self, student: nn.Module, params: Any, ctx: DistillContext) -> None:
        super().__init__()
        missing = [n for n in self.needed_files(params) if not getattr(ctx, n)]
        if missing:
            raise ConfigError(f"method {self.key!r} needs {', '.join(missing)}: pass " + "; ".join(_HINTS.get(m, m) for m in missing))
        self.student = student
        self.params = params
        self.ctx = ctx
        self.teachers = nn.ModuleDict()

    @classmethod
    def needed_files(cls, params: Any) -> tuple[str, ...]:
        """The `needs` that this configuration reads (default: all); e.g. `mvd` trained from scratch reads none."""
        return cls.needs

    @classmethod
    def reads_flow(cls, params: Any) -> bool:
        """Whether this configuration's batches must carry `flow` (default: `needs_flow`); e.g. `d3d` with an
        RGB teacher reads none."""
        return cls.needs_flow

    # --- the student ----------------------------------------------------------------------

    @classmethod
    def student_name(cls, params: Any, default: str) -> str:
        """The preset this method trains: `params.student`, else `student_preset`, else `default`
        (`distill.student`)."""
        return getattr(params, "student", "") or cls.student_preset or default

    @classmethod
    def build_student(cls, params: Any, ctx: DistillContext, *, default: str) -> nn.Module:
        """A fresh student for `ctx`'s data (override for builder arguments of a composite preset).

        The module must come from `vidistill.models.create_model`, so that `model.pt` can rebuild it.
        """
        from vidistill.models import create_model

        return create_model(cls.student_name(params, default), num_classes=ctx.num_classes, frames=ctx.frames, size=ctx.size)

    @classmethod
    def train_config(cls, params: Any, train: Any) -> Any:
        """The optimisation settings this method trains with, from `distill.train` (default: unchanged).

        Called before anything is built, so a setting the method cannot use is refused before any work
        (raise `ConfigError`). A method whose paper fixes its own schedule (e.g. JEDI's constant
        learning rate over 500 epochs) returns a `dataclasses.replace`d copy.
        """
        return train

    def train_dataset(self, default: Any) -> Any:
        """The dataset the loop trains on (default: `default`, the training clips of `distill.clips`).

        A method that trains on something else (e.g. JEDI: cached embeddings of several datasets) returns
        it; its items must carry `label` and `index`, and it must have the attribute `classes` (those of
        the exported student, saved in `model.pt`).
        """
        return default

    def export_model(self) -> nn.Module:
        """The trained module that is saved as `model.pt`, evaluated and exported to ONNX.

        Default: the student. A method whose product is assembled from several trained parts (an
        encoder, an adjustment module, a head) returns them as one registered preset built with
        `create_model` and loaded with their weights. It must map RGB `(B, 3, T, H, W)` in [0, 1] to
        `(logits (B, K), features (B, D))`.
        """
        return self.student

    # --- helpers for subclasses ----------------------------------------------------------

    def add_teacher(self, name: str, model: nn.Module) -> nn.Module:
        """Register a frozen teacher: no gradients, always in eval mode, never checkpointed.

        The constructor loads it from its file, so `--resume` reloads it from there too."""
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        self.teachers[name] = model
        return model

    def ce(self, logits: torch.Tensor, batch: dict[str, Any], weights: torch.Tensor | None = None) -> torch.Tensor:
        """The shared supervised term: cross-entropy of `logits` `(B, K)` against `batch["label"]` `(B,)`
        with `distill.train.label_smoothing`; optional per-sample `weights` `(B,)` (see `supervised_loss`)."""
        return supervised_loss(logits, batch["label"], label_smoothing=self.ctx.label_smoothing, weights=weights)

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
    """Class decorator: `@register_method("kd")` makes the method available as `--method kd`.

    Raises:
        ValueError: the key is taken.
        TypeError: `Params` is not a dataclass, or `needs` names something `DistillContext` lacks.
    """

    def add(cls: type[Distiller]) -> type[Distiller]:
        if key in _METHODS:
            raise ValueError(f"distillation method {key!r} is already registered by {_METHODS[key].__name__}")
        if not dataclasses.is_dataclass(cls.Params):
            raise TypeError(f"{cls.__name__}.Params must be a dataclass of the method's hyperparameters")
        context = {f.name for f in dataclasses.fields(DistillContext)}
        unknown = [n for n in (*cls.needs, *cls.bench_ensembles) if n not in context]
        if unknown:
            raise TypeError(f"{cls.__name__}.needs/bench_ensembles name {unknown}, which DistillContext lacks; "
                            f"it has {', '.join(sorted(context))}")
        cls.key = key
        _METHODS[key] = cls
        return cls

    return add


def list_methods() -> list[str]:
    """Keys of every registered method: the built-in files and the `vidistill.methods` entry points."""
    _load_all()
    return sorted(_METHODS)


def baseline_methods() -> list[str]:
    """Keys of the methods whose students learn from the labels alone (`labels_only`: `none`), the
    baseline every distilled student is compared with."""
    return [k for k in list_methods() if get_method(k).labels_only]


def get_method(key: str) -> type[Distiller]:
    """The method class of `key`; an unknown key raises `ConfigError` listing the valid keys."""
    _load_all()
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


_BUILTIN_LOADED = False


def _load_all() -> None:
    """Import the method files so they register themselves, then the plugins' (once per process)."""
    global _BUILTIN_LOADED
    if not _BUILTIN_LOADED:
        import importlib
        import pkgutil
        from pathlib import Path

        for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):  # the files beside this one
            if mod.name not in ("base",) and not mod.name.startswith("_"):
                importlib.import_module(f"{__package__}.{mod.name}")
        _BUILTIN_LOADED = True
    from vidistill.plugins import METHODS_GROUP, load_entry_points

    load_entry_points(METHODS_GROUP)
