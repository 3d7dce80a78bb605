"""`vidistill bench ort`'s deployment rows (issue 29): fp32 vs int8 ONNX Runtime and OpenVINO (f32) on the
same export, at 1 thread and at the runtime's default, with the model files' sizes and parity."""

from __future__ import annotations

import pytest

from vidistill.benchmarks import bench_overrides
from vidistill.benchmarks.ort import bench_ort


def test_fp32_int8_and_openvino_rows_side_by_side():
    """In a process of its own: OpenVINO's runtime, once loaded into pytest's process, made a later test
    segfault (seen in a full run: test_refusals after test_real_video)."""
    import json
    import subprocess
    import sys

    pytest.importorskip("openvino")
    code = ("import json, sys; from vidistill.benchmarks.ort import bench_ort; "
            "r = bench_ort(runtimes=('ort-cpu', 'ort-cpu-int8', 'openvino-cpu'), batches=(1, 2), threads=(1, 0), "
            "frames=4, size=16, iters=2, warmup=0); json.dump(r, sys.stdout, default=str)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["errors"] == [] and r["skipped"] == []
    rows = {(x["runtime"], x["threads"], x["batch"]): x for x in r["rows"]}
    assert len(rows) == len(r["rows"]) == 3 * 2 * 2
    for t in (1, 0):
        for b in (1, 2):
            fp32, int8, ov = rows["ort-cpu", t, b], rows["ort-cpu-int8", t, b], rows["openvino-cpu", t, b]
            assert fp32["speedup_vs_ort_cpu"] == 1.0 and int8["speedup_vs_ort_cpu"] > 0 and ov["speedup_vs_ort_cpu"] > 0
            assert int8["model_bytes"] < 0.5 * fp32["model_bytes"] == 0.5 * ov["model_bytes"]
            assert ov["max_abs_diff"] <= 1e-4 and ov["top1_agreement"] == 1.0  # f32 hint: OpenVINO computes what ORT does
            assert 1e-4 < int8["max_abs_diff"] < 1.0  # int8 differs, but boundedly
            assert 0 < int8["p50_ms"] and 0 < ov["p50_ms"]
    md = r["markdown"].splitlines()
    assert md[0].startswith("| runtime | threads | batch | ms per clip (p50) |") and len(md) == 2 + 12
    assert md[2].startswith("| ort-cpu | 1 | 1 |") and "| 1.00x |" in md[2] and any(line.startswith("| ort-cpu-int8 | default | 2 |") for line in md)


def test_threads_setting_is_typed_and_checked():
    assert bench_overrides(bench_ort, ["threads=1,0", "runtimes=ort-cpu,ort-cpu-int8"]) == {
        "threads": (1, 0), "runtimes": ("ort-cpu", "ort-cpu-int8")}
    with pytest.raises(ValueError, match=r"threads must be counts >= 0 .* got \(-1,\)"):
        bench_ort(runtimes=("ort-cpu",), threads=(-1,))
    with pytest.raises(ValueError, match="runtimes must be some of"):
        bench_ort(runtimes=("ort-cpu-fp16",))


def test_conv_profile_names_every_convolution_for_each_precision():
    from vidistill.benchmarks.ort import conv_profile

    r = conv_profile(frames=4, size=16, batch=1, runs=2)
    assert set(r["totals"]) == {"fp32", "int8_8", "int8_0"} and all(v > 0 for v in r["totals"].values())
    assert len(r["rows"]) == 17 and r["rows"][0]["weight"].startswith("17x3x1x3x3")  # the RGB stem first
    for row in r["rows"]:  # every convolution found in every profile (fused names included)
        assert all(row[f"{k}_ms"] >= 0 for k in r["totals"]), row
    assert r["markdown"].count("\n") == 2 + 17 + 1
    with pytest.raises(ValueError, match="must be >= 1"):
        conv_profile(runs=0)
