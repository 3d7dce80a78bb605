"""The KServe v2 (Open Inference Protocol) request checks shared by REST and gRPC.

One set of rules for both transports, applied before the model runs:
- the request names every model input exactly once, with the model's datatype (`FP32`) and a shape
  `[B, 3, T, H, W]` matching the model (1 <= B <= `MAX_REQUEST_BATCH`);
- JSON data holds numbers only (a string, boolean or null in FP32 data is refused, as is a nested
  list whose shape differs from `shape`), binary data holds exactly `B*3*T*H*W*4` bytes
  (little-endian float32, the binary tensor data extension), and every value is finite;
- requested outputs exist, are named once each, and ask only for what the server implements
  (`binary_data`; the classification extension is refused).

Each refusal raises `ProtocolError` with a one-line message naming the value and what to send; the
REST layer answers `{"error": message}` with its `status`, the gRPC layer `INVALID_ARGUMENT` or
`NOT_FOUND`.

Spec: https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol (REST and
gRPC), binary-tensor-data-extension; Triton's `extension_binary_data.md` for the client behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

INFERENCE_HEADER = "inference-header-content-length"
MAX_REQUEST_BATCH = 64  # clips per infer request
FP32 = "FP32"
# the datatypes of the protocol (used to tell "not a datatype" from "not this model's datatype")
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "BF16")


class ProtocolError(Exception):
    """A client error: `status` is the HTTP status (400, 404, 413) and `message` one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, protocol datatype and shape (-1 for a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class InferRequest:
    """A checked infer request: the input array and what to send back.

    Attributes:
        x: the model input (B, 3, T, H, W) float32, C-contiguous.
        outputs: names of the outputs to return, in order.
        binary: per output, whether to return it as binary data (REST binary extension).
        id: the request id, echoed in the response.
    """

    x: np.ndarray
    outputs: list[str]
    binary: dict[str, bool] = field(default_factory=dict)
    id: str | None = None


def _strict_numbers(data: Any, name: str) -> np.ndarray:
    """JSON `data` (flat or nested list) as a float64 array; refuses anything but numbers."""
    if not isinstance(data, list):
        raise ProtocolError(400, f"input {name!r}: \"data\" must be a list of numbers, got {type(data).__name__}")
    flat = data
    while flat and isinstance(flat[0], list):  # nested row-major data: flatten level by level
        if not all(isinstance(v, list) for v in flat):
            raise ProtocolError(400, f"input {name!r}: \"data\" mixes lists and numbers; send a flat or evenly nested list of numbers")
        flat = [v for row in flat for v in row]
    kinds = set(map(type, flat))
    if not kinds <= {float, int}:
        bad = sorted(k.__name__ if k is not type(None) else "null" for k in kinds - {float, int})
        bad = ["string" if b == "str" else "boolean" if b == "bool" else "list" if b == "list" else b for b in bad]
        raise ProtocolError(400, f"input {name!r}: FP32 \"data\" must hold numbers only, found {', '.join(bad)}; send JSON numbers (not strings)")
    try:
        return np.array(flat, dtype=np.float64)
    except OverflowError:  # a JSON integer beyond float range
        raise ProtocolError(400, f"input {name!r}: \"data\" holds a number out of float range") from None


def check_input(
    name: Any, datatype: Any, shape: Any, model_inputs: Sequence[TensorSpec], *, seen: set[str]
) -> tuple[TensorSpec, list[int]]:
    """Check one input's name, datatype and shape against the model; returns its spec and shape."""
    if not isinstance(name, str):
        raise ProtocolError(400, f"input \"name\" must be a string, got {name!r}")
    spec = next((s for s in model_inputs if s.name == name), None)
    if spec is None:
        raise ProtocolError(400, f"unknown input {name!r}; the model's inputs are {[s.name for s in model_inputs]}")
    if name in seen:
        raise ProtocolError(400, f"input {name!r} is given twice; send each input once")
    seen.add(name)
    if datatype != spec.datatype:
        what = "an unknown datatype" if datatype not in DATATYPES else "the wrong datatype"
        raise ProtocolError(400, f"input {name!r} has {what} {datatype!r}; the model takes {spec.datatype} (RGB float in [0, 1])")
    if not (isinstance(shape, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise ProtocolError(400, f"input {name!r}: \"shape\" must be a list of integers, got {shape!r}")
    shape = list(shape)
    fixed = list(spec.shape[1:])
    if len(shape) != len(spec.shape) or shape[1:] != fixed or not 1 <= shape[0] <= MAX_REQUEST_BATCH:
        expected = ", ".join(map(str, fixed))
        raise ProtocolError(
            400, f"input {name!r} has wrong shape {shape}: expected [B, {expected}] (B, 3, T, H, W) with 1 <= B <= {MAX_REQUEST_BATCH}"
        )
    return spec, shape


def finish_input(name: str, values: np.ndarray, shape: list[int]) -> np.ndarray:
    """Count and finiteness checks; returns float32 (B, 3, T, H, W), C-contiguous."""
    need = math.prod(shape)
    if values.size != need:
        raise ProtocolError(400, f"input {name!r} holds {values.size} values but shape {shape} needs {need}")
    x = values.astype(np.float32, copy=False).reshape(shape)
    if not np.isfinite(x).all():
        raise ProtocolError(400, f"input {name!r} contains {int((~np.isfinite(x)).sum())} NaN/Inf values; send finite RGB values in [0, 1]")
    return np.ascontiguousarray(x)


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """The `parameters` object of a request, input or output (absent or null: empty)."""
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(400, f'{where}"parameters" must be an object, got {params!r}')
    return params


def _bool_parameter(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    flag = params.get(key, default)
    if not isinstance(flag, bool):
        raise ProtocolError(400, f'{where}"{key}" must be true or false, got {flag!r}')
    return flag


def check_outputs(requested: Any, model_outputs: Sequence[TensorSpec], *, binary_default: bool) -> tuple[list[str], dict[str, bool]]:
    """Requested outputs (REST `outputs`, a list of objects, or absent/null = all) -> names and binary flags."""
    names = [s.name for s in model_outputs]
    if requested is None:
        return names, {n: binary_default for n in names}
    if not isinstance(requested, list):
        raise ProtocolError(400, f"\"outputs\" must be a list of {{\"name\": ...}} objects, got {type(requested).__name__}")
    out: list[str] = []
    binary: dict[str, bool] = {}
    for o in requested:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise ProtocolError(400, f"each requested output must be an object with a string \"name\", got {o!r}")
        where = f"output {o['name']!r}: "
        params = _parameters(o, where)
        flag = _bool_parameter(params, "binary_data", binary_default, where)
        check_output_name(o["name"], params, model_outputs, out)
        out.append(o["name"])
        binary[o["name"]] = flag
    if not out:  # "outputs": [] asks for nothing in particular: the spec's default is every output
        return names, {n: binary_default for n in names}
    return out, binary


def check_output_name(name: str, params: dict[str, Any], model_outputs: Sequence[TensorSpec], chosen: list[str]) -> None:
    """One requested output: known, not repeated, no unsupported extension parameters."""
    names = [s.name for s in model_outputs]
    if name not in names:
        raise ProtocolError(400, f"unknown output {name!r}; the model's outputs are {names}")
    if name in chosen:
        raise ProtocolError(400, f"output {name!r} is requested twice; request each output once")
    if "classification" in params:
        raise ProtocolError(400, f"output {name!r}: the classification extension is not supported; request the logits and take the top-k")


def parse_rest(body: bytes, header_length: str | None, model_inputs: Sequence[TensorSpec], model_outputs: Sequence[TensorSpec]) -> InferRequest:
    """Parse and check a REST infer request body: JSON, or a JSON header followed by binary tensors.

    Args:
        body: the whole HTTP body.
        header_length: the `Inference-Header-Content-Length` header (None: the body is all JSON).
        model_inputs: the model's inputs; model_outputs: its outputs.

    Raises:
        ProtocolError: 400 for any malformed or inconsistent request.
    """
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(400, f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise ProtocolError(400, f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
        head, blob = memoryview(body)[:n], memoryview(body)[n:]
    else:
        head, blob = memoryview(body), memoryview(b"")
    try:
        req = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        hint = "" if header_length is not None else "; binary tensors need the Inference-Header-Content-Length header"
        raise ProtocolError(400, f"malformed JSON body: {e}{hint}") from None
    if not isinstance(req, dict):
        raise ProtocolError(400, f'the request must be a JSON object with "inputs", got {type(req).__name__}')
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError(400, f'"id" must be a string, got {rid!r}')
    binary_default = _bool_parameter(_parameters(req, ""), "binary_data_output", False, "")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(400, f'"inputs" must be a non-empty list of tensors; the model takes {[s.as_dict() for s in model_inputs]}')
    # outputs first: a bad output name is refused before any tensor data is decoded or the model runs
    outputs, binary = check_outputs(req.get("outputs"), model_outputs, binary_default=binary_default)

    seen: set[str] = set()
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for t in inputs:
        if not isinstance(t, dict):
            raise ProtocolError(400, f"each input must be an object with name, shape, datatype and data, got {type(t).__name__}")
        missing = [k for k in ("name", "shape", "datatype") if k not in t]
        if missing:
            raise ProtocolError(400, f"input {t.get('name', '?')!r} is missing {', '.join(missing)}")
        spec, shape = check_input(t["name"], t["datatype"], t["shape"], model_inputs, seen=seen)
        tparams = _parameters(t, f"input {spec.name!r}: ")
        size = tparams.get("binary_data_size")
        if size is not None:
            if "data" in t:
                raise ProtocolError(400, f"input {spec.name!r} has both \"data\" and binary_data_size; send one of them")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(400, f"input {spec.name!r}: binary_data_size must be a non-negative integer, got {size!r}")
            need = math.prod(shape) * 4
            if size != need:
                raise ProtocolError(400, f"input {spec.name!r}: binary_data_size {size} but shape {shape} of FP32 needs {need} bytes")
            if offset + size > len(blob):
                raise ProtocolError(400, f"input {spec.name!r}: the body has {len(blob) - offset} binary bytes left, binary_data_size says {size}")
            values = np.frombuffer(blob[offset : offset + size], dtype="<f4")
            offset += size
        elif "data" in t:
            values = _strict_numbers(t["data"], spec.name)
        else:
            raise ProtocolError(400, f"input {spec.name!r} has neither \"data\" nor a binary_data_size parameter")
        arrays[spec.name] = finish_input(spec.name, values, shape)
    if offset != len(blob):
        raise ProtocolError(400, f"the body has {len(blob) - offset} binary bytes that no input's binary_data_size accounts for")
    absent = [s.name for s in model_inputs if s.name not in arrays]
    if absent:
        raise ProtocolError(400, f"missing input(s) {absent}; the model takes {[s.as_dict() for s in model_inputs]}")
    (x,) = arrays.values()  # the student has exactly one input
    return InferRequest(x=x, outputs=outputs, binary=binary, id=rid)


def rest_response(
    model_name: str, model_version: str, req: InferRequest, outs: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """Encode a REST infer response; returns (body, JSON header length or None when all JSON)."""
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in req.outputs:
        arr = np.ascontiguousarray(outs[name], dtype="<f4")
        t: dict[str, Any] = {"name": name, "datatype": FP32, "shape": list(arr.shape)}
        if req.binary.get(name):
            raw = arr.tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = arr.ravel()
        tensors.append(t)
    resp: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": tensors}
    if req.id is not None:
        resp["id"] = req.id
    head = orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
