"""SD as the paper states it: eq. 2 over the feature map before pooling (hand-computed), the head never
copied from the source model, SGD momentum 0.9 without Nesterov or clipping at the paper's lr as the
method's own training settings, and the paper's λ sweep through `bench methods`."""

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


@pytest.mark.parametrize("features", ["map", "pooled"])
def test_the_sd_term_of_a_step_is_the_hand_computed_distance_to_the_snapshot(source, features):
    task = create_distiller("sd", create_model("r2plus1d_student", num_classes=K, frames=T, size=S), _ctx(source),
                            {"lambda_": 10.0, "features": features})
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
        by_hand = float(((fs - ft) ** 2).flatten(1).sum(1).mean())
    assert by_hand > 1e-4
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
    train = TrainConfig(lr=3e-3, optimizer="adamw", grad_clip=5.0, epochs=7, weight_decay=1e-4)
    sd = get_method("sd")
    cfg = sd.train_config(method_params("sd", None), train)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.grad_clip) == ("sgd", 0.1, 0.9, False, 0.0)
    assert (cfg.epochs, cfg.weight_decay) == (7, 1e-4)  # the rest stays distill.train's
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


def test_the_paper_lambda_sweep_through_bench_methods():
    kw = bench_overrides(bench_methods, ["methods=sd", "sweep.sd.lambda=0,0.1,1,10,100,1000"])
    jobs = method_jobs(list(kw["methods"]), kw["sweep"])
    assert [hp["lambda_"] for _, _, hp in jobs] == [0.0, 0.1, 1.0, 10.0, 100.0, 1000.0]
    assert [label for label, _, _ in jobs][:2] == ["sd (lambda_=0)", "sd (lambda_=0.1)"]
    kw = bench_overrides(bench_methods, ["methods=sd", "sweep.sd.lambda_=100", "sweep.sd.features=map,pooled"])
    assert [hp for _, _, hp in method_jobs(list(kw["methods"]), kw["sweep"])] == [
        {"lambda_": 100.0, "features": "map"}, {"lambda_": 100.0, "features": "pooled"}]
