"""Helpers for the tests of runs in real use (interrupted, resumed, refused, concurrent): a tiny project
folder with a params.yaml, the `vidistill` command as a real process, and waiting on its files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# 8 synthetic classes x 3 videos -> 16 training and 8 test clips of 4x16x16: an epoch of the student
# takes a fraction of a second on one CPU thread
TINY = {
    "prep": {"dataset": "synthetic", "root": "data/raw/synthetic", "out": "data/clips", "frames": 4, "stride": 2,
             "short_side": 16, "crop": 16, "workers": 1,
             "synth": {"out": "data/raw/synthetic", "videos_per_class": 3, "frames": 10, "width": 32, "height": 24}},
    "teach": {"model": "r2plus1d_student", "train": {"epochs": 2, "batch_size": 4, "warmup_epochs": 0}},
    "distill": {"student": "r2plus1d_student", "train": {"epochs": 2, "batch_size": 4, "warmup_epochs": 0}},
    "evaluate": {"batch_size": 8},
}


def write_params(folder: Path, params: dict[str, Any] | None = None) -> Path:
    """`folder/params.yaml` with the tiny settings (deep-merged with `params`)."""

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(merge(TINY, params or {}), sort_keys=False))
    return path


def env(**extra: str) -> dict[str, str]:
    """The environment of a `vidistill` process: one torch thread (a shared, loaded CI machine runs the
    tiny models far faster so), the project's default tracking store unless `extra` says otherwise."""
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    out.pop("MLFLOW_TRACKING_URI", None)
    out.pop("VIDISTILL_DEBUG", None)
    out.update(extra)
    return out


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vidistill.cli", *args]


def start(cwd: Path, *args: str, log: Path | None = None, **popen: Any) -> subprocess.Popen:
    """`vidistill ARGS` as a background process in `cwd` (stdout and stderr to `log`)."""
    log = log or cwd / f"vidistill-{time.monotonic_ns()}.log"
    fh = log.open("wb")
    proc = subprocess.Popen(command(*args), cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=popen.pop("env", env()),
                            **popen)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def run(cwd: Path, *args: str, timeout: float = 600, **popen: Any) -> subprocess.CompletedProcess:
    """`vidistill ARGS` to completion in `cwd`, output captured."""
    return subprocess.run(command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=popen.pop("env", env()), **popen)


def wait_for(predicate: Callable[[], bool], *, timeout: float = 300, proc: subprocess.Popen | None = None,
             what: str = "") -> None:
    """Poll `predicate` every 50 ms; fail (with the process log) on timeout or when `proc` ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n{Path(proc.log).read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def epochs_logged(out: Path) -> int:
    """Epochs in `out/history.json` (written after each epoch's checkpoint)."""
    try:
        return len(json.loads((out / "history.json").read_text()))
    except (OSError, ValueError):
        return 0


def one_line_error(stderr: str) -> str:
    """The single error line of a refused command (asserting there is no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]
