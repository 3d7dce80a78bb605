"""ONNX Runtime inference server speaking the KServe v2 inference protocol: REST (FastAPI + uvicorn)
and gRPC (grpc.aio) in one process, one model, one dynamic batcher, Prometheus metrics.

REST endpoints (`{name}` is the served model's name; each `/v2/models/{name}/...` path also exists as
`/v2/models/{name}/versions/{version}/...`):

    GET  /v2                                    server metadata (extensions: binary_tensor_data)
    GET  /v2/health/live, /v2/health/ready      liveness / readiness
    GET  /v2/models/{name}                      metadata: inputs/outputs with datatype and shape
    GET  /v2/models/{name}/ready                model readiness
    POST /v2/models/{name}/infer                v2 infer: JSON, or the binary tensor data extension
                                                (JSON header + raw little-endian tensors, header length
                                                in Inference-Header-Content-Length), or both mixed;
                                                gzip/deflate request bodies (Content-Encoding)
    POST /v2/models/{name}/classify?top_k=5     raw video bytes as the body; clips are sampled like
                                                prep's evaluation clips, their probabilities averaged
    GET  /metrics                               Prometheus text format (see `vidistill.serve.metrics`)

gRPC (`--grpc-port`, default 8081): `inference.GRPCInferenceService` (see `vidistill.serve.grpc_server`).

Every refused request gets the protocol's error shape, `{"error": "<one line>"}`, with a 4xx status
(400 malformed or inconsistent, 404 unknown model/version/path, 405 wrong method, 413 body over
`--max-body-mb`, refused by Content-Length before reading, 415 unknown Content-Encoding), and the
server goes on. A 5xx means a server fault, never a client's.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import shutil
import socket
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vidistill import __version__
from vidistill.config import PrepConfig
from vidistill.data.video import VideoError, load_clips
from vidistill.export.runtime import OUTPUT_NAMES, make_session, read_metadata
from vidistill.serve.batching import Runner
from vidistill.serve.metrics import ServerMetrics
from vidistill.serve.defaults import DEFAULT_GRPC_PORT, DEFAULT_MAX_BODY_MB
from vidistill.serve.protocol import FP32, INFERENCE_HEADER, ProtocolError, TensorSpec, parse_rest, rest_response

MAX_CLASSIFY_CLIPS = 32
EXTENSIONS = ["binary_tensor_data"]


@dataclass
class LoadedModel:
    """An ONNX model ready to serve.

    Attributes:
        name: the name in the URL (`/v2/models/{name}`).
        version: registry version, or "1" for a plain file.
        session: the ONNX Runtime session.
        classes: class names in label order.
        frames: T; size: H = W (fixed input dims); preprocess: how prep made clips (stride, ...).
        source: where it was loaded from (path or `models:/` URI).
        load_seconds: time to download (registry) and open the session.
    """

    name: str
    version: str
    session: ort.InferenceSession
    classes: list[str]
    frames: int
    size: int
    preprocess: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    load_seconds: float = 0.0
    platform: str = "onnxruntime_onnx"
    workdir: str | None = None  # the download folder of a registry model (removed when a reload retires it)

    @cached_property
    def inputs(self) -> list[TensorSpec]:
        return [_spec(v) for v in self.session.get_inputs()]

    @cached_property
    def outputs(self) -> list[TensorSpec]:
        return [_spec(v) for v in self.session.get_outputs()]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """`x` (B, 3, T, H, W) float32 -> {"logits": (B, K), "features": (B, D)}."""
        outs = self.session.run(list(OUTPUT_NAMES), {self.session.get_inputs()[0].name: x})
        return dict(zip(OUTPUT_NAMES, outs, strict=True))

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [s.as_dict() for s in self.inputs],
            "outputs": [s.as_dict() for s in self.outputs],
            "parameters": {
                "classes": self.classes,
                "input_range": "RGB float32 in [0, 1], normalisation inside the model",
                "providers": self.session.get_providers(),
            },
        }


def _spec(v: Any) -> TensorSpec:
    if v.type != "tensor(float)":
        raise ValueError(f"tensor {v.name!r} has ONNX type {v.type}; vidistill serves float32 students only")
    return TensorSpec(v.name, FP32, tuple(d if isinstance(d, int) else -1 for d in v.shape))


def load_model(model: str, *, name: str | None = None, threads: int | None = None) -> LoadedModel:
    """Load `model`: a path to `model.onnx` (or its directory) or a registry URI.

    Registry URIs are every form MLflow accepts for a registered model (`models:/NAME@alias`,
    `models:/NAME/VERSION`, `models:/NAME/latest`), downloaded with MLflow to a temporary directory
    (tracking server from `$MLFLOW_TRACKING_URI`); classes come from the version's `classes` tag,
    else the ONNX metadata.

    Args:
        model: model file or registry URI.
        name: name to serve under (default: the registered name, or "vidistill" for a file).
        threads: ONNX Runtime intra-op threads (None: ORT default).

    Raises:
        ValueError: a registry URI that does not resolve, or a model without vidistill metadata
            (one-line message).
        FileNotFoundError: a path that does not exist.
    """
    t0 = time.perf_counter()
    version, tmp = "1", None
    if model.startswith("models:/"):
        from vidistill.registry.models import download_model

        tmp = tempfile.mkdtemp(prefix="vidistill-serve-")
        atexit.register(shutil.rmtree, tmp, True)
        try:
            got = download_model(model, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        path, classes, version = Path(got["onnx_path"]), got["classes"], got["version"]
        name = name or got["name"]
    else:
        path = Path(model)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"model {model!r} does not exist; pass a model.onnx path or models:/NAME@champion")
        classes = None
    meta = read_metadata(path)
    for key in ("frames", "size"):
        if key not in meta:
            raise ValueError(f"{path} has no vidistill.{key} metadata; export it with vidistill.export.export_onnx")
    session = make_session(path, threads=threads)
    classes = classes or meta.get("classes") or [str(i) for i in range(meta.get("num_classes", 0))]
    loaded = LoadedModel(
        name=name or "vidistill", version=version, session=session, classes=list(classes),
        frames=meta["frames"], size=meta["size"], preprocess=meta.get("preprocess", {}), source=model, workdir=tmp,
    )
    loaded.inputs, loaded.outputs  # noqa: B018 - refuse a non-float32 model at load time
    loaded.load_seconds = time.perf_counter() - t0
    return loaded


@dataclass
class ServerState:
    """What both front ends share: the model, the runner (batching), the metrics."""

    model: LoadedModel
    runner: Runner  # runs `model` only: a request takes (model, runner) together, so a batch never mixes models
    metrics: ServerMetrics
    ready: bool = True
    threads: int | None = None  # ONNX Runtime intra-op threads of every session this server opens
    make_runner: Callable[[LoadedModel], Runner] | None = None  # a runner with the server's batching settings

    def check_model(self, name: str, version: str | None) -> None:
        """404 unless `name` (and `version`, when given) is the served model."""
        if name != self.model.name:
            raise ProtocolError(404, f"model {name!r} not found; this server serves {self.model.name!r}")
        if version is not None and version != self.model.version:
            raise ProtocolError(404, f"model {name!r} has no version {version!r} here; this server serves version {self.model.version!r}")

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "vidistill", "version": __version__, "extensions": EXTENSIONS}


_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
log = logging.getLogger("vidistill.serve")


async def watch_alias(state: ServerState, period_s: float) -> None:
    """Follow the registry alias the served model came from (`models:/NAME@champion`) and swap in the
    version it names when it moves: how a promotion (or rollback) reaches a running predictor without a
    restart (k8s/base/serving.yaml runs the server with `--watch`). The new version is downloaded and its
    session opened beside the old one, then swapped between two requests; a failed look-up or load keeps
    serving the current version and is logged (one line), to be tried again next period.

    Args:
        state: the server's state; `state.model.source` is the alias URI.
        period_s: seconds between look-ups.
    """
    from vidistill.registry.models import resolve

    uri = state.model.source
    while True:
        await asyncio.sleep(period_s)
        try:
            mv = await asyncio.to_thread(resolve, uri)
            if str(mv.version) == state.model.version:
                continue
            new = await asyncio.to_thread(load_model, uri, name=state.model.name, threads=state.threads)
        except Exception as e:  # the registry may be down for a while: keep serving what we have
            log.warning("watch %s: %s: %s (still serving version %s)", uri, type(e).__name__, " ".join(str(e).split()),
                        state.model.version)
            continue
        old, old_runner = state.model, state.runner
        runner = state.make_runner(new)
        runner.start()
        state.model, state.runner = new, runner  # no await between: every request sees both old or both new
        state.metrics.model_info.labels(old.name, old.version, old.source).set(0)
        state.metrics.model_info.labels(new.name, new.version, new.source).set(1)
        state.metrics.load_seconds.set(new.load_seconds)
        log.warning("watch %s: now serving version %s (was %s)", uri, new.version, old.version)
        task = asyncio.get_running_loop().create_task(_retire(old, old_runner))
        _retiring.add(task)  # a reference, so the task is not collected before it runs
        task.add_done_callback(_retiring.discard)


_retiring: set[asyncio.Task] = set()


async def _retire(model: LoadedModel, runner: Runner, grace_s: float = 30.0) -> None:
    """Stop a replaced model's runner once the requests that took it have finished, then free its download."""
    await asyncio.sleep(grace_s)
    await runner.stop()
    if model.workdir:
        shutil.rmtree(model.workdir, ignore_errors=True)


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


class _MetricsMiddleware:
    """Counts every REST answer by route template and status, and times it (pure ASGI, no buffering)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.observe("rest", endpoint, status[0], time.perf_counter() - t0)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) by Content-Length before reading, or while streaming; a
    gzip/deflate `Content-Encoding` is undone with the same limit on the decoded size."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ProtocolError(400, f"invalid Content-Length header {declared!r}") from None
        if size > limit:
            raise ProtocolError(413, f"payload of {size} bytes exceeds the limit of {limit} bytes (--max-body-mb)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ProtocolError(413, f"payload exceeds the limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(415, f"unsupported Content-Encoding {encoding!r}; send identity, gzip or deflate")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise ProtocolError(400, f"the {encoding} body does not decompress: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ProtocolError(413, f"the decompressed payload exceeds the limit of {limit} bytes (--max-body-mb)")
    if not d.eof:
        raise ProtocolError(400, f"the {encoding} body does not decompress: it ends before the compressed stream does")
    return out


def create_app(
    model: LoadedModel,
    *,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    batching: bool = False,
    max_batch: int = 16,
    max_wait_ms: float = 5.0,
    grpc_host: str = "127.0.0.1",
    grpc_port: int | None = None,
    watch_s: float | None = None,
) -> FastAPI:
    """Build the REST app serving `model`; with `grpc_port`, its lifespan also runs the gRPC server.

    Args:
        model: the loaded model.
        max_body_mb: largest accepted request body (REST) or message (gRPC), in MiB.
        batching: gather concurrent infer requests (REST and gRPC alike) into one ORT call.
        max_batch: clips per gathered batch.
        max_wait_ms: how long the first request of a batch waits for others.
        grpc_host: gRPC bind address.
        grpc_port: gRPC port (None: no gRPC; 0: a free port, see `app.state.grpc_port`).
        watch_s: for a model loaded from `models:/NAME@ALIAS`, look the alias up every `watch_s` seconds
            and serve the version it names once it moves (`watch_alias`); None: never.

    Raises:
        ValueError: a setting out of range.
    """
    if watch_s is not None and not (watch_s > 0 and _ALIAS_URI.match(model.source)):
        raise ValueError(f"watching needs a models:/NAME@ALIAS model and a period > 0 s; got {model.source!r}, {watch_s}")
    if not max_body_mb > 0 or max_batch < 1 or not max_wait_ms >= 0:
        raise ValueError(f"need max_body_mb > 0, max_batch >= 1, max_wait_ms >= 0; got {max_body_mb}, {max_batch}, {max_wait_ms}")
    if grpc_port is not None and not 0 <= grpc_port <= 65535:
        raise ValueError(f"grpc_port must be in [0, 65535], got {grpc_port}")
    limit = int(max_body_mb * 1024 * 1024)
    metrics = ServerMetrics.create()
    metrics.load_seconds.set(model.load_seconds)
    metrics.model_info.labels(model.name, model.version, model.source).set(1)
    def make_runner(m: LoadedModel) -> Runner:
        return Runner(m.run, metrics, batching=batching, max_batch=max_batch, max_wait_ms=max_wait_ms)

    state = ServerState(model=model, runner=make_runner(model), metrics=metrics, make_runner=make_runner)
    prep = PrepConfig()
    pre = {
        "stride": prep.stride, "short_side": prep.short_side, "short_policy": prep.short_policy,
        "clips": prep.clips_per_video_test, **model.preprocess,
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.runner.start()
        watcher = asyncio.get_running_loop().create_task(watch_alias(state, watch_s)) if watch_s else None
        grpc_server = None
        if grpc_port is not None:
            from vidistill.serve.grpc_server import create_grpc_server

            grpc_server, app.state.grpc_port = create_grpc_server(state, host=grpc_host, port=grpc_port, max_message_bytes=limit)
            await grpc_server.start()
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            if grpc_server is not None:
                await grpc_server.stop(grace=2)
            await state.runner.stop()

    app = FastAPI(title="vidistill", version=__version__, lifespan=lifespan)
    app.state.server = state
    app.state.grpc_port = None

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError) -> Response:
        return _json({"error": exc.message}, exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _json({"error": f"{exc.detail}: {request.method} {request.url.path}"}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _json({"error": f"invalid request: {msgs}"}, 400)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> Response:  # a bug, not the client's fault
        return _json({"error": f"internal server error: {type(exc).__name__}: {exc}"}, 500)

    @app.get("/v2")
    async def server_metadata() -> Response:
        return _json(state.server_metadata())

    @app.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return _json({"ready": state.ready})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def model_metadata(name: str, version: str | None = None) -> Response:
        state.check_model(name, version)
        return _json(state.model.metadata())

    async def model_ready(name: str, version: str | None = None) -> Response:
        state.check_model(name, version)
        return _json({"name": name, "ready": state.ready})

    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        state.check_model(name, version)
        model, runner = state.model, state.runner  # together: a reload between two awaits cannot split them
        body = await read_body(request, limit)
        req = parse_rest(body, request.headers.get(INFERENCE_HEADER), model.inputs, model.outputs)
        outs = await runner(req.x)
        payload, header_len = rest_response(model.name, model.version, req, outs)
        if header_len is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(header_len)})

    async def classify(name: str, request: Request, top_k: int = 5, clips: int | None = None, version: str | None = None) -> Response:
        state.check_model(name, version)
        model, runner = state.model, state.runner
        if top_k < 1:
            raise ProtocolError(400, f"top_k must be >= 1, got {top_k}")
        n_clips = pre["clips"] if clips is None else clips
        if not 1 <= n_clips <= MAX_CLASSIFY_CLIPS:
            raise ProtocolError(400, f"clips must be in [1, {MAX_CLASSIFY_CLIPS}], got {n_clips}")
        body = await read_body(request, limit)
        if not body:
            raise ProtocolError(400, "empty body: send the video file's bytes as the request body")
        clip_arr = await asyncio.to_thread(_decode, body, model, pre, n_clips)  # (N, T, S, S, 3) uint8
        x = np.ascontiguousarray(clip_arr.transpose(0, 4, 1, 2, 3), dtype=np.float32) / 255.0  # (N, 3, T, S, S)
        logits = (await runner(x))["logits"]  # (N, K)
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        mean = probs.mean(axis=0)  # multi-clip evaluation: average of clip probabilities
        order = np.argsort(-mean)[: min(top_k, len(model.classes))]
        return _json({
            "model_name": model.name,
            "model_version": model.version,
            "clips": int(x.shape[0]),
            "top_k": [{"index": int(i), "label": model.classes[i], "score": float(mean[i])} for i in order],
        })

    routes: list[tuple[str, Callable[..., Awaitable[Response]], str]] = [
        ("", model_metadata, "GET"), ("/ready", model_ready, "GET"), ("/infer", infer, "POST"), ("/classify", classify, "POST"),
    ]
    for suffix, fn, method in routes:
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            app.add_api_route(prefix + suffix, fn, methods=[method])

    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    return app


def _decode(body: bytes, model: LoadedModel, pre: dict[str, Any], clips: int) -> np.ndarray:
    """Decode uploaded video bytes into eval clips (N, T, S, S, 3) uint8, as prep's test split does."""
    with tempfile.NamedTemporaryFile(suffix=".video") as fh:
        fh.write(body)
        fh.flush()
        try:
            out, _ = load_clips(
                fh.name, relpath="upload", train=False, frames=model.frames, stride=int(pre["stride"]), clips=clips,
                short_side=max(int(pre["short_side"]), model.size), crop=model.size, policy=str(pre["short_policy"]),
            )
        except VideoError as e:
            raise ProtocolError(400, f"the body is not a usable video: {e}") from None
    return out


def _check_free(host: str, port: int, what: str, flag: str) -> None:
    """Refuse (one line) a port that cannot be bound, before the model is loaded."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot bind the {what} port {host}:{port} ({e.strerror}); choose another with {flag}") from None


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    grpc_port: int | None = DEFAULT_GRPC_PORT,
    name: str | None = None,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    batching: bool = False,
    max_batch: int = 16,
    max_wait_ms: float = 5.0,
    threads: int | None = None,
    log_level: str = "warning",
    watch_s: float | None = None,
) -> None:
    """Load `model` and serve it over REST (uvicorn) and gRPC until interrupted.

    Args:
        model: path to `model.onnx` (or its directory) or `models:/NAME@champion` (any registry URI form).
        host: bind address of both servers.
        port: REST port.
        grpc_port: gRPC port (None: REST only).
        name: name to serve under (default: registered name, or "vidistill").
        max_body_mb: largest accepted request body, in MiB.
        batching: dynamic batching of concurrent infer requests (REST and gRPC).
        max_batch: clips per gathered batch.
        max_wait_ms: batching window.
        threads: ONNX Runtime intra-op threads (None: the cgroup's CPU quota, else ORT's default).
        log_level: uvicorn log level.
        watch_s: with `models:/NAME@ALIAS`, serve the version the alias names, looked up every `watch_s`
            seconds (a promotion reaches the server without a restart); None: load once.

    Raises:
        ValueError: a bad setting or a model that cannot be resolved, before anything is loaded or bound.
    """
    import uvicorn

    for what, p in (("port", port), ("grpc_port", grpc_port)):
        if p is not None and not 0 < p <= 65535:
            raise ValueError(f"{what} must be in [1, 65535], got {p}")
    if grpc_port is not None and grpc_port == port:
        raise ValueError(f"the REST and gRPC ports must differ, both are {port}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if not max_body_mb > 0 or max_batch < 1 or not max_wait_ms >= 0:
        raise ValueError(f"need --max-body-mb > 0, --max-batch >= 1, --max-wait-ms >= 0; got {max_body_mb}, {max_batch}, {max_wait_ms}")
    for what, flag, p in (("REST", "--port", port), ("gRPC", "--grpc-port", grpc_port)):
        if p is not None:
            _check_free(host, p, what, flag)
    if watch_s is not None and not (watch_s > 0 and _ALIAS_URI.match(model)):
        raise ValueError(f"--watch follows a registry alias: pass --model models:/NAME@ALIAS (got {model!r}) and a period "
                         f"> 0 s (got {watch_s})")
    loaded = load_model(model, name=name, threads=threads)
    app = create_app(
        loaded, max_body_mb=max_body_mb, batching=batching, max_batch=max_batch, max_wait_ms=max_wait_ms,
        grpc_host=host, grpc_port=grpc_port, watch_s=watch_s,
    )
    app.state.server.threads = threads
    uvicorn.run(app, host=host, port=port, log_level=log_level)
