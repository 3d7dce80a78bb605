"""KServe v2 protocol checks with NVIDIA's `tritonclient` (HTTP and gRPC) against a running server.

The same checks run in `tests/test_serve.py` against `vidistill serve` and, for the serving-library
comparison in the README, against a `kserve` SDK model server (`vidistill.serve.kserve_candidate`):

    python -m vidistill.serve.conformance --http 127.0.0.1:8080 --grpc 127.0.0.1:8081 \\
        --model NAME --onnx model.onnx [--version 3] [--messages]

Every check compares results with ONNX Runtime on the same input (`atol` 1e-5), and every refused
request must come back as the protocol's error (HTTP 4xx with `{"error": "..."}`, gRPC
INVALID_ARGUMENT/NOT_FOUND) and be followed by a request that works. With `messages=True` the
error texts must also name the problem (vidistill's own one-line messages).
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str = ""


class Target:
    """A server under test: REST and gRPC addresses (host:port), model name and version, reference session."""

    def __init__(self, http_addr: str, grpc_addr: str | None, model: str, reference: ort.InferenceSession,
                 version: str | None = None, *, messages: bool = False) -> None:
        import tritonclient.http as httpclient

        self.http_addr = http_addr
        self.grpc_addr = grpc_addr
        self.model = model
        self.version = version
        self.reference = reference
        self.messages = messages
        self.http = httpclient.InferenceServerClient(http_addr, network_timeout=120.0, connection_timeout=30.0)
        self.grpc = None
        if grpc_addr is not None:
            import tritonclient.grpc as grpcclient

            self.grpc = grpcclient.InferenceServerClient(grpc_addr)
        inp = reference.get_inputs()[0]
        self.input_name = inp.name
        self.clip_shape = tuple(inp.shape[1:])  # (3, T, H, W)
        self.output_names = [o.name for o in reference.get_outputs()]

    def clip(self, seed: int, batch: int = 1) -> np.ndarray:
        """(B, 3, T, H, W) float32 in [0, 1)."""
        return np.random.default_rng(seed).random((batch, *self.clip_shape), dtype=np.float32)

    def expected(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.reference.run(None, {self.input_name: x}), strict=True))

    # -- raw HTTP for what tritonclient never sends -------------------------------------------
    def raw(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        host, port = self.http_addr.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            conn.request(method, path, body=body if method != "GET" else None, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def infer_path(self, version: str | None = None) -> str:
        v = f"/versions/{version}" if version else ""
        return f"/v2/models/{self.model}{v}/infer"

    def json_body(self, x: np.ndarray, **extra: Any) -> dict[str, Any]:
        return {"inputs": [{"name": self.input_name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}], **extra}

    # -- assertions ---------------------------------------------------------------------------
    def assert_close(self, got: np.ndarray | None, want: np.ndarray, what: str) -> None:
        assert got is not None, f"{what}: output missing"
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=what)

    def valid_http(self, seed: int = 7) -> None:
        """A valid binary request right after a refused one: the server must still answer."""
        import tritonclient.http as httpclient

        x = self.clip(seed)
        inp = httpclient.InferInput(self.input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = self.http.infer(self.model, [inp])
        self.assert_close(res.as_numpy(self.output_names[0]), self.expected(x)[self.output_names[0]], "valid request after a refused one")

    def refused_raw(self, what: str, path: str, body: bytes, headers: dict[str, str] | None = None, *,
                    status: tuple[int, ...] = (400,), fragment: str = "", method: str = "POST") -> None:
        code, _, data = self.raw(method, path, body, headers)
        assert code in status, f"{what}: HTTP {code} (expected {status}): {data[:300]!r}"
        try:
            err = json.loads(data)
        except ValueError:
            raise AssertionError(f"{what}: the error body is not JSON: {data[:300]!r}") from None
        assert isinstance(err, dict) and isinstance(err.get("error"), str), f"{what}: not the protocol's error shape: {err!r}"
        if self.messages and fragment:
            assert fragment in err["error"], f"{what}: error {err['error']!r} does not name {fragment!r}"
        self.valid_http()

    def refused_grpc(self, what: str, call: Callable[[], Any], *, codes: tuple[str, ...] = ("INVALID_ARGUMENT",), fragment: str = "") -> None:
        from tritonclient.utils import InferenceServerException

        try:
            call()
        except InferenceServerException as e:
            status = str(e.status())
            assert any(status.endswith(c) for c in codes), f"{what}: gRPC status {status} (expected {codes}): {e.message()}"
            if self.messages and fragment:
                assert fragment in (e.message() or ""), f"{what}: error {e.message()!r} does not name {fragment!r}"
        else:
            raise AssertionError(f"{what}: accepted, expected {codes}")
        self.valid_grpc()

    def valid_grpc(self, seed: int = 8) -> None:
        import tritonclient.grpc as grpcclient

        assert self.grpc is not None
        x = self.clip(seed)
        inp = grpcclient.InferInput(self.input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = self.grpc.infer(self.model, [inp])
        self.assert_close(res.as_numpy(self.output_names[0]), self.expected(x)[self.output_names[0]], "valid gRPC request after a refused one")


# ------------------------------------------------------------------------------------------------
# the checks: each takes a Target and raises AssertionError on failure


def check_health_http(t: Target) -> None:
    assert t.http.is_server_live() and t.http.is_server_ready(), "server not live/ready over HTTP"
    assert t.http.is_model_ready(t.model), "model not ready over HTTP"
    if t.version:
        assert t.http.is_model_ready(t.model, t.version), f"model version {t.version} not ready over HTTP"


def check_metadata_http(t: Target) -> None:
    meta = t.http.get_model_metadata(t.model, t.version or "")
    assert meta["name"] == t.model, meta
    ins = {i["name"]: i for i in meta.get("inputs", [])}
    assert t.input_name in ins, f"metadata has no input {t.input_name!r}: {meta.get('inputs')}"
    assert ins[t.input_name]["datatype"] == "FP32" and ins[t.input_name]["shape"] == [-1, *t.clip_shape], ins
    outs = {o["name"]: o for o in meta.get("outputs", [])}
    assert set(outs) == set(t.output_names), f"metadata outputs {sorted(outs)} != {t.output_names}"
    server = t.http.get_server_metadata()
    assert "name" in server and "version" in server, server


def _http_infer(t: Target, x: np.ndarray, *, input_binary: bool, outputs: dict[str, bool] | None, version: str = "") -> Any:
    import tritonclient.http as httpclient

    inp = httpclient.InferInput(t.input_name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=input_binary)
    outs = None if outputs is None else [httpclient.InferRequestedOutput(n, binary_data=b) for n, b in outputs.items()]
    return t.http.infer(t.model, [inp], model_version=version, outputs=outs, request_id="req-7")


def check_infer_json(t: Target) -> None:
    x = t.clip(1, batch=2)
    res = _http_infer(t, x, input_binary=False, outputs={n: False for n in t.output_names})
    want = t.expected(x)
    for n in t.output_names:
        t.assert_close(res.as_numpy(n), want[n], f"JSON output {n}")
    assert res.get_response()["id"] == "req-7", "the request id is not echoed"


def check_infer_binary(t: Target) -> None:
    x = t.clip(2, batch=3)
    res = _http_infer(t, x, input_binary=True, outputs=None)  # tritonclient's default: binary both ways
    want = t.expected(x)
    for n in t.output_names:
        t.assert_close(res.as_numpy(n), want[n], f"binary output {n}")


def check_infer_mixed(t: Target) -> None:
    x = t.clip(3, batch=2)
    want = t.expected(x)
    first, *rest = t.output_names
    # binary input, one output binary and the others JSON
    res = _http_infer(t, x, input_binary=True, outputs={first: True, **{n: False for n in rest}})
    for n in t.output_names:
        t.assert_close(res.as_numpy(n), want[n], f"mixed (binary in) output {n}")
    # JSON input, binary output
    res = _http_infer(t, x, input_binary=False, outputs={first: True})
    t.assert_close(res.as_numpy(first), want[first], f"mixed (JSON in, binary out) output {first}")
    assert all(res.as_numpy(n) is None for n in rest), "outputs that were not requested came back"


def check_infer_versioned(t: Target) -> None:
    if not t.version:
        raise AssertionError("no version given to check /v2/models/{name}/versions/{v}/infer")
    x = t.clip(4)
    res = _http_infer(t, x, input_binary=True, outputs=None, version=t.version)
    t.assert_close(res.as_numpy(t.output_names[0]), t.expected(x)[t.output_names[0]], "versioned infer")


def check_outputs_null(t: Target) -> None:
    """`"outputs": null` is valid: the field is optional (KServe's own data model makes it Optional), so every output comes back."""
    x = t.clip(5)
    code, _, data = t.raw("POST", t.infer_path(), orjson.dumps(t.json_body(x, outputs=None)), {"Content-Type": "application/json"})
    assert code == 200, f'"outputs": null answered HTTP {code}: {data[:300]!r}'
    got = {o["name"]: np.array(o["data"], dtype=np.float32).reshape(o["shape"]) for o in json.loads(data)["outputs"]}
    want = t.expected(x)
    for n in t.output_names:
        t.assert_close(got.get(n), want[n], f'"outputs": null output {n}')


def check_gzip_request(t: Target) -> None:
    x = t.clip(6)
    body = gzip.compress(orjson.dumps(t.json_body(x)))
    code, _, data = t.raw("POST", t.infer_path(), body, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert code == 200, f"gzip request answered HTTP {code}: {data[:300]!r}"


def check_health_grpc(t: Target) -> None:
    assert t.grpc is not None
    assert t.grpc.is_server_live() and t.grpc.is_server_ready(), "server not live/ready over gRPC"
    assert t.grpc.is_model_ready(t.model), "model not ready over gRPC"
    meta = t.grpc.get_model_metadata(t.model, t.version or "", as_json=True)
    assert meta["name"] == t.model, meta
    ins = {i["name"]: i for i in meta.get("inputs", [])}
    assert t.input_name in ins and [int(d) for d in ins[t.input_name]["shape"]] == [-1, *t.clip_shape], meta
    assert {o["name"] for o in meta.get("outputs", [])} == set(t.output_names), meta


def check_infer_grpc(t: Target) -> None:
    import tritonclient.grpc as grpcclient

    assert t.grpc is not None
    x = t.clip(9, batch=2)
    want = t.expected(x)
    inp = grpcclient.InferInput(t.input_name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = t.grpc.infer(t.model, [inp], request_id="g-1")
    for n in t.output_names:
        t.assert_close(res.as_numpy(n), want[n], f"gRPC output {n}")
    assert res.get_response().id == "g-1", "gRPC id not echoed"
    one = t.grpc.infer(t.model, [inp], outputs=[grpcclient.InferRequestedOutput(t.output_names[0])], model_version=t.version or "")
    t.assert_close(one.as_numpy(t.output_names[0]), want[t.output_names[0]], "gRPC requested output")
    assert all(one.as_numpy(n) is None for n in t.output_names[1:]), "gRPC returned outputs that were not requested"


def check_bad_http(t: Target) -> None:
    """Every kind of bad REST request: 4xx in the protocol's error shape, then a valid request works."""
    x = t.clip(10)
    spec = t.json_body(x)["inputs"][0]
    path = t.infer_path()
    js = {"Content-Type": "application/json"}

    def body(**change: Any) -> bytes:
        return orjson.dumps({"inputs": [{**spec, **change}]})

    def binary(header: dict[str, Any], blob: bytes, length: int | None = None) -> tuple[bytes, dict[str, str]]:
        head = orjson.dumps(header)
        n = len(head) if length is None else length
        return head + blob, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(n)}

    raw = x.tobytes()
    bin_spec = {k: v for k, v in spec.items() if k != "data"} | {"parameters": {"binary_data_size": len(raw)}}
    n = x.size
    cases: list[tuple[str, str, bytes, dict[str, str], tuple[int, ...], str]] = [
        ("malformed JSON", path, b'{"inputs": [', js, (400,), "malformed JSON"),
        ("binary body without the header length", path, binary({"inputs": [bin_spec]}, raw)[0], {}, (400,), "malformed JSON"),
        ("not an object", path, b"[1, 2]", js, (400,), "JSON object"),
        ("no inputs", path, b"{}", js, (400,), '"inputs"'),
        ("wrong input name", path, body(name="rgb"), js, (400,), "unknown input 'rgb'"),
        ("wrong shape", path, body(shape=[1, *t.clip_shape[:-1], t.clip_shape[-1] // 2]), js, (400,), "wrong shape"),
        ("wrong datatype", path, body(datatype="INT64"), js, (400,), "wrong datatype"),
        ("unknown datatype", path, body(datatype="FLOAT"), js, (400,), "unknown datatype"),
        ("numbers sent as strings", path, body(data=[str(v) for v in spec["data"]]), js, (400,), "numbers only"),
        ("booleans in FP32 data", path, body(data=[True] * n), js, (400,), "boolean"),
        ("null in FP32 data", path, body(data=[None] * n), js, (400,), "numbers only"),
        ("too few values", path, body(data=[0.5] * 10), js, (400,), "needs"),
        ("NaN (binary)", path, *binary({"inputs": [bin_spec]}, np.full(n, np.nan, np.float32).tobytes()), (400,), "NaN/Inf"),
        ("binary_data_size too small", path, *binary({"inputs": [{**bin_spec, "parameters": {"binary_data_size": 8}}]}, raw[:8]), (400,), "binary_data_size"),
        ("binary bytes missing", path, *binary({"inputs": [bin_spec]}, raw[: len(raw) // 2]), (400,), "binary"),
        ("extra binary bytes", path, *binary({"inputs": [bin_spec]}, raw + b"\0" * 8), (400,), "binary bytes"),
        ("header length past the body", path, *binary({"inputs": [bin_spec]}, raw, length=len(raw) * 4), (400,), "Inference-Header-Content-Length"),
        ("unknown output", path, orjson.dumps(t.json_body(x, outputs=[{"name": "probs"}])), js, (400,), "unknown output 'probs'"),
        ("outputs not a list", path, orjson.dumps(t.json_body(x, outputs="logits")), js, (400,), '"outputs"'),
        ("classification extension", path, orjson.dumps(t.json_body(x, outputs=[{"name": t.output_names[0], "parameters": {"classification": 3}}])),
         js, (400,), "classification"),
        ("unknown model", f"/v2/models/nope/infer", body(), js, (404,), "'nope' not found"),
        ("unknown version", t.infer_path("999999"), body(), js, (404,), "version '999999'"),
        ("unknown model metadata", "/v2/models/nope", b"", {}, (404,), "not found"),
        ("unknown Content-Encoding", path, body(), {**js, "Content-Encoding": "br"}, (400, 415), "Content-Encoding"),
        ("corrupt gzip", path, b"\x1f\x8b\x08\x00garbage", {**js, "Content-Encoding": "gzip"}, (400,), "decompress"),
    ]
    failures = []
    for what, p, b, h, status, fragment in cases:
        try:
            t.refused_raw(what, p, b, h, status=status, fragment=fragment, method="GET" if p == "/v2/models/nope" else "POST")
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, f"{len(failures)}/{len(cases)} bad requests mishandled: " + " | ".join(failures)


def check_bad_grpc(t: Target) -> None:
    import tritonclient.grpc as grpcclient

    assert t.grpc is not None
    x = t.clip(11)

    def inp(shape: list[int] | None = None, dtype: str = "FP32", data: np.ndarray | None = None, name: str | None = None) -> Any:
        d = x if data is None else data
        i = grpcclient.InferInput(name or t.input_name, shape or list(d.shape), dtype)
        i.set_data_from_numpy(d) if dtype == "FP32" else i.set_data_from_numpy(d.astype(np.int64))
        return i

    half = x[..., : x.shape[-1] // 2].copy()
    cases: list[tuple[str, Callable[[], Any], tuple[str, ...], str]] = [
        ("wrong shape", lambda: t.grpc.infer(t.model, [inp(data=half)]), ("INVALID_ARGUMENT",), "wrong shape"),
        ("wrong datatype", lambda: t.grpc.infer(t.model, [inp(dtype="INT64")]), ("INVALID_ARGUMENT",), "wrong datatype"),
        ("wrong input name", lambda: t.grpc.infer(t.model, [inp(name="rgb")]), ("INVALID_ARGUMENT",), "unknown input"),
        ("NaN", lambda: t.grpc.infer(t.model, [inp(data=np.full_like(x, np.nan))]), ("INVALID_ARGUMENT",), "NaN/Inf"),
        ("unknown output", lambda: t.grpc.infer(t.model, [inp()], outputs=[grpcclient.InferRequestedOutput("probs")]),
         ("INVALID_ARGUMENT",), "unknown output"),
        ("unknown model", lambda: t.grpc.infer("nope", [inp()]), ("NOT_FOUND", "UNAVAILABLE"), "'nope' not found"),
        ("unknown version", lambda: t.grpc.infer(t.model, [inp()], model_version="999999"), ("NOT_FOUND", "UNAVAILABLE"), "999999"),
    ]
    failures = []
    for what, call, codes, fragment in cases:
        try:
            t.refused_grpc(what, call, codes=codes, fragment=fragment)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, f"{len(failures)}/{len(cases)} bad gRPC requests mishandled: " + " | ".join(failures)


HTTP_CHECKS: list[Callable[[Target], None]] = [
    check_health_http, check_metadata_http, check_infer_json, check_infer_binary, check_infer_mixed, check_infer_versioned,
    check_outputs_null, check_gzip_request, check_bad_http,
]
GRPC_CHECKS: list[Callable[[Target], None]] = [check_health_grpc, check_infer_grpc, check_bad_grpc]


def run_checks(t: Target) -> list[CheckResult]:
    """Run every check (gRPC ones when the target has a gRPC address); failures are collected, not raised."""
    results = []
    for check in HTTP_CHECKS + (GRPC_CHECKS if t.grpc is not None else []):
        name = check.__name__.removeprefix("check_")
        try:
            check(t)
            results.append(CheckResult(name, True))
        except Exception as e:  # a failed check, whatever the client raised
            results.append(CheckResult(name, False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vidistill.serve.conformance", description=__doc__.splitlines()[0])
    p.add_argument("--http", required=True, help="REST host:port")
    p.add_argument("--grpc", default=None, help="gRPC host:port")
    p.add_argument("--model", required=True)
    p.add_argument("--version", default=None)
    p.add_argument("--onnx", required=True, help="the served model.onnx, for reference results")
    p.add_argument("--messages", action="store_true", help="also require vidistill's error messages")
    a = p.parse_args(argv)
    ref = ort.InferenceSession(a.onnx, providers=["CPUExecutionProvider"])
    results = run_checks(Target(a.http, a.grpc, a.model, ref, a.version, messages=a.messages))
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.name}{'  ' + r.detail if r.detail else ''}")
    passed = sum(r.passed for r in results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
