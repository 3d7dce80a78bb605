"""A Triton / KServe model repository for an exported student: `<root>/<name>/<version>/model.onnx` and
`<root>/<name>/config.pbtxt`.

KServe's stock runtime for `modelFormat: onnx` is Triton's ONNX Runtime backend, which loads a model
repository rather than a bare `model.onnx`. The `config.pbtxt` is built as a
`tritonclient.grpc.model_config_pb2.ModelConfig` message (Triton's own model-config schema) and written
in protobuf text format, so it parses by construction; `validate_model_repository` parses it back and
checks it against the ONNX graph it sits beside (names, datatypes, dims, batching).

The exported graph has a dynamic batch axis, so the config sets `max_batch_size` and lists dims
without the batch axis: `input` TYPE_FP32 [3, T, H, W], `logits` TYPE_FP32 [K], `features` TYPE_FP32
[D]; dynamic batching is on, with a bounded queue delay.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from vidistill.export.runtime import MODEL_FILE

CONFIG_FILE = "config.pbtxt"
REPOSITORY_DIR = "model_repository"  # <export out>/model_repository
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# ONNX tensor element type -> Triton DataType name (model_config.proto)
_TRITON_DTYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.BOOL: "TYPE_BOOL",
}


class ModelRepositoryError(ValueError):
    """A model repository whose config does not parse or does not match its ONNX graph (one line)."""


def _io(values: Any, where: str) -> list[tuple[str, str, list[int | None]]]:
    """(name, Triton dtype, dims with None for a symbolic axis) of graph inputs or outputs."""
    out = []
    for v in values:
        t = v.type.tensor_type
        if t.elem_type not in _TRITON_DTYPES:
            raise ModelRepositoryError(f"{where} {v.name!r} has ONNX element type {t.elem_type}, which Triton's config cannot name")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out.append((v.name, _TRITON_DTYPES[t.elem_type], dims))
    return out


def _graph_io(proto: onnx.ModelProto) -> tuple[list[tuple[str, str, list[int | None]]], list[tuple[str, str, list[int | None]]]]:
    inits = {i.name for i in proto.graph.initializer}
    inputs = _io([i for i in proto.graph.input if i.name not in inits], "input")
    return inputs, _io(proto.graph.output, "output")


def model_config(
    onnx_path: str | Path,
    name: str,
    *,
    max_batch_size: int = 32,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32),
    max_queue_delay_us: int = 2000,
) -> Any:
    """The Triton `ModelConfig` message for an exported student.

    Args:
        onnx_path: the model file; its first axis (batch) must be symbolic on every input and output.
        name: the model name clients ask for (Triton's and KServe's `<name>`).
        max_batch_size: largest batch Triton forms (>= 1).
        preferred_batch_sizes: batch sizes the dynamic batcher aims for (each in 1..max_batch_size).
        max_queue_delay_us: longest a request waits for others to join its batch, in microseconds (>= 0).

    Returns:
        A `tritonclient.grpc.model_config_pb2.ModelConfig`.

    Raises:
        ValueError: a bad name or batching setting (one line naming it).
        ModelRepositoryError: a graph without a dynamic batch axis or with a type Triton cannot name.
        FileNotFoundError: `onnx_path` does not exist.
    """
    from tritonclient.grpc import model_config_pb2 as mc

    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist; run `vidistill export` first")
    if not _NAME.match(name):
        raise ValueError(f"model repository name {name!r} must be letters, digits, '_', '.', '-' (no '/'); "
                         "pass e.g. export.repository_name=vidistill")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    bad = [b for b in preferred_batch_sizes if not 1 <= b <= max_batch_size]
    if bad:
        raise ValueError(f"preferred batch sizes {bad} are outside 1..max_batch_size={max_batch_size}; drop them")
    if max_queue_delay_us < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0 microseconds, got {max_queue_delay_us}")
    inputs, outputs = _graph_io(onnx.load(str(path), load_external_data=False))
    cfg = mc.ModelConfig(name=name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=max_batch_size)
    for kind, items, add in (("input", inputs, cfg.input.add), ("output", outputs, cfg.output.add)):
        for tname, dtype, dims in items:
            if not dims or dims[0] is not None:
                raise ModelRepositoryError(f"{kind} {tname!r} of {path} has dims {dims}: its first (batch) axis must be "
                                           "dynamic for Triton's batching; export with export_onnx (dynamic batch)")
            if any(d is None for d in dims[1:]):
                raise ModelRepositoryError(f"{kind} {tname!r} of {path} has symbolic dims {dims[1:]} beyond the batch axis; "
                                           "export with fixed T, H, W")
            add(name=tname, data_type=mc.DataType.Value(dtype), dims=[int(d) for d in dims[1:]])  # type: ignore[arg-type]
    cfg.dynamic_batching.preferred_batch_size.extend(sorted(set(preferred_batch_sizes)))
    cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    return cfg


def write_model_repository(
    onnx_path: str | Path,
    root: str | Path,
    name: str,
    *,
    version: int = 1,
    **batching: Any,
) -> Path:
    """Write `<root>/<name>/<version>/model.onnx` and `<root>/<name>/config.pbtxt`, then validate them.

    Args:
        onnx_path: the exported model (copied, not moved).
        root: the repository root (Triton's `--model-repository`, KServe's `storageUri`).
        name: model name; version: a positive integer version folder.
        **batching: `max_batch_size`, `preferred_batch_sizes`, `max_queue_delay_us` (see `model_config`).

    Returns:
        The model's folder `<root>/<name>`.

    Raises:
        ValueError, ModelRepositoryError, FileNotFoundError: as `model_config`; a version < 1.
    """
    from google.protobuf import text_format

    if version < 1:
        raise ValueError(f"model repository version must be an integer >= 1, got {version}")
    cfg = model_config(onnx_path, name, **batching)
    folder = Path(root) / name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, folder / str(version) / MODEL_FILE)
    (folder / CONFIG_FILE).write_text(text_format.MessageToString(cfg))
    validate_model_repository(folder)
    return folder


def validate_model_repository(folder: str | Path) -> dict[str, Any]:
    """Parse `<folder>/config.pbtxt` with Triton's schema and check it against every version's ONNX graph.

    Checks: the config parses as a `ModelConfig`; its name is the folder's; the platform is
    `onnxruntime_onnx`; every input and output of the graph appears with the same name, datatype and
    dims (without the batch axis, `max_batch_size` > 0) and no others; dynamic batching is set.

    Returns:
        `{"name", "versions": [int], "inputs": {name: [dims]}, "outputs": {name: [dims]}, "max_batch_size"}`.

    Raises:
        ModelRepositoryError: the config does not parse or does not match (one line naming the field).
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    folder = Path(folder)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise ModelRepositoryError(f"{cfg_path} does not exist; write the repository with write_model_repository")
    try:
        cfg = text_format.Parse(cfg_path.read_text(), mc.ModelConfig())
    except text_format.ParseError as e:
        raise ModelRepositoryError(f"{cfg_path} is not a valid Triton ModelConfig: {e}") from None
    if cfg.name != folder.name:
        raise ModelRepositoryError(f"{cfg_path} names model {cfg.name!r} but sits in folder {folder.name!r}; Triton refuses that")
    if cfg.platform != "onnxruntime_onnx":
        raise ModelRepositoryError(f"{cfg_path} has platform {cfg.platform!r}; expected 'onnxruntime_onnx'")
    if cfg.max_batch_size < 1 or not cfg.HasField("dynamic_batching"):
        raise ModelRepositoryError(f"{cfg_path} must set max_batch_size >= 1 and dynamic_batching for the batched graph")
    versions = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / MODEL_FILE).is_file())
    if not versions:
        raise ModelRepositoryError(f"{folder} has no <version>/{MODEL_FILE}")
    have = {
        "input": {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input},
        "output": {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in cfg.output},
    }
    for v in versions:
        inputs, outputs = _graph_io(onnx.load(str(folder / str(v) / MODEL_FILE), load_external_data=False))
        for kind, items in (("input", inputs), ("output", outputs)):
            want = {n: (dt, dims[1:]) for n, dt, dims in items}
            if want != have[kind]:
                raise ModelRepositoryError(f"{cfg_path} {kind}s {have[kind]} do not match version {v}'s ONNX graph {want}")
    return {"name": cfg.name, "versions": versions, "max_batch_size": cfg.max_batch_size,
            "inputs": {k: v[1] for k, v in have["input"].items()}, "outputs": {k: v[1] for k, v in have["output"].items()}}
