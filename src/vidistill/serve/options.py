"""The serving command line, shared by `vidistill serve` and `python -m vidistill.serve`.

Kept free of heavy imports so that building the `vidistill` parser stays fast.
"""

from __future__ import annotations

import argparse
import sys

from vidistill.serve.defaults import DEFAULT_GRPC_PORT, DEFAULT_MAX_BODY_MB


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The serving options, shared by `vidistill serve` and `python -m vidistill.serve`."""
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest, or a path to model.onnx")
    p.add_argument("--host", default="127.0.0.1", help="bind address of REST and gRPC (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="REST port (default 8080)")
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT,
                   help=f"gRPC port of inference.GRPCInferenceService (default {DEFAULT_GRPC_PORT})")
    p.add_argument("--no-grpc", action="store_true", help="serve REST only")
    p.add_argument("--name", default=None, help="name in /v2/models/{name} (default: registered name or 'vidistill')")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, help="largest request body / gRPC message in MiB")
    p.add_argument("--batching", action="store_true", help="dynamic batching of concurrent infer requests (REST and gRPC)")
    p.add_argument("--max-batch", type=int, default=16, help="clips per gathered batch (with --batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batching window in ms (with --batching)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads (default: the container's CPU quota, else ORT's default)")
    p.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                   help="with --model models:/NAME@ALIAS: look the alias up every SECONDS and serve the version it "
                        "names once it moves (a promotion or rollback reaches the server without a restart)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (default: warning)")


def serve_from_args(a: argparse.Namespace) -> None:
    """Call `serve` with parsed `add_serve_arguments` options."""
    from vidistill.serve.app import serve

    serve(
        a.model, host=a.host, port=a.port, grpc_port=None if a.no_grpc else a.grpc_port, name=a.name,
        max_body_mb=a.max_body_mb, batching=a.batching, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms,
        threads=a.threads, log_level=a.log_level, watch_s=a.watch,
    )


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve until interrupted; a user error is one line on stderr (exit 2)."""
    p = argparse.ArgumentParser(prog="python -m vidistill.serve", description="KServe v2 ONNX Runtime server for vidistill students")
    add_serve_arguments(p)
    a = p.parse_args(argv)
    try:
        serve_from_args(a)
    except Exception as e:  # noqa: BLE001 - a user's error is one line; a bug keeps its traceback
        from vidistill.registry.tracking import tracking_error_message

        message = tracking_error_message(e) or (str(e) if isinstance(e, (ValueError, FileNotFoundError, OSError)) else None)
        if message is None:
            raise
        print(f"vidistill serve: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
