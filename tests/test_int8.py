"""int8 students (issue 29): ONNX Runtime static QDQ quantization of a trained toy student, the accuracy gate
both ways (passes; refuses a damaged model and a drop over the allowed one), the int8 model served by
`vidistill serve` and queried with tritonclient, and the Triton/KServe model repository parsed with
Triton's own model-config schema and checked against the ONNX graph."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient
from google.protobuf import text_format
from helpers_deploy import CLASSES, FRAMES, SIZE, batched, train_toy_student
from mlflow_server import ServeProcess, free_port, stop
from onnx import numpy_helper
from tritonclient.grpc import model_config_pb2

from vidistill.export.model_repository import (
    ModelRepositoryError,
    model_config,
    validate_model_repository,
    write_model_repository,
)
from vidistill.export.quantize import accuracy_gate, quantize_and_gate, quantize_onnx, read_gate
from vidistill.export.runtime import make_session, read_metadata


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Any]:
    """A trained toy student, exported, and its int8 version calibrated on 64 training clips."""
    s = train_toy_student(tmp_path_factory.mktemp("toy"))
    tx, _ = s["train"]
    s["gate"] = quantize_and_gate(s["onnx_path"], [tx[i:i + 16] for i in range(0, 64, 16)], batched(*s["test"]))
    s["int8_path"] = Path(s["gate"]["onnx"])
    return s


def _with_bias(src: Path, dst: Path, shift: float) -> Path:
    """A copy of an int8 model whose class-0 logit is raised by `shift` (the float head's bias): a damaged
    model whose top-1 drop grows with `shift`."""
    m = onnx.load(str(src))
    init = next(i for i in m.graph.initializer if i.name == "head.bias")
    b = numpy_helper.to_array(init).copy()
    b[0] += np.float32(shift)
    init.CopyFrom(numpy_helper.from_array(b, init.name))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst))
    return dst


def test_quantized_model_is_int8_qdq_with_the_same_interface(toy):
    proto = onnx.load(str(toy["int8_path"]))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0 and ops["Conv"] > 0
    weights = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and i.name.endswith("weight_quantized")]
    float_convs = [n.input[1] for n in proto.graph.node if n.op_type == "Conv" and not n.input[1].endswith("DequantizeLinear_Output")]
    assert float_convs == ["stem.0.0.weight"]  # the RGB stem (3 input channels) stays float32: int8 is slower there
    assert len(weights) == ops["Conv"] - 1  # every other convolution's weights are int8
    first = next(n for n in proto.graph.node if "input" in n.input)
    assert first.op_type == "Sub"  # the input and the normalisation stay float32 (no Q/DQ for ORT to fuse the stem into)
    scale = next(i for i in proto.graph.initializer if i.name == weights[0].name.removesuffix("_quantized") + "_scale")
    assert list(scale.dims) == [weights[0].dims[0]]  # one scale per output channel
    head = next(n for n in proto.graph.node if "logits" in n.output)
    assert head.op_type == "Gemm" and head.input[1] == "head.weight"  # the classifier head stays float32
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits", "features"]
    meta = read_metadata(toy["int8_path"])
    assert meta["precision"] == "int8" and meta["classes"] == CLASSES and (meta["frames"], meta["size"]) == (FRAMES, SIZE)
    assert json.loads(meta["quantization"])["calibration_clips"] == 64
    assert toy["gate"]["bytes_int8"] < 0.5 * toy["gate"]["bytes_fp32"]


def test_every_convolution_can_be_quantized(toy, tmp_path):
    path = quantize_onnx(toy["onnx_path"], tmp_path / "all.onnx", [toy["train"][0][:16]], float_below_channels=0)
    proto = onnx.load(str(path))
    assert all(n.input[1].endswith("DequantizeLinear_Output") for n in proto.graph.node if n.op_type == "Conv")


def test_gate_passes_the_real_int8_model(toy):
    g = toy["gate"]
    assert g["passed"] and g["n"] == 200 and g["max_drop_points"] == 1.0
    assert g["top1_fp32"] >= 0.9  # the toy student did learn its task: the gate has something to lose
    assert g["drop_points"] <= 1.0 and g["top1_agreement"] >= 0.98
    assert 0 < g["max_abs_logit_diff"] < 1.0
    assert read_gate(toy["int8_path"].parent.parent) == json.loads((toy["int8_path"].parent / "gate.json").read_text())


def test_gate_refuses_a_damaged_model(toy, tmp_path):
    broken = _with_bias(toy["int8_path"], tmp_path / "broken.onnx", 100.0)  # every clip answers class 0
    g = accuracy_gate(toy["onnx_path"], broken, batched(*toy["test"]))
    assert not g["passed"] and g["drop_points"] > 50 and g["top1_agreement"] < 0.5


def test_gate_refuses_a_drop_over_the_allowed_one(toy, tmp_path):
    """A model that loses a few points passes with that many allowed and is refused with one point less."""
    x, y = toy["test"]
    logits = make_session(toy["int8_path"]).run(["logits"], {"input": x})[0]
    margin = logits.max(1) - logits[:, 0]  # how far class 0 is from the top for each clip
    shift = float(np.quantile(margin[(y != 0) & (logits.argmax(1) == y)], 0.15))  # flips ~15% of those clips to class 0
    hurt = _with_bias(toy["int8_path"], tmp_path / "hurt.onnx", shift + 1e-3)
    g = accuracy_gate(toy["onnx_path"], hurt, batched(x, y))
    assert 2.0 <= g["drop_points"] <= 40.0
    assert accuracy_gate(toy["onnx_path"], hurt, batched(x, y), max_drop_points=g["drop_points"])["passed"]
    assert not accuracy_gate(toy["onnx_path"], hurt, batched(x, y), max_drop_points=g["drop_points"] - 1.0)["passed"]


def test_quantize_and_gate_refuse_bad_input(toy, tmp_path):
    with pytest.raises(ValueError, match=r"max_drop_points must be .* got -1"):
        accuracy_gate(toy["onnx_path"], toy["int8_path"], batched(*toy["test"]), max_drop_points=-1)
    with pytest.raises(ValueError, match=r"calibration batches must be .*\(B, 3, T, H, W\).*got shape \(4, 32, 32\)"):
        quantize_onnx(toy["onnx_path"], tmp_path / "q.onnx", [np.zeros((4, 32, 32), np.float32)])
    with pytest.raises(ValueError, match="at least one clip"):
        quantize_onnx(toy["onnx_path"], tmp_path / "q.onnx", [])
    with pytest.raises(FileNotFoundError, match="missing.onnx does not exist"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "q.onnx", [toy["train"][0][:2]])
    x, y = toy["test"]
    with pytest.raises(ValueError, match="one label per clip"):
        accuracy_gate(toy["onnx_path"], toy["int8_path"], [(x[:4], y[:3])])
    with pytest.raises(FileNotFoundError, match="--int8"):
        read_gate(tmp_path)


def test_vidistill_serve_answers_with_the_int8_model(toy, tmp_path):
    grpc_port = free_port()
    proc = ServeProcess(str(toy["int8_path"]), tmp_path / "serve", "--grpc-port", str(grpc_port), "--threads", "1")
    try:
        client = httpclient.InferenceServerClient(proc.url.removeprefix("http://"))
        assert client.is_model_ready("vidistill")
        x = toy["test"][0][:3]
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        res = client.infer("vidistill", [inp], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)])
        want = make_session(toy["int8_path"]).run(["logits"], {"input": x})[0]
        np.testing.assert_allclose(res.as_numpy("logits"), want, atol=1e-5)
        assert (res.as_numpy("logits").argmax(1) == toy["test"][1][:3]).all()
    finally:
        stop(proc.proc)


@pytest.mark.parametrize("which", ["onnx_path", "int8_path"])
def test_model_repository_parses_with_tritons_schema_and_matches_the_graph(toy, tmp_path, which):
    name = "toy" if which == "onnx_path" else "toy-int8"
    folder = write_model_repository(toy[which], tmp_path / "repo", name, max_batch_size=16, preferred_batch_sizes=(4, 16))
    assert (folder / "1" / "model.onnx").read_bytes() == Path(toy[which]).read_bytes()
    cfg = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 16] and cfg.dynamic_batching.max_queue_delay_microseconds > 0
    graph = onnx.load(str(folder / "1" / "model.onnx")).graph

    def from_graph(values: Any) -> list[tuple[str, str, list[int]]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            assert t.shape.dim[0].dim_param  # the batch axis is dynamic, so the config leaves it out
            out.append((v.name, "TYPE_FP32" if t.elem_type == onnx.TensorProto.FLOAT else "?", [d.dim_value for d in t.shape.dim[1:]]))
        return out

    def from_config(values: Any) -> list[tuple[str, str, list[int]]]:
        return [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in values]

    assert from_config(cfg.input) == from_graph(graph.input) == [("input", "TYPE_FP32", [3, FRAMES, SIZE, SIZE])]
    assert from_config(cfg.output) == from_graph(graph.output)
    assert [o[0] for o in from_config(cfg.output)] == ["logits", "features"] and from_config(cfg.output)[0][2] == [len(CLASSES)]
    assert validate_model_repository(folder)["inputs"] == {"input": [3, FRAMES, SIZE, SIZE]}


def test_model_repository_validation_catches_a_mismatch(toy, tmp_path):
    folder = write_model_repository(toy["onnx_path"], tmp_path / "repo", "toy")
    cfg_path = folder / "config.pbtxt"
    text = cfg_path.read_text()
    assert text.count("dims: 64\n") == 1  # the features output (D = 64)
    cfg_path.write_text(text.replace("dims: 64\n", "dims: 65\n"))
    with pytest.raises(ModelRepositoryError, match="outputs .* do not match version 1"):
        validate_model_repository(folder)
    cfg_path.write_text("name: 'toy'\nnot_a_field: 3\n")
    with pytest.raises(ModelRepositoryError, match="not a valid Triton ModelConfig"):
        validate_model_repository(folder)
    with pytest.raises(ValueError, match=r"name 'a/b' must be letters"):
        model_config(toy["onnx_path"], "a/b")
    with pytest.raises(ValueError, match=r"preferred batch sizes \[64\] are outside 1..max_batch_size=32"):
        model_config(toy["onnx_path"], "toy", preferred_batch_sizes=(8, 64))
