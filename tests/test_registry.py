"""Model registry against a real `mlflow server`: registration, gated promotion, refusal, rollback."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from mlflow_server import CLASSES, FRAMES, SIZE, mlflow_server, perturb_onnx, student_onnx  # noqa: F401  (fixtures)

from vidistill.export.onnx import check_parity
from vidistill.registry import tracking
from vidistill.registry.models import download_model, promote, register_onnx, rollback

NAME = "vidistill-test-registry"


def _aliases(name: str) -> dict[str, str]:
    return {a: str(v) for a, v in tracking.client().get_registered_model(name).aliases.items()}


@pytest.fixture(scope="module")
def registered(mlflow_server, student_onnx, tmp_path_factory):  # noqa: F811
    """Five versions of one model: three good ones, one whose ONNX file fails parity, one on another eval set."""
    path, parity = student_onnx["onnx_path"], student_onnx["parity"]
    bad_path = perturb_onnx(path, tmp_path_factory.mktemp("perturbed") / "model.onnx")
    x = torch.rand(2, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    bad_parity = check_parity(student_onnx["model"], bad_path, x)
    assert not bad_parity["passed"]
    common = {"model_name": NAME, "method": "sd"}
    with tracking.stage_run("register", params={"model": NAME}, tags={"data_hash": "eval-a"}, experiment="t-registry") as run:
        v = {
            "first": register_onnx(path, metrics={"top1": 0.50}, parity=parity, data_hash="eval-a", run_id=run.run_id, **common),
            "small_gain": register_onnx(path, metrics={"top1": 0.505}, parity=parity, data_hash="eval-a", **common),
            "big_gain": register_onnx(path, metrics={"top1": 0.60}, parity=parity, data_hash="eval-a", **common),
            "parity_failed": register_onnx(bad_path, metrics={"top1": 0.90}, parity=bad_parity, data_hash="eval-a", **common),
            "other_eval": register_onnx(path, metrics={"top1": 0.95}, parity=parity, data_hash="eval-b", **common),
        }
    return v, run.run_id


def test_register_tags_and_signature(registered):
    versions, run_id = registered
    assert [int(v) for v in versions.values()] == sorted(int(v) for v in versions.values())
    mv = tracking.client().get_model_version(NAME, versions["first"])
    assert mv.run_id == run_id
    tags = mv.tags
    assert tags["method"] == "sd" and tags["data_hash"] == "eval-a" and float(tags["top1"]) == 0.5
    assert tags["parity_passed"] == "true" and float(tags["parity_max_abs_diff"]) <= 1e-4
    assert tags["onnx_opset"] == "18" and json.loads(tags["classes"]) == CLASSES
    bad = tracking.client().get_model_version(NAME, versions["parity_failed"]).tags
    assert bad["parity_passed"] == "false" and float(bad["parity_max_abs_diff"]) > 1e-4
    import mlflow

    info = mlflow.models.get_model_info(f"models:/{NAME}/{versions['first']}")
    inputs = info.signature.inputs.to_dict()
    assert inputs == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 3, FRAMES, SIZE, SIZE)}, "name": "input"}]
    assert [o["name"] for o in info.signature.outputs.to_dict()] == ["logits", "features"]


def test_promotion_gate_and_rollback(registered):
    v, _ = registered
    first = promote(NAME, v["first"], margin=0.02)
    assert first["decision"] == "champion" and first["champion"] is None
    assert _aliases(NAME) == {"champion": v["first"]}

    small = promote(NAME, v["small_gain"], margin=0.02)  # +0.005 < margin
    assert small["decision"] == "challenger" and small["champion_version"] == v["first"]
    assert (small["candidate"], small["champion"]) == (0.505, 0.5)
    assert _aliases(NAME) == {"champion": v["first"], "challenger": v["small_gain"]}
    tags = tracking.client().get_model_version(NAME, v["small_gain"]).tags
    assert tags["promotion.decision"] == "challenger"
    assert float(tags["promotion.candidate_top1"]) == 0.505 and float(tags["promotion.champion_top1"]) == 0.5
    assert "does not beat" in tags["promotion.reason"]

    big = promote(NAME, v["big_gain"], margin=0.02)
    assert big["decision"] == "champion" and "beats" in big["reason"]
    assert _aliases(NAME)["champion"] == v["big_gain"]

    refused = promote(NAME, v["parity_failed"], margin=0.02)  # best top1, but its ONNX is wrong
    assert refused["decision"] == "refused" and "parity failed" in refused["reason"]
    other = promote(NAME, v["other_eval"], margin=0.02)
    assert other["decision"] == "refused" and "data_hash='eval-b'" in other["reason"] and "eval-a" in other["reason"]
    assert _aliases(NAME) == {"champion": v["big_gain"], "challenger": v["small_gain"]}
    tags = tracking.client().get_model_version(NAME, v["other_eval"]).tags
    assert tags["promotion.decision"] == "refused" and "evaluation sets differ" in tags["promotion.reason"]

    back = rollback(NAME)
    assert (back["from_version"], back["to_version"]) == (v["big_gain"], v["first"])
    assert _aliases(NAME)["champion"] == v["first"]
    with pytest.raises(ValueError, match="no previous champion"):
        rollback(NAME)
    assert rollback(NAME, to_version=v["big_gain"])["to_version"] == v["big_gain"]
    assert _aliases(NAME)["champion"] == v["big_gain"]
    with pytest.raises(ValueError, match="parity check did not pass"):
        rollback(NAME, to_version=v["parity_failed"])
    with pytest.raises(ValueError, match="margin must be >= 0"):
        promote(NAME, v["first"], margin=-0.1)


def test_download_champion_runs_in_onnxruntime(registered, tmp_path):
    v, _ = registered
    promote(NAME, v["first"], margin=0.0)  # makes sure a champion exists whatever ran before
    champion = _aliases(NAME)["champion"]
    got = download_model(f"models:/{NAME}@champion", tmp_path)
    assert got["version"] == champion and got["classes"] == CLASSES and got["onnx_path"].name == "model.onnx"
    session = ort.InferenceSession(str(got["onnx_path"]), providers=["CPUExecutionProvider"])
    logits, _ = session.run(None, {"input": np.random.default_rng(0).random((2, 3, FRAMES, SIZE, SIZE), dtype=np.float32)})
    assert logits.shape == (2, len(CLASSES))
    with pytest.raises(ValueError, match="cannot resolve"):
        download_model(f"models:/{NAME}@nope", tmp_path)


def test_register_refuses_bad_input(mlflow_server, student_onnx, tmp_path):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="does not exist"):
        register_onnx(tmp_path / "model.onnx", model_name=NAME, metrics={}, parity={"passed": True, "max_abs_diff": 0}, data_hash="x", method="sd")
    with pytest.raises(ValueError, match="check_parity"):
        register_onnx(student_onnx["onnx_path"], model_name=NAME, metrics={}, parity={}, data_hash="x", method="sd")
    with pytest.raises(ValueError, match="finite numbers"):
        register_onnx(student_onnx["onnx_path"], model_name=NAME, metrics={"top1": float("nan")},
                      parity=student_onnx["parity"], data_hash="x", method="sd")
