"""Running exported models without torch: ONNX metadata, execution providers, ORT sessions.

Kept free of torch so the serving image needs only onnx and onnxruntime.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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


PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def providers() -> list[str]:
    """ONNX Runtime execution providers to use: CUDA first when this build has it, then CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


default_providers = providers  # `make_session` takes a `providers` argument that shadows the name


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 0.5 for a pod's `limits.cpu: 500m`), or None.

    Reads cgroup v2's `cpu.max` ("QUOTA PERIOD" or "max PERIOD") or cgroup v1's `cpu/cpu.cfs_quota_us`
    and `cpu/cpu.cfs_period_us` (quota -1: none). A container sees its own cgroup at `root`.
    """
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def default_threads(root: str | Path = "/sys/fs/cgroup") -> int | None:
    """Intra-op threads for a session when none are asked for: the cgroup's CPU quota, rounded down, at
    least 1 and at most the visible cores; None where no quota is set (ONNX Runtime's own default).

    ONNX Runtime sizes its pool from the cores it sees, not from the quota: in a pod limited to 0.5 CPU
    on a 16-core node its 16 threads are throttled, 1.85-2.8x less throughput and 2.3-12x worse p95
    than threads matched to the quota (measured in issue 25; microsoft/onnxruntime#29510).
    """
    import os

    limit = cgroup_cpu_limit(root)
    if limit is None:
        return None
    return max(1, min(int(limit), os.cpu_count() or 1))


def make_session(
    onnx_path: str | Path,
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    tf32: bool = False,
) -> ort.InferenceSession:
    """An ONNX Runtime session; `threads` sets intra-op threads (None: the cgroup's CPU quota, see
    `default_threads`, else ORT's default).

    Args:
        onnx_path: the model file.
        threads: intra-op threads (None: `default_threads()`).
        providers: execution providers in order of preference, by name or alias ("cuda", "cpu");
            default `providers()` (CUDA first when this ONNX Runtime build has it).
        tf32: let the CUDA provider run float32 convolutions and matrix products in TF32
            (ORT's `use_tf32`, on by default in ONNX Runtime on Ampere and later GPUs). Off here: the
            served model then computes what the export's parity gate checked (float32, |Δ| <= 1e-4).

    Raises:
        FileNotFoundError: the model file does not exist.
        ValueError: a provider this ONNX Runtime build does not have (the message lists the ones
            it has and, for CUDA, the package to install).
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist; export one with vidistill.export.export_onnx")
    names = [PROVIDER_ALIASES.get(p, p) for p in providers] if providers is not None else default_providers()
    available = ort.get_available_providers()
    missing = [n for n in names if n not in available]
    if missing:
        hint = " (install onnxruntime-gpu instead of onnxruntime, with CUDA 12 and cuDNN 9 libraries)" if "CUDAExecutionProvider" in missing else ""
        raise ValueError(f"onnxruntime {ort.__version__} has no {', '.join(missing)}{hint}; it has {', '.join(available)}")
    opts = ort.SessionOptions()
    threads = default_threads() if threads is None else threads
    if threads is not None:
        opts.intra_op_num_threads = threads
    chosen: list[str | tuple[str, dict[str, str]]] = [
        (n, {"use_tf32": "1" if tf32 else "0"}) if n == "CUDAExecutionProvider" else n for n in names
    ]
    return ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
