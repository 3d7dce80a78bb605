"""ONNX export of the RGB student: metadata, parity, dynamic batch, the parity gate, latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from mlflow_server import CLASSES, FRAMES, SIZE, perturb_onnx, student_onnx  # noqa: F401  (fixture)
from torch import nn

from vidistill.export.onnx import ExportError, check_parity, export_onnx, latency
from vidistill.export.runtime import make_session, read_metadata
from vidistill.models import RGB_MEAN


def test_export_writes_self_describing_model(student_onnx):  # noqa: F811
    path = student_onnx["onnx_path"]
    assert path.name == "model.onnx"
    meta = read_metadata(path)
    assert meta["classes"] == CLASSES
    assert (meta["frames"], meta["size"], meta["num_classes"], meta["opset"]) == (FRAMES, SIZE, len(CLASSES), 18)
    assert meta["input_layout"] == "NCTHW"
    assert f"{RGB_MEAN[0]}" in meta["normalization"]  # the model's own Normalize buffers are recorded
    assert meta["preprocess"]["stride"] == 2
    proto = onnx.load(str(path))
    assert "[0, 1]" in proto.doc_string and "(B, 3, T=8, H=56, W=56)" in proto.doc_string
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits", "features"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # symbolic batch
    assert [d.dim_value for d in dims[1:]] == [3, FRAMES, SIZE, SIZE]  # fixed T, H, W
    parity = student_onnx["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4 and parity["n"] == 3


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_matches_eager(student_onnx, batch):  # noqa: F811
    model = student_onnx["model"]
    session = make_session(student_onnx["onnx_path"])
    x = torch.rand(batch, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
    logits, features = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        ref_logits, ref_features = model(x)
    assert logits.shape == (batch, len(CLASSES)) and features.shape == tuple(ref_features.shape)
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(features, ref_features.numpy(), atol=1e-4)
    report = check_parity(model, student_onnx["onnx_path"], [x, x[:1]])
    assert report["passed"] and report["n"] == batch + 1 and report["top1_agreement"] == 1.0


def test_parity_detects_a_perturbed_onnx_file(student_onnx, tmp_path):  # noqa: F811
    bad = perturb_onnx(student_onnx["onnx_path"], tmp_path / "model.onnx")
    x = torch.rand(4, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    report = check_parity(student_onnx["model"], bad, x, atol=1e-4)
    assert not report["passed"]
    assert report["max_abs_diff"] > 1e-4 and report["n"] == 4
    with pytest.raises(ValueError, match="atol"):
        check_parity(student_onnx["model"], bad, x, atol=-1.0)


class AlwaysDropout(nn.Module):
    """Dropout hard-wired to training mode (a real bug class): eager PyTorch and ONNX Runtime draw
    different masks, so the exported model cannot reproduce the eager one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.dropout(x.mean(dim=(3, 4)).flatten(1), p=0.5, training=True)  # (B, 3 * T)
        return self.fc(features), features


def test_export_fails_loudly_when_parity_fails(tmp_path):
    with pytest.raises(ExportError, match=r"max_abs_diff=\S+ > atol=0.0001.*top1_agreement") as err:
        export_onnx(AlwaysDropout(), tmp_path, frames=2, size=8)
    assert "model.onnx" in str(err.value)
    assert (tmp_path / "parity.json").is_file()  # the failed numbers are kept for inspection


def test_export_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="batch must be >= 2"):
        export_onnx(AlwaysDropout(), tmp_path, batch=1, frames=2, size=8)
    with pytest.raises(ValueError, match="pass frames= and size="):
        export_onnx(AlwaysDropout(), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_session(Path(tmp_path) / "missing.onnx")


def test_latency_helpers_time_both_backends(student_onnx):  # noqa: F811
    x = torch.rand(2, 3, FRAMES, SIZE, SIZE)
    ort_lat = latency(make_session(student_onnx["onnx_path"]), x, warmup=1, iters=3)
    eager_lat = latency(student_onnx["model"], x, warmup=1, iters=3)
    for lat in (ort_lat, eager_lat):
        assert lat["batch"] == 2 and lat["iters"] == 3
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] and lat["per_clip_ms"] == pytest.approx(lat["p50_ms"] / 2)
    with pytest.raises(TypeError, match="nn.Module or an onnxruntime.InferenceSession"):
        latency("model.onnx", x)  # type: ignore[arg-type]
