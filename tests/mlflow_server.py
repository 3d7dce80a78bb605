"""Shared test helpers and fixtures: a real `mlflow server`, a real serving process, test videos.

Import the fixtures into a test file (`from mlflow_server import mlflow_server, student_onnx`).
Session fixtures imported into several files get one pytest definition per file, so the expensive
objects (server process, exported student) are cached here at module level: they start once per
test session and the first session teardown stops them (the others are no-ops).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import av
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vidistill.registry.server import MlflowServer as _LibServer
from vidistill.registry.server import free_port, stop, wait_http  # noqa: F401 - re-exported for the tests

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLASSES = ["left", "right", "up", "down"]
FRAMES, SIZE = 8, 56

_cache: dict[str, Any] = {}


class MlflowServer(_LibServer):
    """A real `mlflow server` on a free loopback port with its own SQLite store and artifact root."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root / "db.sqlite", root / "artifacts", log=root / "mlflow-server.log")


class ServeProcess:
    """`python -m vidistill.serve ...` on a free loopback port, waited on until ready."""

    def __init__(self, model: str, root: Path, *args: str, env: dict[str, str] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "vidistill.serve", "--model", model, "--port", str(self.port), *args]
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=root, env={**os.environ, **(env or {})})
        wait_http(f"{self.url}/v2/health/ready", self.proc, timeout=120, log=self.log)


def write_video(path: Path, *, frames: int = 24, width: int = 96, height: int = 72, fps: int = 12, dx: int = 3) -> Path:
    """A real mpeg4/yuv420p video of a bright square moving `dx` pixels per frame on a dark background."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            img = np.full((height, width, 3), 30, np.uint8)
            x0 = (10 + dx * t) % (width - 16)
            img[20:36, x0 : x0 + 16] = (230, 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def perturb_onnx(src: Path, dst: Path, *, scale: float = 1.5) -> Path:
    """Copy an ONNX model with its largest float initializer scaled: a real model that no longer
    matches its PyTorch source (the situation parity checks exist for)."""
    model = onnx.load(str(src))
    init = max((i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT), key=lambda i: np.prod(i.dims))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(scale), init.name))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def make_student() -> Any:
    """The zoo's RGB student (seeded), in eval mode."""
    import torch

    from vidistill.models import create_model

    torch.manual_seed(0)
    return create_model("r2plus1d_student", num_classes=len(CLASSES), frames=FRAMES, size=SIZE).eval()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A running `mlflow server`; `MLFLOW_TRACKING_URI` points at it for the session."""
    if "mlflow" not in _cache:
        _cache["mlflow"] = MlflowServer(tmp_path_factory.mktemp("mlflow")).wait()
    server = _cache["mlflow"]
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    yield server
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
    stop(server.proc)


@pytest.fixture(scope="session")
def student_onnx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The r2plus1d_student exported once: `{"model", "onnx_path", "parity"}`."""
    if "student" not in _cache:
        from vidistill.export.onnx import export_onnx

        model = make_student()
        out = tmp_path_factory.mktemp("student")
        path = export_onnx(model, out, classes=CLASSES, preprocess={"stride": 2, "short_side": 64, "short_policy": "loop", "clips": 1})
        _cache["student"] = {"model": model, "onnx_path": path, "parity": json.loads((out / "parity.json").read_text())}
    return _cache["student"]
