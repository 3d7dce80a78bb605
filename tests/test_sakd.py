"""SAKD (`vidistill.distill.sakd`): eq. 3-6 and eq. 9 against hand-computed values, the interruption, the
scoring pass, the per-epoch subset the loop trains on, resume, the controls and the CLI.

The DPP itself is tested in `tests/test_dpp.py`; the 2-process run in `test_sakd_under_two_processes_*`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from vidistill import cli
from vidistill.config import TrainConfig
from vidistill.distill import DistillContext, create_distiller, method_params
from vidistill.distill.dpp import feature_kernel, greedy_map
from vidistill.distill.kd import kd_loss
from vidistill.distill.sakd import (
    SAKD,
    interrupt,
    interruption_rate,
    sakd_loss,
    selection_probability,
    transfer_ease,
    update_alpha,
)
from vidistill.errors import ConfigError
from vidistill.models import create_model
from vidistill.train import fit, save_model
from vidistill.train.loop import load_checkpoint

K, T, S = 3, 4, 32


class Clips(Dataset):
    """N random clips `(3, T, S, S)` with labels i mod K, as `ClipDataset` returns them."""

    def __init__(self, n: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rgb = torch.rand(n, 3, T, S, S, generator=g)
        self.y = torch.arange(n) % K

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"rgb": self.rgb[i], "label": int(self.y[i]), "index": i, "video_id": i}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    kw = dict(num_classes=K, frames=T, size=S)
    torch.manual_seed(1)
    return str(save_model(tmp_path_factory.mktemp("sakd") / "teacher.pt", create_model("r2plus1d_student", **kw),
                          name="r2plus1d_student", kwargs=kw, classes=list("abc")))


def _task(teacher: str, **params) -> SAKD:
    ctx = DistillContext(num_classes=K, classes=list("abc"), frames=T, size=S, teacher_rgb=teacher)
    torch.manual_seed(0)
    return create_distiller("sakd", create_model("r2plus1d_student", num_classes=K, frames=T, size=S), ctx, params)


def _cfg(epochs: int, batch: int = 4, **kw) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=batch, lr=0.01, warmup_epochs=0, device="cpu", **kw)


# ----------------------------------------------------------------------------------------------
# the equations, by hand


def test_eq3_to_6_on_the_four_sample_example():
    """ω = [0, 2, 1, 0] after 2 rounds, L̃ = [0.2, 0.8, 0.3, 0], α_prev = [0.1, 0.2, 0, 0], n = 5 of 10 epochs."""
    beta = interruption_rate(5, 10, 0.9)
    assert beta == pytest.approx(1 - 0.5**0.9) and beta == pytest.approx(0.46411, abs=1e-5)  # the brief rounds it to 0.46410
    p = selection_probability(torch.tensor([0, 2, 1, 0]), rounds=2, eps=1.0)
    torch.testing.assert_close(p, torch.tensor([1, 0.5, 2 / 3, 1], dtype=torch.float64))
    q = transfer_ease(torch.tensor([0.2, 0.8, 0.3, 0.0]), p)  # 1/ζ = [0.2, 0.4, 0.2, 0] / 0.4
    torch.testing.assert_close(q, torch.tensor([0.5, 1, 0.5, 0], dtype=torch.float64))
    alpha = update_alpha(torch.tensor([0.1, 0.2, 0.0, 0.0]), q, beta, lambda_=0.5)
    torch.testing.assert_close(alpha, torch.tensor([0.16603, 0.33206, 0.11603, 0.0]), atol=1e-5, rtol=0)
    assert alpha.dtype == torch.float32


def test_beta_is_one_based_and_reaches_one_at_the_last_epoch():
    assert interruption_rate(50, 50, 0.9) == 1.0
    assert 0 < interruption_rate(1, 50, 0.9) < 0.02
    # the switch to shuffling (β ≥ η = 0.5) at 50 epochs: n ≥ 50·(1 − 0.5^(1/0.9)) ≈ 26.9
    assert interruption_rate(26, 50, 0.9) < 0.5 <= interruption_rate(27, 50, 0.9)


def test_eq9_on_a_two_sample_batch():
    s = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    alpha = torch.tensor([0.25, 0.5])
    # CE: log(1 + e^-2) and log 2; KD at τ = 2: 4·(e − 1)/(e + 1) for sample 0 (see test_distill), 0 for sample 1
    ce = [math.log(1 + math.exp(-2)), math.log(2)]
    kd = [4 * (math.e - 1) / (math.e + 1), 0.0]
    expected = ((0.75 * ce[0] + 0.25 * kd[0]) + (0.5 * ce[1] + 0.5 * kd[1])) / 2
    assert float(sakd_loss(s, t, labels, alpha, tau=2.0)) == pytest.approx(expected, rel=1e-6)


def test_a_larger_interrupted_kd_loss_means_easier_larger_alpha_and_picked_first():
    """The paper's direction (sec. III-C): a larger L̃ is a *lower* difficulty ζ; with equal p it gets the larger α
    and, at γ = 1, is selected first."""
    kd = torch.tensor([0.1, 0.9, 0.5, 0.3])
    p = selection_probability(torch.zeros(4, dtype=torch.int64), rounds=3, eps=1.0)
    q = transfer_ease(kd, p)
    alpha = update_alpha(torch.zeros(4), q, 0.6, 0.5)
    assert alpha.argsort(descending=True).tolist() == [1, 2, 3, 0]
    kernel = feature_kernel(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    assert greedy_map(kernel, 2, quality=q, gamma=1.0).tolist() == [1, 2]
    # and a sample selected in every round so far is down-weighted (eq. 5): same L̃, half the p
    p2 = selection_probability(torch.tensor([3, 0, 0, 0]), rounds=3, eps=1.0)
    assert float(p2[0]) == pytest.approx(0.5) and float(p2[1]) == 1.0


# ----------------------------------------------------------------------------------------------
# the interruption


def test_dropout_zeroes_round_beta_t_frames_of_every_clip():
    x = torch.rand(5, 3, 8, 6, 6) + 0.1  # no frame is black to begin with
    out = interrupt(x, beta=0.3, eta=0.5, generator=torch.Generator().manual_seed(0))  # round(2.4) = 2 frames
    black = (out == 0).flatten(3).all(-1).all(1)  # (B, T)
    assert black.sum(1).tolist() == [2] * 5
    assert len({tuple(row.nonzero().flatten().tolist()) for row in black}) > 1  # each clip draws its own frames
    torch.testing.assert_close(out[~black.view(5, 1, 8, 1, 1).expand_as(x)], x[~black.view(5, 1, 8, 1, 1).expand_as(x)])
    assert torch.equal(interrupt(x, beta=0.05, eta=0.5, generator=torch.Generator()), x)  # round(0.4) = 0 frames


def test_a_dropped_frame_is_black_or_the_mean_colour_as_the_release():
    """Issue 26: `drop_fill: black` (default) is 0 in [0, 1] space, ≈ −1.8 after the models' normalisation;
    `mean` is the normalisation's mean colour, 0 after it, as the release zeroes frames of normalised clips."""
    from vidistill.models.base import RGB_MEAN, RGB_STD

    x = torch.rand(3, 3, 8, 4, 4) * 0.5 + 0.25  # no frame is black or the mean colour to begin with
    mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(RGB_STD).view(1, 3, 1, 1, 1)
    outs = {fill: interrupt(x, beta=0.3, eta=0.5, generator=torch.Generator().manual_seed(0), fill=fill)
            for fill in ("black", "mean")}
    dropped = (outs["black"] != x).flatten(3).any(-1).any(1)  # (B, T)
    assert dropped.sum(1).tolist() == [2, 2, 2]  # round(0.3·8), the same frames whatever the colour
    assert torch.equal((outs["mean"] != x).flatten(3).any(-1).any(1), dropped)
    frames = dropped.view(3, 1, 8, 1, 1).expand_as(x)
    normalised = {fill: (out - mean) / std for fill, out in outs.items()}
    assert bool((outs["black"][frames] == 0).all())
    assert float(normalised["mean"].masked_select(frames).abs().max()) < 1e-6  # 0 after normalisation
    black = normalised["black"].transpose(1, 2)[dropped]  # (6, 3, 4, 4): each channel at −mean/std
    torch.testing.assert_close(black.mean((0, 2, 3)), -torch.tensor(RGB_MEAN) / torch.tensor(RGB_STD))
    assert torch.equal(outs["mean"][~frames], x[~frames])
    assert method_params("sakd", None).drop_fill == "black"
    with pytest.raises(ConfigError, match="drop_fill must be one of black, mean"):
        method_params("sakd", {"drop_fill": "grey"})


def test_the_scoring_pass_drops_frames_to_the_chosen_colour(teacher):
    from vidistill.models.base import RGB_MEAN

    task = _task(teacher, score_batch=16, drop_fill="mean")
    task.setup(Clips(), epochs=4)
    seen = []
    task.teachers["rgb"].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    task.on_epoch_start(0)  # β(1) = 0.228, T = 4: one frame per clip
    frames = seen[0].transpose(1, 2).flatten(3)  # (16, T, 3, S·S)
    filled = (frames == torch.tensor(RGB_MEAN).view(1, 1, 3, 1)).all(-1).all(-1)  # (16, T)
    assert filled.sum(1).tolist() == [1] * 16


def test_alpha_scale_and_kd_weights_of_the_release():
    """`alpha_scale: code`: q min-max normalised, the first round's α = q (no β); `kd_weights: code`: the release's
    2·((1 − α)·0.1·CE + α·0.9·KD). Defaults: the paper text."""
    p = selection_probability(torch.zeros(4, dtype=torch.int64), rounds=0, eps=1.0)  # all 1
    kd = torch.tensor([0.2, 0.8, 0.4, 0.6])
    q_code = transfer_ease(kd, p, norm="minmax")  # (L̃ − 0.2)/0.6
    torch.testing.assert_close(q_code, torch.tensor([0.0, 1.0, 1 / 3, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(transfer_ease(kd, p), torch.tensor([0.25, 1.0, 0.5, 0.75], dtype=torch.float64))
    zero = torch.zeros(4)
    torch.testing.assert_close(update_alpha(zero, q_code, 0.1, 0.5, first=True, scale="code"), q_code.float())
    torch.testing.assert_close(update_alpha(zero, q_code, 0.1, 0.5, first=True), 0.05 * q_code.float())  # paper: β·q/2
    later = update_alpha(torch.full((4,), 0.4), q_code, 0.1, 0.1, scale="code")  # eq. 6 after the first round
    torch.testing.assert_close(later, (0.04 + 0.9 * 0.1 * q_code).float())
    s, t = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    labels, alpha = torch.tensor([0, 1]), torch.tensor([0.25, 0.5])
    ce = [math.log(1 + math.exp(-2)), math.log(2)]
    kdv = [4 * (math.e - 1) / (math.e + 1), 0.0]
    expected = 2 * ((0.75 * 0.1 * ce[0] + 0.25 * 0.9 * kdv[0]) + (0.5 * 0.1 * ce[1] + 0.5 * 0.9 * kdv[1])) / 2
    assert float(sakd_loss(s, t, labels, alpha, tau=2.0, weights=(0.2, 1.8))) == pytest.approx(expected, rel=1e-6)
    hp = method_params("sakd", None)
    assert (hp.alpha_scale, hp.kd_weights, hp.drop_fill) == ("paper", "paper", "black")
    for bad, match in (({"alpha_scale": "big"}, "alpha_scale must be one of paper, code"),
                       ({"kd_weights": "vanilla"}, "kd_weights must be one of paper, code")):
        with pytest.raises(ConfigError, match=match):
            method_params("sakd", bad)


def test_a_first_round_with_the_release_alpha_scale_sets_alpha_to_q(teacher):
    task = _task(teacher, r=0.25, alpha_scale="code", kd_weights="code")
    task.setup(Clips(), epochs=4)
    task.on_epoch_start(0)
    q = transfer_ease(task.kd_score, selection_probability(torch.zeros(16, dtype=torch.int64), 0, 1.0), norm="minmax")
    torch.testing.assert_close(task.alpha, q.float(), rtol=0, atol=0)
    assert float(task.alpha.max()) == 1.0 and float(task.alpha.min()) == 0.0
    batch = {"rgb": Clips().rgb[[1, 2]], "label": torch.tensor([1, 2]), "index": torch.tensor([1, 2])}
    task.train()
    out = task(batch)
    with torch.no_grad():
        t_logits, _ = task.teachers["rgb"](batch["rgb"])
    want = sakd_loss(out["logits"], t_logits, batch["label"], task.alpha[[1, 2]], tau=4.0, weights=(0.2, 1.8))
    assert float(out["loss"]) == pytest.approx(float(want), rel=1e-5)


def test_shuffling_moves_eta_of_the_batch_frames_across_clips():
    x = torch.rand(4, 3, 8, 6, 6)
    out = interrupt(x, beta=0.7, eta=0.5, generator=torch.Generator().manual_seed(0))  # 16 of 32 slots
    frames_in = x.transpose(1, 2).reshape(32, -1)
    frames_out = out.transpose(1, 2).reshape(32, -1)
    moved = [i for i in range(32) if not torch.equal(frames_in[i], frames_out[i])]
    assert 8 < len(moved) <= 16
    source = [int((frames_in == frames_out[i]).all(1).nonzero()) for i in range(32)]
    assert sorted(source) == list(range(32))  # a permutation of the batch's frames: nothing lost or invented
    assert any(source[i] // 8 != i // 8 for i in moved)  # frames cross clips


# ----------------------------------------------------------------------------------------------
# the scoring pass and the selection round


def test_scoring_leaves_student_weights_and_batchnorm_buffers_bit_identical(teacher):
    task = _task(teacher)
    task.setup(Clips(), epochs=4)
    task.train()
    before = {k: v.clone() for k, v in task.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in task.teachers.state_dict().items()}
    task.on_epoch_start(0)
    assert task.student.training and not task.teachers["rgb"].training
    for k, v in task.student.state_dict().items():
        assert torch.equal(v, before[k]), f"student {k} changed in the scoring pass"
    for k, v in task.teachers.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher {k} changed in the scoring pass"
    assert all(p.grad is None for p in task.student.parameters())
    assert float(task.kd_score.min()) > 0 and int(task.rounds) == 1
    # the same pass in train mode would have moved the BN statistics: the check above can fail
    task.student.train()
    with torch.no_grad():
        task.student(Clips()[0]["rgb"][None].repeat(2, 1, 1, 1, 1))
    assert any(not torch.equal(v, before[k]) for k, v in task.student.state_dict().items())


def test_the_hooked_feature_map_is_the_teachers_forward_map(teacher):
    task = _task(teacher)
    x = torch.stack([Clips()[i]["rgb"] for i in range(3)])
    with torch.no_grad():
        logits, fmap = task._teacher(x)
        torch.testing.assert_close(fmap, task.teachers["rgb"].forward_map(x), rtol=0, atol=0)
        torch.testing.assert_close(logits, task.teachers["rgb"](x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("epoch, mode", [(0, "dropout"), (2, "shuffle")])
def test_the_teacher_scores_the_interrupted_clip(teacher, epoch, mode):
    """4 epochs, T = 4: β(1) = 0.228 drops round(0.91) = 1 frame per clip; β(3) = 0.713 ≥ η shuffles 16 of 32 slots."""
    data = Clips()
    task = _task(teacher, score_batch=8)
    task.setup(data, epochs=4)
    seen = []
    task.teachers["rgb"].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    task.on_epoch_start(epoch)
    assert len(seen) == 2  # 16 clips in scoring batches of 8
    from vidistill.distill.sakd import _generator

    order = torch.randperm(16, generator=_generator(int(task.seed), epoch, 0))
    for b, x in enumerate(seen):
        clean = data.rgb[order[8 * b: 8 * b + 8]]
        if mode == "dropout":
            differs = (x != clean).flatten(3).any(-1).any(1)  # (8, T)
            assert differs.sum(1).tolist() == [1] * 8
            assert bool((x.transpose(1, 2)[differs] == 0).all())
        else:
            a, c = x.transpose(1, 2).reshape(32, -1), clean.transpose(1, 2).reshape(32, -1)
            moved = sum(not torch.equal(a[i], c[i]) for i in range(32))
            assert 0 < moved <= 16
            assert sorted(int((c == a[i]).all(1).nonzero()) for i in range(32)) == list(range(32))


def test_a_round_applies_eq5_to_eq8_to_its_own_state(teacher):
    """Round 2 from the state round 1 left: α, F̃ and the selection follow eq. 6, 7 and 8 exactly."""
    task = _task(teacher, r=0.25)
    task.setup(Clips(), epochs=4)
    task.on_epoch_start(0)
    first = task.selected.clone()
    assert first.unique().numel() == 4 and task.omega.sum() == 4 and task.omega[first].tolist() == [1] * 4
    alpha0, feats0, omega0 = task.alpha.clone(), task.features.clone(), task.omega.clone()
    kd, feats = task.score(1)  # deterministic: the round recomputes exactly this
    task.on_epoch_start(1)
    torch.testing.assert_close(task.kd_score, kd, rtol=0, atol=0)
    q = transfer_ease(kd, selection_probability(omega0, 1, 1.0))
    torch.testing.assert_close(task.alpha, update_alpha(alpha0, q, interruption_rate(2, 4, 0.9), 0.5), rtol=0, atol=0)
    torch.testing.assert_close(task.features, 0.5 * feats0 + 0.5 * feats, rtol=0, atol=0)
    want = greedy_map(feature_kernel(task.features, jitter=1e-6), 4, quality=q, gamma=0.5)
    assert task.selected.tolist() == want.tolist()
    assert int(task.rounds) == 2 and int(task.omega.sum()) == 8
    assert task.selections[:2].tolist() == [first.tolist(), want.tolist()] and (task.selections[2:] == -1).all()
    assert float(task.alpha.max()) < 1 and float(task.alpha.min()) >= 0


# ----------------------------------------------------------------------------------------------
# training on the subset


class Spy:
    """Records the sample indices and the teacher's inputs of every training step."""

    def __init__(self, task: SAKD) -> None:
        self.indices: dict[int, list[int]] = {}
        self.epoch = -1
        self.teacher_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.batch: dict | None = None
        forward, start = task.forward, task.on_epoch_start

        def on_epoch_start(epoch):
            self.batch = None  # the scoring pass's teacher calls are not training steps
            start(epoch)
            self.epoch = epoch

        def spy_forward(batch):
            self.indices.setdefault(self.epoch, []).extend(batch["index"].tolist())
            self.batch = batch
            return forward(batch)

        def teacher_hook(_m, args):
            if self.batch is not None:
                self.teacher_inputs.append((args[0].clone(), self.batch["index"].clone()))

        task.on_epoch_start, task.forward = on_epoch_start, spy_forward
        task.teachers["rgb"].register_forward_pre_hook(teacher_hook)


def test_each_epoch_trains_on_exactly_round_r_n_distinct_selected_clean_clips(teacher, tmp_path):
    data = Clips(20)
    task = _task(teacher, r=0.25)  # M = 5 of 20; batch 5: one step per epoch
    spy = Spy(task)
    history = fit(task, data, _cfg(3, batch=5, hflip=False), tmp_path, progress=False)
    assert sorted(spy.indices) == [0, 1, 2]
    for epoch, seen in spy.indices.items():
        assert len(seen) == 5 and len(set(seen)) == 5, seen
        assert sorted(seen) == sorted(task.selections[epoch].tolist())
    assert [h["samples"] for h in history] == [5, 5, 5]
    assert len({tuple(sorted(s)) for s in spy.indices.values()}) > 1  # the subset changes between rounds
    assert all(h["epoch_start_seconds"] > 0 for h in history) and {"beta", "alpha_selected", "kd_scored"} <= set(history[-1])
    # the training step's teacher input is the clean clip of the batch's samples
    assert spy.teacher_inputs
    for x, idx in spy.teacher_inputs:
        torch.testing.assert_close(x, data.rgb[idx], rtol=0, atol=0)


def test_the_training_loss_is_eq9_with_each_samples_alpha(teacher):
    task = _task(teacher)
    task.setup(Clips(), epochs=4)
    task.alpha = torch.linspace(0.05, 0.8, 16)
    batch = {"rgb": Clips().rgb[[3, 7, 11]], "label": Clips().y[[3, 7, 11]], "index": torch.tensor([3, 7, 11])}
    task.train()
    out = task(batch)
    t_logits, _ = task.teachers["rgb"](batch["rgb"])
    want = sakd_loss(out["logits"], t_logits, batch["label"], task.alpha[[3, 7, 11]], tau=4.0)
    assert float(out["loss"].detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert float(out["alpha"]) == pytest.approx(float(task.alpha[[3, 7, 11]].mean()))
    assert float(out["kd"]) == pytest.approx(float(kd_loss(out["logits"], t_logits, 4.0).mean()), rel=1e-6)


def test_resume_mid_run_gives_the_same_weights_and_selections(teacher, tmp_path):
    """3 epochs straight against 1 + 2 resumed, selecting every 2 epochs: the resumed run starts between two
    rounds (epoch 2 reuses round 1's subset and α from the checkpoint) and then runs a round (epoch 3)."""
    cfg = _cfg(3)

    def run(out, **kw):
        task = _task(teacher, r=0.25, select_every=2)
        return task, fit(task, Clips(), cfg, out, progress=False, **kw)

    full, hist_full = run(tmp_path / "full")
    run(tmp_path / "part", stop_after_epochs=1)
    state = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["task"]
    assert {"alpha", "omega", "features", "selected", "selections", "rounds", "seed"} <= set(state)
    resumed, hist_res = run(tmp_path / "part", resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{k} differs after resume")
    assert (full.selections >= 0).all() and int(full.rounds) == 2
    assert torch.equal(full.selections[0], full.selections[1]) and not torch.equal(full.selections[1], full.selections[2])
    assert [h["loss"] for h in hist_res] == [h["loss"] for h in hist_full]


def test_random_control_trains_kd_at_fixed_alpha_without_a_scoring_pass(teacher, tmp_path):
    task = _task(teacher, r=0.25, selection="random", adaptive_alpha=False, alpha=0.5)
    calls = []
    task.teachers["rgb"].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    task.setup(Clips(), epochs=2)
    task.on_epoch_start(0)
    assert calls == []  # no scoring pass: nothing needs it
    assert task.selected.unique().numel() == 4
    task.on_epoch_start(1)
    assert task.selections[0].tolist() != task.selections[1].tolist()
    task.train()
    batch = {"rgb": Clips().rgb[:4], "label": Clips().y[:4], "index": torch.arange(4)}
    out = task(batch)
    assert float(out["loss"]) == pytest.approx(0.5 * float(out["ce"]) + 0.5 * float(out["kd"]), rel=1e-5)
    history = fit(_task(teacher, r=0.25, selection="random", adaptive_alpha=False), Clips(), _cfg(2), tmp_path,
                  progress=False)
    assert [h["samples"] for h in history] == [4, 4]
    assert not {"kd_scored", "alpha_selected"} & set(history[-1])  # nothing scored, α fixed


def test_selection_size_is_round_r_n():
    from types import SimpleNamespace

    sizes = [SAKD.epoch_size(SimpleNamespace(params=method_params("sakd", {"r": r})), n)
             for r, n in ((0.1, 268), (0.1, 536), (0.1, 5), (0.25, 10), (0.1, 3), (1.0, 7))]
    assert sizes == [27, 54, 1, 3, 1, 7]  # round half up (0.5 -> 1), at least 1


@pytest.mark.parametrize("params, message", [
    ({"r": 0}, r"distill.methods.sakd.r must be in \(0, 1\], got 0"),
    ({"lambda_": 1}, r"distill.methods.sakd.lambda_ must be in \[0, 1\), got 1"),
    ({"gamma": -0.1}, r"distill.methods.sakd.gamma must be in \[0, 1\]"),
    ({"selection": "topk"}, r"distill.methods.sakd.selection must be one of dpp, random, got 'topk'"),
    ({"select_every": 0}, r"distill.methods.sakd.select_every must be >= 1"),
])
def test_bad_hyperparameters_are_refused(params, message):
    with pytest.raises(ConfigError, match=message):
        method_params("sakd", params)


def test_a_teacher_without_a_feature_map_is_refused_for_dpp_selection(tmp_path):
    kw = dict(num_classes=K, frames=T, size=S)
    path = save_model(tmp_path / "vit.pt", create_model("vit_video_tiny", **kw), name="vit_video_tiny", kwargs=kw,
                      classes=list("abc"))
    ctx = DistillContext(num_classes=K, classes=list("abc"), frames=T, size=S, teacher_rgb=str(path))
    student = create_model("r2plus1d_student", **kw)
    with pytest.raises(ConfigError, match="feature map before pooling.*selection=random"):
        create_distiller("sakd", student, ctx, {})
    create_distiller("sakd", student, ctx, {"selection": "random"})  # random selection needs no map


# ----------------------------------------------------------------------------------------------
# the method as the pipeline runs it


def test_params_yaml_holds_the_papers_defaults():
    import yaml

    entry = yaml.safe_load(Path(__file__).parents[1].joinpath("params.yaml").read_text())["distill"]["methods"]["sakd"]
    params = method_params("sakd", entry)
    assert (params.r, params.lambda_, params.eta, params.theta, params.eps, params.tau) == (0.1, 0.5, 0.5, 0.9, 1.0, 4.0)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, str]:
    """A prep output of 16 training clips (2 classes, 4x32x32) and a teacher file for it."""
    from test_distributed import _fake_prep_output

    root = tmp_path_factory.mktemp("sakd_clips")
    _fake_prep_output(root / "clips", size=S)
    kw = dict(num_classes=2, frames=T, size=S)
    torch.manual_seed(1)
    path = save_model(root / "teacher.pt", create_model("r2plus1d_student", **kw), name="r2plus1d_student", kwargs=kw,
                      classes=["left", "right"])
    return {"clips": str(root / "clips"), "teacher": str(path)}


def test_vidistill_distill_method_sakd_through_the_cli(clips, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("distill:\n  methods:\n    sakd: {r: 0.25, score_batch: 8}\n")
    out = tmp_path / "sakd"
    assert cli.main(["distill", "--method", "sakd", "--clips", clips["clips"], "--teacher-rgb", clips["teacher"],
                     "--out", str(out), "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--quiet",
                     "--params", str(params), "--no-track"]) == 0
    assert "distill (sakd): top1" in capsys.readouterr().out
    history = json.loads((out / "history.json").read_text())
    assert [h["samples"] for h in history] == [4, 4]  # round(0.25 · 16)
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["steps_per_epoch"] == 1 and ckpt["task"]["selections"].shape == (2, 4)
    assert not any(k.startswith("teachers.") for k in ckpt["task"])
    assert load_checkpoint(out / "model.pt")["name"] == "r2plus1d_student"


# ----------------------------------------------------------------------------------------------
# two processes


WORKER = Path(__file__).with_name("sakd_ddp_worker.py")


@pytest.mark.slow
def test_sakd_under_two_processes_scores_shards_and_selects_once(clips, tmp_path):
    """torchrun with 2 gloo processes against 1 process: each rank scores half of the scoring batches, every
    rank ends with the same per-sample state, and round 1 (same initial weights in both runs) selects the same
    samples with the same α as the single process."""
    from sakd_ddp_worker import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same kernels, so the same floating-point sums
    try:
        single = run(clips["clips"], clips["teacher"], tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), clips["clips"], clips["teacher"], str(tmp_path / "ddp")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    # the 16 clips in scoring batches of 6, 6 and 4: rank 0 scores batches 0 and 2, rank 1 batch 1
    assert [r["scored"] for r in ranks] == [[10, 10], [6, 6]] and single["scored"] == [16, 16]
    # α, ω, L̃, F̃ and the selection, right after each round (before the epoch-end buffer sync): the same on every rank
    assert ranks[0]["state_after_round"] == ranks[1]["state_after_round"]
    assert ranks[0]["selections"][0] == single["selections"][0]
    assert ranks[0]["alpha_round1"] == single["alpha_round1"]
    assert min(single["alpha_round1"]) >= 0 and max(single["alpha_round1"]) > 0
