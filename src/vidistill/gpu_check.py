"""`make gpu-check`: prove the CUDA code paths and measure TV-L1, training and serving on a GPU, time-boxed.

    python -m vidistill.gpu_check --out outputs/gpu_check [--budget 480]

Parts, each a subprocess of the project's own commands with its own time limit, in the order that
matters most (a slow or failing part never hides the others' results):

1. `tests_flow`: the GPU-marked tests of tests/test_flow.py (`pytest -m gpu`): CUDA TV-L1, eager,
   compiled and as CUDA graphs, against OpenCV on the same pairs (this also fills the compile caches);
2. `flow_320x240`: `vidistill bench flow` on CUDA, eager against compiled, against OpenCV on the CPU
   cores (EPE of both on the same pairs);
3. `tests_gpu`: tests/test_gpu.py: CUDA training steps (fp32, bf16, fp16), ONNX Runtime's CUDA
   provider and the export parity gate against PyTorch, the flow stage on CUDA;
4. `train_8x56`, `train_16x112`: `vidistill bench train`: teacher and student clips/s, fp32/bf16/fp16;
5. `ort`: `vidistill bench ort`: serving latency and clips/s, CUDA provider against CPU provider;
6. `flow_112x112`, `flow_320x240_graphs` (CUDA graphs), `flow_memory` (peak GPU memory per batch size).

It writes `gpu_check.json` (everything), `gpu_check.md` (the tables, and the README's GPU table)
and `gpu_check.log` (every part's output) to `--out`, prints one line per part, and exits 1 if a part
failed, timed out or broke an accuracy gate (0 otherwise). Without a GPU it prints one line and
exits 0. `--profile smoke` runs the same parts at toy sizes on the CPU (what the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]  # src/vidistill/gpu_check.py -> the checkout
BUDGET_S = 480  # the whole check: 8 minutes
EPE_GATE = 1.05  # torch EPE / OpenCV EPE on the same pairs
PAIRS_FLOOR, PAIRS_GOAL = 300, 1000  # TV-L1 pairs/s at 320x240 on one H100/H200-class GPU (issue 19)


@dataclass
class Part:
    """One time-boxed step: a command, its limit, and the JSON it leaves (bench --json or junit)."""

    name: str
    what: str  # "tests" or a `vidistill bench` name
    settings: dict[str, str] = field(default_factory=dict)
    timeout: float = 60.0

    def command(self, python: str, result: Path) -> list[str]:
        if self.what == "tests":
            files = self.settings["files"].split(",")
            return [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=-ra",
                    f"--junitxml={result}", *files]
        sets = [x for k, v in self.settings.items() for x in ("--set", f"{k}={v}")]
        return [python, "-m", "vidistill.cli", "bench", self.what, "--json", str(result), *sets]

    def display(self) -> str:
        """The command as a person would type it (for the summary and the README table)."""
        if self.what == "tests":
            return "pytest -m gpu " + " ".join(self.settings["files"].split(","))
        return f"vidistill bench {self.what} " + " ".join(f"--set {k}={v}" for k, v in self.settings.items())


def plan(profile: str = "full") -> list[Part]:
    """The parts of the check. `smoke` keeps every part and setting name, at toy sizes on the CPU.

    Full-profile sizes: 436 pairs of 320x240 are two default GPU batches (218 pairs, 16 M pixels);
    OpenCV, the CPU reference, solves the first 32 of them over all cores.
    """
    flow_ref = {"backends": "torch-cuda,opencv-mp", "repeats": "2"}
    parts = [
        Part("tests_flow", "tests", {"files": "tests/test_flow.py"}, 90),  # also fills the compile caches
        Part("flow_320x240", "flow", {"sizes": "320x240", "pairs": "436", **flow_ref, "reference_pairs": "32",
                                      "compile_modes": "off,on"}, 90),
        Part("tests_gpu", "tests", {"files": "tests/test_gpu.py"}, 60),
        Part("train_8x56", "train", {"device": "cuda", "batch_size": "64", "frames": "8", "size": "56",
                                     "steps": "20", "warmup": "5"}, 30),
        Part("train_16x112", "train", {"device": "cuda", "batch_size": "16", "frames": "16", "size": "112",
                                       "steps": "6", "warmup": "2"}, 30),
        Part("ort", "ort", {"batches": "1,8,32", "iters": "20", "warmup": "3"}, 45),
        Part("flow_112x112", "flow", {"sizes": "112x112", "pairs": "1400", **flow_ref, "reference_pairs": "64",
                                      "compile_modes": "off,on"}, 40),
        Part("flow_320x240_graphs", "flow", {"sizes": "320x240", "pairs": "436", **flow_ref, "reference_pairs": "16",
                                             "compile_modes": "graphs"}, 45),
        Part("flow_memory", "flow", {"sizes": "320x240", "pairs": "256", "backends": "torch-cuda",
                                     "compile_modes": "off,on", "batch_sizes": "32,128,256"}, 45),
    ]
    if profile == "smoke":
        flow_toy = {"backends": "torch-cpu,opencv-mp", "compile_modes": "off", "repeats": "1"}
        toy = {
            "tests_flow": {"files": "tests/test_gpu.py"},  # test_flow.py's CPU tests are the suite's
            "flow_320x240": {"sizes": "64x48", "pairs": "3", **flow_toy, "reference_pairs": "2"},
            "tests_gpu": {"files": "tests/test_gpu.py"},
            "train_8x56": {"device": "cpu", "batch_size": "2", "frames": "4", "size": "16", "steps": "1", "warmup": "0"},
            "train_16x112": {"device": "cpu", "batch_size": "2", "frames": "4", "size": "16", "steps": "1", "warmup": "0"},
            "ort": {"batches": "1", "iters": "2", "warmup": "0"},
            "flow_112x112": {"sizes": "48x40", "pairs": "2", **flow_toy, "reference_pairs": "1"},
            "flow_320x240_graphs": {"sizes": "48x40", "pairs": "2", **flow_toy, "reference_pairs": "1"},
            "flow_memory": {"sizes": "48x40", "pairs": "2", "backends": "torch-cpu", "compile_modes": "off", "batch_sizes": "1"},
        }
        for part in parts:
            part.settings.update(toy[part.name])
            part.timeout = 300  # a shared CPU machine: the limits are the GPU's, not this one's
            if part.what in ("train", "ort"):
                part.settings.update({"methods": "none", "precisions": "fp32,bf16"} if part.what == "train" else
                                     {"runtimes": "ort-cpu,ort-cuda,torch-cpu"})
    elif profile != "full":
        raise ValueError(f"gpu_check: profile must be 'full' or 'smoke', got {profile!r}")
    return parts


# ----------------------------------------------------------------------------------------------
# the machine


def _run_quiet(cmd: list[str], timeout: float = 20) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def nvidia_gpus() -> str:
    """`nvidia-smi -L` output, or "" where there is no NVIDIA GPU (or no driver)."""
    return _run_quiet(["nvidia-smi", "-L"]) if shutil.which("nvidia-smi") else ""


def environment(python: str) -> dict[str, Any]:
    """What the numbers were measured on and with, read by `python` (the interpreter of the parts)."""
    probe = r"""
import json, os, platform
out = {"python": platform.python_version(), "cores": os.cpu_count()}
try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))))
except Exception as e:
    out["torch_error"] = repr(e)
for name in ("triton", "onnxruntime", "cv2", "numpy", "onnx"):
    try:
        mod = __import__(name)
        out[name] = getattr(mod, "__version__", "?")
    except Exception as e:
        out[name] = None
try:
    import onnxruntime
    out["onnxruntime_providers"] = onnxruntime.get_available_providers()
except Exception:
    pass
try:
    import cv2
    out["cv2_optflow"] = hasattr(cv2, "optflow")
except Exception:
    pass
for line in open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else []:
    if line.startswith("model name"):
        out["cpu"] = line.split(":", 1)[1].strip()
        break
print(json.dumps(out))
"""
    text = _run_quiet([python, "-c", probe], timeout=60)
    try:
        env = json.loads(text.splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        env = {"error": f"could not read the environment with {python}"}
    env["nvidia_smi"] = nvidia_gpus()
    env["driver"] = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if env["nvidia_smi"] else ""
    env["platform"] = platform.platform()
    return env


# ----------------------------------------------------------------------------------------------
# running the parts


def _junit(path: Path) -> dict[str, Any]:
    """Per-test outcomes of a pytest junit XML: {"passed", "failed", "skipped", "tests": [{name, outcome, message}]}."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed", "error": "failed", "skipped": "skipped"}[kind]
                text = (node.get("message") or node.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        tests.append({"name": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}", "outcome": outcome, "message": message})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    return {**counts, "tests": tests}


def run_part(part: Part, *, python: str, tmp: Path, log: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run one part with its time limit; its outcome, result and the tail of its output (never raises)."""
    result_path = tmp / f"{part.name}.{'xml' if part.what == 'tests' else 'json'}"
    cmd = part.command(python, result_path)
    start = time.perf_counter()
    status, rc, output = "ok", 0, ""
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = "timeout"
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    except OSError as e:
        status, output = "error", f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - start
    with log.open("a") as fh:
        fh.write(f"\n===== {part.name} ({status}, rc {rc}, {seconds:.1f} s): {' '.join(cmd)}\n{output}\n")
    out: dict[str, Any] = {"status": status, "seconds": round(seconds, 1), "timeout_s": round(timeout),
                           "command": part.display()}
    if result_path.exists():
        try:
            out["result"] = _junit(result_path) if part.what == "tests" else json.loads(result_path.read_text())
        except (ET.ParseError, json.JSONDecodeError) as e:
            out["status"], out["error"] = "error", f"unreadable result {result_path.name}: {e}"
    if status == "ok" and rc != 0:
        failed_tests = part.what == "tests" and rc == 1 and "result" in out
        out["status"] = "failed" if failed_tests else "error"
        out.setdefault("error", f"exit code {rc}")
    if status == "ok" and "result" not in out:
        out["status"], out["error"] = "error", out.get("error", "no result written")
    if out["status"] != "ok" or rc != 0:
        out["output_tail"] = output[-2000:]
    return out


def _failures(name: str, part: dict[str, Any]) -> list[str]:
    """What in a part's outcome fails the check: its status, failed tests, benchmark errors, accuracy gates."""
    bad = [] if part["status"] == "ok" else [f"{name}: {part['status']}: {part.get('error', '')}".rstrip(": ")]
    result = part.get("result") or {}
    bad += [f"{name}: test {t['name']} failed: {t['message']}" for t in result.get("tests", []) if t["outcome"] == "failed"]
    bad += [f"{name}: {e}" for e in result.get("errors", [])]
    for row in result.get("rows", []):
        if str(row.get("backend", "")).startswith("torch") and row.get("epe_ratio", 0) > EPE_GATE:
            bad.append(f"{name}: {row['backend']} compile={row.get('compile')} EPE {row['epe_ref']} is "
                       f"{row['epe_ratio']}x OpenCV's (gate {EPE_GATE}x)")
    return bad


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The few numbers the README table quotes, and the recommended `flow.tvl1_compile`."""
    parts = summary.get("parts", {})
    head: dict[str, Any] = {}
    flow = [r for name in ("flow_320x240", "flow_320x240_graphs") for r in ((parts.get(name) or {}).get("result") or {}).get("rows", [])]
    cuda = [r for r in flow if r.get("backend") == "torch-cuda" and "pairs_per_s" in r]
    accurate = [r for r in cuda if r.get("epe_ratio", 0) <= EPE_GATE]
    if cuda:
        best = max(accurate or cuda, key=lambda r: r["pairs_per_s"])
        eager = next((r for r in cuda if r.get("compile") == "off"), None)
        head["tvl1_320x240"] = {"best_compile": best.get("compile"), "pairs_per_s": best["pairs_per_s"],
                                "eager_pairs_per_s": eager and eager["pairs_per_s"],
                                "floor_met": best["pairs_per_s"] >= PAIRS_FLOOR, "goal_met": best["pairs_per_s"] >= PAIRS_GOAL}
        head["recommended_tvl1_compile"] = best.get("compile") if accurate else "off"
    return head


def run_check(out: Path, *, profile: str = "full", budget: float = BUDGET_S, python: str | None = None,
              timeouts: dict[str, float] | None = None, only: list[str] | None = None,
              parts: list[Part] | None = None, probe: bool = True) -> dict[str, Any]:
    """Run the parts of `plan(profile)` within `budget` seconds; write the summary files to `out`.

    Args:
        out: output folder (created): gpu_check.json, gpu_check.md, gpu_check.log.
        profile: "full" (the GPU check) or "smoke" (toy sizes on the CPU).
        budget: seconds for all parts; a part gets its own limit or what is left, whichever is less,
            and is skipped when less than 5 s are left.
        python: interpreter of the parts (default this one).
        timeouts: per-part limits replacing the plan's, in seconds.
        only: run only these parts (names from `plan`).
        parts: the parts to run instead of `plan(profile)` (tests).
        probe: read the machine's environment first (`environment`).

    Returns:
        The summary written to gpu_check.json: {"profile", "environment", "budget_s", "seconds",
        "parts": {name: {status, seconds, command, result, ...}}, "failures": [...], "headline": {...}}.
    """
    python = python or sys.executable
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text(f"vidistill gpu-check, profile {profile}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    summary: dict[str, Any] = {"profile": profile, "environment": environment(python) if probe else {},
                               "budget_s": budget, "parts": {}}
    start = time.perf_counter()  # the budget is the parts'
    if summary["environment"].get("cv2_optflow") is False:
        print("gpu-check: warning: this OpenCV has no optflow module (DualTVL1, the reference): install "
              "opencv-contrib-python-headless, or carry .whl from `make gpu-check-wheels`", flush=True)
    parts = [p for p in (parts if parts is not None else plan(profile)) if not only or p.name in only]
    with tempfile.TemporaryDirectory(prefix="vidistill-gpu-check-") as tmp:
        for part in parts:
            left = budget - (time.perf_counter() - start)
            limit = min((timeouts or {}).get(part.name, part.timeout), left)
            if limit < 5:
                summary["parts"][part.name] = {"status": "skipped", "error": f"no time left in the {budget:.0f} s budget"}
            else:
                summary["parts"][part.name] = run_part(part, python=python, tmp=Path(tmp), log=log, timeout=limit, env=env)
            p = summary["parts"][part.name]
            print(f"gpu-check {part.name}: {p['status']}" + (f" ({p['seconds']} s)" if "seconds" in p else "")
                  + (f": {p['error']}" if p.get("error") else ""), flush=True)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["failures"] = [f for name, p in summary["parts"].items() for f in _failures(name, p)]
    summary["headline"] = headline(summary)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    from vidistill.gpu_report import render_markdown

    (out / "gpu_check.md").write_text(render_markdown(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidistill.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/gpu_check", help="folder for gpu_check.json/.md/.log")
    parser.add_argument("--profile", choices=["full", "smoke"], default="full")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 480; smoke 1800)")
    parser.add_argument("--timeout", action="append", default=[], metavar="PART=SECONDS", help="a part's own limit")
    parser.add_argument("--only", action="append", default=[], metavar="PART", help="run only this part (repeatable)")
    args = parser.parse_args(argv)
    names = [p.name for p in plan(args.profile)]
    timeouts: dict[str, float] = {}
    for item in args.timeout:
        name, _, value = item.partition("=")
        try:
            timeouts[name] = float(value)
        except ValueError:
            parser.error(f"--timeout takes PART=SECONDS, got {item!r}")
    for name in [*timeouts, *args.only]:
        if name not in names:
            parser.error(f"unknown part {name!r}; parts: {', '.join(names)}")
    if args.profile == "full":
        import torch

        if not torch.cuda.is_available():
            gpus = nvidia_gpus()
            if not gpus:
                print("gpu-check: no NVIDIA GPU on this machine (nvidia-smi -L finds none): nothing to check")
                return 0
            print(f"gpu-check: torch {torch.__version__} cannot use the GPU ({gpus.splitlines()[0]}): install a CUDA "
                  "build of torch (`make setup` on a GPU machine does) and rerun", file=sys.stderr)
            return 2
    budget = args.budget or (BUDGET_S if args.profile == "full" else 1800)
    summary = run_check(Path(args.out), profile=args.profile, budget=budget, timeouts=timeouts, only=args.only or None)
    head = summary["headline"].get("tvl1_320x240")
    tail = f"; TV-L1 320x240: {head['pairs_per_s']} pairs/s (compile={head['best_compile']})" if head else ""
    verdict = f"{len(summary['failures'])} failure(s)" if summary["failures"] else "all parts passed"
    print(f"gpu-check: {verdict} in {summary['seconds']} s{tail}; summary in {Path(args.out) / 'gpu_check.md'}")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
