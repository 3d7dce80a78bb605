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
    with pytest.raises(ValueError, match="has no alias .nope."):
        download_model(f"models:/{NAME}@nope", tmp_path)


def test_register_refuses_bad_input(mlflow_server, student_onnx, tmp_path):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="does not exist"):
        register_onnx(tmp_path / "model.onnx", model_name=NAME, metrics={}, parity={"passed": True, "max_abs_diff": 0}, data_hash="x", method="sd")
    with pytest.raises(ValueError, match="check_parity"):
        register_onnx(student_onnx["onnx_path"], model_name=NAME, metrics={}, parity={}, data_hash="x", method="sd")
    with pytest.raises(ValueError, match="finite numbers"):
        register_onnx(student_onnx["onnx_path"], model_name=NAME, metrics={"top1": float("nan")},
                      parity=student_onnx["parity"], data_hash="x", method="sd")


# ------------------------------------------------------------------------------------------------
# deleted versions and every models:/ URI form MLflow accepts

DELETED = "vidistill-test-deleted"


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from vidistill import cli

    capsys.readouterr()  # drop what earlier calls (MLflow's registration logs) wrote
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code: int, err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


def test_deleted_versions_rollback_promote_serve(mlflow_server, student_onnx, tmp_path, capsys):  # noqa: F811
    """Versions deleted from a real MLflow registry: rollback skips them, promote/rollback/serve of a
    deleted one answer one line, every URI form resolves to what exists."""
    import subprocess
    import sys

    from mlflow_server import ServeProcess, stop

    from vidistill.registry.models import resolve

    path, parity = student_onnx["onnx_path"], student_onnx["parity"]
    v = [register_onnx(path, model_name=DELETED, metrics={"top1": t}, parity=parity, data_hash="eval-a", method="kd")
         for t in (0.5, 0.6, 0.7, 0.8)]
    for version in v[:3]:
        assert promote(DELETED, version, margin=0.01)["decision"] == "champion"
    assert _aliases(DELETED) == {"champion": v[2]}
    c = tracking.client()

    # the previous champion was deleted: rollback skips it and lands on the one before
    c.delete_model_version(DELETED, v[1])
    back = rollback(DELETED)
    assert back["skipped"] == [v[1]] and (back["from_version"], back["to_version"]) == (v[2], v[0])
    assert _aliases(DELETED)["champion"] == v[0]

    # a deleted version named explicitly: one line naming what exists
    code, _, err = _cli(capsys, "rollback", "--model-name", DELETED, "--version", v[1])
    _one_line_error(code, err, f"has no version {v[1]} (deleted or never registered); its versions are {v[0]}, {v[2]}, {v[3]}")
    code, _, err = _cli(capsys, "promote", "--model-name", DELETED, "--version", v[1], "--margin", "0")
    _one_line_error(code, err, f"has no version {v[1]}")
    code, _, err = _cli(capsys, "promote", "--model-name", "no-such-model", "--version", "1")
    _one_line_error(code, err, "registered model 'no-such-model' does not exist")

    # the champion itself deleted: its alias goes with it; serve and rollback say so in one line
    c.delete_model_version(DELETED, v[0])
    assert "champion" not in _aliases(DELETED)
    with pytest.raises(ValueError, match="has no alias 'champion'"):
        resolve(f"models:/{DELETED}@champion")
    code, _, err = _cli(capsys, "rollback", "--model-name", DELETED)
    _one_line_error(code, err, "no previous champion to roll back to")
    r = subprocess.run([sys.executable, "-m", "vidistill.cli", "serve", "--model", f"models:/{DELETED}@champion", "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    _one_line_error(r.returncode, r.stderr, "port must be")  # settings are checked before the registry...
    from vidistill.registry.server import free_port

    r = subprocess.run([sys.executable, "-m", "vidistill.cli", "serve", "--model", f"models:/{DELETED}@champion",
                        "--port", str(free_port()), "--grpc-port", str(free_port())], capture_output=True, text=True, timeout=120)
    _one_line_error(r.returncode, r.stderr, f"{DELETED!r} has no alias 'champion'")  # ...then the URI, before binding
    r = subprocess.run([sys.executable, "-m", "vidistill.cli", "serve", "--model", f"models:/{DELETED}/{v[0]}",
                        "--port", str(free_port()), "--grpc-port", str(free_port())], capture_output=True, text=True, timeout=120)
    _one_line_error(r.returncode, r.stderr, f"has no version {v[0]}")

    # every URI form MLflow accepts resolves to an existing version
    assert resolve(f"models:/{DELETED}/latest").version == v[3]
    assert resolve(f"models:/{DELETED}/LATEST").version == v[3]
    assert resolve(f"models:/{DELETED}/{v[2]}").version == v[2]
    code, out, err = _cli(capsys, "rollback", "--model-name", DELETED, "--version", v[2])
    assert code == 0, err
    assert resolve(f"models:/{DELETED}@champion").version == v[2]
    with pytest.raises(ValueError, match="has no version in stage 'Production'"):
        resolve(f"models:/{DELETED}/Production")
    for bad in (f"models:/{DELETED}", "models:/", f"runs:/abc/model", f"models:/{DELETED}/1/2"):
        with pytest.raises(ValueError, match="expected a registry URI"):
            resolve(bad)

    # serving models:/NAME/latest works and reports the version it resolved to
    proc = ServeProcess(f"models:/{DELETED}/latest", tmp_path / "serve", "--grpc-port", str(free_port()))
    try:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=30)
        conn.request("GET", f"/v2/models/{DELETED}")
        meta = json.loads(conn.getresponse().read())
        conn.close()
        assert meta["versions"] == [v[3]]
    finally:
        stop(proc.proc)

    # the whole model deleted
    c.delete_registered_model(DELETED)
    with pytest.raises(ValueError, match=f"registered model {DELETED!r} does not exist"):
        resolve(f"models:/{DELETED}/latest")
