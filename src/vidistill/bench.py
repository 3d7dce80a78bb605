"""`vidistill bench ...`: benchmarks whose numbers go into the README, always with the machine named."""

from __future__ import annotations

import os
import platform
from typing import Any


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_bench(what: str, *, quick: bool = False) -> dict[str, Any]:
    """Run one benchmark, print a table, return the results (with the machine)."""
    from rich.console import Console
    from rich.table import Table

    if what == "prep":
        from vidistill.data.bench import bench_prep as fn

        kwargs: dict[str, Any] = {"videos": 4} if quick else {}
    elif what == "flow":
        from vidistill.flow.bench import bench_flow as fn

        kwargs = {"pairs": 2, "sizes": ((112, 112),)} if quick else {}
    elif what == "serve":
        from vidistill.serve.bench import bench_serve as fn

        kwargs = {"requests": 80} if quick else {}
    elif what == "methods":
        from vidistill.evaluate.compare import bench_methods as fn

        kwargs = {"seeds": 1, "videos_per_class": 6, "teacher_epochs": 1, "student_epochs": 1} if quick else {}
    else:
        raise ValueError(f"unknown benchmark {what!r}; choose prep, flow, serve or methods")
    results = fn(**kwargs)
    rows = results.get("rows") or [results]
    results["machine"] = machine()
    table = Table(title=f"vidistill bench {what} — {results['machine']['cpu']}, {results['machine']['cores']} cores")
    cols = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols])
    console = Console()
    console.print(table)
    for key in ("latency", "ratios"):
        if results.get(key):
            console.print(f"{key}: {results[key]}")
    return results
