"""`vidistill bench ...`: benchmarks whose numbers go into the README, always with the machine named.

The benchmarks live here, outside the stage modules: `prep` (`benchmarks/prep.py`), `methods`
(`benchmarks/methods.py`), `mvd` (`benchmarks/mvd.py`), `jedi` (`benchmarks/jedi.py`), `train` and `ort` (`benchmarks/train.py`,
`benchmarks/ort.py`: the GPU check's), the model zoo's latency (`python -m vidistill.benchmarks.models`);
`flow` and `serve` are still in `vidistill/flow/bench.py` and `vidistill/serve/bench.py`. `run_bench`
dispatches by name through `BENCHMARKS`.
"""

from __future__ import annotations

import importlib
import os
import platform
from collections.abc import Mapping
from typing import Any

# name -> (module, function, keyword arguments of a --quick smoke run)
BENCHMARKS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "prep": ("vidistill.benchmarks.prep", "bench_prep", {"videos": 4}),
    "flow": ("vidistill.flow.bench", "bench_flow", {"pairs": 2, "sizes": ("112x112",)}),
    "serve": ("vidistill.serve.bench", "bench_serve", {"requests": 80}),
    "methods": ("vidistill.benchmarks.methods", "bench_methods",
                {"seeds": 1, "videos_per_class": 6, "student_videos_per_class": 2, "teacher_epochs": 1,
                 "student_epochs": 1}),
    "mvd": ("vidistill.benchmarks.mvd", "bench_mvd",
            {"seeds": 1, "videos_per_class": 6, "labelled_per_class": 2, "teacher_epochs": 1, "mvd_epochs": 1,
             "finetune_epochs": 1}),
    "jedi": ("vidistill.benchmarks.jedi", "bench_jedi",
             {"seeds": 1, "videos_per_class": 4, "expert_epochs": 1, "epochs": 3, "burn_in": 1, "lrs": (1e-3,)}),
    # the GPU check (issue 19): training throughput per precision, ONNX Runtime per provider
    "train": ("vidistill.benchmarks.train", "bench_train",
              {"methods": ("none",), "precisions": ("fp32",), "batch_size": 2, "steps": 2, "warmup": 1}),
    "ort": ("vidistill.benchmarks.ort", "bench_ort", {"batches": (1,), "iters": 3, "warmup": 1}),
    # issue 29: per-convolution ORT profile, float32 vs int8 (where int8 3-D convolution gains and loses)
    "ort-convs": ("vidistill.benchmarks.ort", "conv_profile", {"runs": 3, "batch": 1}),
}


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
    """`["seeds=3", "methods=none,d3d", "sweep.d3d.lambda_=1,0.1"]` -> keyword arguments of benchmark `fn`.

    A plain setting is typed by its default (a tuple default takes a comma-separated list). A
    setting whose default is a mapping takes dotted keys, `name.a.b=v1,v2`, collected into nested
    dicts of value lists (`{"sweep": {"d3d": {"lambda_": ["1", "0.1"]}}}`) that the benchmark types
    and checks itself before any work.

    Raises:
        ValueError: for a malformed item, a name `fn` does not take (the message lists them) or a value
            that does not fit the default's type.
    """
    import inspect

    def simple(v: Any) -> bool:
        return isinstance(v, (int, float, str)) or isinstance(v, tuple) and all(isinstance(x, (int, float, str)) for x in v)

    params = inspect.signature(fn).parameters.items()
    kinds = [p for n, p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    defaults = {p.name: p.default for p in kinds if simple(p.default)}
    nested = {p.name for p in kinds if isinstance(p.default, Mapping)}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"--set takes name=value, got {item!r}")
        head, _, rest = name.partition(".")
        if head in nested:
            keys = rest.split(".") if rest else []
            if not keys or not all(keys):
                raise ValueError(f"benchmark setting {head} takes dotted keys, e.g. {head}.d3d.lambda_=1,0.1; got {item!r}")
            cur = out.setdefault(head, {})
            for k in keys[:-1]:
                cur = cur.setdefault(k, {})
                if not isinstance(cur, dict):
                    raise ValueError(f"benchmark setting {item!r} conflicts with an earlier --set of {head}")
            cur[keys[-1]] = [v.strip() for v in text.split(",") if v.strip()]
            continue
        if name not in defaults:
            raise ValueError(f"unknown benchmark setting {name!r}; valid: {', '.join(sorted([*defaults, *nested]))}")
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

    if what not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {what!r}; choose {', '.join(BENCHMARKS)}")
    module, name, quick_kwargs = BENCHMARKS[what]
    fn = getattr(importlib.import_module(module), name)
    kwargs: dict[str, Any] = dict(quick_kwargs) if quick else {}
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
    for key in ("latency", "ratios", "skipped_methods", "lr", "verdict"):
        if results.get(key):
            console.print(f"{key}: {results[key]}")
    return results
