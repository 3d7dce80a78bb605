"""The GPU check on a CPU machine: its one-line exit, time boxes, failure isolation, settings, report;
`bench train` and `bench ort` at toy sizes; ONNX Runtime provider selection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vidistill import gpu_check
from vidistill.benchmarks import bench_overrides
from vidistill.gpu_check import BUDGET_S, Part, plan, run_check, run_part
from vidistill.gpu_report import readme_table, render_markdown

REPO = Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(bool(gpu_check.nvidia_gpus()), reason="checks the no-GPU answer; this machine has a GPU")


@no_gpu
@pytest.mark.parametrize("cmd", [["make", "--no-print-directory", "gpu-check"], ["bash", "scripts/gpu-check.sh"],
                                 [sys.executable, "-m", "vidistill.gpu_check"]])
def test_without_a_gpu_the_check_says_so_in_one_line(cmd: list[str], tmp_path: Path) -> None:
    proc = subprocess.run([*cmd, *([str(tmp_path / "out")] if cmd[0] == "bash" else [])], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == ["gpu-check: no NVIDIA GPU on this machine (nvidia-smi -L finds none): nothing to check"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def _bench_fn(what: str):
    from vidistill.benchmarks.ort import bench_ort
    from vidistill.benchmarks.train import bench_train
    from vidistill.flow.bench import bench_flow

    return {"flow": bench_flow, "train": bench_train, "ort": bench_ort}[what]


@pytest.mark.parametrize("profile", ["full", "smoke"])
def test_every_part_setting_is_a_real_benchmark_setting(profile: str) -> None:
    """A typo in a part's --set would only show on the GPU machine: every one must parse here."""
    parts = plan(profile)
    assert {p.name for p in parts} == {p.name for p in plan("full")}
    for part in parts:
        if part.what == "tests":
            assert all((REPO / f).is_file() for f in part.settings["files"].split(","))
            continue
        kwargs = bench_overrides(_bench_fn(part.what), [f"{k}={v}" for k, v in part.settings.items()])
        assert set(kwargs) == set(part.settings)
    assert sum(p.timeout for p in plan("full")) <= BUDGET_S


def test_full_plan_measures_what_the_issue_asks() -> None:
    parts = {p.name: p.settings for p in plan("full")}
    flow = bench_overrides(_bench_fn("flow"), [f"{k}={v}" for k, v in parts["flow_320x240"].items()])
    assert flow["sizes"] == ("320x240",) and {"off", "on"} <= set(flow["compile_modes"]) and "opencv-mp" in flow["backends"]
    assert flow["pairs"] >= 2 * 218  # at least two default GPU batches of 320x240
    assert bench_overrides(_bench_fn("flow"), [f"{k}={v}" for k, v in parts["flow_112x112"].items()])["sizes"] == ("112x112",)
    assert len(bench_overrides(_bench_fn("flow"), [f"{k}={v}" for k, v in parts["flow_memory"].items()])["batch_sizes"]) >= 3
    assert parts["train_8x56"]["device"] == "cuda" and parts["ort"]["batches"] == "1,8,32"


class _Fake(Part):
    """A part running a small Python snippet (writes `result` as JSON when it finishes)."""

    def command(self, python: str, result: Path) -> list[str]:
        return [python, "-c", self.settings["code"].replace("RESULT", repr(str(result)))]


def test_a_slow_part_is_cut_at_its_limit_and_the_others_still_report(tmp_path: Path) -> None:
    parts = [
        _Fake("slow", "fake", {"code": "import time; print('started', flush=True); time.sleep(60)"}, timeout=6),
        _Fake("broken", "fake", {"code": "raise SystemExit('boom')"}, timeout=30),
        _Fake("good", "fake", {"code": "import json; json.dump({'rows': [{'backend': 'torch-cuda', 'compile': 'on', "
                                        "'pairs_per_s': 512.0, 'epe_ref': 0.2, 'epe_ratio': 1.2}], 'errors': []}, open(RESULT, 'w'))"}),
        _Fake("silent", "fake", {"code": "print('no result file')"}),
    ]
    summary = run_check(tmp_path, parts=parts, budget=25, probe=False)
    p = summary["parts"]
    assert p["slow"]["status"] == "timeout" and 5 < p["slow"]["seconds"] < 15 and "started" in p["slow"]["output_tail"]
    assert p["broken"]["status"] == "error" and "boom" in p["broken"]["output_tail"]
    assert p["good"]["status"] == "ok" and p["good"]["result"]["rows"][0]["pairs_per_s"] == 512.0
    assert p["silent"]["status"] == "error" and p["silent"]["error"] == "no result written"
    failures = "\n".join(summary["failures"])
    assert "slow: timeout" in failures and "broken: error" in failures
    assert "1.2x OpenCV's (gate 1.05x)" in failures  # the accuracy gate fails the check too
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["parts"]["good"]["result"]["rows"][0]["compile"] == "on"
    assert "===== slow (timeout" in (tmp_path / "gpu_check.log").read_text()
    assert "| slow | timeout |" in (tmp_path / "gpu_check.md").read_text()


def test_run_part_never_raises_on_a_missing_interpreter(tmp_path: Path) -> None:
    out = run_part(_Fake("x", "fake", {"code": "pass"}), python=str(tmp_path / "no-python"), tmp=tmp_path,
                   log=tmp_path / "log", timeout=5, env={})
    assert out["status"] == "error" and "FileNotFoundError" in out["output_tail"]


@pytest.mark.slow
def test_smoke_profile_runs_the_real_parts_on_cpu(tmp_path: Path) -> None:
    """The check's own commands (pytest -m gpu, bench flow, bench train), at toy sizes, end to end."""
    proc = subprocess.run([sys.executable, "-m", "vidistill.gpu_check", "--profile", "smoke", "--out", str(tmp_path),
                           "--only", "tests_gpu", "--only", "flow_320x240", "--only", "train_8x56"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [line.split(":")[0] for line in proc.stdout.splitlines()[:3]] == [
        "gpu-check flow_320x240", "gpu-check tests_gpu", "gpu-check train_8x56"]
    tests = summary["parts"]["tests_gpu"]["result"]
    assert tests["failed"] == 0 and tests["skipped"] == len(tests["tests"]) > 0  # gpu tests skip on CPU
    flow = {r["backend"]: r for r in summary["parts"]["flow_320x240"]["result"]["rows"]}
    assert flow["torch-cpu"]["epe_ratio"] <= 1.05 and flow["opencv-mp"]["pairs"] == 2
    train = summary["parts"]["train_8x56"]["result"]["rows"]
    assert {(r["task"], r["precision"]) for r in train} == {(t, p) for t in ("teacher", "student:none") for p in ("fp32", "bf16")}
    assert all(r["clips_per_s"] > 0 for r in train)
    assert "| TV-L1, 320×240 |" in (tmp_path / "gpu_check.md").read_text()


def _fake_summary() -> dict:
    return {
        "profile": "full", "seconds": 301.5, "budget_s": 480, "failures": [],
        "environment": {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "driver": "580.1", "cpu": "Xeon", "cores": 16,
                        "torch": "2.11.0+cu130", "triton": "3.6.0", "onnxruntime": "1.30.0", "cv2": "4.12.0"},
        "headline": {"tvl1_320x240": {"best_compile": "on", "pairs_per_s": 1234.5, "eager_pairs_per_s": 321.0,
                                      "floor_met": True, "goal_met": True}, "recommended_tvl1_compile": "on"},
        "parts": {
            "tests_flow": {"status": "ok", "command": "pytest -m gpu tests/test_flow.py",
                           "result": {"passed": 7, "failed": 0, "skipped": 0, "tests": []}},
            "tests_gpu": {"status": "ok", "command": "pytest -m gpu tests/test_gpu.py",
                          "result": {"passed": 17, "failed": 1, "skipped": 2,
                                     "tests": [{"name": "test_gpu::test_x", "outcome": "failed", "message": "boom"},
                                               {"name": "test_gpu::test_ort", "outcome": "skipped", "message": "no CUDA EP"}]}},
            "flow_320x240": {"status": "ok", "command": "vidistill bench flow --set sizes=320x240", "result": {"workers": 16, "rows": [
                {"backend": "torch-cuda", "compile": "off", "pairs_per_s": 321.0, "speedup": 20.1, "epe_ref": 0.201,
                 "epe_ratio": 1.004, "peak_mib": 5600.0, "batch_size": 218},
                {"backend": "torch-cuda", "compile": "on", "pairs_per_s": 1234.5, "speedup": 77.2, "epe_ref": 0.2,
                 "epe_ratio": 0.999, "peak_mib": 2100.0, "batch_size": 218},
                {"backend": "torch-cuda", "compile": "graphs", "error": "RuntimeError: overwritten"},
                {"backend": "opencv-mp", "pairs": 32, "pairs_per_s": 16.0, "epe_ref": 0.2002, "epe": 0.2002}]}},
            "flow_memory": {"status": "ok", "command": "vidistill bench flow --set batch_sizes=32,128", "result": {"rows": [
                {"backend": "torch-cuda", "compile": "off", "batch_size": 32, "peak_mib": 800.0},
                {"backend": "torch-cuda", "compile": "off", "batch_size": 128, "peak_mib": 3100.0}]}},
            "train_8x56": {"status": "ok", "command": "vidistill bench train --set device=cuda", "result": {"rows": [
                {"task": "teacher", "model": "r2plus1d_teacher", "precision": "fp32", "batch_size": 64, "clips_per_s": 5000.0},
                {"task": "teacher", "model": "r2plus1d_teacher", "precision": "bf16", "batch_size": 64, "clips_per_s": 9000.0,
                 "speedup_vs_fp32": 1.8}]}},
            "train_16x112": {"status": "timeout", "error": "", "seconds": 35.0},
            "ort": {"status": "ok", "command": "vidistill bench ort", "result": {"rows": [
                {"runtime": "ort-cpu", "batch": 1, "p50_ms": 4.2, "clips_per_s": 238.1, "max_abs_diff": 1e-7},
                {"runtime": "ort-cuda", "batch": 1, "skipped": "onnxruntime 1.30.0 has no CUDAExecutionProvider"}]}},
        },
    }


def test_readme_table_is_made_from_the_summary() -> None:
    table = readme_table(_fake_summary())
    assert table.startswith("Machine: NVIDIA H200 (139.8 GiB), driver 580.1, Xeon (16 cores); torch 2.11.0+cu130")
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "7 passed, 0 failed, 0 skipped" in lines["GPU tests of TV-L1 (`-m gpu`)"]
    assert "17 passed, 1 failed, 2 skipped (failed: test_gpu::test_x) (skipped: no CUDA EP)" in lines[
        "GPU tests of training, ONNX Runtime, flow stage"]
    flow = lines["TV-L1, 320×240"]
    assert "`vidistill bench flow --set sizes=320x240`" in flow
    assert "CUDA compile=on: **1,234 pairs/s** (77.2× OpenCV), EPE 0.2 = 0.999× OpenCV's" in flow
    assert "compile=graphs: error RuntimeError: overwritten" in flow
    assert "OpenCV DualTVL1 over 16 CPU processes: 16 pairs/s, EPE 0.2 (on the first 32 pairs)" in flow
    assert "32 pairs: 800 MiB, 128 pairs: 3,100 MiB" in lines["TV-L1 peak GPU memory per batch size, 320×240"]
    assert "teacher (r2plus1d_teacher, batch 64): fp32 5,000, bf16 9,000 (1.8×) clips/s" in lines["training, 8×56×56 clips"]
    assert "**timeout**" in lines["training, 16×112×112 clips"]
    assert "ort-cuda: not measured: onnxruntime 1.30.0 has no CUDAExecutionProvider" in table
    assert "| TV-L1, 112×112 | — | not run |" in table and "| TV-L1, 320×240, CUDA graphs | — | not run |" in table
    md = render_markdown(_fake_summary())
    assert "best 1234.5 pairs/s with compile=on (eager 321.0); floor 300 met" in md and "`flow.tvl1_compile`: `on`" in md


# ----------------------------------------------------------------------------------------------
# the benchmarks the check runs, at toy sizes here


def test_bench_train_rows_on_cpu() -> None:
    from vidistill.benchmarks.train import bench_train

    r = bench_train(device="cpu", methods=("kd",), teacher="r2plus1d_student", precisions=("fp32", "bf16"),
                    batch_size=2, frames=4, size=16, steps=1, warmup=0)
    assert r["errors"] == [] and r["device"] == "cpu"
    assert [(x["task"], x["precision"]) for x in r["rows"]] == [("teacher", "fp32"), ("teacher", "bf16"),
                                                               ("student:kd", "fp32"), ("student:kd", "bf16")]
    assert all(x["clips_per_s"] > 0 and np.isfinite(x["loss"]) and x["peak_mib"] is None for x in r["rows"])
    assert r["rows"][0]["speedup_vs_fp32"] == 1.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"precisions": ("fp8",)}, "precisions"),
    ({"methods": ("nope",)}, "unknown distillation method"),
    ({"teacher": "resnet"}, "unknown model"),
    ({"steps": 0}, "steps >= 1"),
])
def test_bench_train_refuses_bad_settings(kwargs: dict, message: str) -> None:
    from vidistill.benchmarks.train import bench_train
    from vidistill.config import ConfigError

    with pytest.raises((ValueError, ConfigError), match=message):
        bench_train(device="cpu", **kwargs)


def test_bench_ort_cpu_rows_and_missing_cuda_provider() -> None:
    import onnxruntime as ort

    from vidistill.benchmarks.ort import bench_ort

    r = bench_ort(runtimes=("ort-cpu", "ort-cuda", "torch-cpu"), batches=(1, 2), frames=4, size=16, iters=2, warmup=0)
    rows = {(x["runtime"], x["batch"]): x for x in r["rows"]}
    assert r["errors"] == []
    for b in (1, 2):
        assert rows["ort-cpu", b]["max_abs_diff"] <= 1e-4 and rows["ort-cpu", b]["top1_agreement"] == 1.0
        assert rows["ort-cpu", b]["providers"] == "CPU" and rows["ort-cpu", b]["speedup_vs_ort_cpu"] == 1.0
        assert rows["torch-cpu", b]["max_abs_diff"] == 0.0
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "install onnxruntime-gpu" in rows["ort-cuda", 1]["skipped"] and r["skipped"]


def test_make_session_providers(tmp_path: Path) -> None:
    import onnxruntime as ort

    from vidistill.benchmarks.ort import bench_ort  # noqa: F401 - imports the exporter's dependencies once
    from vidistill.export.onnx import export_onnx
    from vidistill.export.runtime import make_session
    from vidistill.models import create_model

    torch.manual_seed(0)
    path = export_onnx(create_model("r2plus1d_student", num_classes=3, frames=4, size=16), tmp_path)
    assert make_session(path, providers=["cpu"]).get_providers() == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match=r"has no CUDAExecutionProvider \(install onnxruntime-gpu"):
            make_session(path, providers=["cuda"])
    with pytest.raises(ValueError, match="has no TensorrtExecutionProvider"):
        make_session(path, providers=["TensorrtExecutionProvider"])


def test_bench_flow_reference_subset_and_a_failing_mode() -> None:
    """OpenCV (the process pool) solves the first pairs only; every row is compared on those; a compile
    mode that cannot run here ("graphs" needs CUDA) is an error row, and the others still report."""
    from vidistill.flow.bench import bench_flow

    r = bench_flow(sizes=("48x40",), pairs=3, backends=("torch-cpu", "opencv-mp"), reference_pairs=2,
                   compile_modes=("off", "graphs"), workers=2, nscales=2, warps=1)
    rows = {(x["backend"], x["compile"]): x for x in r["rows"]}
    assert r["reference"] == "opencv-mp" and rows["opencv-mp", None]["pairs"] == 2
    eager = rows["torch-cpu", "off"]
    assert eager["pairs"] == 3 and eager["path"] == "eager" and eager["epe_ratio"] <= 1.05 and eager["speedup"] > 0
    assert eager["pixel_iterations_per_pair"] > 0 and eager["model_gb_s"] > 0
    assert "needs a CUDA device" in rows["torch-cpu", "graphs"]["error"]
    assert any("compile=graphs" in e for e in r["errors"])


def test_bench_flow_refuses_bad_settings() -> None:
    from vidistill.flow.bench import bench_flow

    for kwargs, message in [({"sizes": ("320by240",)}, "WIDTHxHEIGHT"), ({"compile_modes": ("fast",)}, "compile_modes"),
                            ({"batch_sizes": (-1,)}, "batch sizes"), ({"backends": ("cuda",)}, "unknown backends")]:
        with pytest.raises(ValueError, match=message):
            bench_flow(**kwargs)


def test_junit_outcomes(tmp_path: Path) -> None:
    from vidistill.gpu_check import _junit

    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.test_gpu" name="a"/>'
                   '<testcase classname="tests.test_gpu" name="b"><skipped message=" "/></testcase>'
                   '<testcase classname="tests.test_flow" name="c"><failure message="assert 1 == 2&#10;more">tb</failure>'
                   '</testcase></testsuite></testsuites>')
    assert _junit(xml) == {"passed": 1, "failed": 1, "skipped": 1, "tests": [
        {"name": "test_gpu::a", "outcome": "passed", "message": ""},
        {"name": "test_gpu::b", "outcome": "skipped", "message": ""},
        {"name": "test_flow::c", "outcome": "failed", "message": "assert 1 == 2"}]}
