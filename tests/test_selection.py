"""A champion within a latency budget (issue 29), and the export/register stages' deployment outputs: int8
model + gate and model repository from `vidistill export`, `vidistill register --precision int8
--latency-budget-ms`, against a real `mlflow server`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow_server import mlflow_server, student_onnx  # noqa: F401  (fixtures)

from vidistill import stages
from vidistill.config import ConfigError, ExportConfig, PrepConfig, RegisterConfig, SynthConfig
from vidistill.data import ClipDataset
from vidistill.evaluate.report import decision_text
from vidistill.export.model_repository import validate_model_repository
from vidistill.models import create_model
from vidistill.registry import tracking
from vidistill.registry.models import promote, register_onnx
from vidistill.registry.selection import (
    frontier,
    frontier_markdown,
    measure_latency,
    pick_within_budget,
    plot_frontier,
    select_champion,
)
from vidistill.train import save_model

NAME = "vidistill-test-budget"


def _cand(version: int, accuracy: float, latency_ms: float) -> dict:
    return {"version": str(version), "accuracy": accuracy, "latency_ms": latency_ms}


def test_pick_within_budget_and_frontier():
    cands = [_cand(1, 0.90, 5.0), _cand(2, 0.80, 1.0), _cand(3, 0.85, 2.0), _cand(4, 0.85, 1.5), _cand(5, 0.70, 3.0)]
    assert pick_within_budget(cands, 10.0)["version"] == "1"
    assert pick_within_budget(cands, 4.0)["version"] == "4"  # 0.85 twice within budget: the faster one
    assert pick_within_budget(cands, 1.2)["version"] == "2"
    assert pick_within_budget(cands, 0.5) is None
    assert frontier(cands) == ["2", "4", "1"]
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="latency budget must be a positive number of ms per clip"):
            pick_within_budget(cands, bad)


def test_budget_that_excludes_the_most_accurate_student_picks_the_next(mlflow_server, student_onnx, tmp_path):  # noqa: F811
    """Five versions with known latencies; a budget below the most accurate one's latency picks the next most
    accurate under it; versions that failed parity or their int8 gate are never picked, even when best."""
    path, parity = student_onnx["onnx_path"], student_onnx["parity"]
    bad_parity = {**parity, "passed": False, "max_abs_diff": 0.5}

    def reg(top1: float, latency: float, *, parity: dict = parity, **tags: str) -> str:
        return register_onnx(path, model_name=NAME, metrics={"top1": top1}, parity=parity, data_hash="eval-a", method="kd",
                             extra_tags={"latency_ms": repr(latency), "precision": "fp32", **tags})

    v = {
        "best_slow": reg(0.90, 5.0),
        "next": reg(0.85, 2.0),
        "fast": reg(0.80, 1.0),
        "int8_failed": reg(0.95, 0.5, precision="int8", int8_gate_passed="false"),
        "parity_failed": reg(0.99, 0.5, parity=bad_parity),
    }
    s = select_champion(NAME, 3.0)
    assert s["decision"] == "champion" and s["champion_version"] == v["next"]
    assert tracking.client().get_registered_model(NAME).aliases["champion"] == v["next"]
    assert f"more accurate but over budget: v{v['best_slow']}" in s["reason"]
    assert {c["version"] for c in s["candidates"]} == {v["best_slow"], v["next"], v["fast"]}
    assert any("int8 accuracy gate failed" in e for e in s["excluded"]) and any("parity failed" in e for e in s["excluded"])
    assert {c["version"] for c in s["candidates"] if c["on_frontier"]} == {v["best_slow"], v["next"], v["fast"]}
    tags = tracking.client().get_model_version(NAME, v["next"]).tags
    assert tags["promotion.decision"] == "champion" and float(tags["promotion.latency_budget_ms"]) == 3.0

    assert select_champion(NAME, 1.5)["champion_version"] == v["fast"]
    assert select_champion(NAME, 50.0)["champion_version"] == v["best_slow"]
    none = select_champion(NAME, 0.1)
    assert none["decision"] == "none_within_budget" and none["champion_version"] == v["best_slow"]
    assert "no eligible version runs within 0.1 ms per clip" in none["reason"]
    history = json.loads(tracking.client().get_registered_model(NAME).tags["champion_history"])
    assert history == [v["next"], v["fast"], v["best_slow"]]

    # the margin gate refuses an int8 version whose gate failed
    assert promote(NAME, v["int8_failed"], margin=0.0)["decision"] == "refused"

    s = select_champion(NAME, 3.0)
    md = frontier_markdown(s)
    assert f"| v{v['next']} | kd | fp32 | 0.8500 | 2.000 | yes | yes | **champion** |" in md
    assert f"| v{v['best_slow']} | kd | fp32 | 0.9000 | 5.000 | no | yes |  |" in md
    png = plot_frontier(s, tmp_path / "frontier.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the pipeline report's decision paragraph carries the same table, champion marked
    text = decision_text({"registered": True, "model_name": NAME, "version": v["fast"], "method": "kd", "decision": s})
    assert text.startswith(f"**champion** within 3 ms per clip: `{NAME}` version {v['fast']}") and "**champion** |" in text


def test_measure_latency(student_onnx, tmp_path):  # noqa: F811
    ms = measure_latency(student_onnx["onnx_path"], threads=1, iters=5, warmup=1)
    assert 0 < ms < 1000
    with pytest.raises(ValueError, match="threads >= 1"):
        measure_latency(student_onnx["onnx_path"], threads=0)
    with pytest.raises(FileNotFoundError):
        measure_latency(tmp_path / "missing.onnx")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Real synthetic videos prepped to 4x32x32 clips and an (untrained, seeded) student file."""
    root = tmp_path_factory.mktemp("deploy")
    synth = SynthConfig(out=str(root / "raw"), videos_per_class=3, frames=12, width=48, height=36, seed=0)
    prep = PrepConfig(dataset="synthetic", root=synth.out, out=str(root / "clips"), frames=4, stride=2, short_side=32,
                      crop=32, synth=synth)
    stages.prep(prep, progress=False, track=False)
    train = ClipDataset(prep.out, "train")
    torch.manual_seed(0)
    model = create_model("r2plus1d_student", num_classes=train.num_classes, frames=train.frames, size=train.size)
    path = save_model(root / "student" / "model.pt", model, classes=train.classes)
    return {"root": str(root), "clips": prep.out, "model": str(path), "classes": train.classes}


def test_export_stage_writes_int8_and_the_model_repository_then_register_picks_within_budget(data, mlflow_server):  # noqa: F811
    out = Path(data["root"]) / "onnx"
    r = stages.export(ExportConfig(model=data["model"], clips=data["clips"], out=str(out), int8=True, calibration_clips=8,
                                   int8_max_drop=100.0, repository_name="synthetic"), track=False)
    gate = r["int8"]
    assert gate["passed"] and gate["n"] == len(ClipDataset(data["clips"], "test")) and 0 <= gate["top1_agreement"] <= 1
    assert json.loads((out / "int8" / "gate.json").read_text())["drop_points"] == gate["drop_points"]
    assert set(r["repository"]) == {"synthetic", "synthetic-int8"}
    for folder in r["repository"].values():
        info = validate_model_repository(folder)
        assert info["versions"] == [1] and info["outputs"]["logits"] == [len(data["classes"])]

    metrics = Path(data["root"]) / "metrics.json"
    metrics.write_text(json.dumps({"top1": 0.5, "top5": 1.0, "data_hash": "h-deploy", "classes": data["classes"]}))
    common = {"onnx": str(out), "metrics": str(metrics), "model_name": "vidistill-test-deploy", "method": "kd"}
    fp32 = stages.register(RegisterConfig(**common, latency_budget_ms=1000.0), track=False)
    int8 = stages.register(RegisterConfig(**common, precision="int8", latency_budget_ms=1000.0), track=False)
    c = tracking.client()
    t32, t8 = (c.get_model_version("vidistill-test-deploy", x["version"]).tags for x in (fp32, int8))
    assert t32["precision"] == "fp32" and t8["precision"] == "int8" and t8["int8_gate_passed"] == "true"
    assert float(t8["latency_ms"]) > 0 and t8["latency_threads"] == "1"
    assert float(t8["top1"]) == pytest.approx(0.5 - max(gate["drop_points"], 0) / 100)
    assert int8["decision"]["decision"] == "champion"
    assert {x["version"] for x in int8["decision"]["candidates"]} == {fp32["version"], int8["version"]}

    # a gate that fails: the int8 model is kept for inspection, but never registered as int8
    (out / "int8" / "gate.json").write_text(json.dumps({**gate, "passed": False, "drop_points": 3.0, "max_drop_points": 1.0}))
    with pytest.raises(ValueError, match=r"failed its accuracy gate \(top-1 drop 3.00 points > 1\); register precision fp32"):
        stages.register(RegisterConfig(**common, precision="int8"), track=False)

    # an export without int8 removes the earlier int8 model and its repository entry (never registered by mistake)
    again = stages.export(ExportConfig(model=data["model"], clips=data["clips"], out=str(out), repository_name="synthetic"),
                          track=False)
    assert again["int8"] is None and set(again["repository"]) == {"synthetic"}
    assert not (out / "int8").exists() and not (out / "model_repository" / "synthetic-int8").exists()
    with pytest.raises(FileNotFoundError, match="export with `vidistill export --int8` first"):
        stages.register(RegisterConfig(**common, precision="int8"), track=False)


def test_deployment_settings_are_checked():
    with pytest.raises(ConfigError, match="register.latency_budget_ms must be >= 0"):
        RegisterConfig(latency_budget_ms=-1.0).validate()
    with pytest.raises(ConfigError, match="register.precision must be fp32 or int8, got 'fp16'"):
        RegisterConfig(precision="fp16").validate()
    with pytest.raises(ConfigError, match="export.int8_max_drop must be >= 0"):
        ExportConfig(int8_max_drop=-0.5).validate()
    with pytest.raises(ConfigError, match="export.repository_name must be"):
        ExportConfig(repository_name="a/b").validate()
