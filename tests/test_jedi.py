"""JEDI (`distill/jedi.py`, `models/jedi.py`, `data/multi.py`, `vidistill experts`): eq. 1-5 against hand-computed
values, the semi-supervised gradient path, the burn-in, frozen encoders that run once per clip, the exported
student against the cached-embedding path (and ONNX parity), and the experts stage end to end on real prep
output of real encoded videos (several datasets, overlapping class names, a dataset without usable videos)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_jedi import tiny_experts
from vidistill import cli, stages
from vidistill.config import (ConfigError, DistillConfig, ExpertsConfig, PrepConfig, SynthConfig, TeachConfig, TrainConfig,
                              from_dict)
from vidistill.data import ClipDataset
from vidistill.data.multi import EmbeddingSet, cache_embeddings, holdout_mask, holdout_split, read_experts
from vidistill.distill import DistillContext, get_method, method_params
from vidistill.distill.jedi import dataset_weights, ensemble_dropout
from vidistill.models import ZooModel
from vidistill.train import fit, load_model
from vidistill.train.loop import collate

T, S = 4, 32


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two datasets: the main one (3 classes, 12 train clips) and another (2 classes, 6 train clips)."""
    folder, sets = tiny_experts(tmp_path_factory.mktemp("experts"))
    return folder, sets


def _task(folder, **params):
    cls = get_method("jedi")
    manifest = read_experts(folder)
    main = manifest["datasets"][0]
    ctx = DistillContext(num_classes=len(main["classes"]), classes=main["classes"], frames=T, size=S, experts=str(folder))
    hp = method_params("jedi", params)
    torch.manual_seed(0)
    return cls(cls.build_student(hp, ctx, default="r2plus1d_student"), hp, ctx)


def _batch(dataset, rows):
    return collate([dataset[i] for i in rows])


# ----------------------------------------------------------------------------------------------
# eq. 1, 2, 4 by hand


def test_eq2_weights_for_datasets_of_3_and_1_clips():
    w = dataset_weights([3, 1])
    assert w.tolist() == [[1.0, 0.25], [0.75, 1.0]]  # row: the clip's dataset i; column: the model j
    assert dataset_weights([3, 1], own_only=True).tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_eq1_by_hand_on_two_datasets_of_3_and_1_clips(tmp_path):
    folder, _ = tiny_experts(tmp_path, train=(3, 1), test=(3, 2))
    task = _task(folder)
    task.setup(EmbeddingSet(folder, "train"), epochs=500)
    assert task.weights.tolist() == [[1.0, 0.25], [0.75, 1.0]]
    # fixed tiny logits for a batch of two clips: clip a from D_0 (label 1), clip b from D_1 (label 0)
    s0 = torch.tensor([[0.5, 1.0, -0.5], [0.2, 0.1, 0.0]])
    s1 = torch.tensor([[0.3, -0.3], [1.0, 0.0]])
    t0 = torch.tensor([[0.0, 2.0, 0.5], [1.0, 0.0, 0.3]])
    t1 = torch.tensor([[0.4, 0.1], [0.2, 0.9]])
    task.outputs = lambda emb: ([s0, s1], [t0, t1])
    task.on_epoch_start(30)  # after the burn-in
    batch = {"emb": torch.zeros(2, sum(task.widths)), "dataset": torch.tensor([0, 1]), "label": torch.tensor([1, 0])}
    out = task(batch)

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    def ce(v, y):
        return -math.log(softmax(v)[y])

    def hinge(v, y):  # Weston-Watkins, as torch's multi_margin_loss: sum over c != y, divided by K
        return sum(max(0.0, 1 - v[y] + v[c]) for c in range(len(v)) if c != y) / len(v)

    def kd(s, t):  # soft-target cross-entropy, T = 1
        return -sum(p * math.log(q) for p, q in zip(softmax(t), softmax(s)))

    a, b = 0, 1
    la = ce(s0[a].tolist(), 1) + hinge(t0[a].tolist(), 1) + 0.4 * (1.0 * kd(s0[a].tolist(), t0[a].tolist())
                                                                  + 0.25 * kd(s1[a].tolist(), t1[a].tolist()))
    lb = ce(s1[b].tolist(), 0) + hinge(t1[b].tolist(), 0) + 0.4 * (0.75 * kd(s0[b].tolist(), t0[b].tolist())
                                                                  + 1.0 * kd(s1[b].tolist(), t1[b].tolist()))
    assert float(out["loss"]) == pytest.approx((la + lb) / 2, abs=1e-6)
    assert float(out["ce"]) == pytest.approx((ce(s0[a].tolist(), 1) + ce(s1[b].tolist(), 0)) / 2, abs=1e-6)
    assert float(out["hinge"]) == pytest.approx((hinge(t0[a].tolist(), 1) + hinge(t1[b].tolist(), 0)) / 2, abs=1e-6)
    # each clip's own student's logits, padded with -inf to the largest label set
    assert out["logits"][1, 2] == float("-inf") and torch.equal(out["logits"][0], s0[0])


def test_eq4_dropout_for_our_widths_and_the_teachers_read_every_expert(experts):
    assert ensemble_dropout(8, 192) == pytest.approx(1 - 80 / 192) == pytest.approx(0.58333, abs=1e-5)
    assert ensemble_dropout(6, 192) == pytest.approx(0.6875)
    assert ensemble_dropout(100, 192) == 0.0  # max(0, .)
    folder, _ = experts
    task = _task(folder)
    width = sum(task.widths)
    assert task.widths == [64, 64] and width == 128
    for name, k in zip(task.names, task.num_classes):
        assert task.ensembles[name].linear.in_features == width  # the concatenation of every expert
        assert task.ensembles[name].dropout.p == pytest.approx(max(0.0, 1 - 10 * k / width))


def test_a_teachers_hinge_loss_on_one_clip_reaches_every_adjustment_module(experts):
    folder, _ = experts
    task = _task(folder, alpha=0.0, gamma=0.0)  # only the hinge term
    train = EmbeddingSet(folder, "train")
    task.train()
    out = task(_batch(train, [0]))  # one clip of the main dataset: only E_0's hinge loss
    out["loss"].backward()
    for m in task.students:
        assert m.adjust.up.weight.grad.abs().sum() > 0  # the teacher's input is every adjusted embedding
        assert m.head.weight.grad is None or m.head.weight.grad.abs().sum() == 0


def test_a_batch_from_dataset_1_trains_the_main_student_through_kd_alone(experts):
    folder, _ = experts
    train = EmbeddingSet(folder, "train")
    rows = [i for i in range(len(train)) if train[i]["dataset"] == 1][:4]

    def grads(epoch, **params):
        task = _task(folder, **params)
        task.setup(train, epochs=500)
        task.on_epoch_start(epoch)
        task.train()
        out = task(_batch(train, rows))
        out["loss"].backward()
        return out, [p.grad for p in task.student.parameters()]

    out, g = grads(30)
    assert out["kd"].item() > 0
    assert g[-2].abs().sum() > 0 and g[-1].abs().sum() > 0  # the head h_0 (weight, bias): only KD reaches it here
    out, g = grads(30, beta=0.0)  # without the teachers' hinge loss, whose gradient also reaches A_0
    assert all(x.abs().sum() > 0 for x in g[-4:])  # A_0's output layer W_2 and the head
    # controls: nothing reaches M_0 without KD (gamma = 0) or during the burn-in
    for epoch, params in ((30, {"gamma": 0.0, "beta": 0.0}), (10, {"beta": 0.0})):
        out, g = grads(epoch, **params)
        assert float(out["kd"]) == 0.0
        assert all(x is None or x.abs().sum() == 0 for x in g)


def test_the_kd_term_is_exactly_zero_during_the_burn_in(experts):
    folder, _ = experts
    task = _task(folder)
    train = EmbeddingSet(folder, "train")
    batch = _batch(train, range(len(train)))
    for epoch, positive in ((0, False), (24, False), (25, True), (499, True)):
        task.on_epoch_start(epoch)
        out = task(batch)
        assert (out["kd"].item() > 0) == positive and out["kd_div"].item() > 0
        if not positive:
            assert float(out["kd"]) == 0.0
            assert out["loss"].item() == pytest.approx((out["ce"] + out["hinge"]).item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# frozen encoders, once per clip; the exported student


class Calls:
    """Counts the clips each zoo model's forward sees."""

    def __init__(self, models):
        self.clips = [0] * len(models)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(models)]

    def _hook(self, i):
        def hook(module, args, output):
            self.clips[i] += args[0].shape[0]
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def test_the_embedding_pass_runs_every_encoder_once_per_clip(experts, tmp_path):
    folder, sets = experts
    encoders = [load_model(folder / f"d{i}" / "model.pt")[0] for i in range(2)]
    calls = Calls(encoders)
    cache_embeddings(tmp_path, names=["d0", "d1"], datasets=sets, encoders=encoders, batch_size=5)
    total = sum(len(ds) for s in sets for ds in s.values())
    assert calls.clips == [total, total]
    with np.load(tmp_path / "embeddings" / "d1" / "test.npz") as z:
        assert z["e0"].shape == (len(sets[1]["test"]), 64) and z["labels"].tolist() == sets[1]["test"].labels.tolist()
        with torch.no_grad():  # the cached embedding is the expert's feature of that clip
            torch.testing.assert_close(torch.from_numpy(z["e1"][:2]), encoders[1](sets[1]["test"].rgb[:2])[1])


def test_training_on_cached_embeddings_runs_no_encoder_and_leaves_them_bit_identical(experts, tmp_path):
    folder, _ = experts
    task = _task(folder, epochs=3, burn_in=1, lr=1e-3)
    before = {k: v.clone() for k, v in task.teachers.state_dict().items()}
    assert all(not p.requires_grad for p in task.teachers.parameters())
    calls = Calls(list(task.teachers.values()))
    train = task.train_dataset(None)
    cfg = get_method("jedi").train_config(task.params, TrainConfig(batch_size=8, device="cpu"))
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.schedule, cfg.warmup_epochs) == (3, 1e-3, 3e-3, "constant", 0)
    history = fit(task, train, cfg, tmp_path, progress=False)
    calls.close()
    assert calls.clips == [0, 0]
    assert [h["lr"] for h in history] == [1e-3] * 3  # constant learning rate
    assert history[0]["kd"] == 0.0 and history[-1]["kd"] > 0
    assert {"d0_student_top1", "d0_teacher_top1", "d1_student_top1", "d1_teacher_top1", "train_acc"} <= set(history[-1])
    for k, v in task.teachers.state_dict().items():
        assert torch.equal(v, before[k]), k
    on_file, _ = load_model(folder / "d0" / "model.pt")
    for k, v in on_file.state_dict().items():
        assert torch.equal(task.teachers["d0"].state_dict()[k], v), k
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("teachers.") for k in ckpt["task"])  # frozen experts come back from their files


def test_the_exported_student_equals_the_cached_embedding_path_and_passes_onnx_parity(experts, tmp_path):
    from vidistill.export.onnx import check_parity, export_onnx

    folder, sets = experts
    task = _task(folder, epochs=2, burn_in=0, lr=1e-2)
    fit(task, task.train_dataset(None), get_method("jedi").train_config(task.params, TrainConfig(batch_size=6, device="cpu")),
        tmp_path, progress=False)
    model = task.export_model()
    assert isinstance(model, ZooModel) and model.create_kwargs["name"] == "jedi_student"
    assert any(p.abs().sum() > 0 for p in model.student.adjust.up.parameters())  # trained, not the initial expert
    clips = sets[0]["test"].rgb  # (N, 3, T, S, S)
    with torch.no_grad():
        logits, _ = model.eval()(clips)
        task.eval()
        cached = torch.from_numpy(np.load(folder / "embeddings" / "d0" / "test.npz")["e0"])
        path, _ = task.student(cached)  # h_0(A_0(e_0)) on the cached embeddings
    assert float((logits - path).abs().max()) <= 1e-5
    onnx = export_onnx(model, tmp_path / "onnx", classes=list("abc"))
    parity = check_parity(model, onnx, clips)
    assert parity["passed"] and parity["top1_agreement"] == 1.0


# ----------------------------------------------------------------------------------------------
# parameters, data


def test_bad_hyperparameters_are_refused():
    for params, message in (({"gamma": -1}, "jedi.gamma must be >= 0"), ({"ensemble_input": "logits"}, "ensemble_input"),
                            ({"kd_data": "kinetics"}, "kd_data"), ({"adjust_dropout": 1.0}, "adjust_dropout"),
                            ({"lr": 0}, "lr must be > 0"), ({"burn_in": -1}, "burn_in")):
        with pytest.raises(ConfigError, match=message):
            method_params("jedi", params)


def test_the_training_views_of_distill_train_are_off_for_cached_embeddings(experts):
    """Issue 26: params.yaml's `distill.train` has flips and crops; jedi trains on embeddings, so its own
    train_config turns both off (it used to refuse hflip, and then crop a batch of embeddings)."""
    cfg = get_method("jedi").train_config(method_params("jedi", {}), TrainConfig(hflip=True, crop_scale=0.5))
    assert not cfg.hflip and cfg.crop_scale == 1.0
    cfg.validate()
    from vidistill.data.augment import augment_batch

    batch = _batch(EmbeddingSet(experts[0], "train"), [0, 1])
    with pytest.raises(ValueError, match="need clips"):  # what the loop would do with views on: a clear refusal
        augment_batch(batch, torch.Generator().manual_seed(0), crop_scale=0.5)


def test_the_validation_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(4), 10)
    videos = np.arange(40)
    held = holdout_mask(labels, videos, 0.15)
    assert [int(held[labels == c].sum()) for c in range(4)] == [2, 2, 2, 2]  # round(0.15 * 10) per class
    assert np.array_equal(held, holdout_mask(labels, videos, 0.15))
    assert not holdout_mask(labels, videos, 0.15, seed=1)[held].all()


def test_a_missing_or_skipped_experts_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match="run `vidistill experts` first"):
        read_experts(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "datasets": []}))
    with pytest.raises(ConfigError, match="skipped its work"):
        read_experts(tmp_path)


def test_experts_config_refusals():
    for datasets, message in (([{"dataset": "synthetic"}], r"datasets\[0\]\.name"),
                              ([{"name": "main"}], "used twice"),
                              ([{"name": "a", "frames": 16}], "clip geometry"),
                              ([{"name": "a", "split": 4, "dataset": "ucf101"}], r"datasets\[0\] \(a\).*split"),
                              (["d1"], "must be a mapping"),
                              ([], "at least one dataset")):
        with pytest.raises(ConfigError, match=message):
            ExpertsConfig(datasets=datasets).validate()


# ----------------------------------------------------------------------------------------------
# the experts stage and `distill --method jedi` end to end


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Main dataset: real synthetic videos of domain 0 (8 classes x 3), prep to 4x32x32 clips; the experts stage
    adds domain 1 (6 classes) and domain 0 again with another seed (the same class names: label spaces are per
    dataset) and trains one expert per dataset for one epoch."""
    root = tmp_path_factory.mktemp("jedi")
    synth = SynthConfig(out=str(root / "raw0"), videos_per_class=3, frames=12, width=48, height=36, seed=0)
    prep = PrepConfig(dataset="synthetic", root=synth.out, out=str(root / "clips"), frames=4, stride=2, short_side=32,
                      crop=32, synth=synth)
    stages.prep(prep, progress=False, track=False)
    small = {"videos_per_class": 3, "frames": 12, "width": 48, "height": 36}
    cfg = ExpertsConfig(clips=prep.out, name="d0", out=str(root / "experts"), embed_batch_size=8,
                        datasets=[{"name": "d1", "dataset": "synthetic", "root": str(root / "raw1"),
                                   "synth": {"domain": 1, "seed": 1, **small}},
                                  {"name": "d0b", "dataset": "synthetic", "root": str(root / "raw0b"),
                                   "synth": {"domain": 0, "seed": 5, **small}}],
                        train=TrainConfig(epochs=1, batch_size=8, device="cpu"))
    manifest = stages.experts(cfg, progress=False, track=False)
    return {"root": root, "clips": prep.out, "experts": cfg.out, "manifest": manifest, "cfg": cfg}


def test_the_experts_stage_prepares_trains_and_caches_every_dataset(real):
    m = real["manifest"]
    assert [d["name"] for d in m["datasets"]] == ["d0", "d1", "d0b"] and m["main"] == "d0"
    assert m["datasets"][0]["classes"] == m["datasets"][2]["classes"]  # overlapping class names are fine
    assert len(m["datasets"][1]["classes"]) == 6
    assert m["datasets"][0]["data_hash"] == ClipDataset(real["clips"], "train").manifest["hash"]
    for d in m["datasets"]:
        clips = ClipDataset(d["clips"], "train")
        assert clips.frames == 4 and clips.size == 32  # the main dataset's clip geometry
        assert d["splits"]["train"]["clips"] == len(clips) and 0 <= d["top1"] <= 1
        with np.load(Path(real["experts"]) / d["splits"]["train"]["file"]) as z:
            assert sorted(z.files) == ["e0", "e1", "e2", "labels", "video_ids"] and z["e2"].shape == (len(clips), 64)
    assert m["encoder_clips"] == sum(d["splits"][s]["clips"] for d in m["datasets"] for s in ("train", "test"))
    assert read_experts(real["experts"]) == json.loads((Path(real["experts"]) / "manifest.json").read_text())


def test_experts_start_from_the_pretrained_encoder_and_train_with_flips_and_crops(real, tmp_path, monkeypatch):
    """Issue 26: JEDI's experts are pre-trained, then fine-tuned with augmentation (paper sec. 4.3). `experts.pretrained`
    (the pace encoder) initialises every expert's encoder, its head stays new, and `experts.train`'s flips and crops
    reach the training loop; the cached embeddings are still made without augmentation."""
    import vidistill.train
    import vidistill.train.loop as loop
    from vidistill.models import create_model
    from vidistill.train import save_model

    torch.manual_seed(7)
    kw = {"num_classes": 3, "frames": T, "size": S}  # a pace encoder: 3 speeds, not the datasets' classes
    pace = create_model("r2plus1d_student", **kw)
    pretrained = save_model(tmp_path / "pace.pt", pace, classes=["1x", "2x", "3x"], extra={"pretext": "pace"})
    encoder = {k: v for k, v in pace.state_dict().items() if not k.startswith("head.")}
    started, views = [], []
    real_fit, real_augment = vidistill.train.fit, loop.augment_batch

    def spy_fit(task, train_set, cfg, *args, **kwargs):
        started.append(({k: v.clone() for k, v in task.student.state_dict().items()}, cfg.hflip, cfg.crop_scale))
        return real_fit(task, train_set, cfg, *args, **kwargs)

    def spy_augment(batch, generator, **kwargs):
        views.append((kwargs.get("hflip"), kwargs.get("crop_scale")))
        return real_augment(batch, generator, **kwargs)

    monkeypatch.setattr(vidistill.train, "fit", spy_fit)
    monkeypatch.setattr(loop, "augment_batch", spy_augment)
    d1 = real["manifest"]["datasets"][1]
    cfg = replace(real["cfg"], out=str(tmp_path / "experts"), pretrained=str(pretrained),
                  datasets=[{"name": "d1", "clips": d1["clips"]}],
                  train=TrainConfig(epochs=1, batch_size=8, device="cpu", hflip=True, crop_scale=0.5))
    manifest = stages.experts(cfg, progress=False, track=False)
    assert len(started) == 2  # one expert per dataset
    for state, hflip, crop in started:
        for k, v in encoder.items():
            assert torch.equal(state[k], v), f"expert weight {k} does not start from the pretrained encoder"
        assert state["head.weight"].shape[0] in (8, 6)  # the dataset's classes: a new head
        assert (hflip, crop) == (True, 0.5)
    assert views and set(views) == {(True, 0.5)}  # every training batch of every expert got a view
    assert manifest["expert_init"] == str(pretrained)
    assert manifest["expert_views"] == {"hflip": True, "crop_scale": 0.5}
    expert, info = load_model(Path(cfg.out) / "d0" / "model.pt")
    assert info["extra"]["init"] == str(pretrained)
    with np.load(Path(cfg.out) / "embeddings" / "d0" / "test.npz") as z:  # cached without views: deterministic
        test = ClipDataset(real["clips"], "test")
        with torch.no_grad():
            _, feats = expert.eval()(torch.stack([test[i]["rgb"] for i in range(len(test))]))
        np.testing.assert_allclose(z["e0"], feats.numpy(), rtol=1e-4, atol=1e-5)


def test_a_scratch_expert_and_a_missing_encoder_are_named(real, tmp_path):
    cfg = replace(real["cfg"], out=str(tmp_path / "experts"), pretrained=str(tmp_path / "missing.pt"),
                  datasets=[{"name": "d1", "clips": real["manifest"]["datasets"][1]["clips"]}])
    with pytest.raises(ConfigError, match=r"experts.pretrained .*missing.pt does not exist.*--section pretrain"):
        stages.experts(cfg, progress=False, track=False)
    assert not (tmp_path / "experts").exists()  # refused before any expert trains
    assert real["manifest"]["expert_init"] == "scratch"
    with pytest.raises(ConfigError, match="teach.init initialises a classifier or a pace encoder"):
        TeachConfig(pretext="videomae", model="vit_video_tiny", init="pace.pt").validate()


def test_distill_jedi_trains_exports_and_matches_the_cached_path(real, tmp_path, capsys):
    out = tmp_path / "jedi"
    params = tmp_path / "params.yaml"
    params.write_text("distill:\n  methods:\n    jedi: {epochs: 3, burn_in: 1, lr: 0.001}\n")
    common = ["--params", str(params), "--no-track", "--quiet"]
    assert cli.main(["distill", "--method", "jedi", "--clips", real["clips"], "--experts", real["experts"], "--out", str(out),
                     "--batch-size", "8", "--device", "cpu", *common]) == 0
    assert "distill (jedi): top1" in capsys.readouterr().out
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 3 and history[0]["kd"] == 0.0 and history[-1]["kd"] > 0
    assert {f"{n}_{w}_top1" for n in ("d0", "d1", "d0b") for w in ("student", "teacher")} <= set(history[-1])
    model, info = load_model(out / "model.pt")
    assert info["name"] == "jedi_student" and info["classes"] == real["manifest"]["datasets"][0]["classes"]
    test = ClipDataset(real["clips"], "test")
    clips = torch.stack([test[i]["rgb"] for i in range(len(test))])
    with torch.no_grad():
        logits, _ = model(clips)
        cached = torch.from_numpy(np.load(Path(real["experts"]) / "embeddings" / "d0" / "test.npz")["e0"])
        path, _ = model.student(cached)
    assert float((logits - path).abs().max()) <= 1e-5
    assert cli.main(["export", "--model", str(out / "model.pt"), "--clips", real["clips"], *common]) == 0
    parity = json.loads((out / "onnx" / "parity.json").read_text())
    assert parity["passed"] and parity["top1_agreement"] == 1.0
    capsys.readouterr()


def test_distill_jedi_refuses_clips_the_experts_were_not_built_on(real, tmp_path):
    other = tmp_path / "other"
    manifest = json.loads((Path(real["experts"]) / "manifest.json").read_text())
    # the d0b clips have the same classes as the main dataset but other videos
    cfg = from_dict(DistillConfig, {"method": "jedi", "clips": manifest["datasets"][2]["clips"], "experts": real["experts"],
                                    "out": str(other), "train": {"device": "cpu"}})
    with pytest.raises(ConfigError, match="built on other clips"):
        stages.distill(cfg, progress=False, track=False)
    assert not other.exists()


def test_a_validation_split_that_no_expert_trains_on(real, tmp_path):
    split = holdout_split(real["clips"], tmp_path / "split", 0.25)
    train, val, test = (ClipDataset(split, s) for s in ("train", "val", "test"))
    original = ClipDataset(real["clips"], "train")
    assert len(train) + len(val) == len(original) and len(test) == len(ClipDataset(real["clips"], "test"))
    assert not set(train.video_ids) & set(val.video_ids)
    assert sorted(set(val.labels)) == list(range(original.num_classes))  # stratified: every class has a video there
    i = int(np.flatnonzero(original.video_ids == val.video_ids[0])[0])
    assert torch.equal(val[0]["rgb"], original[i]["rgb"])  # the same clips, linked, not copied
    with pytest.raises(ConfigError, match="has no 'val' split"):
        EmbeddingSet(real["experts"], "val")


def test_a_dataset_without_usable_videos_stops_the_run_before_training(real, tmp_path):
    empty = tmp_path / "mine"
    for c in ("walk", "run"):
        (empty / c).mkdir(parents=True)
        for i in range(2):
            (empty / c / f"notes{i}.txt").write_text("not a video\n")
    cfg = replace(real["cfg"], out=str(tmp_path / "experts"), datasets=[{"name": "mine", "dataset": "folder", "root": str(empty)}])
    with pytest.raises(ConfigError, match=r"experts\.datasets\[0\] \(mine, folder at .*mine\)"):
        stages.experts(cfg, progress=False, track=False)
    assert not (tmp_path / "experts" / "d0").exists()  # no expert trained
    assert not (tmp_path / "experts" / "manifest.json").exists()


def test_bench_jedi_builds_pace_initialised_experts_with_views(tmp_path, monkeypatch):
    """`vidistill bench jedi` trains its experts as issue 26 asks (pace-initialised, flips and crops) by default, and
    refuses a pace domain that is one of the JEDI datasets before any work."""
    from vidistill.benchmarks import jedi as bench

    with pytest.raises(ConfigError, match="pace_domain must be"):
        bench.bench_jedi(work=tmp_path, pace_domain=1)
    with pytest.raises(ConfigError, match="expert_init must be"):
        bench.bench_jedi(work=tmp_path, expert_init="imagenet")
    seen = {}

    def fake_experts(cfg, **kw):
        seen["cfg"] = cfg
        raise RuntimeError("stop")

    monkeypatch.setattr(bench, "_prepare", lambda work, domains, vpc, val: [str(tmp_path / f"c{d}") for d in domains])
    monkeypatch.setattr(bench, "_pace_encoder", lambda work, **kw: seen.setdefault("pace", kw) and "pace/model.pt")
    monkeypatch.setattr(stages, "experts", fake_experts)
    with pytest.raises(RuntimeError, match="stop"):
        bench.bench_jedi(work=tmp_path, lr=1e-3)
    cfg = seen["cfg"]
    assert cfg.pretrained == "pace/model.pt" and (cfg.train.hflip, cfg.train.crop_scale) == (True, 0.5)
    assert seen["pace"]["domain"] == 3 and Path(cfg.out).name == "experts0_pace_flip_crop0.5"


def test_the_pipeline_experts_task_starts_the_experts_from_the_pretrain_encoder_artifact(real, tmp_path, monkeypatch):
    """`experts_op`'s own function on real kfp artifacts: with `experts.pretrained` set (params.yaml's
    runs/pretrain/model.pt), every expert starts from the `pretrain-encoder` task's model, whatever path the section
    names; without a method that needs experts it does no work."""
    from kfp import dsl

    from vidistill.models import create_model
    from vidistill.train import save_model
    from vidistill_pipeline.components import experts_op

    encoder = tmp_path / "pretrain"
    torch.manual_seed(3)
    save_model(encoder / "model.pt", create_model("r2plus1d_student", num_classes=3, frames=T, size=S),
               classes=["1x", "2x", "3x"], extra={"pretext": "pace"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = {"name": "d0", "pretrained": "/nowhere/runs/pretrain/model.pt", "embed_batch_size": 8,
              "datasets": [{"name": "d1", "clips": real["manifest"]["datasets"][1]["clips"]}],
              "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "hflip": True, "crop_scale": 0.5}}

    def call(name, methods):
        out = dsl.Artifact(name="experts", uri=str(tmp_path / name))
        experts_op.python_func(params=params, code_version="test", methods=methods,
                               clips=dsl.Dataset(name="clips", uri=real["clips"]),
                               pretrained=dsl.Model(name="model", uri=str(encoder)), experts=out)
        return json.loads((Path(out.path) / "manifest.json").read_text())

    assert call("skipped", ["none", "kd"])["datasets"] == []
    manifest = call("ran", ["none", "jedi"])
    assert manifest["expert_init"] == str(encoder / "model.pt")
    assert manifest["expert_views"] == {"hflip": True, "crop_scale": 0.5}
    assert [d["name"] for d in manifest["datasets"]] == ["d0", "d1"]
