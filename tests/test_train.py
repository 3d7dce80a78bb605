"""Training loop: determinism, resume equivalence, atomic checkpoints, validation."""

import torch
from torch import nn
from torch.utils.data import Dataset

import pytest

from vidistill.config import TrainConfig
from vidistill.train import Supervised, fit
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
