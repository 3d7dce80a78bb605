"""Distillation core: registry, losses against hand-computed values, teacher handling, SD snapshots, D3D inputs.

Tests parametrized over `list_methods()` cover every registered method, the out-of-tree `toy` of
`tests/plugins/` included (see `tests/conftest.py`).
"""

import math

import pytest
import torch
from torch.utils.data import Dataset

from helpers_jedi import tiny_experts
from vidistill.config import ConfigError, TrainConfig
from vidistill.distill import DistillContext, create_distiller, get_method, list_methods, method_params, weighted_mean
from vidistill.distill.d3d import d3d_loss
from vidistill.distill.kd import kd_loss
from vidistill.distill.sd import sd_loss
from vidistill.models import create_model
from vidistill.train import fit, load_model, save_model, supervised_loss
from vidistill.train.loop import hflip_batch, load_checkpoint

K, T, S = 3, 4, 32


class Clips(Dataset):
    def __init__(self, n=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rgb = torch.rand(n, 3, T, S, S, generator=g)
        self.flow = torch.randn(n, 2, T - 1, S, S, generator=g) * 3
        self.y = torch.arange(n) % K

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"rgb": self.rgb[i], "flow": self.flow[i], "label": int(self.y[i]), "index": i, "video_id": i}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    paths = {}
    for modality in ("rgb", "flow"):
        torch.manual_seed(1)
        kw = dict(num_classes=K, frames=T, size=S, modality=modality)
        paths[modality] = str(save_model(d / f"{modality}.pt", create_model("r2plus1d_student", **kw),
                                         name="r2plus1d_student", kwargs=kw, classes=list("abc")))
    vit = create_model("vit_video_tiny", num_classes=K, frames=T, size=S)  # what `teach --pretext mvd` saves
    paths["mvd"] = str(save_model(d / "mvd.pt", vit, classes=list("abc"), extra={"pretext": "mvd"}))
    paths["experts"] = str(tiny_experts(d / "experts", frames=T, size=S)[0])  # multi-dataset methods (jedi)
    return paths


def _ctx(teachers, **kw):
    return DistillContext(num_classes=K, classes=list("abc"), frames=T, size=S, teacher_rgb=teachers["rgb"],
                          teacher_flow=teachers["flow"], pretrained=teachers["rgb"], mvd_encoder=teachers["mvd"],
                          experts=teachers["experts"], **kw)


def _student():
    return create_model("r2plus1d_student", num_classes=K, frames=T, size=S)


def _task(method, teachers, params=None, **ctx_kw):
    """Method `method` around the student it declares (`build_student`), as `vidistill distill` builds it."""
    cls = get_method(method)
    ctx = _ctx(teachers, **ctx_kw)
    hp = method_params(method, params)
    torch.manual_seed(0)
    return cls(cls.build_student(hp, ctx, default="r2plus1d_student"), hp, ctx)


def _batch(n=4):
    ds = Clips()
    items = [ds[i] for i in range(n)]
    return {"rgb": torch.stack([i["rgb"] for i in items]), "flow": torch.stack([i["flow"] for i in items]),
            "label": torch.tensor([i["label"] for i in items]), "index": torch.arange(n)}


def test_registry_lists_methods_and_refuses_unknown(teachers):
    assert {"kd", "d3d", "sd", "none"} <= set(list_methods())
    with pytest.raises(ConfigError, match="valid methods: .*d3d.*toy"):
        create_distiller("d4d", _student(), _ctx(teachers))


def test_missing_teacher_is_named(teachers):
    ctx = _ctx(teachers)
    ctx.teacher_flow = ""
    with pytest.raises(ConfigError, match="teacher_flow.*--modality flow"):
        create_distiller("d3d", _student(), ctx)


def test_kd_loss_by_hand():
    s = torch.tensor([[2.0, 0.0]])
    t = torch.tensor([[0.0, 2.0]])
    tau = 2.0
    ps = torch.softmax(s / tau, 1)[0]
    pt = torch.softmax(t / tau, 1)[0]
    expected = tau**2 * float((pt * (pt.log() - ps.log())).sum())
    # by hand: p_s = (e, 1)/(e+1), p_t = (1, e)/(e+1); KL = -1/(e+1) + e/(e+1) = (e-1)/(e+1); times tau^2
    assert expected == pytest.approx(4 * (math.e - 1) / (math.e + 1), rel=1e-6)
    assert float(kd_loss(s, t, tau)[0]) == pytest.approx(expected, rel=1e-6)
    assert float(kd_loss(t, t, tau)[0]) == pytest.approx(0.0, abs=1e-7)


def test_d3d_and_sd_losses_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert d3d_loss(s, t).tolist() == [13.0, 3.0]  # 0 + 4 + 9 ; 1 + 1 + 1
    assert sd_loss(s, t).tolist() == [13.0, 3.0]
    assert float(weighted_mean(torch.tensor([13.0, 3.0]))) == 8.0
    assert float(weighted_mean(torch.tensor([13.0, 3.0]), torch.tensor([1.0, 0.0]))) == 6.5


def test_registry_holds_builtin_and_plugin_methods():
    assert {"kd", "d3d", "sd", "none", "toy"} <= set(list_methods())  # toy: tests/plugins, an entry point


@pytest.mark.parametrize("method", list_methods())
def test_step_returns_terms_and_teachers_stay_frozen(method, teachers):
    task = _task(method, teachers)
    task.on_epoch_start(0)
    task.train()
    out = task(_batch())
    assert {"loss", "logits"} <= set(out) and out["logits"].shape == (4, K)
    assert len(out) >= 3 or method == "none"
    out["loss"].backward()
    for name, t in task.teachers.items():
        assert not t.training, f"teacher {name} left eval mode"
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    student_ids = {id(p) for p in task.student.parameters()}
    trainable = {id(p) for p in task.trainable_parameters()}
    assert student_ids <= trainable and not trainable & {id(p) for p in task.teachers.parameters()}
    assert all(p.grad is not None for p in task.student.parameters())
    exported = task.export_model()
    logits, features = exported.eval()(_batch()["rgb"])
    assert logits.shape == (4, K) and features.shape[0] == 4
    assert exported.create_kwargs["name"] == get_method(method).student_name(task.params, "r2plus1d_student")


@pytest.mark.parametrize("method", list_methods())
def test_label_smoothing_changes_the_supervised_term_of_every_method(method, teachers):
    """`distill.train.label_smoothing` reaches every method through the shared `Distiller.ce`."""
    batch = _batch()
    out = {}
    for eps in (0.0, 0.2):
        task = _task(method, teachers, label_smoothing=eps)
        head = [m for m in task.student.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():  # confident logits: at the near-uniform init, smoothing barely moves CE
            head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
        task.on_epoch_start(0)
        task.train()
        torch.manual_seed(1)  # same dropout masks in both runs
        out[eps] = {k: v.detach() for k, v in task(batch).items()}
    torch.testing.assert_close(out[0.0]["logits"], out[0.2]["logits"])
    assert abs(float(out[0.2]["loss"]) - float(out[0.0]["loss"])) > 1e-3
    for eps, o in out.items():
        assert float(o["ce"]) == pytest.approx(float(supervised_loss(o["logits"], batch["label"], label_smoothing=eps)), rel=1e-6)


def test_supervised_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    # eps = 0.2, K = 2: target (0.9, 0.1) for sample 0 and (0.1, 0.9) for sample 1
    lp0, lp1 = torch.log_softmax(logits[0], 0), torch.log_softmax(logits[1], 0)
    ce0 = -(0.9 * lp0[0] + 0.1 * lp0[1])
    ce1 = -(0.1 * lp1[0] + 0.9 * lp1[1])
    assert float(supervised_loss(logits, labels, label_smoothing=0.2)) == pytest.approx(float((ce0 + ce1) / 2), rel=1e-6)
    w = torch.tensor([0.5, 1.0])
    assert float(supervised_loss(logits, labels, label_smoothing=0.2, weights=w)) == pytest.approx(
        float((0.5 * ce0 + ce1) / 2), rel=1e-6)


def test_kd_checkpoint_holds_no_teacher_and_resume_reloads_it_from_its_file(teachers, tmp_path):
    """The teacher (2.65 M parameters for `r2plus1d_teacher`) is loaded from its file, never checkpointed."""
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.01, warmup_epochs=0, device="cpu")

    def run(out, **kw):
        task = _task("kd", teachers)
        return task, fit(task, Clips(), cfg, out, progress=False, **kw)

    full, hist_full = run(tmp_path / "full")
    part, _ = run(tmp_path / "part", stop_after_epochs=1)
    state = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert state["task"] and not any(k.startswith("teachers.") for k in state["task"]), sorted(state["task"])[:5]
    assert state["frozen_modules"] == ["teachers"]
    assert set(state["task"]) == {f"student.{k}" for k in part.student.state_dict()}
    resumed, hist_res = run(tmp_path / "part", resume=True)
    file_teacher, _ = load_model(teachers["rgb"])
    for (k, a), b in zip(resumed.teachers["rgb"].state_dict().items(), file_teacher.state_dict().values()):
        assert torch.equal(a, b), f"teacher {k} was not reloaded from its file"
    for (k, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{k} differs after resume")
    assert [h["kd"] for h in hist_res] == [h["kd"] for h in hist_full]


def test_kd_combines_terms_with_alpha(teachers):
    task = create_distiller("kd", _student(), _ctx(teachers), {"alpha": 0.25, "tau": 4})
    task.train()
    out = task(_batch())
    assert float(out["loss"]) == pytest.approx(0.75 * float(out["ce"]) + 0.25 * float(out["kd"]), rel=1e-5)


def test_d3d_teacher_sees_the_flow_of_the_same_clip(teachers):
    task = create_distiller("d3d", _student(), _ctx(teachers), {"lambda_": 1.0})
    seen = {}
    task.teachers["flow"].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))
    batch = hflip_batch(_batch(), torch.Generator().manual_seed(0))
    out = task(batch)
    torch.testing.assert_close(seen["x"], batch["flow"])
    t_logits, _ = task.teachers["flow"](batch["flow"])
    assert float(out["distill"]) == pytest.approx(float(d3d_loss(out["logits"], t_logits).mean()), rel=1e-5)
    assert float(out["loss"]) == pytest.approx(float(out["ce"]) + float(out["distill"]), rel=1e-5)


def test_d3d_distils_from_an_rgb_teacher_the_papers_control(teachers):
    """Issue 26: `teacher: rgb` is Table 6's "D3D distilled from spatial stream": the same loss (eq. 2, summed
    over the K logits), the RGB stream on the clip itself; no flow is read."""
    cls = get_method("d3d")
    rgb, flow = method_params("d3d", {"teacher": "rgb"}), method_params("d3d", None)
    assert flow.teacher == "flow" and cls.needed_files(flow) == ("teacher_flow",) and cls.reads_flow(flow)
    assert cls.needed_files(rgb) == ("teacher_rgb",) and not cls.reads_flow(rgb)
    task = create_distiller("d3d", _student(), _ctx(teachers), {"lambda_": 0.5, "teacher": "rgb"})
    assert list(task.teachers) == ["rgb"] and task.teachers["rgb"].modality == "rgb"
    seen = {}
    task.teachers["rgb"].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))
    batch = _batch()
    del batch["flow"]  # an RGB teacher needs none
    task.train()
    out = task(batch)
    torch.testing.assert_close(seen["x"], batch["rgb"])
    with torch.no_grad():
        t_logits, _ = load_model(teachers["rgb"])[0].eval()(batch["rgb"])  # the RGB teacher file, on the clip
    by_hand = float(((out["logits"].detach() - t_logits) ** 2).sum(1).mean())  # Σ over K, mean over clips
    assert float(out["distill"]) == pytest.approx(by_hand, rel=1e-4)
    assert float(out["loss"]) == pytest.approx(float(out["ce"]) + 0.5 * by_hand, rel=1e-4)
    swapped = _ctx({**teachers, "rgb": teachers["flow"], "flow": teachers["rgb"]})  # each file of the other modality
    for teacher, modality in (("rgb", "flow"), ("flow", "rgb")):
        with pytest.raises(ConfigError, match=f"teacher is '{teacher}', but .* takes {modality}"):
            create_distiller("d3d", _student(), swapped, {"teacher": teacher})
    with pytest.raises(ConfigError, match="teacher must be one of flow, rgb"):
        method_params("d3d", {"teacher": "depth"})


def test_hflip_flips_rgb_and_flow_together_and_negates_u():
    b = _batch(8)
    f = hflip_batch(b, torch.Generator().manual_seed(3))
    flipped = [i for i in range(8) if not torch.equal(f["rgb"][i], b["rgb"][i])]
    assert 0 < len(flipped) < 8
    for i in range(8):
        if i in flipped:
            torch.testing.assert_close(f["rgb"][i], b["rgb"][i].flip(-1))
            torch.testing.assert_close(f["flow"][i, 0], -b["flow"][i, 0].flip(-1))
            torch.testing.assert_close(f["flow"][i, 1], b["flow"][i, 1].flip(-1))
        else:
            assert torch.equal(f["flow"][i], b["flow"][i])


def test_sd_snapshot_changes_exactly_at_epoch_boundaries(teachers, tmp_path):
    task = create_distiller("sd", _student(), _ctx(teachers), {"lambda_": 1.0})
    pretrained = {k: v.clone() for k, v in task.student.state_dict().items()}
    log = []  # (epoch, snapshot fingerprint, student fingerprint at epoch start)
    orig = task.on_epoch_start

    def spy(epoch):
        log.append(("start", epoch, sum(float(p.sum()) for p in task.student.parameters())))
        orig(epoch)

    task.on_epoch_start = spy
    snap = task.teachers["snapshot"]  # its stem runs whether eq. 2 reads the feature map or the pooled vector
    snap.stem.register_forward_pre_hook(
        lambda m, a: log.append(("step", task.snapshot_epoch, sum(float(p.sum()) for p in snap.parameters()))))
    fit(task, Clips(), TrainConfig(epochs=3, batch_size=4, lr=0.01, warmup_epochs=0, device="cpu"), tmp_path, progress=False)
    starts = [e for e in log if e[0] == "start"]
    steps = [e for e in log if e[0] == "step"]
    assert [s[1] for s in starts] == [0, 1, 2]
    for epoch, (_, _, student_at_start) in enumerate(starts):
        snaps = {round(s[2], 4) for s in steps if s[1] == epoch}
        assert len(snaps) == 1, f"snapshot changed within epoch {epoch}"
        assert snaps.pop() == pytest.approx(student_at_start, rel=1e-6)
    assert starts[0][2] == pytest.approx(sum(float(v.sum()) for k, v in pretrained.items()
                                             if k in dict(task.student.named_parameters())), rel=1e-6)
    assert len({round(s[2], 4) for s in starts}) == 3  # and the student really moved between epochs


def test_sd_loads_the_pretrained_encoder(teachers):
    student = _student()
    task = create_distiller("sd", student, _ctx(teachers))
    from vidistill.train import load_model

    pre, _ = load_model(teachers["rgb"])
    for (k, a), b in zip(student.state_dict().items(), pre.state_dict().values()):
        if k not in task.fresh:
            torch.testing.assert_close(a, b)


def test_sd_lambda_zero_is_plain_finetuning(teachers):
    task = create_distiller("sd", _student(), _ctx(teachers), {"lambda_": 0.0})
    task.on_epoch_start(0)
    out = task(_batch())
    assert float(out["loss"]) == pytest.approx(float(out["ce"]))


def test_sd_snapshot_norm_batch_starts_at_zero_and_keeps_its_buffers(teachers):
    """With batch statistics the epoch-1 snapshot is the student exactly, so L_SD starts at 0; with running
    statistics (the pre-trained model's) it does not, which is the mismatch `snapshot_norm` removes."""
    terms = {}
    for norm in ("batch", "running"):
        task = create_distiller("sd", _student(), _ctx(teachers), {"lambda_": 1.0, "snapshot_norm": norm})
        task.on_epoch_start(0)
        task.train()
        snap = task.teachers["snapshot"]
        buffers = {k: v.clone() for k, v in snap.named_buffers()}
        terms[norm] = float(task(_batch())["sd"])
        assert not snap.training
        for k, v in snap.named_buffers():
            assert torch.equal(v, buffers[k]), f"snapshot buffer {k} changed in a training step ({norm})"
    assert terms["batch"] == pytest.approx(0.0, abs=1e-8)
    assert terms["running"] > 1e-3


def test_sd_refuses_unknown_snapshot_norm(teachers):
    with pytest.raises(ConfigError, match="snapshot_norm must be one of batch, running"):
        create_distiller("sd", _student(), _ctx(teachers), {"snapshot_norm": "group"})
