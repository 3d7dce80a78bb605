"""Masked pre-training tasks without labels: MAE, VideoMAE and MVD's masked feature distillation.

All three are `TrainTask`s that return no logits: the loop trains, checkpoints and resumes them like
any other task, and each reports a **held-out masked-reconstruction loss** (`heldout_loss`, on the
test split of the same prep output, with fixed masks, so the numbers of all epochs are comparable)
from `on_epoch_end`, plus `heldout_loss_init`, the same loss of the untrained model, from `setup`.

* `MaskedPixels` (`pretext: mae` with an image ViT, `pretext: videomae` with a video ViT): the
  encoder sees the visible tokens only; a `MaskedDecoder` predicts the pixels of every masked patch,
  normalised per patch; the loss is the MSE over the masked patches.
  - MAE (He et al., CVPR 2022): random masking 0.75; target normalised over all p·p·3 values of a
    patch (`forward_loss` with `norm_pix_loss`, `models_mae.py` of `facebookresearch/mae`).
  - VideoMAE (Tong et al., NeurIPS 2022): tube masking 0.9 over 2×p×p tubelets; target normalised per
    colour channel over the 2·p·p pixels of a tubelet, unbiased variance, ε = 1e-6 added to the
    standard deviation (`engine_for_pretraining.py` of `MCG-NJU/VideoMAE`, `normlize_target`).
* `MaskedVideoDistillation` (`pretext: mvd`; Wang et al., CVPR 2023, sec. 3.2-3.3): tube masking 0.9;
  two decoders of identical architecture and separate weights predict, at the masked positions only,
  the frozen teachers' last-block tokens before their final LayerNorm on the *unmasked* clip:
  L = λ₁·SmoothL1(image targets) + λ₂·SmoothL1(video targets), λ₁ = λ₂ = 1, SmoothL1 with β = 1
  (`engine_for_pretraining.py` of `ruiwang2021/mvd`). The image teacher runs on the first frame of
  each tubelet (`time_stride_loss=True`): target token (t, i, j) is image token (i, j) of frame
  t·tubelet. Targets are not normalised (`norm_feature` off by default).

Deviations, for models this small: the encoders keep our presets' learned position embeddings (the
releases use fixed sin-cos ones in the encoders; the decoders here use sin-cos as they do); the image
encoder's CLS token is dropped before its decoder (MAE keeps it in the decoder's sequence); no drop
path. Each deviation keeps the presets and the exported students unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vidistill.errors import ConfigError
from vidistill.models.decoder import MaskedDecoder
from vidistill.models.masking import random_mask, tube_mask
from vidistill.train.loop import TrainTask, scan

MASKED_PRETEXTS = ("mae", "videomae", "mvd")
DEFAULT_MASK_RATIO = {"mae": 0.75, "videomae": 0.9, "mvd": 0.9}  # MAE; VideoMAE and MVD release scripts
# The releases' pre-training views, as `TrainConfig` settings (`hflip`, `crop_scale`: smallest crop area). MAE
# (`main_pretrain.py`): RandomResizedCrop(scale=(0.2, 1)) + RandomHorizontalFlip. VideoMAE
# (`DataAugmentationForVideoMAE`) and MVD (`DataAugmentationForVideoDistillation`): GroupMultiScaleCrop with side
# scales [1, .875, .75, .66] and no flip; ours is the nearest random resized crop, area >= 0.66² ≈ 0.44 (a reading:
# theirs draws the two sides from that discrete list, ours a uniform area and an aspect ratio in [3/4, 4/3]).
PRETEXT_VIEWS = {"mae": {"hflip": True, "crop_scale": 0.2}, "videomae": {"hflip": False, "crop_scale": 0.44},
                 "mvd": {"hflip": False, "crop_scale": 0.44}}
# The releases' decoders, as (blocks, width / encoder width), for `teach.recipe` (ViT-B encoders, 768 wide): MAE 8 x 512
# (`mae_vit_base_patch16`: decoder_depth 8, decoder_embed_dim 512), VideoMAE 4 x 384 (`pretrain_videomae_base_patch16_224`:
# decoder_depth 4, decoder_embed_dim 384), MVD 2 x the encoder's (`--decoder_depth 2`, feat_decoder_embed_dim = embed_dim).
# "small_data" is VideoMAE's UCF101 recipe (`scripts/ucf101/..._tubemasking_ratio_0.75_epoch_3200/pretrain.sh`): tube
# masking 0.75 and a 4-block decoder.
RECIPES = ("", "release", "small_data")
RELEASE_DECODERS = {"mae": (8, 2 / 3), "videomae": (4, 1 / 2), "mvd": (2, 1.0)}
SMALL_DATA_MASK_RATIO = 0.75


def recipe_decoder(pretext: str, enc_dim: int, enc_heads: int) -> tuple[int, int, int]:
    """`(depth, width, heads)` of the release's decoder for `pretext`, scaled to an encoder of width `enc_dim` with
    `enc_heads` heads: the release's depth, its width ratio, and the encoder's heads times that ratio, rounded to the
    nearest count that divides the width (e.g. for our 96-wide, 3-head ViTs: MAE 8 x 64, 2 heads; VideoMAE
    4 x 48, 2 heads; MVD 2 x 96, 3 heads)."""
    depth, ratio = RELEASE_DECODERS[pretext]
    width = max(1, round(enc_dim * ratio))
    want = max(1.0, enc_heads * ratio)
    heads = min((h for h in range(1, width + 1) if width % h == 0), key=lambda h: (abs(h - want), -h))
    return depth, width, heads
MVD_TEACHERS = ("both", "image", "video")
HELDOUT_SEED = 20230601  # the fixed masks of the held-out loss


def _vit(model: nn.Module, kind: str, what: str) -> None:
    """Refuse a model that is not a ViT of input kind `kind` ("image" or "video")."""
    if not hasattr(model, "forward_tokens") or getattr(model, "input_kind", "") != kind:
        name = getattr(model, "create_kwargs", {}).get("name", type(model).__name__)
        example = "vit_image_tiny" if kind == "image" else "vit_video_tiny"
        raise ConfigError(f"{what} must be an {kind} ViT (e.g. {example}), got {name!r}")


def patch_size(model: nn.Module) -> tuple[int, ...]:
    """The patch `(p, p)` or tubelet `(t, p, p)` of a ViT."""
    return tuple(model.patch_embed.kernel_size)


def pixel_targets(x: torch.Tensor, patch: tuple[int, ...], *, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised pixels, one row per token in grid order.

    Args:
        x: images `(B, 3, H, W)` with `patch = (p, p)`, or clips `(B, 3, T, H, W)` with
            `patch = (t, p, p)`; values in [0, 1].
        patch: the patch or tubelet size.
        eps: ε of the normalisation.

    Returns:
        `(B, N, P)`. Images: P = p·p·3 in MAE's `patchify` order (p, q, c), normalised over all P values
        with (var + ε)^½ (MAE `forward_loss`). Clips: P = t·p·p·3 in VideoMAE's order ((p0 p1 p2) c),
        normalised per channel over the t·p·p pixels with std + ε (VideoMAE `normlize_target`).
    """
    if x.dim() == 4:
        b, c, h, w = x.shape
        p, q = patch
        rows = x.reshape(b, c, h // p, p, w // q, q).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // q), p * q * c)
        mean, var = rows.mean(dim=-1, keepdim=True), rows.var(dim=-1, keepdim=True)
        return (rows - mean) / (var + eps).sqrt()
    b, c, t, h, w = x.shape
    p0, p1, p2 = patch
    cells = x.reshape(b, c, t // p0, p0, h // p1, p1, w // p2, p2).permute(0, 2, 4, 6, 3, 5, 7, 1)
    cells = cells.reshape(b, (t // p0) * (h // p1) * (w // p2), p0 * p1 * p2, c)  # (B, N, pixels, C)
    normed = (cells - cells.mean(dim=-2, keepdim=True)) / (cells.var(dim=-2, keepdim=True).sqrt() + eps)
    return normed.flatten(2)  # (B, N, pixels·C)


def at_masked(targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The targets `(B, N, D)` of the masked positions of `mask` `(B, N)`: `(B, N_masked, D)`, grid order."""
    b, _, d = targets.shape
    return targets[mask].view(b, -1, d)


def masked_feature_loss(pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SmoothL1 (β = 1) between the predictions of the masked tokens and the targets at those positions.

    Args:
        pred: `(B, N_masked, D)`, a decoder's predictions in grid order.
        targets: `(B, N, D)`, a teacher's tokens at every position; the visible ones are ignored.
        mask: bool `(B, N)`, True = masked.

    Returns:
        The mean over the masked tokens and channels of smooth_l1(pred − target): 0.5·d² where |d| < 1,
        else |d| − 0.5 (MVD: `torch.nn.SmoothL1Loss()`, `engine_for_pretraining.py`).
    """
    return F.smooth_l1_loss(pred, at_masked(targets, mask), beta=1.0)


class MaskedModelling(TrainTask):
    """Shared part of the masked pretexts: masks, the held-out loss, no logits.

    Subclasses set `self.student`, `self.mask_ratio` and implement `losses(x, mask)` and `make_mask`.

    Args:
        heldout: items with `rgb` as the training items (the test split, or its frames); None: no
            held-out loss.
        eval_batch: batch size of the held-out pass.
    """

    def __init__(self, *, heldout: Dataset | None, eval_batch: int) -> None:
        super().__init__()
        self.heldout = heldout
        self.eval_batch = eval_batch
        self.heldout_init: float | None = None

    def make_mask(self, batch: int, *, generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def losses(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One step on `batch["rgb"]` with a fresh mask (torch's global RNG, so `--resume` stays bit-exact).

        Returns:
            `loss` and the named terms of `losses`; no `logits`.
        """
        x = batch["rgb"]
        return self.losses(x, self.make_mask(x.shape[0], generator=None).to(x.device))

    @torch.no_grad()
    def heldout_loss(self) -> float:
        """Mean `loss` over the held-out items, with masks drawn from a fixed seed (the same every call),
        in eval mode; restores the previous mode and does not touch the global RNG."""
        if self.heldout is None or len(self.heldout) == 0:
            return float("nan")
        was_training = self.training
        self.eval()
        gen = torch.Generator().manual_seed(HELDOUT_SEED)
        device = next(self.student.parameters()).device
        total, count = 0.0, 0
        for batch in scan(self.heldout, batch_size=self.eval_batch, device=device):
            x = batch["rgb"]
            mask = self.make_mask(x.shape[0], generator=gen).to(device)
            total += float(self.losses(x, mask)["loss"]) * x.shape[0]
            count += x.shape[0]
        self.train(was_training)
        return total / count

    def setup(self, train_set: Dataset, *, epochs: int) -> None:
        """The held-out loss of the model before training (`heldout_loss_init`)."""
        self.heldout_init = self.heldout_loss()

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        out = {"heldout_loss": self.heldout_loss()}
        if self.heldout_init is not None:
            out["heldout_loss_init"] = self.heldout_init
        return out


class MaskedPixels(MaskedModelling):
    """MAE (image ViT, random masking) or VideoMAE (video ViT, tube masking): reconstruct normalised pixels.

    Args:
        model: an image ViT (MAE) or a video ViT (VideoMAE), from `create_model`.
        mask_ratio: the masked fraction (MAE 0.75, VideoMAE 0.9).
        decoder_depth: decoder blocks.
        decoder_dim: decoder width (0: the encoder's).
        decoder_heads: decoder heads (0: the encoder's).
        heldout: held-out items for `heldout_loss` (None: none).
        eval_batch: batch size of the held-out pass.
    """

    def __init__(self, model: nn.Module, *, mask_ratio: float, decoder_depth: int = 2, decoder_dim: int = 0,
                 decoder_heads: int = 0, heldout: Dataset | None = None, eval_batch: int = 64) -> None:
        super().__init__(heldout=heldout, eval_batch=eval_batch)
        self.student = model
        self.video = model.input_kind == "video"
        self.mask_ratio = mask_ratio
        self.patch = patch_size(model)
        self.decoder = MaskedDecoder(enc_dim=model.feature_dim, dec_dim=decoder_dim or model.feature_dim,
                                     depth=decoder_depth, heads=decoder_heads or model.blocks[0].attn.heads,
                                     out_dim=3 * math.prod(self.patch), grid=model.grid)
        self.make_mask(1)  # refuse a ratio that leaves nothing masked or visible, before any work

    def make_mask(self, batch: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Tube masks for video (VideoMAE), random masks for images (MAE): bool `(B, N)`."""
        if self.video:
            return tube_mask(batch, self.student.grid, self.mask_ratio, generator=generator)
        return random_mask(batch, self.student.num_tokens, self.mask_ratio, generator=generator)

    def losses(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """MSE between the predicted and the per-patch normalised pixels of the masked patches.

        Args:
            x: `(B, 3, T, H, W)` clips (VideoMAE) or `(B, 3, H, W)` frames (MAE), in [0, 1].
            mask: bool `(B, N)`, True = masked.

        Returns:
            `loss` and `pixel_mse` (the same number).
        """
        visible = self.student.forward_tokens(x, mask)  # (B, N_vis, D): masked tokens never reach the encoder
        pred = self.decoder(visible, mask)  # (B, N_mask, P)
        with torch.no_grad():
            target = at_masked(pixel_targets(x, self.patch), mask)
        mse = F.mse_loss(pred, target)
        return {"loss": mse, "pixel_mse": mse}


class MaskedVideoDistillation(MaskedModelling):
    """MVD pre-training of a video ViT student against frozen MAE image and VideoMAE video teachers.

    Args:
        student: the video ViT to pre-train (its head is not used).
        image_teacher: an image ViT pre-trained by MAE, or None (`teachers="video"`).
        video_teacher: a video ViT pre-trained by VideoMAE, or None (`teachers="image"`).
        mask_ratio: the tube-masking ratio (0.9).
        image_weight: λ₁ (1).
        video_weight: λ₂ (1).
        decoder_depth: blocks of each decoder (2, `--decoder_depth 2`).
        decoder_dim: decoder width (0: the encoder's, as `feat_decoder_embed_dim` defaults to).
        decoder_heads: decoder heads (0: the encoder's).
        heldout: held-out clips for `heldout_loss` (None: none).
        eval_batch: batch size of the held-out pass.

    Raises:
        ConfigError: a teacher whose token grid does not line up with the student's (the image
            teacher's patch must equal the tubelet's spatial size, the video teacher's grid the student's).
    """

    frozen_modules = ("teachers",)

    def __init__(self, student: nn.Module, *, image_teacher: nn.Module | None, video_teacher: nn.Module | None,
                 mask_ratio: float = 0.9, image_weight: float = 1.0, video_weight: float = 1.0, decoder_depth: int = 2,
                 decoder_dim: int = 0, decoder_heads: int = 0, heldout: Dataset | None = None, eval_batch: int = 64) -> None:
        super().__init__(heldout=heldout, eval_batch=eval_batch)
        _vit(student, "video", "the MVD student")
        if image_teacher is None and video_teacher is None:
            raise ConfigError("MVD needs at least one teacher (image, video or both)")
        self.student = student
        self.mask_ratio = mask_ratio
        self.weights = {"image": image_weight, "video": video_weight}
        self.tubelet = patch_size(student)[0]
        self.teachers = nn.ModuleDict()
        self.decoders = nn.ModuleDict()
        t, h, w = student.grid
        dec = {"enc_dim": student.feature_dim, "dec_dim": decoder_dim or student.feature_dim, "depth": decoder_depth,
               "heads": decoder_heads or student.blocks[0].attn.heads, "grid": student.grid}
        if image_teacher is not None:
            _vit(image_teacher, "image", "MVD's image teacher")
            if tuple(image_teacher.grid) != (h, w):
                raise ConfigError(f"the image teacher's {image_teacher.grid} patch grid does not line up with the student's "
                                  f"{(h, w)} spatial grid; pre-train it with the tubelet's spatial patch size and the same crop")
            self._add_teacher("image", image_teacher)
            self.decoders["image"] = MaskedDecoder(out_dim=image_teacher.feature_dim, **dec)
        if video_teacher is not None:
            _vit(video_teacher, "video", "MVD's video teacher")
            if tuple(video_teacher.grid) != (t, h, w):
                raise ConfigError(f"the video teacher's token grid {video_teacher.grid} differs from the student's "
                                  f"{student.grid}; pre-train it on clips of the same frames and crop")
            self._add_teacher("video", video_teacher)
            self.decoders["video"] = MaskedDecoder(out_dim=video_teacher.feature_dim, **dec)
        self.make_mask(1)

    def _add_teacher(self, name: str, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        self.teachers[name] = model.eval()

    def train(self, mode: bool = True) -> MaskedVideoDistillation:
        super().train(mode)
        self.teachers.eval()  # teachers never leave eval mode
        return self

    def trainable_parameters(self):
        frozen = {id(p) for p in self.teachers.parameters()}
        return (p for p in self.parameters() if p.requires_grad and id(p) not in frozen)

    def make_mask(self, batch: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Tube masks: bool `(B, t·h·w)`, one 2-D mask per sample repeated over the t time slices."""
        return tube_mask(batch, self.student.grid, self.mask_ratio, generator=generator)

    @torch.no_grad()
    def image_targets(self, x: torch.Tensor) -> torch.Tensor:
        """The image teacher's last-block tokens (before its final LayerNorm, CLS dropped) on the first frame
        of each tubelet of the unmasked clip: `(B, 3, T, H, W)` -> `(B, t·h·w, D_img)`, token (t, i, j) =
        image token (i, j) of frame t·tubelet."""
        b = x.shape[0]
        frames = x[:, :, :: self.tubelet].transpose(1, 2)  # (B, t, 3, H, W): frames 0, tubelet, 2·tubelet, ...
        tokens = self.teachers["image"].forward_tokens(frames.flatten(0, 1), final_norm=False)  # (B·t, h·w, D)
        return tokens.reshape(b, -1, tokens.shape[-1])

    @torch.no_grad()
    def video_targets(self, x: torch.Tensor) -> torch.Tensor:
        """The video teacher's last-block tokens before its final LayerNorm on the unmasked clip: `(B, N, D_vid)`."""
        return self.teachers["video"].forward_tokens(x, final_norm=False)

    def losses(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """L = λ₁·SmoothL1(image) + λ₂·SmoothL1(video), each over the masked tokens only.

        Args:
            x: the unmasked clips `(B, 3, T, H, W)` in [0, 1] (the teachers see them whole).
            mask: bool `(B, N)` tube mask, True = masked (the student's encoder sees only the rest).

        Returns:
            `loss`, and `feat_image` / `feat_video` for each teacher in use.
        """
        visible = self.student.forward_tokens(x, mask)  # (B, N_vis, D): masked tokens never reach the encoder
        out: dict[str, torch.Tensor] = {}
        loss = x.new_zeros(())
        for name, targets in (("image", self.image_targets), ("video", self.video_targets)):
            if name not in self.decoders:
                continue
            term = masked_feature_loss(self.decoders[name](visible, mask), targets(x), mask)
            out[f"feat_{name}"] = term
            loss = loss + self.weights[name] * term
        out["loss"] = loss
        return out


# ----------------------------------------------------------------------------------------------
# building a task from model files


def check_pretext(info: dict[str, Any], path: str | Path, want: str, role: str) -> None:
    """Refuse a model file whose `extra["pretext"]` tag is not `want`, in one line.

    Args:
        info: what `load_model` returns beside the model (`extra` holds the tag `vidistill teach` wrote).
        path: the file, for the message.
        want: the pretext the role requires (mae, videomae, mvd).
        role: what the file is used as, e.g. "MVD's image teacher".

    Raises:
        ConfigError: the tag differs (a supervised teacher has no tag: "none").
    """
    got = info.get("extra", {}).get("pretext", "none")
    if got != want:
        raise ConfigError(f"{path} was pre-trained by {got!r}, not {want!r}; {role} must come from "
                          f"`vidistill teach --pretext {want}`")


def load_pretrained(path: str, want: str, role: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model file and check its pretext tag (`check_pretext`).

    Raises:
        ConfigError: no path, a missing file, or another pretext's model.
    """
    from vidistill.train.artifacts import load_model

    if not path:
        raise ConfigError(f"{role} is not given: pass the model.pt of `vidistill teach --pretext {want}`")
    if not Path(path).is_file():
        raise ConfigError(f"{role} {path} does not exist; train it with `vidistill teach --pretext {want}`")
    model, info = load_model(path)
    check_pretext(info, path, want, role)
    return model, info


def build_masked_task(pretext: str, model: nn.Module, *, mask_ratio: float, decoder_depth: int = 2,
                      decoder_dim: int = 0, decoder_heads: int = 0, image_teacher: str = "", video_teacher: str = "",
                      teachers: str = "both", image_weight: float = 1.0, video_weight: float = 1.0,
                      heldout: Dataset | None = None, eval_batch: int = 64) -> MaskedModelling:
    """The task of `vidistill teach --pretext {mae,videomae,mvd}`.

    Args:
        pretext: mae (an image ViT), videomae (a video ViT) or mvd (a video ViT student).
        model: the model to pre-train, from `create_model`.
        mask_ratio: the masked fraction.
        decoder_depth: decoder blocks.
        decoder_dim: decoder width (0: the encoder's).
        decoder_heads: decoder heads (0: the encoder's).
        image_teacher: mvd: model.pt of the MAE image teacher.
        video_teacher: mvd: model.pt of the VideoMAE video teacher.
        teachers: mvd: "both" (co-teaching), "image" or "video" (a single teacher).
        image_weight: mvd: λ₁.
        video_weight: mvd: λ₂.
        heldout: held-out items (test clips; for mae their frames).
        eval_batch: batch size of the held-out pass.

    Raises:
        ConfigError: an unknown pretext, a model of the wrong kind, a missing teacher or one not
            pre-trained by the matching pretext (MAE for the image teacher, VideoMAE for the video teacher).
    """
    common = {"mask_ratio": mask_ratio, "decoder_depth": decoder_depth, "decoder_dim": decoder_dim,
              "decoder_heads": decoder_heads, "heldout": heldout, "eval_batch": eval_batch}
    if pretext == "mae":
        _vit(model, "image", "teach.model of --pretext mae")
        return MaskedPixels(model, **common)
    if pretext == "videomae":
        _vit(model, "video", "teach.model of --pretext videomae")
        return MaskedPixels(model, **common)
    if pretext != "mvd":
        raise ConfigError(f"unknown masked pretext {pretext!r}; choose one of {', '.join(MASKED_PRETEXTS)}")
    if teachers not in MVD_TEACHERS:
        raise ConfigError(f"teach.mvd_teachers must be one of {', '.join(MVD_TEACHERS)}, got {teachers!r}")
    image = video = None
    if teachers in ("both", "image"):
        image, _ = load_pretrained(image_teacher, "mae", "MVD's image teacher (teach.image_teacher)")
    if teachers in ("both", "video"):
        video, _ = load_pretrained(video_teacher, "videomae", "MVD's video teacher (teach.video_teacher)")
    return MaskedVideoDistillation(model, image_teacher=image, video_teacher=video, image_weight=image_weight,
                                   video_weight=video_weight, **common)
