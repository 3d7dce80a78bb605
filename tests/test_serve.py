"""The serving process (real uvicorn subprocess, real ONNX Runtime, real videos): KServe v2 protocol,
the champion from a real MLflow registry, every kind of bad request, dynamic batching."""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from mlflow_server import (  # noqa: F401  (fixtures)
    CLASSES,
    FRAMES,
    SIZE,
    ServeProcess,
    mlflow_server,
    stop,
    student_onnx,
    write_video,
)

from vidistill.data.video import load_clips
from vidistill.export.runtime import make_session
from vidistill.registry.models import promote, register_onnx

NAME = "vidistill-test-serve"
LIMIT_MB = 2


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One HTTP request on a fresh connection; returns (status, decoded JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def infer_body(x: np.ndarray, **extra: Any) -> bytes:
    data = np.round(x.astype(np.float64), 6).ravel().tolist()  # short decimals, the same float32 values
    spec = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}
    return json.dumps({"inputs": [spec], **extra}).encode()


def clip(seed: int, batch: int = 1) -> np.ndarray:
    """(B, 3, T, S, S) values with two decimals (compact JSON), float32."""
    return np.round(np.random.default_rng(seed).random((batch, 3, FRAMES, SIZE, SIZE)), 2).astype(np.float32)


@pytest.fixture(scope="module")
def server(mlflow_server, student_onnx, tmp_path_factory):  # noqa: F811
    """`python -m vidistill.serve --model models:/NAME@champion` after registering and promoting the student."""
    version = register_onnx(student_onnx["onnx_path"], model_name=NAME, metrics={"top1": 0.7},
                            parity=student_onnx["parity"], data_hash="eval-a", method="kd")
    assert promote(NAME, version, margin=0.01)["decision"] == "champion"
    proc = ServeProcess(f"models:/{NAME}@champion", tmp_path_factory.mktemp("serve"), "--max-body-mb", str(LIMIT_MB))
    proc.version = version
    yield proc
    stop(proc.proc)


@pytest.fixture(scope="module")
def reference(student_onnx):  # noqa: F811
    return make_session(student_onnx["onnx_path"])


def test_health_and_metadata(server):
    assert request(server.url, "GET", "/v2/health/live") == (200, {"live": True})
    status, server_meta = request(server.url, "GET", "/v2")
    assert status == 200 and server_meta["name"] == "vidistill"
    assert request(server.url, "GET", "/v2/health/ready") == (200, {"ready": True})
    status, meta = request(server.url, "GET", f"/v2/models/{NAME}")
    assert status == 200 and meta["name"] == NAME and meta["versions"] == [server.version]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, FRAMES, SIZE, SIZE]}]
    assert [(o["name"], o["shape"][:1], o["datatype"]) for o in meta["outputs"]] == [("logits", [-1], "FP32"), ("features", [-1], "FP32")]
    assert meta["outputs"][0]["shape"] == [-1, len(CLASSES)]
    assert meta["parameters"]["classes"] == CLASSES


def test_infer_matches_onnxruntime(server, reference):
    x = clip(1, batch=2)
    status, out = request(server.url, "POST", f"/v2/models/{NAME}/infer", infer_body(x, id="req-1"))
    assert status == 200, out
    assert out["model_name"] == NAME and out["id"] == "req-1"
    logits = next(o for o in out["outputs"] if o["name"] == "logits")
    assert logits["shape"] == [2, len(CLASSES)] and logits["datatype"] == "FP32"
    ref_logits, _ = reference.run(None, {"input": x})
    np.testing.assert_allclose(np.array(logits["data"]).reshape(2, -1), ref_logits, atol=1e-5)


def test_classify_video_upload(server, reference, tmp_path):
    video = write_video(tmp_path / "clip.avi")
    status, out = request(server.url, "POST", f"/v2/models/{NAME}/classify?top_k=3", video.read_bytes())
    assert status == 200, out
    assert out["clips"] == 1 and len(out["top_k"]) == 3
    clips, _ = load_clips(video, relpath="upload", train=False, frames=FRAMES, stride=2, clips=1, short_side=64, crop=SIZE)
    x = clips.transpose(0, 4, 1, 2, 3).astype(np.float32) / 255.0  # (1, 3, T, S, S)
    logits = reference.run(None, {"input": x})[0][0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    best = int(np.argmax(probs))
    assert out["top_k"][0]["label"] == CLASSES[best] and out["top_k"][0]["index"] == best
    assert out["top_k"][0]["score"] == pytest.approx(float(probs[best]), abs=1e-5)
    scores = [t["score"] for t in out["top_k"]]
    assert scores == sorted(scores, reverse=True)


def _bad_requests(tmp_path) -> list[tuple[str, str, bytes, dict[str, str], int, str]]:
    x = clip(2)
    spec = json.loads(infer_body(x))["inputs"][0]
    video = write_video(tmp_path / "whole.mp4").read_bytes()
    infer, classify = f"/v2/models/{NAME}/infer", f"/v2/models/{NAME}/classify"

    def body(**change: Any) -> bytes:
        return json.dumps({"inputs": [{**spec, **change}]}).encode()

    nan = list(spec["data"])
    nan[5] = float("nan")
    inf = list(spec["data"])
    inf[-1] = float("inf")
    return [
        ("malformed JSON", infer, b'{"inputs": [', {}, 400, "malformed JSON"),
        ("not an object", infer, b"[1, 2]", {}, 400, '"inputs"'),
        ("wrong input name", infer, body(name="rgb"), {}, 400, "unknown input 'rgb'"),
        ("wrong shape", infer, body(shape=[1, 3, FRAMES // 2, SIZE, SIZE]), {}, 400, "wrong shape"),
        ("wrong dtype", infer, body(datatype="INT64"), {}, 400, "FP32"),
        ("non-numbers", infer, body(data=["a"] * x.size), {}, 400, "list of numbers"),
        ("too few values", infer, body(data=[0.5] * 10), {}, 400, "needs"),
        ("NaN", infer, body(data=nan), {}, 400, "NaN/Inf"),
        ("Inf", infer, body(data=inf), {}, 400, "NaN/Inf"),
        ("unknown model", "/v2/models/nope/infer", infer_body(x), {}, 404, "'nope' not found"),
        ("unknown model metadata", "/v2/models/nope", b"", {}, 404, "not found"),
        ("oversized payload", classify, b"\0" * (LIMIT_MB * 1024 * 1024 + 1), {}, 413, "exceeds the limit"),
        ("corrupt video", classify, np.random.default_rng(0).bytes(4096), {}, 400, "not a usable video"),
        ("not a video", classify, b"hello, this is a text file\n" * 50, {}, 400, "not a usable video"),
        ("truncated video", classify, video[: len(video) // 3], {}, 400, "not a usable video"),
        ("empty body", classify, b"", {}, 400, "empty body"),
        ("top_k=0", classify + "?top_k=0", video, {}, 400, "top_k"),
        ("top_k not an int", classify + "?top_k=many", video, {}, 400, "top_k"),
    ]


def test_bad_requests_are_refused_and_the_server_keeps_serving(server, reference, tmp_path):
    x = clip(3)
    ref_logits, _ = reference.run(None, {"input": x})
    for what, path, body, headers, code, message in _bad_requests(tmp_path):
        method = "GET" if path == "/v2/models/nope" else "POST"
        status, out = request(server.url, method, path, body if method == "POST" else None, headers)
        assert status == code, (what, out)
        assert set(out) == {"error"} and message in out["error"], (what, out)
        status, ok = request(server.url, "POST", f"/v2/models/{NAME}/infer", infer_body(x))
        assert status == 200, (f"after {what}", ok)
        np.testing.assert_allclose(np.array(ok["outputs"][0]["data"]).reshape(1, -1), ref_logits, atol=1e-5)


def test_oversized_payload_refused_by_content_length_before_reading(server):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("POST", f"/v2/models/{NAME}/classify")
        conn.putheader("Content-Length", str(10 * 1024**3))  # announces 10 GiB, sends nothing
        conn.endheaders()
        resp = conn.getresponse()  # answered without the body ever arriving (else: timeout)
        assert resp.status == 413 and "exceeds the limit" in json.loads(resp.read())["error"]
    finally:
        conn.close()


def test_dynamic_batching_returns_each_request_its_own_rows(student_onnx, reference, tmp_path):  # noqa: F811
    proc = ServeProcess(str(student_onnx["onnx_path"]), tmp_path, "--name", "student", "--batching",
                        "--max-batch", "8", "--max-wait-ms", "50")
    try:
        inputs = [clip(100 + i, batch=1 + i % 2) for i in range(16)]

        def call(x: np.ndarray) -> tuple[int, Any]:
            return request(proc.url, "POST", "/v2/models/student/infer", infer_body(x))

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, inputs))
        for x, (status, out) in zip(inputs, results, strict=True):
            assert status == 200, out
            ref_logits, _ = reference.run(None, {"input": x})
            logits = np.array(out["outputs"][0]["data"]).reshape(x.shape[0], -1)
            np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
        status, _ = request(proc.url, "POST", "/v2/models/student/infer", infer_body(clip(1)[:, :2]))
        assert status == 400
    finally:
        stop(proc.proc)
