"""The serving process (real uvicorn + grpc.aio subprocess, real ONNX Runtime, real videos) driven by
NVIDIA's `tritonclient` over HTTP (JSON, binary, mixed) and gRPC: the KServe v2 protocol checks of
`vidistill.serve.conformance`, the champion from a real MLflow registry, every kind of bad request
with a valid one after each, Prometheus metrics, dynamic batching across both protocols."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from mlflow_server import (  # noqa: F401  (fixtures)
    CLASSES,
    FRAMES,
    SIZE,
    ServeProcess,
    free_port,
    mlflow_server,
    stop,
    student_onnx,
    write_video,
)
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from vidistill.data.video import load_clips
from vidistill.export.runtime import make_session
from vidistill.registry.models import promote, register_onnx
from vidistill.serve import conformance

NAME = "vidistill-test-serve"
LIMIT_MB = 8


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


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics parsed with prometheus_client's own parser: {(sample name, labels): value}."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
        text = resp.read().decode()
    finally:
        conn.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


class Served:
    """A server process with its REST URL, gRPC address and registry version."""

    def __init__(self, proc: ServeProcess, grpc_port: int, version: str) -> None:
        self.proc = proc
        self.url = proc.url
        self.http_addr = proc.url.removeprefix("http://")
        self.grpc_addr = f"127.0.0.1:{grpc_port}"
        self.version = version


@pytest.fixture(scope="module")
def server(mlflow_server, student_onnx, tmp_path_factory):  # noqa: F811
    """`python -m vidistill.serve --model models:/NAME@champion` (REST + gRPC) after registering and promoting the student."""
    version = register_onnx(student_onnx["onnx_path"], model_name=NAME, metrics={"top1": 0.7},
                            parity=student_onnx["parity"], data_hash="eval-a", method="kd")
    assert promote(NAME, version, margin=0.01)["decision"] == "champion"
    gport = free_port()
    proc = ServeProcess(f"models:/{NAME}@champion", tmp_path_factory.mktemp("serve"), "--max-body-mb", str(LIMIT_MB),
                        "--grpc-port", str(gport))
    yield Served(proc, gport, version)
    stop(proc.proc)


@pytest.fixture(scope="module")
def reference(student_onnx):  # noqa: F811
    return make_session(student_onnx["onnx_path"])


@pytest.fixture(scope="module")
def target(server, reference):
    return conformance.Target(server.http_addr, server.grpc_addr, NAME, reference, server.version, messages=True)


@pytest.mark.parametrize("check", conformance.HTTP_CHECKS + conformance.GRPC_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_protocol_with_tritonclient(target, check):
    """Each check of the conformance suite: results equal ONNX Runtime's, refusals in the protocol's shape."""
    check(target)


def test_conformance_checks_can_fail(target):
    """The checks are not vacuous: a target that names the wrong version or expects other results fails them."""
    wrong = conformance.Target(target.http_addr, target.grpc_addr, NAME, target.reference, "999", messages=True)
    with pytest.raises(InferenceServerException, match="version"):
        conformance.check_infer_versioned(wrong)
    scaled = conformance.Target(target.http_addr, target.grpc_addr, NAME, target.reference, target.version, messages=True)
    scaled.expected = lambda x: {k: v * 1.01 + 0.01 for k, v in target.expected(x).items()}  # type: ignore[method-assign]
    with pytest.raises(AssertionError):
        conformance.check_infer_binary(scaled)
    with pytest.raises(AssertionError):
        conformance.check_infer_grpc(scaled)


def test_metadata_over_both_protocols(server):
    meta = httpclient.InferenceServerClient(server.http_addr).get_model_metadata(NAME, server.version)
    assert meta["versions"] == [server.version] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, FRAMES, SIZE, SIZE]}]
    assert [(o["name"], o["shape"]) for o in meta["outputs"]][0] == ("logits", [-1, len(CLASSES)])
    assert meta["parameters"]["classes"] == CLASSES
    g = grpcclient.InferenceServerClient(server.grpc_addr).get_model_metadata(NAME, as_json=True)
    assert g["versions"] == [server.version] and [int(d) for d in g["inputs"][0]["shape"]] == [-1, 3, FRAMES, SIZE, SIZE]
    status, smeta = request(server.url, "GET", "/v2")
    assert status == 200 and smeta["name"] == "vidistill" and "binary_tensor_data" in smeta["extensions"]


def test_output_names_are_checked_before_the_model_runs(server, target):
    """An unknown output is refused without an ONNX Runtime call (the batch-size histogram does not move)."""
    x = target.clip(20)
    before = sample(metrics(server.url), "vidistill_batch_size_count")
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="unknown output 'probs'"):
        target.http.infer(NAME, [inp], outputs=[httpclient.InferRequestedOutput("probs")])
    ginp = grpcclient.InferInput("input", list(x.shape), "FP32")
    ginp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="unknown output"):
        target.grpc.infer(NAME, [ginp], outputs=[grpcclient.InferRequestedOutput("probs")])
    assert sample(metrics(server.url), "vidistill_batch_size_count") == before
    target.http.infer(NAME, [inp])
    assert sample(metrics(server.url), "vidistill_batch_size_count") == before + 1


def test_metrics_count_requests_by_status(server, target):
    x = target.clip(21)
    before = metrics(server.url)
    path = f"/v2/models/{NAME}/infer"
    body = json.dumps(target.json_body(x)).encode()
    assert request(server.url, "POST", path, body)[0] == 200
    assert request(server.url, "POST", path, b"{")[0] == 400
    assert request(server.url, "POST", f"/v2/models/{NAME}/versions/{server.version}/infer", body)[0] == 200
    target.valid_grpc()
    after = metrics(server.url)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    rest = {"protocol": "rest", "endpoint": "/v2/models/{name}/infer"}
    assert delta("vidistill_requests_total", **rest, code="200") == 1
    assert delta("vidistill_requests_total", **rest, code="400") == 1
    assert delta("vidistill_requests_total", protocol="rest", endpoint="/v2/models/{name}/versions/{version}/infer", code="200") == 1
    assert delta("vidistill_requests_total", protocol="grpc", endpoint="ModelInfer", code="OK") == 1
    assert delta("vidistill_request_duration_seconds_count", **rest) == 2
    assert sample(after, "vidistill_request_duration_seconds_bucket", **rest, le="+Inf") == sample(after, "vidistill_request_duration_seconds_count", **rest)
    assert delta("vidistill_batch_size_count") == 3 and delta("vidistill_batch_size_sum") == 3  # one clip each, no batching
    assert delta("vidistill_inference_duration_seconds_count") == 3
    assert sample(after, "vidistill_model_load_seconds") > 0
    assert sample(after, "vidistill_model_info", model=NAME, version=server.version, source=f"models:/{NAME}@champion") == 1


def test_classify_video_upload(server, reference, tmp_path):
    video = write_video(tmp_path / "clip.avi")
    for path in (f"/v2/models/{NAME}/classify?top_k=3", f"/v2/models/{NAME}/versions/{server.version}/classify?top_k=3"):
        status, out = request(server.url, "POST", path, video.read_bytes())
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


def test_bad_uploads_are_refused_and_the_server_keeps_serving(server, target, tmp_path):
    video = write_video(tmp_path / "whole.mp4").read_bytes()
    classify = f"/v2/models/{NAME}/classify"
    cases = [
        ("oversized payload", classify, b"\0" * (LIMIT_MB * 1024 * 1024 + 1), 413, "exceeds the limit"),
        ("corrupt video", classify, np.random.default_rng(0).bytes(4096), 400, "not a usable video"),
        ("not a video", classify, b"hello, this is a text file\n" * 50, 400, "not a usable video"),
        ("truncated video", classify, video[: len(video) // 3], 400, "not a usable video"),
        ("empty body", classify, b"", 400, "empty body"),
        ("top_k=0", classify + "?top_k=0", video, 400, "top_k"),
        ("top_k not an int", classify + "?top_k=many", video, 400, "top_k"),
        ("clips=0", classify + "?clips=0", video, 400, "clips"),
        ("wrong method", f"/v2/models/{NAME}/infer", None, 405, "Method Not Allowed"),
        ("unknown path", "/v3/whatever", None, 404, "Not Found"),
    ]
    for what, path, body, code, message in cases:
        method = "GET" if body is None else "POST"
        status, out = request(server.url, method, path, body)
        assert status == code, (what, out)
        assert set(out) == {"error"} and message in out["error"], (what, out)
        target.valid_http()


def test_oversized_payload_refused_by_content_length_before_reading(server):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("POST", f"/v2/models/{NAME}/infer")
        conn.putheader("Content-Length", str(10 * 1024**3))  # announces 10 GiB, sends nothing
        conn.endheaders()
        resp = conn.getresponse()  # answered without the body ever arriving (else: timeout)
        assert resp.status == 413 and "exceeds the limit" in json.loads(resp.read())["error"]
    finally:
        conn.close()


def test_dynamic_batching_over_rest_and_grpc(student_onnx, reference, tmp_path):  # noqa: F811
    """Concurrent REST (binary and JSON) and gRPC requests share batches; each gets its own rows back."""
    gport = free_port()
    proc = ServeProcess(str(student_onnx["onnx_path"]), tmp_path, "--name", "student", "--grpc-port", str(gport), "--batching",
                        "--max-batch", "8", "--max-wait-ms", "100")
    try:
        t = conformance.Target(proc.url.removeprefix("http://"), f"127.0.0.1:{gport}", "student", reference, messages=True)
        inputs = [t.clip(100 + i, batch=1 + i % 2) for i in range(18)]

        def call(i: int) -> np.ndarray:
            x = inputs[i]
            if i % 3 == 2:
                g = grpcclient.InferenceServerClient(t.grpc_addr)
                gi = grpcclient.InferInput("input", list(x.shape), "FP32")
                gi.set_data_from_numpy(x)
                return g.infer("student", [gi]).as_numpy("logits")
            h = httpclient.InferenceServerClient(t.http_addr)
            hi = httpclient.InferInput("input", list(x.shape), "FP32")
            hi.set_data_from_numpy(x, binary_data=i % 3 == 0)
            return h.infer("student", [hi], outputs=[httpclient.InferRequestedOutput("logits", binary_data=i % 2 == 0)]).as_numpy("logits")

        with ThreadPoolExecutor(9) as pool:
            results = list(pool.map(call, range(len(inputs))))
        for x, logits in zip(inputs, results, strict=True):
            np.testing.assert_allclose(logits, reference.run(None, {"input": x})[0], atol=1e-5)
        m = metrics(proc.url)
        calls, clips = sample(m, "vidistill_batch_size_count"), sample(m, "vidistill_batch_size_sum")
        assert clips == sum(x.shape[0] for x in inputs)
        assert calls < len(inputs), f"{calls} ONNX Runtime calls for {len(inputs)} concurrent requests: nothing was batched"
        with pytest.raises(InferenceServerException, match="wrong shape"):  # a bad request inside batching
            bad = httpclient.InferInput("input", [1, 3, FRAMES, SIZE, SIZE // 2], "FP32")
            bad.set_data_from_numpy(inputs[0][..., : SIZE // 2].copy())
            t.http.infer("student", [bad])
        t.valid_http()
        t.valid_grpc()
    finally:
        stop(proc.proc)


def _serve_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vidistill.cli", "serve", *args], capture_output=True, text=True, timeout=timeout)


def test_serve_refuses_bad_settings_in_one_line(student_onnx, tmp_path):  # noqa: F811
    busy = free_port()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", busy))
        s.listen()
        cases = [
            (["--model", str(tmp_path / "missing.onnx")], "does not exist"),
            (["--model", str(student_onnx["onnx_path"]), "--port", "0"], "port must be in [1, 65535]"),
            (["--model", str(student_onnx["onnx_path"]), "--port", str(free_port()), "--grpc-port", str(busy)], f"gRPC port 127.0.0.1:{busy}"),
            (["--model", str(student_onnx["onnx_path"]), "--max-batch", "0"], "--max-batch >= 1"),
        ]
        for args, message in cases:
            r = _serve_cli(*args)
            assert r.returncode == 2, (args, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)


def test_bench_serve_smoke(student_onnx):  # noqa: F811
    """`vidistill bench serve` at toy scale: every protocol row, zero errors, answers equal ONNX Runtime's."""
    from vidistill.serve.bench import bench_serve

    r = bench_serve(student_onnx["model"], onnx_path=student_onnx["onnx_path"], requests=12, concurrency=2, batching="off",
                    latency_iters=2)
    assert [(row["protocol"], row["batching"]) for row in r["rows"]] == [("json", "off"), ("binary", "off"), ("grpc", "off")]
    assert all(row["errors"] == 0 and row["matches_onnxruntime"] and row["throughput_rps"] > 0 for row in r["rows"])
    assert set(r["ratios"]) == {"vidistill binary/json, batching off", "vidistill grpc/json, batching off"}
    assert "| vidistill | grpc | off |" in r["markdown"]
    with pytest.raises(ValueError, match="batching must be"):
        bench_serve(student_onnx["model"], onnx_path=student_onnx["onnx_path"], batching="sometimes")


def test_grpc_model_ready_answers_false_like_triton(server):
    """Issue 25.11: Triton answers `ready: false` for a model or version it does not serve, and tritonclient's
    is_model_ready expects that; NOT_FOUND made it raise."""
    g = grpcclient.InferenceServerClient(server.grpc_addr)
    assert g.is_model_ready(NAME) and g.is_model_ready(NAME, server.version)
    assert g.is_model_ready("no-such-model") is False and g.is_model_ready(NAME, "999") is False


def test_watch_follows_the_champion_and_logged_model_uris_resolve(mlflow_server, student_onnx, tmp_path):  # noqa: F811
    """Issue 25.3: a promotion reaches a running server (`--watch`) without a restart; 25.11: MLflow 3's own
    `models:/m-<model_id>` names the registered version made from that logged model."""
    from vidistill.registry.models import resolve
    from vidistill.registry.tracking import client

    name = f"{NAME}-watch"
    first = register_onnx(student_onnx["onnx_path"], model_name=name, metrics={"top1": 0.5}, parity=student_onnx["parity"],
                          data_hash="eval-a", method="none")
    promote(name, first, margin=0.0)
    proc = ServeProcess(f"models:/{name}@champion", tmp_path, "--watch", "0.5", "--no-grpc")
    try:
        h = httpclient.InferenceServerClient(proc.url.removeprefix("http://"))
        assert h.get_model_metadata(name)["versions"] == [first]
        second = register_onnx(student_onnx["onnx_path"], model_name=name, metrics={"top1": 0.9},
                               parity=student_onnx["parity"], data_hash="eval-a", method="kd")
        assert promote(name, second, margin=0.01)["decision"] == "champion"
        import time

        x = np.random.default_rng(0).random((1, 3, FRAMES, SIZE, SIZE), dtype=np.float32)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        versions = set()
        deadline = time.monotonic() + 60
        while h.get_model_metadata(name)["versions"] != [second] and time.monotonic() < deadline:
            got = h.infer(name, [inp])  # traffic through the swap: every request answered, by one version or the other
            assert got.as_numpy("logits").shape == (1, len(CLASSES))
            versions.add(got.get_response()["model_version"])
            time.sleep(0.1)
        assert versions <= {first, second}
        assert h.get_model_metadata(name)["versions"] == [second]
        assert h.is_model_ready(name, second) and not h.is_model_ready(name, first)
    finally:
        stop(proc.proc)
    model_id = client().get_model_version(name, second).source.removeprefix("models:/")
    assert model_id.startswith("m-") and resolve(f"models:/{model_id}").version == second
    with pytest.raises(ValueError, match="no logged model 'm-0000'"):
        resolve("models:/m-0000")
    done = _serve_cli("--model", str(student_onnx["onnx_path"]), "--watch", "5")  # a file has no alias to follow
    assert done.returncode == 2 and "--watch follows a registry alias" in done.stderr
