"""Training loop: determinism, resume equivalence, atomic checkpoints, validation."""

import torch
from torch import nn
from torch.utils.data import Dataset

import pytest

from vidistill.config import TrainConfig
from vidistill.train import Supervised, TrainTask, fit
from vidistill.train.loop import EpochPermutation, cosine_lambda, load_checkpoint


class TinyClips(Dataset):
    """Learnable toy clips: the class is the sign of the mean temporal difference."""

    def __init__(self, n: int = 40, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 4, 8, 8, generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)
        ramp = torch.linspace(-0.3, 0.3, 4).view(1, 4, 1, 1)
        self.x += torch.where(self.y.view(-1, 1, 1, 1, 1) == 1, ramp, -ramp)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"rgb": self.x[i], "label": int(self.y[i]), "index": i, "video_id": i}


class TinyNet(nn.Module):
    modality = "rgb"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.2)  # exercises the RNG state across resume
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        f = self.drop(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))
        return self.fc(f), f


def _cfg(**kw):
    base = dict(epochs=4, batch_size=8, lr=0.05, warmup_epochs=1, seed=3, device="cpu", hflip=True)
    base.update(kw)
    return TrainConfig(**base)


def _train(out, *, resume=False, stop=None, seed=3, epochs=4):
    torch.manual_seed(seed)
    model = TinyNet()
    hist = fit(Supervised(model), TinyClips(), _cfg(seed=seed, epochs=epochs), out, resume=resume, progress=False, stop_after_epochs=stop)
    return model, hist


def test_resume_reaches_same_weights_as_uninterrupted(tmp_path):
    full, hist_full = _train(tmp_path / "a")
    part, hist_part = _train(tmp_path / "b", stop=2)
    assert len(hist_part) == 2
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["epoch"] == 1
    resumed, hist_res = _train(tmp_path / "b", resume=True)  # a fresh process would rebuild the model too
    assert len(hist_res) == 4
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{k} differs after resume")
    assert [h["loss"] for h in hist_res] == pytest.approx([h["loss"] for h in hist_full], abs=0)
    # and a different seed really gives different weights (the comparison above can fail)
    other, _ = _train(tmp_path / "c", seed=4)
    assert not torch.equal(other.fc.weight, full.fc.weight)


def test_training_learns_and_writes_history(tmp_path):
    _, hist = _train(tmp_path, epochs=15)
    assert hist[-1]["train_acc"] > 0.8
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert (tmp_path / "history.json").exists()
    assert not list((tmp_path / "checkpoints").glob("*.tmp*"))


def test_resume_refuses_changed_parameters(tmp_path):
    _train(tmp_path, stop=1)
    with pytest.raises(ValueError, match="lr"):
        fit(Supervised(TinyNet()), TinyClips(), _cfg(lr=0.1), tmp_path, resume=True, progress=False)


def test_epoch_permutation_depends_only_on_seed_and_epoch():
    a, b = EpochPermutation(10, seed=1), EpochPermutation(10, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and sorted(a) == list(range(10))
    b.set_epoch(4)
    assert list(a) != list(b)
    shards = [list(EpochPermutation(10, seed=1, rank=r, world=3)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and set(sum(shards, [])) == set(range(10))


def test_cosine_schedule_shape():
    f = cosine_lambda(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=1e-6) and f(100) == pytest.approx(0.0, abs=1e-9)


def test_bad_training_parameters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        fit(Supervised(TinyNet()), TinyClips(), _cfg(batch_size=0), tmp_path, progress=False)
    with pytest.raises(ValueError, match="empty"):
        fit(Supervised(TinyNet()), TinyClips(n=0), _cfg(), tmp_path, progress=False)


# ----------------------------------------------------------------------------------------------
# the training seams: per-epoch subsets chosen from per-sample state, pretext tasks without logits


class SelectingTask(Supervised):
    """Trains on 10 % of the samples per epoch, chosen in `on_epoch_start` from per-sample state, as SAKD does.

    `setup` sizes the per-sample buffer `times_picked` (checkpointed, so resume restores it); the
    hook scores every sample with a no-grad pass of the student in eval mode (`scan`) and picks the
    least-picked samples, ties broken by the highest loss. `trained` records the indices each
    training forward sees, `picked` what the hook chose, per epoch.
    """

    def __init__(self, model, *, keep: float = 0.1):
        super().__init__(model)
        self.keep = keep
        self.register_buffer("times_picked", torch.zeros(0, dtype=torch.long))
        self.trained: dict[int, list[int]] = {}
        self.picked: dict[int, list[int]] = {}
        self.seen_setup: dict = {}

    def setup(self, train_set, *, epochs):
        self.train_set = train_set
        self.seen_setup = {"n": len(train_set), "epochs": epochs}
        self.times_picked = torch.zeros(len(train_set), dtype=torch.long)

    def epoch_size(self, num_samples):
        return round(self.keep * num_samples)

    def on_epoch_start(self, epoch):
        from vidistill.train import scan

        self.epoch = epoch
        self.student.eval()
        losses = torch.empty(len(self.train_set))
        with torch.no_grad():
            for batch in scan(self.train_set, batch_size=16):
                logits, _ = self.student(batch["rgb"])
                losses[batch["index"]] = nn.functional.cross_entropy(logits, batch["label"], reduction="none")
        # least picked first, then highest loss
        order = sorted(range(len(losses)), key=lambda i: (int(self.times_picked[i]), -float(losses[i])))
        chosen = sorted(order[: self.epoch_size(len(losses))])
        self.times_picked[chosen] += 1
        self.picked[epoch] = chosen

    def epoch_indices(self, epoch):
        return self.picked[epoch]

    def forward(self, batch):
        self.trained.setdefault(self.epoch, []).extend(batch["index"].tolist())
        return super().forward(batch)


def _select(out, *, resume=False, stop=None, epochs=4):
    torch.manual_seed(3)
    task = SelectingTask(TinyNet())
    cfg = _cfg(epochs=epochs, batch_size=2, warmup_epochs=0)
    hist = fit(task, TinyClips(n=40), cfg, out, resume=resume, progress=False, stop_after_epochs=stop)
    return task, hist


def test_a_task_keeping_ten_percent_trains_on_exactly_those_and_resumes_bit_exact(tmp_path):
    full, hist_full = _select(tmp_path / "a")
    assert full.seen_setup == {"n": 40, "epochs": 4}
    for epoch in range(4):
        assert len(full.picked[epoch]) == 4
        assert sorted(full.trained[epoch]) == full.picked[epoch], f"epoch {epoch}: trained on other samples"
    assert len({tuple(p) for p in full.picked.values()}) == 4  # the selection really moves between epochs
    assert [h["samples"] for h in hist_full] == [4] * 4
    assert all(h["epoch_start_seconds"] > 0 and h["epoch_seconds"] > h["epoch_start_seconds"] for h in hist_full)
    # the LR schedule counts 2 steps per epoch (4 samples, batch 2), not 20: cosine reaches 0 at the last step
    state = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    assert state["scheduler"]["last_epoch"] == 4 * 2 and state["steps_per_epoch"] == 2
    assert hist_full[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert torch.equal(state["task"]["times_picked"], full.times_picked)  # per-sample state is checkpointed

    part, _ = _select(tmp_path / "b", stop=2)
    resumed, hist_res = _select(tmp_path / "b", resume=True)  # a fresh task, as a new process builds it
    assert sorted(resumed.picked) == [2, 3]
    assert {e: resumed.picked[e] for e in (2, 3)} == {e: full.picked[e] for e in (2, 3)}
    assert torch.equal(resumed.times_picked, full.times_picked)
    for (k, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{k} differs after resume")
    assert [h["loss"] for h in hist_res] == [h["loss"] for h in hist_full]


def test_a_task_breaking_its_epoch_size_is_refused(tmp_path):
    class Liar(SelectingTask):
        def epoch_indices(self, epoch):
            return self.picked[epoch][:-1]

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="returned 3 indices but epoch_size\\(\\) declared 4"):
        fit(Liar(TinyNet()), TinyClips(n=40), _cfg(batch_size=2), tmp_path, progress=False)


def test_epoch_permutation_of_a_subset_is_deterministic_and_sharded():
    subset = [5, 1, 17, 9, 30, 2]
    a = EpochPermutation(40, seed=1, size=6)
    a.set_epoch(2, subset)
    b = EpochPermutation(40, seed=1, size=6)
    b.set_epoch(2, list(reversed(subset)))
    assert sorted(a) == sorted(subset) and len(a) == 6
    assert list(a) != list(b)  # the order follows the given indices through a fixed permutation
    first = list(a)
    a.set_epoch(2, subset)
    assert list(a) == first
    shards = []
    for rank in range(4):
        s = EpochPermutation(40, seed=1, rank=rank, world=4, size=6)
        s.set_epoch(2, subset)
        shards.append(list(s))
    assert [len(s) for s in shards] == [2, 2, 2, 2]  # 6 padded to 8
    assert set(sum(shards, [])) == set(subset)
    with pytest.raises(ValueError, match="outside"):
        a.set_epoch(3, [0, 1, 2, 3, 4, 40])
    with pytest.raises(ValueError, match="returned None"):
        a.set_epoch(3, None)


class Reconstruction(TrainTask):
    """A pretext task: an auto-encoder of the clip; no labels read, no logits returned, an own metric."""

    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(nn.Conv3d(3, 2, 1), nn.Dropout(0.1))
        self.decoder = nn.Conv3d(2, 3, 1)  # an extra trainable module, checkpointed with the student

    def forward(self, batch):
        x = batch["rgb"]
        recon = nn.functional.mse_loss(self.decoder(self.student(x)), x)
        return {"loss": recon, "recon": recon}

    def on_epoch_end(self, epoch):
        self.eval()  # the loop sets train mode again before the next epoch
        with torch.no_grad():
            return {"held_out_recon": float(self(
                {"rgb": TinyClips(n=4, seed=9).x})["recon"])}


class Unlabelled(TinyClips):
    def __getitem__(self, i):
        return {"rgb": self.x[i], "index": i}


def _pretext(out, *, resume=False, stop=None):
    torch.manual_seed(0)
    task = Reconstruction()
    return task, fit(task, Unlabelled(), _cfg(hflip=False), out, resume=resume, progress=False, stop_after_epochs=stop)


def test_a_pretext_task_without_logits_trains_checkpoints_and_resumes(tmp_path):
    full, hist = _pretext(tmp_path / "a")
    assert "train_acc" not in hist[0] and {"loss", "recon", "held_out_recon"} <= set(hist[0])
    assert hist[-1]["recon"] < hist[0]["recon"] and hist[-1]["held_out_recon"] < hist[0]["held_out_recon"]
    assert any(k.startswith("decoder.") for k in load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["task"])
    _pretext(tmp_path / "b", stop=2)
    resumed, hist_res = _pretext(tmp_path / "b", resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{k} differs after resume")
    assert [h["held_out_recon"] for h in hist_res] == [h["held_out_recon"] for h in hist]
