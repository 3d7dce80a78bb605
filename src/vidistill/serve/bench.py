"""Serving benchmark: a real server process under concurrent loopback clients, and ONNX Runtime vs
PyTorch eager per-clip latency in the same run.

    python -m vidistill.serve.bench --requests 1000 --concurrency 8 [--batching]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vidistill.export.onnx import export_onnx, latency
from vidistill.export.runtime import make_session, read_metadata


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(onnx_path: Path, port: int, args: list[str], log: Path, timeout: float = 120.0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vidistill.serve", "--model", str(onnx_path), "--port", str(port), "--name", "bench", *args]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"server not ready after {timeout} s: {log.read_text()[-2000:]}")


def _client(port: int, body: bytes, n: int, lat_ms: list[float], errors: list[str]) -> None:
    """Send `n` infer requests on one keep-alive connection (reconnecting after a failure)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v2/models/bench/infer", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                errors.append(f"HTTP {resp.status}: {data[:200]!r}")
                continue
        except (OSError, http.client.HTTPException) as e:
            errors.append(f"{type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            continue
        lat_ms.append((time.perf_counter() - t0) * 1000.0)
    conn.close()


def bench_serve(
    model: nn.Module | None = None,
    *,
    onnx_path: str | Path | None = None,
    requests: int = 1000,
    concurrency: int = 8,
    clip_batch: int = 1,
    batching: bool = False,
    threads: int | None = None,
    latency_iters: int = 30,
) -> dict[str, Any]:
    """Benchmark the server and compare ONNX Runtime with PyTorch eager.

    Args:
        model: the PyTorch model (default: a seeded `r2plus1d_student`, 10 classes, 8x56x56).
        onnx_path: its exported ONNX file (default: exported here to a temporary directory).
        requests: total infer requests, split evenly over the clients.
        concurrency: client threads, each on its own keep-alive loopback connection.
        clip_batch: clips per request.
        batching: start the server with dynamic batching.
        threads: ONNX Runtime intra-op threads in the server (None: ORT default).
        latency_iters: timed iterations of the in-process ORT vs eager comparison (batch 1).

    Returns:
        Server numbers (`errors`, `throughput_rps`, `p50_ms`, `p99_ms`, ...) and `ort_ms_per_clip`,
        `torch_ms_per_clip`, `ort_speedup` (eager / ORT) at default threads and the same three at one
        thread each (`*_1thread`), plus the machine description.
    """
    if requests < concurrency or concurrency < 1:
        raise ValueError(f"need concurrency >= 1 and requests >= concurrency, got {requests} requests, {concurrency} clients")
    if model is None:
        from vidistill.models import create_model

        torch.manual_seed(0)
        model = create_model("r2plus1d_student", num_classes=10, frames=8, size=56)
    model = model.eval()
    with tempfile.TemporaryDirectory(prefix="vidistill-bench-") as tmp:
        path = Path(onnx_path) if onnx_path is not None else export_onnx(model, tmp)
        meta = read_metadata(path)
        shape = (clip_batch, 3, meta["frames"], meta["size"], meta["size"])
        x = np.random.default_rng(0).random(shape).astype(np.float32)  # (B, 3, T, S, S)
        data = np.round(x.astype(np.float64), 4).ravel().tolist()
        body = json.dumps({"inputs": [{"name": "input", "shape": list(shape), "datatype": "FP32", "data": data}]}).encode()

        port = _free_port()
        args = ["--max-body-mb", str(max(8, 2 * len(body) // 2**20))]
        if batching:
            args += ["--batching", "--max-batch", str(max(8, clip_batch * concurrency))]
        if threads is not None:
            args += ["--threads", str(threads)]
        proc = _start_server(path, port, args, Path(tmp) / "server.log")
        try:
            lat_ms: list[float] = []
            errors: list[str] = []
            shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
            workers = [threading.Thread(target=_client, args=(port, body, n, lat_ms, errors)) for n in shares]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=30)

        one = torch.from_numpy(x[:1])  # (1, 3, T, S, S)
        ort_lat = latency(make_session(path), one, warmup=5, iters=latency_iters)
        eager_lat = latency(model, one, warmup=5, iters=latency_iters)
        # the same at one thread each: on a busy machine multi-threaded eager torch suffers most
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ort_1t = latency(make_session(path, threads=1), one, warmup=5, iters=latency_iters)
            eager_1t = latency(model, one, warmup=5, iters=latency_iters)
        finally:
            torch.set_num_threads(torch_threads)
    return {
        "machine": f"{platform.machine()} {platform.platform()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "requests": requests,
        "concurrency": concurrency,
        "clip_batch": clip_batch,
        "batching": batching,
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": wall,
        "throughput_rps": len(lat_ms) / wall,
        "clips_per_s": len(lat_ms) * clip_batch / wall,
        "p50_ms": float(np.percentile(lat_ms, 50)) if lat_ms else float("nan"),
        "p99_ms": float(np.percentile(lat_ms, 99)) if lat_ms else float("nan"),
        "request_bytes": len(body),
        "ort_ms_per_clip": ort_lat["per_clip_ms"],
        "torch_ms_per_clip": eager_lat["per_clip_ms"],
        "ort_speedup": eager_lat["p50_ms"] / ort_lat["p50_ms"],
        "ort_ms_per_clip_1thread": ort_1t["per_clip_ms"],
        "torch_ms_per_clip_1thread": eager_1t["per_clip_ms"],
        "ort_speedup_1thread": eager_1t["p50_ms"] / ort_1t["p50_ms"],
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: run `bench_serve` and print its result as JSON."""
    p = argparse.ArgumentParser(prog="python -m vidistill.serve.bench", description=bench_serve.__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--clip-batch", type=int, default=1)
    p.add_argument("--batching", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    result = bench_serve(requests=a.requests, concurrency=a.concurrency, clip_batch=a.clip_batch, batching=a.batching, threads=a.threads)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
