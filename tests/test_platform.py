"""The method platform end to end, on real prep output of real encoded videos.

* An out-of-tree method (`toy`, `tests/plugins/`, found through its `vidistill.methods` entry point)
  with one `params.yaml` entry trains through `vidistill distill`; its composite student (encoder +
  residual adjustment + head, a preset the plugin registers) is saved, reloaded, evaluated with
  `vidistill evaluate` and exported with `vidistill export`, parity gate included.
* A method whose product is assembled from separately trained parts (`Distiller.export_model`, the
  JEDI shape): `model.pt` holds the assembled composite, which equals the training-time path in eval
  mode and passes ONNX parity.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vidistill import cli, stages
from vidistill.config import DistillConfig, ExportConfig, PrepConfig, SynthConfig, TrainConfig
from vidistill.data import ClipDataset
from vidistill.distill import base as distill_base
from vidistill.distill import get_method, register_method
from vidistill.models import create_model
from vidistill.train import load_model, save_model
from vidistill.train.loop import load_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Real synthetic videos (domain 0, 8 classes x 3), `vidistill prep` to 4x32x32 clips, and an RGB teacher file."""
    root = tmp_path_factory.mktemp("platform")
    synth = SynthConfig(out=str(root / "raw"), videos_per_class=3, frames=12, width=48, height=36, seed=0)
    prep = PrepConfig(dataset="synthetic", root=synth.out, out=str(root / "clips"), frames=4, stride=2, short_side=32,
                      crop=32, synth=synth)
    stages.prep(prep, progress=False, track=False)
    train = ClipDataset(prep.out, "train")
    torch.manual_seed(0)
    kw = {"num_classes": train.num_classes, "frames": train.frames, "size": train.size}
    teacher = save_model(root / "teacher_rgb.pt", create_model("r2plus1d_student", **kw), classes=train.classes)
    return {"root": str(root), "clips": prep.out, "teacher": str(teacher)}


def test_a_plugin_method_with_one_params_entry_trains_evaluates_and_exports_through_the_cli(data, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("distill:\n  methods:\n    toy: {beta: 0.25, hidden: 6}\n")  # the method's one params.yaml entry
    out = tmp_path / "toy"
    common = ["--params", str(params), "--no-track"]
    assert cli.main(["distill", "--method", "toy", "--clips", data["clips"], "--teacher-rgb", data["teacher"],
                     "--out", str(out), "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--quiet", *common]) == 0
    assert "distill (toy): top1" in capsys.readouterr().out

    saved = load_checkpoint(out / "model.pt")
    assert saved["name"] == "toy_composite" and saved["kwargs"]["hidden"] == 6  # builder arguments kept
    assert saved["extra"]["method"] == "toy"
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert not any(k.startswith("teachers.") for k in ckpt["task"])
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and {"ce", "match", "loss", "train_acc"} <= set(history[-1])
    assert history[-1]["loss"] == pytest.approx(history[-1]["ce"] + 0.25 * history[-1]["match"], rel=1e-5)

    model, info = load_model(out / "model.pt")  # rebuilt through the plugin's preset
    assert type(model).__name__ == "AdjustedStudent" and model.adjust[0].out_features == 6

    assert cli.main(["evaluate", "--checkpoint", str(out / "model.pt"), "--clips", data["clips"],
                     "--out", str(tmp_path / "eval"), *common]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(json.loads((out / "eval" / "metrics.json").read_text())["top1"])

    assert cli.main(["export", "--model", str(out / "model.pt"), "--clips", data["clips"], *common]) == 0
    parity = json.loads((out / "onnx" / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    capsys.readouterr()


def test_a_bad_plugin_hyperparameter_is_refused_before_work(data, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("distill:\n  methods:\n    toy: {beta: -1}\n")
    out = tmp_path / "toy"
    assert cli.main(["distill", "--method", "toy", "--clips", data["clips"], "--teacher-rgb", data["teacher"],
                     "--out", str(out), "--params", str(params), "--no-track"]) == 2
    err = capsys.readouterr().err
    assert "distill.methods.toy.beta must be >= 0, got -1.0" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.fixture
def assembled():
    """`toy_assembled`, registered for one test: the student is a plain encoder; an adjustment module and a
    head train beside it as the task's own modules; `export_model` assembles them into `toy_composite`."""
    toy = get_method("toy")

    class Assembled(toy):
        """Encoder, adjustment and head trained as separate parts, exported as one composite preset."""

        student_preset = ""  # the plain `distill.student` encoder

        @classmethod
        def build_student(cls, params, ctx, *, default):
            return create_model(default, num_classes=ctx.num_classes, frames=ctx.frames, size=ctx.size)

        def __init__(self, student, params, ctx):
            super().__init__(student, params, ctx)
            d = student.feature_dim
            self.adjust = nn.Sequential(nn.Linear(d, params.hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(params.hidden, d))
            self.head = nn.Linear(d, ctx.num_classes)

        def predict(self, x):
            _, f = self.student(x)  # (B, D); the encoder's own head is not used
            a = f + self.adjust(f)
            return self.head(a), a

        def forward(self, batch):
            logits, _ = self.predict(batch["rgb"])
            ce = self.ce(logits, batch)
            return {"loss": ce, "logits": logits, "ce": ce}

        def export_model(self):
            model = create_model("toy_composite", num_classes=self.ctx.num_classes, frames=self.ctx.frames,
                                 size=self.ctx.size, base=self.student.create_kwargs["name"], hidden=self.params.hidden)
            model.encoder.load_state_dict({k: v for k, v in self.student.state_dict().items() if not k.startswith("head.")})
            model.adjust.load_state_dict(self.adjust.state_dict())
            model.head.load_state_dict(self.head.state_dict())
            return model

    register_method("toy_assembled")(Assembled)
    yield Assembled
    del distill_base._METHODS["toy_assembled"]


def test_a_composite_assembled_by_the_export_hook_is_saved_reloaded_and_exported(data, tmp_path, assembled):
    out = tmp_path / "assembled"
    cfg = DistillConfig(clips=data["clips"], method="toy_assembled", teacher_rgb=data["teacher"], out=str(out),
                        methods={"toy_assembled": {"hidden": 5}}, train=TrainConfig(epochs=1, batch_size=4, device="cpu"))
    stages.distill(cfg, progress=False, track=False)
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert any(k.startswith("adjust.") for k in ckpt["task"]) and any(k.startswith("head.") for k in ckpt["task"])

    model, info = load_model(out / "model.pt")
    assert info["name"] == "toy_composite" and info["kwargs"]["hidden"] == 5 and info["kwargs"]["base"] == "r2plus1d_student"
    # the task's eval-mode path equals the exported composite (rebuild the trained task from its checkpoint)
    ctx = distill_base.DistillContext(num_classes=model.num_classes, classes=info["classes"], frames=4, size=32,
                                      teacher_rgb=data["teacher"])
    params = distill_base.method_params("toy_assembled", {"hidden": 5})
    task = assembled(assembled.build_student(params, ctx, default="r2plus1d_student"), params, ctx)
    task.load_state_dict({**ckpt["task"], **{f"teachers.{k}": v for k, v in task.teachers.state_dict().items()}})
    task.eval()
    x = torch.stack([ClipDataset(data["clips"], "test")[i]["rgb"] for i in range(4)])
    with torch.no_grad():
        want, _ = task.predict(x)
        got, _ = model(x)
    assert (want - got).abs().max() <= 1e-5

    result = stages.export(ExportConfig(model=str(out / "model.pt"), clips=data["clips"]), track=False)
    assert result["parity"]["passed"] and Path(result["onnx"]).exists()
