"""A stand-in for the Kubeflow Pipelines API server (v2beta1 REST), for the `--host` tests.

No Kubeflow cluster can run here, so this small HTTP server answers the endpoints that kfp's own
`kfp.Client` calls to submit and follow one run, and records every request (method, path, headers,
JSON body) for the tests to inspect:

- `GET  /apis/v2beta1/healthz`                 (the client asks whether the server is multi-user)
- `GET  /apis/v2beta1/experiments?filter=...`  (find the experiment by name)
- `POST /apis/v2beta1/experiments`             (create it when missing)
- `POST /apis/v2beta1/runs`                    (the run: compiled pipeline spec + runtime parameters)
- `GET  /apis/v2beta1/runs/{id}`               (its state: `states` in order, the last one repeated)
- `POST /apis/v2beta1/recurringruns`          (a schedule)

`backend` plays the field's other answers: "login" (Kubeflow behind Dex: every request is redirected to
the login page), "kfp-1.8" (no v2 API: 404 there, a v1beta1 healthz), or a version tag for healthz.
It binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class KfpApiStandIn:
    """Context manager: `with KfpApiStandIn(states=["RUNNING", "SUCCEEDED"]) as api: api.url ...`."""

    def __init__(self, states: list[str] | None = None, backend: str = "2.16.1") -> None:
        self.states = list(states or ["PENDING", "RUNNING", "SUCCEEDED"])
        self.backend = backend
        self.requests: list[dict[str, Any]] = []
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring: list[dict[str, Any]] = []
        self._polls: dict[str, int] = {}
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> dict[str, Any]:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                entry = {"method": self.command, "path": urlparse(self.path).path,
                         "query": parse_qs(urlparse(self.path).query), "headers": dict(self.headers.items()),
                         "body": json.loads(raw) if raw else None}
                stand_in.requests.append(entry)
                return entry

            def _login(self) -> None:
                self.send_response(302)
                self.send_header("Location", "/dex/auth?client_id=kubeflow-oidc-authservice")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                req = self._record()
                path = req["path"]
                if stand_in.backend == "login":
                    return self._login()
                if stand_in.backend == "kfp-1.8":
                    if path == "/apis/v1beta1/healthz":
                        return self._send(200, {"commit_sha": "abc", "tag_name": "1.8.5", "multi_user": False})
                    return self._send(404, {"error": "Not Found", "code": 5})
                if path == "/apis/v2beta1/healthz":
                    return self._send(200, {"commit_sha": "abc", "tag_name": stand_in.backend, "multi_user": False})
                if path == "/apis/v2beta1/experiments":
                    wanted = None
                    if req["query"].get("filter"):
                        predicates = json.loads(req["query"]["filter"][0]).get("predicates", [])
                        wanted = next((p.get("stringValue") or p.get("string_value") for p in predicates), None)
                    found = [e for e in stand_in.experiments.values() if wanted in (None, e["display_name"])]
                    return self._send(200, {"experiments": found, "total_size": len(found)})
                if path.startswith("/apis/v2beta1/runs/"):
                    run_id = path.rsplit("/", 1)[-1]
                    if run_id not in stand_in.runs:
                        return self._send(404, {"error": f"run {run_id} not found", "code": 5})
                    n = stand_in._polls.get(run_id, 0)
                    stand_in._polls[run_id] = n + 1
                    state = stand_in.states[min(n, len(stand_in.states) - 1)]
                    return self._send(200, {**stand_in.runs[run_id], "state": state})
                return self._send(404, {"error": f"no such endpoint {path}", "code": 5})

            def do_POST(self) -> None:  # noqa: N802
                req = self._record()
                if stand_in.backend == "login":
                    return self._login()
                if req["path"] == "/apis/v2beta1/recurringruns":
                    job = {**req["body"], "recurring_run_id": str(uuid.uuid4())}
                    stand_in.recurring.append(job)
                    return self._send(200, job)
                if req["path"] == "/apis/v2beta1/experiments":
                    exp = {"experiment_id": str(uuid.uuid4()), "display_name": req["body"]["display_name"]}
                    stand_in.experiments[exp["experiment_id"]] = exp
                    return self._send(200, exp)
                if req["path"] == "/apis/v2beta1/runs":
                    run = {**req["body"], "run_id": str(uuid.uuid4()), "state": "PENDING"}
                    stand_in.runs[run["run_id"]] = run
                    return self._send(200, run)
                return self._send(404, {"error": f"no such endpoint {req['path']}", "code": 5})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "KfpApiStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def created_runs(self) -> list[dict[str, Any]]:
        """The bodies of every `POST /runs`."""
        return [r["body"] for r in self.requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/runs"]
