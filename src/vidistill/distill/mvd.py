"""Masked Video Distillation, fine-tuning stage (../shared/papers/mvd_masked_video_distillation.md).

MVD (Wang et al., CVPR 2023) is two-stage self-supervised pre-training followed by supervised
fine-tuning. The pre-training runs as pretexts of `vidistill teach` (`vidistill.train.pretext`):

1. `--pretext mae`: an image ViT learns masked pixel modelling (MAE) on the frames of the unlabelled
   pool; `--pretext videomae`: a video ViT of the student's architecture learns it with tube masking
   (VideoMAE). These are the frozen teachers.
2. `--pretext mvd`: the student's encoder, fed only the visible tokens of a tube-masked clip (0.9),
   feeds two decoders that predict the teachers' last-block features of the masked tokens
   (λ₁·SmoothL1(image) + λ₂·SmoothL1(video), sec. 3.2, "spatial-temporal co-teaching").

This method is stage 3 (paper sec. 4.1, "The resulting models are then finetuned on downstream video
tasks"; the release's `run_class_finetuning.py`): the video ViT student with mean pooling and a
linear head, its encoder initialised from the stage-2 model (`ctx.mvd_encoder`), its head
re-initialised, trained with the shared cross-entropy; the decoders are not part of `model.pt` and
are discarded. The fine-tuning recipe is the project's (`distill.train`), the same for every arm; the
release's layer decay, mixup and multi-view testing are left out (methods brief 3.4 item 7).

The head (`head`): "fc_norm" (the default, the release's `modeling_finetune.py` with `use_mean_pooling`):
the pre-trained final LayerNorm is dropped, the last block's tokens are mean-pooled, a new LayerNorm
(`fc_norm`) normalises the pooled vector, and the new linear head starts scaled by `init_scale` = 0.001
(`run_class_finetuning.py --init_scale`); "final_norm" (before issue 26): the pre-trained final LayerNorm
on every token, their mean, then the head at its default initialisation.

`init` selects what the encoder starts from, so the benchmark's arms run through one method:
`mvd` (the MVD student), `videomae` (the VideoMAE video teacher itself: the paper's baseline) or
`scratch` (no pre-training). A file pre-trained by another pretext is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vidistill.distill.base import Distiller, register_method
from vidistill.errors import ConfigError
from vidistill.train.pretext import load_pretrained

INITS = ("mvd", "videomae", "scratch")
HEADS = ("fc_norm", "final_norm")
INIT_SCALE = 0.001  # the release's --init_scale: the new head's weights and bias start multiplied by it


@dataclass
class MVDParams:
    """What the student's encoder starts from, and its head.

    Attributes:
        init: "mvd" (the model of `teach --pretext mvd`, the paper's method), "videomae" (the model of
            `teach --pretext videomae`: the VideoMAE baseline of Tables 1-2) or "scratch" (random).
        head: "fc_norm" (the release: mean of the last block's tokens, a new LayerNorm, the head scaled by
            0.001 at initialisation) or "final_norm" (the pre-trained final LayerNorm, then the mean).
    """

    init: str = "mvd"
    head: str = "fc_norm"

    def validate(self) -> None:
        if self.init not in INITS:
            raise ConfigError(f"distill.methods.mvd.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.head not in HEADS:
            raise ConfigError(f"distill.methods.mvd.head must be one of {', '.join(HEADS)} (fc_norm: the release's "
                              f"fine-tuning head), got {self.head!r}")


def load_encoder_weights(student: torch.nn.Module, path: str, *, pretext: str) -> list[str]:
    """Copy every weight of a `pretext`-pre-trained model into `student` except the classification head.

    Args:
        student: the video ViT to fine-tune.
        path: the pre-trained `model.pt`.
        pretext: the pretext its tag must name ("mvd" or "videomae").

    Returns:
        The student's state-dict keys left at their initialisation (the head, and `fc_norm` when the student
        has one; the source's final LayerNorm is then not copied).

    Raises:
        ConfigError: a missing file, a model of another pretext, or an encoder of another architecture,
            frame count or crop.
    """
    model, info = load_pretrained(path, pretext, f"the encoder of mvd (init {pretext}, --mvd-encoder)")
    own = student.state_dict()
    dropped = ("head.", "norm.") if getattr(student, "fc_norm", None) is not None else ("head.",)  # fc_norm: no final LN
    saved = {k: v for k, v in model.state_dict().items() if not k.startswith(dropped)}
    fresh = ("head.", "fc_norm.")
    wrong = sorted(k for k in own if not k.startswith(fresh) and (k not in saved or saved[k].shape != own[k].shape))
    if wrong or set(saved) - set(own):
        want = {k: student.create_kwargs.get(k) for k in ("name", "frames", "size")}
        got = {"name": info["name"], **{k: info["kwargs"].get(k) for k in ("frames", "size")}}
        raise ConfigError(f"{path} holds a {got} encoder but mvd fine-tunes {want}; pre-train that architecture "
                          f"on clips of the same frames and crop (first mismatch: {(wrong or sorted(set(saved) - set(own)))[0]})")
    own.update(saved)
    student.load_state_dict(own)
    return sorted(k for k in own if k.startswith(fresh))


@register_method("mvd")
class MaskedVideoDistillationFinetune(Distiller):
    """MVD: fine-tune the masked-video-distilled ViT encoder (mean pooling, fc_norm, linear head) on labels."""

    Params = MVDParams
    needs = ("mvd_encoder",)
    student_preset = "vit_video_tiny"

    @classmethod
    def needed_files(cls, params: MVDParams) -> tuple[str, ...]:
        return () if params.init == "scratch" else cls.needs

    @classmethod
    def build_student(cls, params: MVDParams, ctx, *, default: str) -> torch.nn.Module:
        """The video ViT with the fine-tuning head `params.head` (pool "fc_norm" or "mean")."""
        from vidistill.models import create_model

        name = cls.student_name(params, default)
        if params.head == "final_norm":
            return create_model(name, num_classes=ctx.num_classes, frames=ctx.frames, size=ctx.size)
        student = create_model(name, num_classes=ctx.num_classes, frames=ctx.frames, size=ctx.size, pool="fc_norm")
        with torch.no_grad():
            student.head.weight.mul_(INIT_SCALE)
            student.head.bias.mul_(INIT_SCALE)
        return student

    def __init__(self, student, params: MVDParams, ctx) -> None:
        super().__init__(student, params, ctx)
        self.fresh: list[str] = []  # keys left at their initialisation
        if params.init != "scratch":
            self.fresh = load_encoder_weights(student, ctx.mvd_encoder, pretext=params.init)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One fine-tuning step: cross-entropy of the student on labelled clips.

        Args:
            batch: `rgb` `(B, 3, T, H, W)` in [0, 1], `label` `(B,)` int64.

        Returns:
            `loss` (= `ce`), `logits` `(B, K)`, `ce` (with `distill.train.label_smoothing`).
        """
        logits, _ = self.student(batch["rgb"])  # (B, K): mean of the encoder's tokens (then fc_norm), then the head
        ce = self.ce(logits, batch)
        return {"loss": ce, "logits": logits, "ce": ce}
