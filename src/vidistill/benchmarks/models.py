"""CPU latency (torch eager) and size of every preset, relative to a reference preset in the same run.

    python -m vidistill.benchmarks.models [--threads 2] [--batch 1] [--rounds 10] [--iters 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from vidistill.models.registry import create_model, list_models, model_modalities


def machine_name() -> str:
    """CPU model, core count and OS, for naming where a timing was taken."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} torch threads of {len(os.sched_getaffinity(0))} cores, {platform.system()}"


def _timed_calls(model: torch.nn.Module, x: torch.Tensor, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"median_ms": statistics.median(times), "min_ms": times[0], "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))]}


def benchmark_zoo(
    *,
    names: list[str] | None = None,
    reference: str = "r2plus1d_teacher",
    num_classes: int = 10,
    frames: int = 8,
    size: int = 56,
    batch: int = 1,
    threads: int = 2,
    warmup: int = 10,
    rounds: int = 10,
    iters: int = 10,
) -> list[dict]:
    """Params and eager CPU latency of each preset x modality, and its speed-up over `reference` (rgb).

    Timing rounds interleave the models (each round times every model `iters` times), so load from
    other processes hits all of them alike and the ratios stay comparable on a shared machine.

    Args:
        names: presets to measure (default: all registered); the reference is always measured.
        reference: preset whose RGB latency is the baseline of `speedup` (reference / model).
        num_classes: K of the built models.
        frames: T of the clip.
        size: H = W.
        batch: B of the timed input.
        threads: torch intra-op threads during the run (restored afterwards).
        warmup: untimed calls per model first.
        rounds: interleaved timing rounds.
        iters: timed calls per model and round.

    Returns:
        One dict per preset x modality: name, modality, params, median_ms, min_ms, p90_ms and
        speedup (reference median / this median), the reference first.
    """
    names = list_models() if names is None else names
    unknown = [n for n in [reference, *names] if n not in list_models()]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from: {', '.join(list_models())}")
    if rounds < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"rounds and iters must be >= 1 and warmup >= 0, got rounds={rounds}, iters={iters}, warmup={warmup}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = []
        for name in [reference] + [n for n in names if n != reference]:
            for modality in model_modalities(name):
                torch.manual_seed(0)
                model = create_model(name, num_classes=num_classes, frames=frames, size=size, modality=modality).eval()
                runs.append((name, modality, model, model.example_input(batch=batch), []))
        with torch.inference_mode():
            for _, _, model, x, _ in runs:
                _timed_calls(model, x, warmup)
            for _ in range(rounds):
                for _, _, model, x, times in runs:
                    times.extend(_timed_calls(model, x, iters))
        rows = [
            {"name": name, "modality": modality, "params": sum(p.numel() for p in model.parameters()), **_summary(times)}
            for name, modality, model, _, times in runs
        ]
        for row in rows:
            row["speedup"] = rows[0]["median_ms"] / row["median_ms"]
        return rows
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=10, help="timed calls per model and round")
    parser.add_argument("--reference", default="r2plus1d_teacher")
    args = parser.parse_args(argv)
    rows = benchmark_zoo(reference=args.reference, frames=args.frames, size=args.size, batch=args.batch, threads=args.threads, rounds=args.rounds, iters=args.iters)
    torch.set_num_threads(args.threads)
    table = Table(title=f"eager CPU latency, batch {args.batch}, {args.frames}x{args.size}x{args.size}; {machine_name()}")
    for col in ("model", "modality", "params", "median ms", "min ms", "p90 ms", f"speed-up vs {args.reference}"):
        table.add_column(col, justify="left" if col in ("model", "modality") else "right")
    for r in rows:
        table.add_row(r["name"], r["modality"], f"{r['params'] / 1e6:.3f} M", f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['speedup']:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
