"""Running exported models without torch: ONNX metadata, execution providers, ORT sessions.

Kept free of torch so the serving image needs only onnx and onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "features")
META_PREFIX = "vidistill."
MODEL_FILE = "model.onnx"


def read_metadata(onnx_path: str | Path) -> dict[str, Any]:
    """The `vidistill.*` metadata of an exported model, decoded (classes as a list, ints as ints)."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    raw = {p.key.removeprefix(META_PREFIX): p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}
    out: dict[str, Any] = dict(raw)
    for key in ("classes", "preprocess"):
        if key in raw:
            out[key] = json.loads(raw[key])
    for key in ("num_classes", "frames", "size", "opset"):
        if key in raw:
            out[key] = int(raw[key])
    return out


def providers() -> list[str]:
    """ONNX Runtime execution providers to use: CUDA first when this build has it, then CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def make_session(onnx_path: str | Path, *, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session on `providers()`; `threads` sets intra-op threads (None: ORT default)."""
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist; export one with vidistill.export.export_onnx")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers())
