"""A real `mlflow server` on a free loopback port: the single writer when pipeline tasks run in parallel.

SQLite does not like concurrent writers, so the local pipeline run (whose ParallelFor iterations run
at the same time) starts one server over the project's `mlflow.db` and points every task at it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, *, timeout: float, log: Path) -> None:
    """Poll `url` until it answers 200; fail with the process log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Terminate a process we started (SIGTERM, then SIGKILL after 10 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class MlflowServer:
    """`mlflow server` bound to 127.0.0.1 with a SQLite store and a local artifact root.

    Use as a context manager (`with MlflowServer(db, artifacts) as server: server.uri`) or call
    `wait()` and `close()`.
    """

    def __init__(self, db: str | Path, artifacts: str | Path, *, log: str | Path | None = None,
                 serve_artifacts: bool = True, allowed_hosts: str | None = None) -> None:
        """`serve_artifacts=False` stores artifact locations as plain paths under `artifacts`, so clients
        that open the same SQLite file directly (the CLI without a server) can read and write them too.
        `allowed_hosts`: the server's `--allowed-hosts` (None: MLflow's default, localhost names)."""
        db, artifacts = Path(db).resolve(), Path(artifacts).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = Path(log) if log else db.with_name("mlflow-server.log")
        # percent-encoded locations: a folder may be named "my runs", "100%", "a?b" or "#1"
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server",
               "--backend-store-uri", "sqlite:///" + quote(str(db)), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        if allowed_hosts is not None:
            cmd += ["--allowed-hosts", allowed_hosts]
        if serve_artifacts:
            cmd += ["--artifacts-destination", artifacts.as_uri()]
        else:
            cmd += ["--default-artifact-root", artifacts.as_uri(), "--no-serve-artifacts"]
        # no background job executor (huey consumers): not needed here, and it triples the start time
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=db.parent, env=env)

    def wait(self, timeout: float = 120) -> MlflowServer:
        wait_http(f"{self.uri}/health", self.proc, timeout=timeout, log=self.log)
        return self

    def close(self) -> None:
        stop(self.proc)

    def __enter__(self) -> MlflowServer:
        return self.wait()

    def __exit__(self, *exc: object) -> None:
        self.close()
