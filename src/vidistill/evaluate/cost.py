"""What a model costs to serve: parameters, ONNX size and latency per clip, measured on this machine.

Used by the comparison report for every student and teacher. Students are served as ONNX with ONNX
Runtime, so a model is exported (batch 1, the model's own input shape: RGB `(1, 3, T, H, W)` or flow
`(1, 2, T-1, H, W)`) and timed in an ONNX Runtime session; a model that does not export is timed in
eager PyTorch instead, and the result says so.

The export here uses PyTorch's TorchScript-based exporter (`dynamo=False`): 2-4 s a model on this
2-core machine against 40-60 s for the dynamo exporter that `vidistill export` uses for the served
file, for a graph of the same operators and weights (the r2plus1d student: 913 KB against 983 KB).
The pipeline's report gives the served student's own file size beside it.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of `model`."""
    return int(sum(p.numel() for p in model.parameters()))


def model_cost(model: nn.Module, *, threads: int = 1, warmup: int = 3, iters: int = 20) -> dict[str, Any]:
    """Parameters, ONNX size (bytes) and latency per clip (ms, batch 1) of `model`.

    Args:
        model: a vidistill model with `example_input(batch)` (`vidistill.models.base`); it returns
            `(logits, features)` for an input `(B, C, T, H, W)`.
        threads: ONNX Runtime intra-op threads (and torch threads for the eager fallback) while timing.
        warmup: untimed calls first.
        iters: timed calls; the latency is their median.

    Returns:
        `{"params", "onnx_bytes" (None when the export failed), "latency_ms", "runtime"
        ("onnxruntime" | "pytorch"), "threads", "iters", "error" (why the export failed, or "")}`.
    """
    from vidistill.export.onnx import latency

    model = model.eval().cpu()
    x = model.example_input(1).float().cpu()  # (1, C, T, H, W)
    out: dict[str, Any] = {"params": parameter_count(model), "onnx_bytes": None, "threads": threads, "iters": iters,
                           "error": ""}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits", "features"],
                                  dynamo=False, opset_version=18)
            out["onnx_bytes"] = path.stat().st_size
        except Exception as exc:  # noqa: BLE001 - any exporter failure falls back to eager timing
            out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if out["onnx_bytes"] is not None:
            from vidistill.export.runtime import make_session

            session = make_session(path, threads=threads)
            timing = latency(session, x.numpy().astype(np.float32), warmup=warmup, iters=iters)
            out["runtime"] = "onnxruntime"
        else:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                timing = latency(model, x, warmup=warmup, iters=iters)
            finally:
                torch.set_num_threads(previous)
            out["runtime"] = "pytorch"
    out["latency_ms"] = float(timing["per_clip_ms"])
    return out
