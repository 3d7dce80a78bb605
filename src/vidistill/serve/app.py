"""ONNX Runtime inference server speaking the KServe v2 inference protocol (FastAPI + uvicorn).

Endpoints (`{name}` is the served model's name):

    GET  /v2                                    server metadata
    GET  /v2/health/live, /v2/health/ready      liveness / readiness
    GET  /v2/models/{name}                      metadata: inputs/outputs with datatype and shape
    GET  /v2/models/{name}/ready                model readiness
    POST /v2/models/{name}/infer                KServe v2 JSON: {"inputs": [{"name": "input",
                                                "shape": [B, 3, T, H, W], "datatype": "FP32", "data": [...]}]}
    POST /v2/models/{name}/classify?top_k=5     raw video bytes as the body (no multipart); the
                                                clips are sampled like prep's evaluation clips

Every refused request gets a 4xx JSON `{"error": "..."}` naming the problem and the server goes on:
malformed JSON, wrong input name/shape/datatype, NaN/Inf, oversized body (refused by
Content-Length before reading), a body that is not a decodable video, an unknown model (404).
Optional dynamic batching gathers concurrent infer requests for up to `max_wait_ms` or
`max_batch` clips into one ONNX Runtime call.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import math
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vidistill import __version__
from vidistill.config import PrepConfig
from vidistill.data.video import VideoError, load_clips
from vidistill.export.runtime import INPUT_NAME, OUTPUT_NAMES, make_session, read_metadata

DEFAULT_MAX_BODY_MB = 32.0
MAX_REQUEST_BATCH = 64  # clips per infer request
MAX_CLASSIFY_CLIPS = 32


class RequestError(Exception):
    """A client error: answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
    """

    name: str
    version: str
    session: ort.InferenceSession
    classes: list[str]
    frames: int
    size: int
    preprocess: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """`x` (B, 3, T, H, W) float32 -> {"logits": (B, K), "features": (B, D)}."""
        outs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return dict(zip(OUTPUT_NAMES, outs, strict=True))

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata."""

        def spec(v: Any) -> dict[str, Any]:
            shape = [d if isinstance(d, int) else -1 for d in v.shape]
            return {"name": v.name, "datatype": "FP32", "shape": shape}

        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [spec(v) for v in self.session.get_inputs()],
            "outputs": [spec(v) for v in self.session.get_outputs()],
            "parameters": {
                "classes": self.classes,
                "input_range": "RGB float32 in [0, 1], normalisation inside the model",
                "providers": self.session.get_providers(),
            },
        }


def load_model(model: str, *, name: str | None = None, threads: int | None = None) -> LoadedModel:
    """Load `model` (a path to `model.onnx`, or `models:/NAME@alias` / `models:/NAME/VERSION`).

    Registry models are downloaded with MLflow to a temporary directory (tracking server from
    `$MLFLOW_TRACKING_URI`); classes come from the version's `classes` tag, else the ONNX metadata.

    Args:
        model: model file or registry URI.
        name: name to serve under (default: the registered name, or "vidistill" for a file).
        threads: ONNX Runtime intra-op threads (None: ORT default).
    """
    version = "1"
    if model.startswith("models:/"):
        from vidistill.registry.models import download_model

        tmp = tempfile.mkdtemp(prefix="vidistill-serve-")
        atexit.register(shutil.rmtree, tmp, True)
        got = download_model(model, tmp)
        path, classes, version = Path(got["onnx_path"]), got["classes"], got["version"]
        name = name or got["name"]
    else:
        path = Path(model)
        if path.is_dir():
            path = path / "model.onnx"
        classes = None
    meta = read_metadata(path)
    for key in ("frames", "size"):
        if key not in meta:
            raise ValueError(f"{path} has no vidistill.{key} metadata; export it with vidistill.export.export_onnx")
    session = make_session(path, threads=threads)
    classes = classes or meta.get("classes") or [str(i) for i in range(meta.get("num_classes", 0))]
    return LoadedModel(
        name=name or "vidistill", version=version, session=session, classes=list(classes),
        frames=meta["frames"], size=meta["size"], preprocess=meta.get("preprocess", {}), source=model,
    )


class Batcher:
    """Dynamic batching: one worker drains a queue, gathering up to `max_batch` clips or `max_wait_ms`."""

    def __init__(self, model: LoadedModel, *, max_batch: int, max_wait_ms: float) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def submit(self, x: np.ndarray) -> dict[str, np.ndarray]:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, fut))
        return await fut

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            total = items[0][0].shape[0]
            deadline = loop.time() + self.max_wait
            while total < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
                items.append(item)
                total += item[0].shape[0]
            batch = np.concatenate([x for x, _ in items])  # (sum B, 3, T, H, W)
            try:
                outs = await asyncio.to_thread(self.model.run, batch)
            except Exception as e:  # the ORT failure goes to every waiting request
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            start = 0
            for x, fut in items:
                n = x.shape[0]
                if not fut.done():
                    fut.set_result({k: v[start : start + n] for k, v in outs.items()})
                start += n


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) by Content-Length before reading, or while streaming."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length header {declared!r}") from None
        if size > limit:
            raise RequestError(413, f"payload of {size} bytes exceeds the limit of {limit} bytes (--max-body-mb)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(413, f"payload exceeds the limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_infer(body: bytes, model: LoadedModel) -> tuple[np.ndarray, dict[str, Any]]:
    """Validate a KServe v2 infer request; returns the (B, 3, T, H, W) float32 input and the request."""
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON body: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or len(req["inputs"]) != 1:
        raise RequestError(400, 'request must be a JSON object with "inputs": a list holding exactly one tensor named "input"')
    spec = req["inputs"][0]
    if not isinstance(spec, dict):
        raise RequestError(400, f'"inputs"[0] must be an object with name, shape, datatype and data, got {type(spec).__name__}')
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in spec]
    if missing:
        raise RequestError(400, f'input tensor is missing {", ".join(missing)}')
    if spec["name"] != INPUT_NAME:
        raise RequestError(400, f'unknown input {spec["name"]!r}; the model has one input named {INPUT_NAME!r}')
    if spec["datatype"] != "FP32":
        raise RequestError(400, f'datatype must be "FP32" (RGB float in [0, 1]), got {spec["datatype"]!r}')
    shape = spec["shape"]
    expected = [3, model.frames, model.size, model.size]
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise RequestError(400, f"shape must be a list of integers, got {shape!r}")
    if len(shape) != 5 or shape[1:] != expected or not 1 <= shape[0] <= MAX_REQUEST_BATCH:
        raise RequestError(
            400, f"wrong shape {shape}: expected [B, {', '.join(map(str, expected))}] (B, 3, T, H, W) with 1 <= B <= {MAX_REQUEST_BATCH}"
        )
    try:
        x = np.asarray(spec["data"], dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise RequestError(400, f"data must be a (flat or nested) list of numbers: {e}") from None
    if x.size != math.prod(shape):
        raise RequestError(400, f"data holds {x.size} values but shape {shape} needs {math.prod(shape)}")
    if not np.isfinite(x).all():
        raise RequestError(400, f"data contains {int((~np.isfinite(x)).sum())} NaN/Inf values; send finite RGB values in [0, 1]")
    return np.ascontiguousarray(x.reshape(shape)), req


def create_app(
    model: LoadedModel,
    *,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    batching: bool = False,
    max_batch: int = 16,
    max_wait_ms: float = 5.0,
) -> FastAPI:
    """Build the FastAPI app serving `model` (see the module docstring for the endpoints).

    Args:
        model: the loaded model.
        max_body_mb: largest accepted request body, in MiB.
        batching: gather concurrent infer requests into one ORT call.
        max_batch: clips per gathered batch.
        max_wait_ms: how long the first request of a batch waits for others.
    """
    if max_body_mb <= 0 or max_batch < 1 or max_wait_ms < 0:
        raise ValueError(f"need max_body_mb > 0, max_batch >= 1, max_wait_ms >= 0; got {max_body_mb}, {max_batch}, {max_wait_ms}")
    limit = int(max_body_mb * 1024 * 1024)
    batcher = Batcher(model, max_batch=max_batch, max_wait_ms=max_wait_ms) if batching else None
    prep = PrepConfig()
    pre = {
        "stride": prep.stride, "short_side": prep.short_side, "short_policy": prep.short_policy,
        "clips": prep.clips_per_video_test, **model.preprocess,
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if batcher is not None:
            batcher.start()
        yield
        if batcher is not None:
            await batcher.stop()

    app = FastAPI(title="vidistill", lifespan=lifespan)
    app.state.model = model

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request: {msgs}"}, status_code=400)

    def check_name(name: str) -> None:
        if name != model.name:
            raise RequestError(404, f"model {name!r} not found; this server serves {model.name!r}")

    async def run(x: np.ndarray) -> dict[str, np.ndarray]:
        if batcher is not None:
            return await batcher.submit(x)
        return await asyncio.to_thread(model.run, x)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "vidistill", "version": __version__, "extensions": []}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get("/v2/models/{name}")
    async def metadata(name: str) -> dict[str, Any]:
        check_name(name)
        return model.metadata()

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> dict[str, Any]:
        check_name(name)
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> dict[str, Any]:
        check_name(name)
        x, req = parse_infer(await read_body(request, limit), model)
        outs = await run(x)
        wanted = [o.get("name") for o in req.get("outputs", []) if isinstance(o, dict)] or list(OUTPUT_NAMES)
        unknown = sorted(set(wanted) - set(OUTPUT_NAMES))
        if unknown:
            raise RequestError(400, f"unknown output(s) {unknown}; the model has {list(OUTPUT_NAMES)}")
        resp: dict[str, Any] = {
            "model_name": model.name,
            "model_version": model.version,
            "outputs": [
                {"name": k, "datatype": "FP32", "shape": list(outs[k].shape), "data": outs[k].ravel().tolist()} for k in wanted
            ],
        }
        if "id" in req:
            resp["id"] = req["id"]
        return resp

    @app.post("/v2/models/{name}/classify")
    async def classify(name: str, request: Request, top_k: int = 5, clips: int | None = None) -> dict[str, Any]:
        check_name(name)
        k_max = len(model.classes)
        if not 1 <= top_k:
            raise RequestError(400, f"top_k must be >= 1, got {top_k}")
        n_clips = pre["clips"] if clips is None else clips
        if not 1 <= n_clips <= MAX_CLASSIFY_CLIPS:
            raise RequestError(400, f"clips must be in [1, {MAX_CLASSIFY_CLIPS}], got {n_clips}")
        body = await read_body(request, limit)
        if not body:
            raise RequestError(400, "empty body: send the video file's bytes as the request body")
        clip_arr = await asyncio.to_thread(_decode, body, model, pre, n_clips)  # (N, T, S, S, 3) uint8
        x = np.ascontiguousarray(clip_arr.transpose(0, 4, 1, 2, 3), dtype=np.float32) / 255.0  # (N, 3, T, S, S)
        logits = (await run(x))["logits"]  # (N, K)
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        mean = probs.mean(axis=0)  # multi-clip evaluation: average of clip probabilities
        order = np.argsort(-mean)[: min(top_k, k_max)]
        return {
            "model_name": model.name,
            "model_version": model.version,
            "clips": int(x.shape[0]),
            "top_k": [{"index": int(i), "label": model.classes[i], "score": float(mean[i])} for i in order],
        }

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
            raise RequestError(400, f"the body is not a usable video: {e}") from None
    return out


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    name: str | None = None,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    batching: bool = False,
    max_batch: int = 16,
    max_wait_ms: float = 5.0,
    threads: int | None = None,
    log_level: str = "warning",
) -> None:
    """Load `model` and serve it with uvicorn until interrupted.

    Args:
        model: path to `model.onnx` (or its directory) or `models:/NAME@champion`.
        host: bind address.
        port: TCP port.
        name: name to serve under (default: registered name, or "vidistill").
        max_body_mb: largest accepted request body, in MiB.
        batching: dynamic batching of concurrent infer requests.
        max_batch: clips per gathered batch.
        max_wait_ms: batching window.
        threads: ONNX Runtime intra-op threads (None: ORT default).
        log_level: uvicorn log level.
    """
    import uvicorn

    loaded = load_model(model, name=name, threads=threads)
    app = create_app(loaded, max_body_mb=max_body_mb, batching=batching, max_batch=max_batch, max_wait_ms=max_wait_ms)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
