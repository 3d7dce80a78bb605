"""vidistill.data.augment: training views shared by RGB and flow, flow rescaled and mirrored, labels
mirrored, everything drawn from the loop's generator (resume stays bit-exact)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from vidistill.config import ConfigError, TrainConfig
from vidistill.data.augment import Views, apply_views, augment_batch, mirror_label_map, sample_views
from vidistill.train import Supervised, fit
from vidistill.train.loop import hflip_batch

S = 24


def _coords(b: int, t: int) -> torch.Tensor:
    """`(B, 2, T, S, S)`: channel 0 holds each pixel's x coordinate, channel 1 its y, in pixels."""
    yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    return torch.stack([xx, yy])[None, :, None].expand(b, 2, t, S, S).clone()


def _batch(b: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.rand(b, 3, 4, S, S, generator=g), "flow": 4 * torch.randn(b, 2, 3, S, S, generator=g),
            "label": torch.arange(b) % 4, "index": torch.arange(b)}


def test_rgb_and_flow_get_the_same_box_and_flow_is_rescaled_and_mirrored():
    views = sample_views(16, torch.Generator().manual_seed(1), hflip=True, crop_scale=0.3)
    assert 0 < int(views.flip.sum()) < 16
    x, y, w, h = views.box.unbind(1)
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 1 + 1e-6).all() and (y + h <= 1 + 1e-6).all()
    assert ((w * h) >= 0.3 - 1e-6).all() and ((w * h) < 0.999).all()
    # the same field read as an image and as a flow: the flow is the image times the zoom, u mirrored
    field = _coords(16, 3)
    image = apply_views(torch.cat([field, field[:, :1]], 1), views)[:, :2]  # 3 "colour" channels
    flow = apply_views(field, views, flow=True)
    sign = torch.where(views.flip, -1.0, 1.0)
    torch.testing.assert_close(flow[:, 0], image[:, 0] * (sign / w).view(-1, 1, 1, 1))
    torch.testing.assert_close(flow[:, 1], image[:, 1] / h.view(-1, 1, 1, 1))
    # and the view really is the box: the output's corner pixels read the box's corners (mirrored where flipped)
    left, right = image[:, 0, 0, 0, 0], image[:, 0, 0, 0, -1]
    lo, hi = torch.minimum(left, right), torch.maximum(left, right)
    assert torch.equal(left > right, views.flip)
    # pixel centres of the first and last output column, in input pixels (grid_sample, align_corners=False)
    torch.testing.assert_close(lo, (x * S + (w - 1) / 2).clamp(min=0), atol=1e-3, rtol=0)
    torch.testing.assert_close(hi, (x * S + w * S - (w + 1) / 2).clamp(max=S - 1), atol=1e-3, rtol=0)


def test_a_view_of_a_translation_is_the_translation_zoomed():
    """The flow of the cropped frames (real TV-L1) is the cropped flow of the frames: crop-equivariance."""
    from vidistill.flow import tvl1

    rng = np.random.default_rng(0)
    big = np.kron(rng.uniform(0, 1, (20, 20)), np.ones((6, 6)))  # blocky texture, 120 x 120
    big = cv2.GaussianBlur(big.astype(np.float32), (0, 0), 1.5)
    f0, f1 = big[30:86, 30:86], big[30:86, 28:84]  # the content moves 2 px right: u = +2, v = 0
    clip = torch.from_numpy(np.stack([f0, f1]))[None, None].expand(1, 3, 2, 56, 56).contiguous()  # (1, 3, 2, 56, 56)
    flow = torch.zeros(1, 2, 1, 56, 56)
    flow[:, 0] = 2.0
    views = Views(flip=torch.tensor([True]), box=torch.tensor([[0.2, 0.1, 0.6, 0.7]]))
    v_clip, v_flow = apply_views(clip, views), apply_views(flow, views, flow=True)
    est = tvl1(v_clip[0, 0, :1].numpy(), v_clip[0, 0, 1:].numpy(), device="cpu")[0]  # (2, H, W)
    inner = (slice(8, -8), slice(8, -8))
    assert float(v_flow[0, 0, 0, 0, 0]) == pytest.approx(-2.0 / 0.6)  # zoomed 1/0.6 and mirrored
    assert np.median(est[0][inner]) == pytest.approx(float(v_flow[0, 0, 0, 0, 0]), abs=0.15)
    assert np.median(est[1][inner]) == pytest.approx(0.0, abs=0.15)


def test_flip_only_is_exact_negates_u_and_draws_as_the_former_hflip():
    b = _batch()
    out = augment_batch(b, torch.Generator().manual_seed(3), hflip=True)
    old = hflip_batch(b, torch.Generator().manual_seed(3))  # the loop's flip before this module
    torch.testing.assert_close(out["rgb"], old["rgb"], rtol=0, atol=0)
    torch.testing.assert_close(out["flow"], old["flow"], rtol=0, atol=0)
    flipped = [i for i in range(8) if not torch.equal(out["rgb"][i], b["rgb"][i])]
    assert 0 < len(flipped) < 8
    for i in flipped:
        assert torch.equal(out["flow"][i, 0], -b["flow"][i, 0].flip(-1))
        assert torch.equal(out["flow"][i, 1], b["flow"][i, 1].flip(-1))


def test_deterministic_from_the_generator_and_nothing_drawn_when_off():
    b = _batch()
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (7, 7, 8))
    a1 = augment_batch(b, g1, hflip=True, crop_scale=0.5)
    a2 = augment_batch(b, g2, hflip=True, crop_scale=0.5)
    a3 = augment_batch(b, g3, hflip=True, crop_scale=0.5)
    assert all(torch.equal(a1[k], a2[k]) for k in ("rgb", "flow", "label"))
    assert not torch.equal(a1["rgb"], a3["rgb"])
    assert torch.equal(g1.get_state(), g2.get_state())  # the state a checkpoint saves
    g = torch.Generator().manual_seed(9)
    state = g.get_state()
    assert augment_batch(b, g) is b and torch.equal(g.get_state(), state)


def test_mirrored_clips_take_the_mirrored_label():
    classes = ["left", "right", "up", "down", "rotate_cw", "rotate_ccw", "expand", "shrink"]
    m = mirror_label_map(classes)
    assert m == [1, 0, 2, 3, 5, 4, 6, 7]
    assert mirror_label_map(["PushLeft", "PushRight", "Walk", "left"]) == [1, 0, 2, 3]
    assert mirror_label_map(["ApplyEyeMakeup", "Archery"]) == [0, 1]  # UCF101-style names: flips keep labels
    b = _batch(16)
    b["label"] = torch.arange(16) % 8
    out = augment_batch(b, torch.Generator().manual_seed(0), hflip=True, label_map=m)
    flipped = torch.tensor([not torch.equal(out["rgb"][i], b["rgb"][i]) for i in range(16)])
    assert torch.equal(out["label"], torch.where(flipped, torch.tensor(m)[b["label"]], b["label"]))
    assert bool((out["label"] != b["label"]).any())


def test_crop_scale_is_validated():
    with pytest.raises(ConfigError, match="crop_scale must be in \\(0, 1\\]"):
        TrainConfig(crop_scale=0.0).validate()
    with pytest.raises(ValueError, match="crop_scale must be in"):
        sample_views(2, torch.Generator(), hflip=False, crop_scale=1.5)


class _Clips(Dataset):
    classes = ["left", "right"]
    hflip_label_map = [1, 0]

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 2, (24,), generator=g)
        ramp = torch.linspace(-1, 1, 8).view(1, 1, 8)
        self.x = 0.1 * torch.rand(24, 3, 4, 8, 8, generator=g) + torch.where(self.y.view(-1, 1, 1, 1, 1) == 1, ramp, -ramp)

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return {"rgb": self.x[i], "label": int(self.y[i]), "index": i, "video_id": i}


def _fit(out, stop=None, resume=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))
    net = type("Net", (nn.Module,), {"modality": "rgb", "forward": lambda self, x: (self.m(x), x.mean((2, 3, 4)))})()
    net.m = model
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, seed=1, device="cpu", hflip=True, crop_scale=0.5, warmup_epochs=0)
    fit(Supervised(net), _Clips(), cfg, out, progress=False, stop_after_epochs=stop, resume=resume)
    return net


def test_training_with_views_resumes_bit_exact(tmp_path):
    full = _fit(tmp_path / "a")
    _fit(tmp_path / "b", stop=1)
    resumed = _fit(tmp_path / "b", resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{k} differs after resume")


class _Recording(Supervised):
    """Records (index, label) of every training sample the loop hands it, after the views."""

    def __init__(self, model):
        super().__init__(model)
        self.seen: list[tuple[int, int]] = []

    def forward(self, batch):
        if self.training:
            self.seen += list(zip(batch["index"].tolist(), batch["label"].tolist()))
        return super().forward(batch)


@pytest.mark.parametrize("hflip_labels", ["mirror", "keep"])
def test_the_loop_mirrors_labels_only_when_told(tmp_path, hflip_labels):
    data = _Clips()
    torch.manual_seed(0)
    net = type("Net", (nn.Module,), {"modality": "rgb", "forward": lambda self, x: (self.m(x), x.mean((2, 3, 4)))})()
    net.m = nn.Sequential(nn.Conv3d(3, 2, 1), nn.AdaptiveAvgPool3d(1), nn.Flatten())
    task = _Recording(net)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01, seed=1, device="cpu", hflip=True, hflip_labels=hflip_labels, warmup_epochs=0)
    fit(task, data, cfg, tmp_path, progress=False)
    changed = sum(int(data.y[i]) != y for i, y in task.seen)
    assert len(task.seen) == 48
    if hflip_labels == "keep":
        assert changed == 0
    else:  # about half the clips are flipped, and a flipped left becomes right
        assert 12 <= changed <= 36
    with pytest.raises(ConfigError, match="hflip_labels must be"):
        TrainConfig(hflip_labels="swap").validate()
