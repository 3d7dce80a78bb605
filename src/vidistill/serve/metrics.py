"""Prometheus metrics of the server (`GET /metrics` on the REST port), with `prometheus_client`.

Each server has its own `CollectorRegistry`, so several apps in one process (tests) do not mix.

    vidistill_requests_total{protocol, endpoint, code}        requests answered, by status
    vidistill_request_duration_seconds{protocol, endpoint}    latency histogram (receipt to answer)
    vidistill_batch_size                                      clips per ONNX Runtime call
    vidistill_inference_duration_seconds                      time in ONNX Runtime per call
    vidistill_model_load_seconds                              model download + session creation
    vidistill_model_info{model, version, source}              1 for the served model

`protocol` is `rest` or `grpc`; `endpoint` the route template (`/v2/models/{name}/infer`) or the gRPC
method (`ModelInfer`); `code` the HTTP status or the gRPC status name.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class ServerMetrics:
    """The server's collectors, registered in their own `registry`."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    batch_size: Histogram
    inference: Histogram
    load_seconds: Gauge
    model_info: Gauge

    @classmethod
    def create(cls) -> ServerMetrics:
        reg = CollectorRegistry()
        return cls(
            registry=reg,
            requests=Counter("vidistill_requests", "Requests answered, by protocol, endpoint and status code",
                             ["protocol", "endpoint", "code"], registry=reg),
            latency=Histogram("vidistill_request_duration_seconds", "Request latency from receipt to answer",
                              ["protocol", "endpoint"], buckets=LATENCY_BUCKETS, registry=reg),
            batch_size=Histogram("vidistill_batch_size", "Clips per ONNX Runtime call (with dynamic batching: gathered requests)",
                                 buckets=BATCH_BUCKETS, registry=reg),
            inference=Histogram("vidistill_inference_duration_seconds", "Time in ONNX Runtime per call",
                                buckets=LATENCY_BUCKETS, registry=reg),
            load_seconds=Gauge("vidistill_model_load_seconds", "Time to load the model (download and ONNX Runtime session)", registry=reg),
            model_info=Gauge("vidistill_model_info", "The served model", ["model", "version", "source"], registry=reg),
        )

    def observe(self, protocol: str, endpoint: str, code: str | int, seconds: float) -> None:
        """Count one answered request and its latency."""
        self.requests.labels(protocol, endpoint, str(code)).inc()
        self.latency.labels(protocol, endpoint).observe(seconds)

    def exposition(self) -> bytes:
        """The text exposition format (`text/plain; version=0.0.4`)."""
        return generate_latest(self.registry)
