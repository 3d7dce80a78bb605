"""gRPC front end: `inference.GRPCInferenceService` (KServe v2 / Open Inference Protocol) on grpc.aio.

The service definition and messages are the generated stubs that ship with NVIDIA's `tritonclient`
(`tritonclient.grpc.service_pb2{,_grpc}`): the same `inference` package and message field numbers as
KServe's `grpc_predict_v2.proto`, which Triton's proto extends. Implemented: ServerLive, ServerReady,
ModelReady, ServerMetadata, ModelMetadata, ModelInfer; the others answer UNIMPLEMENTED.

It runs on the same asyncio loop as the REST app, so both share one model, one set of checks
(`vidistill.serve.protocol`) and one dynamic batcher. Inputs come as `raw_input_contents`
(little-endian bytes, what tritonclient sends) or typed `contents.fp32_contents`; outputs go back
as `raw_output_contents`, as Triton does.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from vidistill.serve.protocol import FP32, ProtocolError, check_input, check_output_name, finish_input

if TYPE_CHECKING:
    from vidistill.serve.app import ServerState

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED}
_OTHER_CONTENTS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents", "fp64_contents", "bytes_contents")


def parse_grpc(request: Any, state: ServerState) -> tuple[np.ndarray, list[str]]:
    """Check a `ModelInferRequest` with the REST rules; returns (B, 3, T, H, W) float32 and output names."""
    model = state.model
    chosen: list[str] = []
    for o in request.outputs:
        check_output_name(o.name, dict(o.parameters), model.outputs, chosen)
        chosen.append(o.name)
    outputs = chosen or [s.name for s in model.outputs]
    if not request.inputs:
        raise ProtocolError(400, f"the request has no inputs; the model takes {[s.as_dict() for s in model.inputs]}")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input")
    seen: set[str] = set()
    arrays: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        spec, shape = check_input(t.name, t.datatype, list(t.shape), model.inputs, seen=seen)
        typed = t.HasField("contents")
        if raw:
            if typed:
                raise ProtocolError(400, f"input {spec.name!r} has both contents and raw_input_contents; send one of them")
            need = math.prod(shape) * 4
            if len(raw[i]) != need:
                raise ProtocolError(400, f"input {spec.name!r}: {len(raw[i])} raw bytes but shape {shape} of FP32 needs {need}")
            values = np.frombuffer(raw[i], dtype="<f4")
        else:
            other = [f for f in _OTHER_CONTENTS if len(getattr(t.contents, f))]
            if other:
                raise ProtocolError(400, f"input {spec.name!r} is FP32 but its data is in contents.{other[0]}; use fp32_contents or raw_input_contents")
            values = np.asarray(t.contents.fp32_contents, dtype=np.float32)
        arrays[spec.name] = finish_input(spec.name, values, shape)
    absent = [s.name for s in model.inputs if s.name not in arrays]
    if absent:
        raise ProtocolError(400, f"missing input(s) {absent}")
    (x,) = arrays.values()
    return x, outputs


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The v2 gRPC service over a `ServerState` (model, runner, metrics)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def _answer(self, method: str, context: grpc.aio.ServicerContext, fn: Any) -> Any:
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await fn()
        except ProtocolError as e:
            code = _CODES.get(e.status, grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(code, e.message)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # a bug or an ONNX Runtime failure: INTERNAL, never a client's fault
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, f"{type(e).__name__}: {e}")
        finally:
            self.state.metrics.observe("grpc", method, code.name, time.perf_counter() - t0)

    def _check_model(self, name: str, version: str) -> None:
        self.state.check_model(name, version or None)

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def fn() -> Any:
            return service_pb2.ServerLiveResponse(live=True)

        return await self._answer("ServerLive", context, fn)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def fn() -> Any:
            return service_pb2.ServerReadyResponse(ready=self.state.ready)

        return await self._answer("ServerReady", context, fn)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def fn() -> Any:
            # Triton (the reference) answers ready: false for a model or version it does not serve, and
            # tritonclient's is_model_ready expects that, not NOT_FOUND
            try:
                self._check_model(request.name, request.version)
            except ProtocolError as e:
                if e.status != 404:
                    raise
                return service_pb2.ModelReadyResponse(ready=False)
            return service_pb2.ModelReadyResponse(ready=self.state.ready)

        return await self._answer("ModelReady", context, fn)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def fn() -> Any:
            meta = self.state.server_metadata()
            return service_pb2.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

        return await self._answer("ServerMetadata", context, fn)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def fn() -> Any:
            self._check_model(request.name, request.version)
            m = self.state.model

            def tensors(specs: Any) -> list[Any]:
                return [service_pb2.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in specs]

            return service_pb2.ModelMetadataResponse(
                name=m.name, versions=[m.version], platform=m.platform, inputs=tensors(m.inputs), outputs=tensors(m.outputs)
            )

        return await self._answer("ModelMetadata", context, fn)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def fn() -> Any:
            self._check_model(request.model_name, request.model_version)
            model, runner = self.state.model, self.state.runner  # together: a reload cannot split them
            x, outputs = parse_grpc(request, self.state)
            outs = await runner(x)
            resp = service_pb2.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
            for name in outputs:
                arr = np.ascontiguousarray(outs[name], dtype="<f4")
                resp.outputs.add(name=name, datatype=FP32, shape=list(arr.shape))
                resp.raw_output_contents.append(arr.tobytes())
            return resp

        return await self._answer("ModelInfer", context, fn)


def create_grpc_server(state: ServerState, *, host: str, port: int, max_message_bytes: int) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with the inference service on `host:port` (not started); returns it and the bound port."""
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC port {host}:{port}; choose another with --grpc-port")
    return server, bound
