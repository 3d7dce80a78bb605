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


def bench_overrides(fn: Any, items: list[str]) -> dict[str, Any]:
    """`["seeds=3", "sd_lambdas=0,100"]` -> keyword arguments of benchmark `fn`, typed by its defaults.

    Raises:
        ValueError: for a malformed item, a name `fn` does not take (the message lists them) or a value
            that does not fit the default's type.
    """
    import inspect

    def simple(v: Any) -> bool:
        return isinstance(v, (int, float, str)) or isinstance(v, tuple) and all(isinstance(x, (int, float, str)) for x in v)

    defaults = {n: p.default for n, p in inspect.signature(fn).parameters.items()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and simple(p.default)}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"--set takes name=value, got {item!r}")
        if name not in defaults:
            raise ValueError(f"unknown benchmark setting {name!r}; valid: {', '.join(sorted(defaults))}")
        default = defaults[name]
        try:
            if isinstance(default, tuple):
                kind = type(default[0]) if default else str
                out[name] = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
            elif isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[name] = text.lower() in ("true", "1")
            else:
                out[name] = type(default)(text)
        except ValueError:
            raise ValueError(f"benchmark setting {name}={text!r} must be like its default {default!r}") from None
    return out


def run_bench(what: str, *, quick: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run one benchmark, print a table, return the results (with the machine).

    Args:
        what: prep, flow, serve, methods, train or ort.
        quick: fewer items, for a smoke run.
        overrides: `name=value` settings of the benchmark function (`vidistill bench methods --set seeds=5`).
    """
    from rich.console import Console
    from rich.table import Table

    if what == "prep":
        from vidistill.data.bench import bench_prep as fn

        kwargs: dict[str, Any] = {"videos": 4} if quick else {}
    elif what == "flow":
        from vidistill.flow.bench import bench_flow as fn

        kwargs = {"pairs": 2, "sizes": ("112x112",)} if quick else {}
    elif what == "serve":
        from vidistill.serve.bench import bench_serve as fn

        kwargs = {"requests": 80} if quick else {}
    elif what == "methods":
        from vidistill.evaluate.compare import bench_methods as fn

        kwargs = {"seeds": 1, "videos_per_class": 6, "teacher_epochs": 1, "student_epochs": 1} if quick else {}
    # --- GPU check (issue 19): training throughput per precision, ONNX Runtime per provider ---
    elif what == "train":
        from vidistill.benchmarks.train import bench_train as fn

        kwargs = {"methods": ("none",), "precisions": ("fp32",), "batch_size": 2, "steps": 2, "warmup": 1} if quick else {}
    elif what == "ort":
        from vidistill.benchmarks.ort import bench_ort as fn

        kwargs = {"batches": (1,), "iters": 3, "warmup": 1} if quick else {}
    else:
        raise ValueError(f"unknown benchmark {what!r}; choose prep, flow, serve, methods, train or ort")
    kwargs.update(bench_overrides(fn, overrides or []))
    results = fn(**kwargs)
    rows = results.get("rows") or [results]
    results["machine"] = machine()
    title = f"vidistill bench {what} — {results['machine']['cpu']}, {results['machine']['cores']} cores"
    console = Console()
    if results.get("markdown"):  # mean ± std tables read best as Markdown (and paste into the README)
        print(f"{title}\n\n{results['markdown']}")
    else:
        table = Table(title=title)
        cols = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))))
        for c in cols:
            table.add_column(c)
        for r in rows:
            table.add_row(*[f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "–")) for c in cols])
        console.print(table)
    for key in ("latency", "ratios"):
        if results.get(key):
            console.print(f"{key}: {results[key]}")
    return results
