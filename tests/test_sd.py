"""SD as the paper states it: eq. 2 over the feature map before pooling (hand-computed, in the paper's λ units:
mean over the map's elements, and in the literal sum), the head never copied from the source model, SGD momentum
0.9 without Nesterov or clipping at the paper's lr and RSPNet's weight decay as the method's own training
settings, every labelled video on request, and the paper's λ sweep through `bench methods`."""

from __future__ import annotations

import pytest
import torch

from vidistill import stages
from vidistill.benchmarks import bench_overrides
from vidistill.benchmarks.methods import bench_methods, method_jobs
from vidistill.config import DistillConfig, PrepConfig, SynthConfig, TrainConfig
from vidistill.data import ClipDataset
from vidistill.distill import DistillContext, create_distiller, get_method, method_params
from vidistill.distill.sd import encode, sd_loss
from vidistill.errors import ConfigError
from vidistill.models import create_model
from vidistill.train import load_model, save_model
from vidistill.train.loop import build_optimizer, load_checkpoint

K, T, S = 3, 4, 32


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 'pre-trained' encoder file whose head has the student's shape (the case a shape test would copy)."""
    torch.manual_seed(1)
    kw = dict(num_classes=K, frames=T, size=S)
    model = create_model("r2plus1d_student", **kw)
    with torch.no_grad():  # a source head unlike any fresh initialisation
        model.head.weight.fill_(0.25)
        model.head.bias.fill_(0.5)
    return str(save_model(tmp_path_factory.mktemp("sd") / "pre.pt", model,
                          name="r2plus1d_student", kwargs=kw, classes=list("abc")))


def _ctx(pretrained):
    return DistillContext(num_classes=K, classes=list("abc"), frames=T, size=S, pretrained=pretrained)


def _rgb(n=4, seed=0):
    return torch.rand(n, 3, T, S, S, generator=torch.Generator().manual_seed(seed))


def test_sd_term_over_a_feature_map_by_hand():
    s = torch.tensor([[[[[1.0, 2.0]]], [[[3.0, 4.0]]]], [[[[0.0, 0.0]]], [[[0.0, 0.0]]]]])  # (B=2, D=2, T'=1, H'=1, W'=2)
    t = torch.tensor([[[[[0.0, 0.0]]], [[[0.0, 0.0]]]], [[[[1.0, 1.0]]], [[[1.0, -1.0]]]]])
    assert sd_loss(s, t).tolist() == [30.0, 4.0]  # 1 + 4 + 9 + 16 ; 1 + 1 + 1 + 1
    # the pooled reading of the same maps is a different number: the parameter matters
    assert sd_loss(s.mean((2, 3, 4)), t.mean((2, 3, 4))).tolist() == [2.25 + 12.25, 1.0 + 0.0]


def test_sd_term_in_the_paper_units_by_hand():
    """Issue 26: eq. 2 mean-reduced over the map's elements, the units of the paper's λ grid (0.1 ... 1000)."""
    s = torch.tensor([[[[[1.0, 2.0]]], [[[3.0, 4.0]]]], [[[[0.0, 0.0]]], [[[0.0, 0.0]]]]])  # (B=2, D=2, T'=1, H'=1, W'=2)
    t = torch.tensor([[[[[0.0, 0.0]]], [[[0.0, 0.0]]]], [[[[1.0, 1.0]]], [[[1.0, -1.0]]]]])
    assert sd_loss(s, t, "mean").tolist() == [7.5, 1.0]  # (1 + 4 + 9 + 16) / 4 ; (1 + 1 + 1 + 1) / 4
    assert sd_loss(s, t, "sum").tolist() == [30.0, 4.0]
    assert method_params("sd", None).reduction == "mean" and method_params("sd", None).lambda_ == 100.0
    with pytest.raises(ConfigError, match="reduction must be one of mean, sum"):
        method_params("sd", {"reduction": "max"})


def test_the_default_sd_step_is_lambda_times_the_mean_squared_error_of_the_map(source):
    """A whole step at the defaults (λ = 100, mean units) against a hand computation with nn.MSELoss semantics."""
    task = create_distiller("sd", create_model("r2plus1d_student", num_classes=K, frames=T, size=S), _ctx(source), {})
    task.on_epoch_start(0)
    with torch.no_grad():
        next(task.student.stages[-1].parameters()).add_(0.05)
    task.train()
    x = _rgb()
    out = task({"rgb": x, "label": torch.tensor([0, 1, 2, 0])})
    with torch.no_grad():
        fs, ft = task.student.forward_map(x), task.teachers["snapshot"].forward_map(x)
        mse = float(torch.nn.functional.mse_loss(fs, ft))  # mean over B and every element of the map
    assert mse > 1e-6
    assert float(out["sd"].detach()) == pytest.approx(mse, rel=1e-4)
    assert float(out["loss"].detach()) == pytest.approx(float(out["ce"].detach()) + 100.0 * mse, rel=1e-4)


@pytest.mark.parametrize("features", ["map", "pooled"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_sd_term_of_a_step_is_the_hand_computed_distance_to_the_snapshot(source, features, reduction):
    task = create_distiller("sd", create_model("r2plus1d_student", num_classes=K, frames=T, size=S), _ctx(source),
                            {"lambda_": 10.0, "features": features, "reduction": reduction})
    task.on_epoch_start(0)
    with torch.no_grad():  # the student moves away from its snapshot
        next(task.student.stages[-1].parameters()).add_(0.05)
    task.train()
    x = _rgb()
    out = task({"rgb": x, "label": torch.tensor([0, 1, 2, 0])})
    with torch.no_grad():
        fs, ft = task.student.forward_map(x), task.teachers["snapshot"].forward_map(x)  # (B, D, T', H', W')
        if features == "pooled":
            fs, ft = fs.mean((2, 3, 4)), ft.mean((2, 3, 4))
        squared = ((fs - ft) ** 2).flatten(1)
        by_hand = float((squared.mean(1) if reduction == "mean" else squared.sum(1)).mean())
    assert by_hand > 1e-6
    assert float(out["sd"].detach()) == pytest.approx(by_hand, rel=1e-4)
    assert float(out["loss"].detach()) == pytest.approx(float(out["ce"].detach()) + 10.0 * by_hand, rel=1e-4)


def test_encode_reads_the_model_own_logits(source):
    model = create_model("r2plus1d_student", num_classes=K, frames=T, size=S).eval()
    x = _rgb()
    logits, fmap = encode(model, x, "map")
    ref_logits, ref_feats = model(x)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(fmap.mean((2, 3, 4)), ref_feats)
    assert fmap.dim() == 5


def test_the_head_is_never_copied_from_the_source(source):
    torch.manual_seed(0)
    student = create_model("r2plus1d_student", num_classes=K, frames=T, size=S)
    fresh_head = {k: v.clone() for k, v in student.head.state_dict().items()}
    task = create_distiller("sd", student, _ctx(source))
    pre, _ = load_model(source)
    assert pre.head.weight.shape == student.head.weight.shape  # a shape match alone would have copied it
    assert {"head.weight", "head.bias"} <= set(task.fresh)
    for k, v in student.head.state_dict().items():
        torch.testing.assert_close(v, fresh_head[k], rtol=0, atol=0)
        assert not torch.equal(v, pre.head.state_dict()[k])
    for (k, a), b in zip(student.state_dict().items(), pre.state_dict().values()):
        if not k.startswith("head."):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"encoder weight {k} not loaded")


def test_the_paper_optimiser_is_the_method_own_training_setting():
    train = TrainConfig(lr=3e-3, optimizer="adamw", grad_clip=5.0, epochs=7, weight_decay=5e-4)
    sd = get_method("sd")
    cfg = sd.train_config(method_params("sd", None), train)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.grad_clip) == ("sgd", 0.1, 0.9, False, 0.0)
    assert cfg.weight_decay == 1e-4  # RSPNet's fine-tuning recipe, not distill.train's 5e-4
    assert cfg.epochs == 7  # the rest stays distill.train's
    assert sd.train_config(method_params("sd", {"weight_decay": 0.0}), train).weight_decay == 0.0
    opt = build_optimizer(torch.nn.Linear(2, 2).parameters(), cfg)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["nesterov"] is False
    assert sd.train_config(method_params("sd", {"optimizer": "train"}), train) is train
    assert sd.train_config(method_params("sd", {"lr": 0.005}), train).lr == 0.005  # the paper's C3D value
    assert train.optimizer == "adamw" and build_optimizer(torch.nn.Linear(2, 2).parameters(),
                                                          TrainConfig(optimizer="sgd")).param_groups[0]["nesterov"]
    for bad, match in (({"optimizer": "adam"}, "optimizer must be one of paper, train"),
                       ({"features": "tokens"}, "features must be one of map, pooled"), ({"lr": 0}, "lr must be > 0")):
        with pytest.raises(ConfigError, match=match):
            method_params("sd", bad)


def test_distill_stage_trains_sd_with_its_own_optimiser(tmp_path):
    synth = SynthConfig(out=str(tmp_path / "raw"), videos_per_class=2, frames=8, width=48, height=36, seed=0)
    prep = PrepConfig(dataset="synthetic", root=synth.out, out=str(tmp_path / "clips"), frames=4, stride=2, short_side=32,
                      crop=32, synth=synth, test_fraction=0.5)
    stages.prep(prep, progress=False, track=False)
    train = ClipDataset(prep.out, "train")
    kw = {"num_classes": train.num_classes, "frames": train.frames, "size": train.size}
    torch.manual_seed(0)
    pre = save_model(tmp_path / "pre.pt", create_model("r2plus1d_student", **kw), name="r2plus1d_student", kwargs=kw,
                     classes=train.classes)
    cfg = DistillConfig(clips=prep.out, out=str(tmp_path / "sd"), method="sd", pretrained=str(pre),
                        methods={"sd": {"lambda_": 1.0}},
                        train=TrainConfig(epochs=1, batch_size=4, lr=3e-3, warmup_epochs=0, device="cpu"))
    stages.distill(cfg, progress=False, track=False)
    group = load_checkpoint(tmp_path / "sd" / "checkpoints" / "last.pt")["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["nesterov"], group["initial_lr"]) == (0.9, False, 0.1)
    assert "dampening" in group  # torch.optim.SGD's state, not AdamW's
    assert group["weight_decay"] == 1e-4


def test_labelled_all_trains_on_every_labelled_video(source, tmp_path):
    """`labelled: all`: every labelled video of the training split counts in an epoch, whatever
    `student_videos_per_class` keeps for the other students."""
    synth = SynthConfig(out=str(tmp_path / "raw"), videos_per_class=3, frames=8, width=48, height=36, seed=0)
    prep = PrepConfig(dataset="synthetic", root=synth.out, out=str(tmp_path / "clips"), frames=T, stride=2,
                      short_side=S, crop=S, synth=synth, test_fraction=0.34)
    stages.prep(prep, progress=False, track=False)
    every, subset = ClipDataset(prep.out, "train"), ClipDataset(prep.out, "train", videos_per_class=1)
    assert len(subset) < len(every)
    ctx = DistillContext(num_classes=every.num_classes, classes=every.classes, frames=T, size=S, pretrained=source)
    student = lambda: create_model("r2plus1d_student", num_classes=every.num_classes, frames=T, size=S)  # noqa: E731
    assert create_distiller("sd", student(), ctx, {}).train_dataset(subset) is subset  # default: the students' subset
    chosen = create_distiller("sd", student(), ctx, {"labelled": "all"}).train_dataset(subset)
    assert len(chosen) == len(every) and list(chosen.video_ids) == list(every.video_ids)
    with pytest.raises(ConfigError, match="labelled must be one of subset, all"):
        method_params("sd", {"labelled": "some"})


def test_the_paper_lambda_sweep_through_bench_methods():
    kw = bench_overrides(bench_methods, ["methods=sd", "sweep.sd.lambda=0,0.1,1,10,100,1000"])
    jobs = method_jobs(list(kw["methods"]), kw["sweep"])
    assert [hp["lambda_"] for _, _, hp in jobs] == [0.0, 0.1, 1.0, 10.0, 100.0, 1000.0]
    assert [label for label, _, _ in jobs][:2] == ["sd (lambda_=0)", "sd (lambda_=0.1)"]
    kw = bench_overrides(bench_methods, ["methods=sd", "sweep.sd.lambda_=100", "sweep.sd.features=map,pooled"])
    assert [hp for _, _, hp in method_jobs(list(kw["methods"]), kw["sweep"])] == [
        {"lambda_": 100.0, "features": "map"}, {"lambda_": 100.0, "features": "pooled"}]
