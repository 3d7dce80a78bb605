"""Serving benchmark: JSON vs binary vs gRPC against real server processes, batching off and on, in
one run; ONNX Runtime vs PyTorch eager per-clip latency in the same run.

    vidistill bench serve [--set requests=1000] [--set repeats=3] [--set kserve_python=/path/to/python]

Each (server, batching) configuration is one server process (REST and gRPC together); within it the
three protocols take turns, and with `repeats > 1` the configurations and the protocol order rotate,
so a busy machine slows every row alike. Clients are `concurrency` threads, each with its own
keep-alive connection (REST: `http.client`; gRPC: a channel), sending pre-encoded requests so the
numbers measure the server. Every answer's status is checked; the first answer of each row is
decoded and compared with ONNX Runtime.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from torch import nn

from vidistill.export.onnx import export_onnx, latency
from vidistill.export.runtime import make_session, read_metadata
from vidistill.registry.server import free_port, stop, wait_http

PROTOCOLS = ("json", "binary", "grpc")


def _start(cmd: list[str], http_port: int, log: Path, timeout: float = 120.0) -> subprocess.Popen:
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{http_port}/v2/health/ready", proc, timeout=timeout, log=log)
    return proc


def _bodies(x: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    """Pre-encoded REST requests: JSON both ways, and binary both ways (what tritonclient sends by default)."""
    spec = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    js = orjson.dumps({"inputs": [{**spec, "data": x.ravel().tolist()}]})  # float32 values, shortest repr
    raw = x.astype("<f4").tobytes()
    head = orjson.dumps({"inputs": [{**spec, "parameters": {"binary_data_size": len(raw)}}], "parameters": {"binary_data_output": True}})
    return {
        "json": (js, {"Content-Type": "application/json"}),
        "binary": (head + raw, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}),
    }


def _decode_rest(data: bytes, headers: dict[str, str]) -> np.ndarray:
    n = headers.get("inference-header-content-length")
    head = orjson.loads(data[: int(n)] if n else data)
    out = head["outputs"][0]
    if "data" in out:
        return np.asarray(out["data"], np.float32).reshape(out["shape"])
    return np.frombuffer(data[int(n) : int(n) + out["parameters"]["binary_data_size"]], "<f4").reshape(out["shape"])


def _rest_client(port: int, path: str, body: bytes, headers: dict[str, str], n: int, lat: list[float], errors: list[str],
                 first: list[np.ndarray]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            errors.append(f"{type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            continue
        if resp.status != 200:
            errors.append(f"HTTP {resp.status}: {data[:200]!r}")
            continue
        lat.append((time.perf_counter() - t0) * 1000.0)
        if not first:
            first.append(_decode_rest(data, {k.lower(): v for k, v in resp.getheaders()}))
    conn.close()


def _grpc_client(port: int, request: Any, n: int, lat: list[float], errors: list[str], first: list[np.ndarray]) -> None:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    limit = 64 * 1024 * 1024
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", limit),
                                                             ("grpc.max_send_message_length", limit)]) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                resp = stub.ModelInfer(request, timeout=120)
            except grpc.RpcError as e:
                errors.append(f"gRPC {e.code().name}: {e.details()}")
                continue
            lat.append((time.perf_counter() - t0) * 1000.0)
            if not first:
                out = resp.outputs[0]
                first.append(np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(list(out.shape)))


def _load(clients: int, requests: int, make: Callable[[int, list[float], list[str], list[np.ndarray]], None]) -> dict[str, Any]:
    lat: list[float] = []
    errors: list[str] = []
    first: list[np.ndarray] = []
    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    workers = [threading.Thread(target=make, args=(n, lat, errors, first)) for n in shares]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    return {
        "requests": requests, "errors": len(errors), "first_errors": errors[:3], "wall_s": wall,
        "throughput_rps": len(lat) / wall, "p50_ms": float(np.percentile(lat, 50)) if lat else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if lat else float("nan"), "first": first[0] if first else None,
    }


def bench_serve(
    model: nn.Module | None = None,
    *,
    onnx_path: str | Path | None = None,
    requests: int = 1000,
    concurrency: int = 8,
    clip_batch: int = 1,
    repeats: int = 1,
    batching: str = "off,on",
    max_batch: int = 16,
    max_wait_ms: float = 2.0,
    threads: int | None = None,
    kserve_python: str = "",
    latency_iters: int = 30,
) -> dict[str, Any]:
    """Benchmark JSON, binary and gRPC requests against the server, and ONNX Runtime against PyTorch eager.

    Args:
        model: the PyTorch model (default: a seeded `r2plus1d_student`, 10 classes, 8x56x56).
        onnx_path: its exported ONNX file (default: exported here to a temporary directory).
        requests: infer requests per row (protocol x batching x repeat), split evenly over the clients.
        concurrency: client threads.
        clip_batch: clips per request.
        repeats: how many times every row is measured (configurations and protocol order rotate).
        batching: which server settings to run, "off", "on" or "off,on".
        max_batch: `--max-batch` of the batching server (clips).
        max_wait_ms: `--max-wait-ms` of the batching server.
        threads: ONNX Runtime intra-op threads in the server (None: ORT default).
        kserve_python: a Python with `kserve` installed: also measure `kserve_candidate.py` (no batcher).
        latency_iters: timed iterations of the in-process ORT vs eager comparison (batch 1).

    Returns:
        `rows` (one per server, protocol and batching: medians over repeats of `throughput_rps`,
        `p50_ms`, `p99_ms`, total `errors`), `ratios` (binary/JSON and gRPC/JSON throughput per
        repeat), `markdown` (the table), `ort_ms_per_clip`, `torch_ms_per_clip`, `ort_speedup` and
        the same at one thread (`*_1thread`).

    Raises:
        ValueError: a setting out of range (before any work).
    """
    if requests < concurrency or concurrency < 1 or repeats < 1 or clip_batch < 1:
        raise ValueError(f"need concurrency >= 1, requests >= concurrency, repeats >= 1, clip_batch >= 1; got "
                         f"{requests}, {concurrency}, {repeats}, {clip_batch}")
    modes = [m.strip() for m in str(batching).split(",") if m.strip()]
    if not modes or set(modes) - {"off", "on"}:
        raise ValueError(f"batching must be 'off', 'on' or 'off,on', got {batching!r}")
    if kserve_python and not Path(kserve_python).is_file():
        raise ValueError(f"kserve_python {kserve_python!r} does not exist; give a Python that has kserve installed")
    if model is None:
        from vidistill.models import create_model

        torch.manual_seed(0)
        model = create_model("r2plus1d_student", num_classes=10, frames=8, size=56)
    model = model.eval()
    from tritonclient.grpc import service_pb2

    with tempfile.TemporaryDirectory(prefix="vidistill-bench-") as tmp:
        path = Path(onnx_path) if onnx_path is not None else export_onnx(model, tmp)
        meta = read_metadata(path)
        shape = (clip_batch, 3, meta["frames"], meta["size"], meta["size"])
        x = np.random.default_rng(0).random(shape, dtype=np.float32)  # (B, 3, T, S, S)
        ref = make_session(path).run(None, {"input": x})[0]
        bodies = _bodies(x)
        greq = service_pb2.ModelInferRequest(model_name="bench")
        greq.inputs.add(name="input", datatype="FP32", shape=list(shape))
        greq.raw_input_contents.append(x.astype("<f4").tobytes())
        body_mb = max(8, 2 * len(bodies["json"][0]) // 2**20)

        configs: list[tuple[str, str]] = [("vidistill", m) for m in modes] + ([("kserve-sdk", "off")] if kserve_python else [])
        measured: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for rep in range(repeats):
            order = configs[rep % len(configs):] + configs[: rep % len(configs)]
            for server, mode in order:
                port, gport = free_port(), free_port()
                if server == "vidistill":
                    cmd = [sys.executable, "-m", "vidistill.serve", "--model", str(path), "--name", "bench", "--port", str(port),
                           "--grpc-port", str(gport), "--max-body-mb", str(body_mb)]
                    if mode == "on":
                        cmd += ["--batching", "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
                    if threads is not None:
                        cmd += ["--threads", str(threads)]
                else:
                    script = Path(__file__).with_name("kserve_candidate.py")
                    cmd = [kserve_python, str(script), "--onnx", str(path), "--model_name", "bench", "--http_port", str(port),
                           "--grpc_port", str(gport), "--workers", "1"]
                proc = _start(cmd, port, Path(tmp) / f"{server}-{mode}-{rep}.log")
                try:
                    protos = PROTOCOLS[rep % 3:] + PROTOCOLS[: rep % 3]
                    for proto in protos:
                        if proto == "grpc":
                            make = lambda n, lat, err, first: _grpc_client(gport, greq, n, lat, err, first)  # noqa: E731
                        else:
                            body, headers = bodies[proto]
                            make = lambda n, lat, err, first, b=body, h=headers: _rest_client(  # noqa: E731
                                port, "/v2/models/bench/infer", b, h, n, lat, err, first)
                        r = _load(concurrency, requests, make)
                        got = r.pop("first")
                        r["matches_onnxruntime"] = bool(got is not None and np.allclose(got, ref, atol=1e-5))
                        measured.setdefault((server, proto, mode), []).append(r)
                finally:
                    stop(proc)

        one = torch.from_numpy(x[:1])  # (1, 3, T, S, S)
        ort_lat = latency(make_session(path), one, warmup=5, iters=latency_iters)
        eager_lat = latency(model, one, warmup=5, iters=latency_iters)
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ort_1t = latency(make_session(path, threads=1), one, warmup=5, iters=latency_iters)
            eager_1t = latency(model, one, warmup=5, iters=latency_iters)
        finally:
            torch.set_num_threads(torch_threads)

    rows = []
    for (server, proto, mode), runs in measured.items():
        rows.append({
            "server": server, "protocol": proto, "batching": mode, "clients": concurrency, "requests": requests * len(runs),
            "errors": sum(r["errors"] for r in runs),
            "throughput_rps": float(np.median([r["throughput_rps"] for r in runs])),
            "p50_ms": float(np.median([r["p50_ms"] for r in runs])),
            "p99_ms": float(np.median([r["p99_ms"] for r in runs])),
            "matches_onnxruntime": all(r["matches_onnxruntime"] for r in runs),
            "request_kb": round(len(bodies["json"][0] if proto == "json" else bodies["binary"][0]) / 1024, 1),
        })
    ratios: dict[str, list[float]] = {}
    for server, mode in configs:
        js = [r["throughput_rps"] for r in measured[(server, "json", mode)]]
        for proto in ("binary", "grpc"):
            other = [r["throughput_rps"] for r in measured[(server, proto, mode)]]
            ratios[f"{server} {proto}/json, batching {mode}"] = [o / j for o, j in zip(other, js, strict=True)]
    lines = ["| server | protocol | batching | req/s | p50 ms | p99 ms | errors | request KB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['protocol']} | {r['batching']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['errors']} | {r['request_kb']} |")
    lines.append("")
    lines += [f"- {k}: " + ", ".join(f"{v:.2f}x" for v in vs) for k, vs in ratios.items()]
    lines.append(f"- ONNX Runtime vs PyTorch eager per clip: {ort_lat['per_clip_ms']:.2f} vs {eager_lat['per_clip_ms']:.2f} ms "
                 f"({eager_lat['p50_ms'] / ort_lat['p50_ms']:.2f}x); one thread each: {ort_1t['per_clip_ms']:.2f} vs "
                 f"{eager_1t['per_clip_ms']:.2f} ms ({eager_1t['p50_ms'] / ort_1t['p50_ms']:.2f}x)")
    return {
        "machine": f"{platform.machine()} {platform.platform()}, {os.cpu_count()} CPU cores",
        "rows": rows,
        "ratios": ratios,
        "markdown": "\n".join(lines),
        "runs": {f"{s} {p} {m}": v for (s, p, m), v in measured.items()},
        "ort_ms_per_clip": ort_lat["per_clip_ms"],
        "torch_ms_per_clip": eager_lat["per_clip_ms"],
        "ort_speedup": eager_lat["p50_ms"] / ort_lat["p50_ms"],
        "ort_ms_per_clip_1thread": ort_1t["per_clip_ms"],
        "torch_ms_per_clip_1thread": eager_1t["per_clip_ms"],
        "ort_speedup_1thread": eager_1t["p50_ms"] / ort_1t["p50_ms"],
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: run `bench_serve` and print its table."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m vidistill.serve.bench", description=bench_serve.__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--batching", default="off,on")
    p.add_argument("--kserve-python", default="")
    a = p.parse_args(argv)
    result = bench_serve(requests=a.requests, concurrency=a.concurrency, repeats=a.repeats, batching=a.batching, kserve_python=a.kserve_python)
    print(result["markdown"])
    print(json.dumps({k: v for k, v in result.items() if k not in ("markdown", "runs")}, indent=2, default=str))


if __name__ == "__main__":
    main()
