"""Training views: random resized crops and horizontal flips applied identically to RGB and flow.

The standard training views of video action recognition (TSN's multi-scale crop and flip, Wang et al.
2016; the RandomResizedCrop of Szegedy et al. 2015 that torchvision implements), made aware of optical
flow, which torchvision's transforms are not:

* the same crop box and flip are applied to a clip and to its TV-L1 flow, so a teacher that reads the
  flow (D3D's temporal stream) sees the flow of exactly the view the student sees;
* flow is crop-equivariant but its *values* are displacements in pixels: resizing a crop of `w x h`
  pixels back to `S x S` multiplies `u` by `S / w` and `v` by `S / h`, and a horizontal flip negates `u`;
* the output keeps the input's size `S x S`, so models, ONNX export and serving are untouched;
* every random number comes from the `torch.Generator` the training loop checkpoints, so `--resume`
  reaches the same weights as an uninterrupted run (`tests/test_train.py`).

A horizontal flip turns a leftward motion into a rightward one and clockwise into counter-clockwise. For
classes named by such a direction the flip must swap the label too (as Something-Something pipelines
do); `mirror_label_map` builds that permutation from the class names, and a class without a mirror
partner keeps its label.

Hand-written because no maintained library does this: torchvision's `v2.RandomResizedCrop` neither
rescales flow vectors nor takes a `Generator`, and it draws one box per call, not one per clip of a batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio range of a crop box (torchvision's RandomResizedCrop default)

# name tokens a horizontal flip turns into each other
_MIRROR_TOKENS = {"left": "right", "right": "left", "cw": "ccw", "ccw": "cw", "clockwise": "counterclockwise",
                  "counterclockwise": "clockwise"}


@dataclass(frozen=True)
class Views:
    """One random view per clip of a batch.

    Attributes:
        flip: bool `(B,)`, True where the clip is mirrored left-right.
        box: float `(B, 4)`, the crop box `(x0, y0, w, h)` as fractions of the frame width and height.
            `(0, 0, 1, 1)` is the whole frame.
    """

    flip: torch.Tensor
    box: torch.Tensor


def sample_views(batch_size: int, generator: torch.Generator, *, hflip: bool, crop_scale: float) -> Views:
    """Draw a flip and a crop box for each of `batch_size` clips from `generator`.

    The box is RandomResizedCrop's: its area is a uniform fraction in `[crop_scale, 1]` of the frame, its
    aspect ratio log-uniform in `CROP_RATIO`, each side clamped to the frame, its position uniform.
    With `hflip` alone, exactly `batch_size` uniform numbers are drawn (the draws of the loop's former
    `hflip_batch`); with `crop_scale == 1` no box is drawn.

    Args:
        batch_size: B.
        generator: the source of every random number (the training loop checkpoints it).
        hflip: mirror each clip with probability 0.5.
        crop_scale: smallest crop area, as a fraction of the frame, in (0, 1]; 1 keeps the whole frame.

    Returns:
        The views.

    Raises:
        ValueError: `crop_scale` outside (0, 1].
    """
    if not 0.0 < crop_scale <= 1.0:
        raise ValueError(f"crop_scale must be in (0, 1], got {crop_scale}; 1 turns random crops off")
    flip = torch.rand(batch_size, generator=generator) < 0.5 if hflip else torch.zeros(batch_size, dtype=torch.bool)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(batch_size, 1)
    if crop_scale < 1.0:
        u = torch.rand(batch_size, 4, generator=generator, dtype=torch.float64)
        area = crop_scale + (1.0 - crop_scale) * u[:, 0]
        log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])  # w / h
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        box = torch.stack([(1.0 - w) * u[:, 2], (1.0 - h) * u[:, 3], w, h], dim=1).float()
    return Views(flip=flip, box=box)


def _grid(views: Views, height: int, width: int) -> torch.Tensor:
    """Sampling grid `(B, H, W, 2)` of `F.grid_sample` (align_corners=False) that maps each output
    pixel to its position in the crop box, mirrored where `flip`."""
    x0, y0, w, h = views.box.unbind(1)
    sx = torch.where(views.flip, -w, w)  # a flip reverses the x axis of the box
    theta = torch.zeros(len(w), 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, 2 * x0 + w - 1  # x_in = ±w·x_out + centre of the box, in [-1, 1]
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * y0 + h - 1
    return F.affine_grid(theta, [len(w), 1, height, width], align_corners=False)


def apply_views(x: torch.Tensor, views: Views, *, flow: bool = False) -> torch.Tensor:
    """Crop each clip to its box, resize it back to `H x W` (bilinear) and mirror it where `flip`.

    Args:
        x: float `(B, C, T, H, W)`: RGB clips, or flow `(B, 2, T-1, H, W)` in pixels (channel 0 is `u`,
            horizontal, channel 1 `v`) when `flow`.
        views: one view per clip (`sample_views`).
        flow: rescale the displacements with the resize (`u · W/w`, `v · H/h`, in pixels of the output)
            and negate `u` where mirrored.

    Returns:
        Float `(B, C, T, H, W)`, the same shape and dtype as `x`. Clips whose box is the whole frame are
        mirrored exactly (`Tensor.flip`, no interpolation) or returned unchanged.
    """
    B, C, T, H, W = x.shape
    whole = (views.box == torch.tensor([0.0, 0.0, 1.0, 1.0])).all(1)  # (B,)
    out = torch.where(views.flip.view(-1, 1, 1, 1, 1), x.flip(-1), x)
    if flow:
        u_sign = torch.where(views.flip, -1.0, 1.0).to(x.dtype).view(-1, 1, 1, 1)
        out = torch.cat([out[:, :1] * u_sign.unsqueeze(1), out[:, 1:]], dim=1)
    if bool(whole.all()):
        return out
    crop = ~whole
    grid = _grid(Views(flip=views.flip[crop], box=views.box[crop]), H, W).to(x.dtype)
    y = F.grid_sample(x[crop].reshape(-1, C * T, H, W), grid, mode="bilinear", padding_mode="border",
                      align_corners=False).reshape(-1, C, T, H, W)
    if flow:  # displacements grow by the zoom factor; a mirrored u changes sign
        w, h = views.box[crop, 2].to(x.dtype), views.box[crop, 3].to(x.dtype)
        su = torch.where(views.flip[crop], -1.0 / w, 1.0 / w)
        y = torch.cat([y[:, :1] * su.view(-1, 1, 1, 1, 1), y[:, 1:] / h.view(-1, 1, 1, 1, 1)], dim=1)
    out[crop] = y
    return out


def augment_batch(batch: dict[str, Any], generator: torch.Generator, *, hflip: bool = False, crop_scale: float = 1.0,
                  label_map: Sequence[int] | None = None) -> dict[str, Any]:
    """Give every clip of a batch a random training view, the same for its RGB and its flow.

    Args:
        batch: a collated batch: `rgb` `(B, 3, T, H, W)` (or frames `(B, 3, H, W)`), `label` int64 `(B,)`,
            optionally `flow` `(B, 2, T-1, H, W)` in pixels; other keys pass through.
        generator: the source of every random number (the loop's checkpointed generator).
        hflip: mirror each clip with probability 0.5.
        crop_scale: smallest crop area (fraction of the frame) of a random resized crop; 1 is off.
        label_map: `label_map[k]` is the class a mirrored clip of class `k` shows (`mirror_label_map`);
            None keeps every label.

    Returns:
        The batch with new `rgb`, `flow` and `label` tensors; `batch` itself is returned untouched, and
        nothing is drawn from `generator`, when both `hflip` and cropping are off.
    """
    if not hflip and crop_scale >= 1.0:
        return batch
    if "rgb" not in batch:
        raise ValueError(f"training views (hflip, crop_scale) need clips (`rgb`), but this batch holds {sorted(batch)}; "
                         "a method that trains on other inputs (e.g. cached embeddings) turns them off in its train_config")
    views = sample_views(batch["rgb"].shape[0], generator, hflip=hflip, crop_scale=crop_scale)
    out = dict(batch)
    if batch["rgb"].dim() == 4:  # frames `(B, 3, H, W)` (the MAE pretext's images): one-frame clips
        out["rgb"] = apply_views(batch["rgb"].unsqueeze(2), views).squeeze(2)
    else:
        out["rgb"] = apply_views(batch["rgb"], views)
    if "flow" in batch:
        out["flow"] = apply_views(batch["flow"], views, flow=True)
    if label_map is not None and bool(views.flip.any()):
        mirrored = torch.as_tensor(list(label_map), dtype=batch["label"].dtype)[batch["label"]]
        out["label"] = torch.where(views.flip, mirrored, batch["label"])
    return out


def mirror_label_map(classes: Sequence[str]) -> list[int]:
    """The class each class turns into under a horizontal flip, by swapping direction words in its name.

    Words are separated by `_`, `-`, spaces or case changes; `left`/`right`, `cw`/`ccw` and
    `clockwise`/`counterclockwise` swap. A class whose mirrored name is not a class (or whose mirror
    does not map back to it) keeps its index.

    Args:
        classes: class names in label order.

    Returns:
        `m` with `m[k]` the label of mirrored class `k` (a permutation of `range(len(classes))`).

    Example:
        `mirror_label_map(["left", "right", "up", "rotate_cw", "rotate_ccw"]) == [1, 0, 2, 4, 3]`.
    """
    index = {c.lower(): k for k, c in enumerate(classes)}
    out = []
    for k, name in enumerate(classes):
        parts = re.split(r"([_\-\s]+|(?<=[a-z])(?=[A-Z]))", name)
        swapped = "".join(_MIRROR_TOKENS.get(p.lower(), p) if p and not re.fullmatch(r"[_\-\s]*", p) else p for p in parts)
        out.append(index.get(swapped.lower(), k))
    return [j if out[j] == k else k for k, j in enumerate(out)]  # pairs only: always a permutation
