"""`python -m vidistill.serve --model models:/NAME@champion` (or a path to model.onnx)."""

from __future__ import annotations

import argparse

from vidistill.serve.app import DEFAULT_MAX_BODY_MB, serve


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve the model until interrupted."""
    p = argparse.ArgumentParser(prog="python -m vidistill.serve", description="KServe v2 ONNX Runtime server for vidistill students")
    p.add_argument("--model", required=True, help="models:/NAME@champion, models:/NAME/VERSION, or a path to model.onnx")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--name", default=None, help="name in /v2/models/{name} (default: registered name or 'vidistill')")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, help="largest request body in MiB")
    p.add_argument("--batching", action="store_true", help="dynamic batching of concurrent infer requests")
    p.add_argument("--max-batch", type=int, default=16, help="clips per gathered batch (with --batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batching window in ms (with --batching)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    serve(
        a.model, host=a.host, port=a.port, name=a.name, max_body_mb=a.max_body_mb, batching=a.batching,
        max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, threads=a.threads, log_level=a.log_level,
    )


if __name__ == "__main__":
    main()
