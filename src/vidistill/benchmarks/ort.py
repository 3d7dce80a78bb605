"""`vidistill bench ort`: serving latency and throughput of an exported student per runtime and precision.

The student is exported with the project's exporter (`export_onnx`: dynamo, dynamic batch, its
parity gate) and each runtime answers the same clips through `vidistill.export.onnx.latency`, the
function `vidistill bench serve` uses: host numpy in, host numpy out, so the CUDA rows include the
copies a server pays. PyTorch eager rows on CPU and CUDA give the reference, and every row's outputs
are compared with PyTorch's on CPU in float32 (the export's parity reference).

Issue 29 adds `ort-cpu-int8` (the same export quantized by `vidistill.export.quantize`: static QDQ,
per-channel int8 weights, calibrated on the benchmark's clips) and `openvino-cpu` (OpenVINO reading the
same ONNX file, `INFERENCE_PRECISION_HINT` f32 so it computes what the parity gate checked; its
default on CPUs with bf16 units is bf16), each at every `threads` setting, with the model file's size:

    vidistill bench ort --set runtimes=ort-cpu,ort-cpu-int8,openvino-cpu --set threads=1,0 --set batches=1,8
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

RUNTIMES = ("ort-cpu", "ort-cuda", "ort-cuda-tf32", "torch-cpu", "torch-cuda", "ort-cpu-int8", "openvino-cpu")
DEFAULT_RUNTIMES = RUNTIMES[:5]  # the GPU check's set; int8 and OpenVINO rows are asked for by name


def _all_threads() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _openvino(path: Any, batch: int, threads: int) -> Any:
    """OpenVINO's CPU plugin compiled for (batch, 3, T, H, W), f32 precision, `threads` inference threads."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    shape = list(model.input(0).get_partial_shape())
    model.reshape({model.input(0).get_any_name(): [batch, *[int(d.get_length()) for d in shape[1:]]]})
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    return core.compile_model(model, "CPU", config)


def _timed(call: Any, batch: int, warmup: int, iters: int) -> dict[str, float]:
    """`vidistill.export.onnx.latency`'s numbers for any zero-argument call."""
    import statistics
    import time

    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000.0)
    p50 = statistics.median(times)
    return {"p50_ms": p50, "p90_ms": float(np.percentile(times, 90)), "per_clip_ms": p50 / batch}


def _unavailable(runtime: str) -> str | None:
    """Why `runtime` cannot run here, or None."""
    if runtime == "openvino-cpu":
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "openvino is not installed (pip install openvino)"
    if runtime.startswith("torch-cuda") and not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    if runtime.startswith("ort-cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
                    f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
    return None


def bench_ort(
    *,
    runtimes: Sequence[str] = DEFAULT_RUNTIMES,
    batches: Sequence[int] = (1, 8, 32),
    threads: Sequence[int] = (0,),
    model: str = "r2plus1d_student",
    frames: int = 8,
    size: int = 56,
    num_classes: int = 10,
    iters: int = 30,
    warmup: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Latency (p50/p90) and clips/s of each runtime at each batch size, on the same exported model.

    Args:
        runtimes: any of "ort-cpu", "ort-cuda" (CUDA provider in float32: the project's sessions),
            "ort-cuda-tf32" (the CUDA provider with ONNX Runtime's own default, TF32 convolutions),
            "torch-cpu", "torch-cuda" (eager PyTorch), "ort-cpu-int8" (the export quantized to int8,
            calibrated on 16 of the benchmark's random clips), "openvino-cpu" (OpenVINO, f32). Runtimes
            this machine lacks are reported as skipped with the reason.
        batches: clips per call.
        threads: intra-op threads of the CPU runtimes, one row each; 0 = the runtime's default
            (ONNX Runtime and OpenVINO: one per core; PyTorch: its own). CUDA rows ignore it.
        model: the preset exported (`create_model`, seeded); frames (T), size (H = W), num_classes (K).
        iters: timed calls per row; warmup: untimed calls first.
        seed: model initialisation and clips.

    Returns:
        {"rows": [...], "onnx_providers": what ONNX Runtime offers, "errors": [...], "skipped": [...]};
        a row per (runtime, threads, batch): "runtime", "threads" (0: the runtime's default), "batch", "p50_ms", "p90_ms", "per_clip_ms",
        "clips_per_s" (batch / p50), "max_abs_diff" (largest |output - PyTorch CPU float32| over logits
        and features), "top1_agreement", "speedup_vs_ort_cpu" (p50 of ort-cpu / this p50, same batch and
        threads), "model_bytes" (the file the row runs: float32 or int8 ONNX),
        and "providers" (the session's, for ONNX Runtime rows: a CUDA row that silently fell back to
        CPU is an error). A skipped runtime's rows carry "skipped", a failed one's "error".

    Raises:
        ValueError: an unknown runtime or preset, or bad counts (before any work).
    """
    import onnxruntime as ort

    from vidistill.export.onnx import OUTPUT_NAMES, export_onnx, latency
    from vidistill.export.runtime import INPUT_NAME, make_session
    from vidistill.models import create_model

    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        raise ValueError(f"bench_ort: runtimes must be some of {', '.join(RUNTIMES)}, got {tuple(runtimes)}")
    if not batches or min(batches) < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"bench_ort: need batches >= 1, iters >= 1, warmup >= 0; got batches={tuple(batches)}, "
                         f"iters={iters}, warmup={warmup}")
    if not threads or min(threads) < 0:
        raise ValueError(f"bench_ort: threads must be counts >= 0 (0: the runtime's default), got {tuple(threads)}")
    torch.manual_seed(seed)
    net = create_model(model, num_classes=num_classes, frames=frames, size=size).eval()
    rng = np.random.default_rng(seed)
    clips = {b: rng.random((b, 3, frames, size, size), dtype=np.float32) for b in batches}  # (B, 3, T, H, W)
    with torch.no_grad():
        reference = {b: [t.numpy() for t in net(torch.from_numpy(x))] for b, x in clips.items()}
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    skipped: list[str] = []
    torch_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="vidistill-bench-ort-") as tmp:
        path = export_onnx(net, tmp)
        int8_path = None
        for runtime in runtimes:
            reason = _unavailable(runtime)
            if reason:
                skipped.append(f"{runtime}: {reason}")
                rows += [{"runtime": runtime, "batch": b, "skipped": reason} for b in batches]
                continue
            for n_threads in (threads if "cuda" not in runtime else (0,)):
                base = {"runtime": runtime, "threads": n_threads}
                try:
                    file = path
                    if runtime == "ort-cpu-int8" and int8_path is None:
                        from vidistill.export.quantize import quantize_onnx

                        calib = rng.random((16, 3, frames, size, size), dtype=np.float32)
                        int8_path = quantize_onnx(path, f"{tmp}/int8/model.onnx", [calib[:8], calib[8:]])
                    if runtime == "ort-cpu-int8":
                        file = int8_path
                    providers = None
                    if runtime.startswith("ort"):
                        target: Any = make_session(file, providers=["cuda" if "cuda" in runtime else "cpu"], tf32=runtime.endswith("tf32"),
                                                   threads=n_threads or None)
                        providers = target.get_providers()
                        if "cuda" in runtime and providers[0] != "CUDAExecutionProvider":
                            raise RuntimeError(f"the session fell back to {providers} (CUDA libraries not found?)")

                        def run(x: np.ndarray, s: Any = target) -> list[np.ndarray]:
                            return s.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
                    elif runtime == "openvino-cpu":
                        compiled = {b: _openvino(file, b, n_threads) for b in batches}
                        target = None

                        def run(x: np.ndarray, c: Any = compiled) -> list[np.ndarray]:
                            out = c[x.shape[0]](x)
                            return [np.asarray(out[c[x.shape[0]].output(i)]) for i in range(len(OUTPUT_NAMES))]
                    else:
                        file = None
                        torch.set_num_threads(n_threads or torch_threads)
                        target = create_model(model, num_classes=num_classes, frames=frames, size=size).eval()
                        target.load_state_dict(net.state_dict())
                        target.to("cuda" if runtime == "torch-cuda" else "cpu")

                        def run(x: np.ndarray, m: Any = target) -> list[np.ndarray]:
                            with torch.inference_mode():
                                dev = next(m.parameters()).device
                                return [t.cpu().numpy() for t in m(torch.from_numpy(x).to(dev))]
                except Exception as e:  # noqa: BLE001 - one failing runtime must not hide the others
                    msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    errors.append(f"{runtime}: {msg}")
                    rows += [{**base, "batch": b, "error": msg} for b in batches]
                    continue
                for b, x in clips.items():
                    row: dict[str, Any] = {**base, "batch": b}
                    try:
                        got = run(x)
                        diff = max(float(np.max(np.abs(r.astype(np.float64) - g))) for r, g in zip(reference[b], got, strict=True))
                        if runtime == "openvino-cpu":
                            lat = _timed(lambda x=x: run(x), b, warmup, iters)
                        else:
                            lat = latency(target, x, warmup=warmup, iters=iters)
                        row.update({"p50_ms": round(lat["p50_ms"], 3), "p90_ms": round(lat["p90_ms"], 3),
                                    "per_clip_ms": round(lat["per_clip_ms"], 4), "clips_per_s": round(1000 * b / lat["p50_ms"], 1),
                                    "max_abs_diff": float(f"{diff:.3g}"),
                                    "top1_agreement": float(np.mean(got[0].argmax(1) == reference[b][0].argmax(1)))})
                        if file is not None:
                            row["model_bytes"] = Path(file).stat().st_size
                        if providers is not None:
                            row["providers"] = ",".join(p.removesuffix("ExecutionProvider") for p in providers)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                        errors.append(f"{runtime} batch {b}: {row['error']}")
                    rows.append(row)
                torch.set_num_threads(torch_threads)
    base_ms = {(r["batch"], r["threads"]): r["p50_ms"] for r in rows if r["runtime"] == "ort-cpu" and "p50_ms" in r}
    for r in rows:
        key = (r["batch"], r.get("threads"))
        if "p50_ms" in r and key in base_ms:
            r["speedup_vs_ort_cpu"] = round(base_ms[key] / r["p50_ms"], 2)
    if any(r in runtimes for r in ("ort-cpu-int8", "openvino-cpu")):  # the deployment table (issue 29), README-ready
        return {"rows": rows, "onnx_providers": ort.get_available_providers(), "errors": errors, "skipped": skipped,
                "markdown": deployment_markdown(rows)}
    return {"rows": rows, "onnx_providers": ort.get_available_providers(), "errors": errors, "skipped": skipped}


def deployment_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """`| runtime | threads | batch | ms per clip | clips/s | vs ort-cpu | model | max abs diff | top-1 agreement |`,
    one line per measured row (threads 0 shows as "default")."""
    lines = ["| runtime | threads | batch | ms per clip (p50) | clips/s | vs ort-cpu | model file | max abs diff vs PyTorch | top-1 agreement |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "p50_ms" not in r:
            continue
        size = f"{r['model_bytes'] / 1024:.0f} KiB" if "model_bytes" in r else "–"
        lines.append(f"| {r['runtime']} | {r.get('threads') or 'default'} | {r['batch']} | {r['per_clip_ms']:.3f} | "
                     f"{r['clips_per_s']:.0f} | {r.get('speedup_vs_ort_cpu', float('nan')):.2f}x | {size} | "
                     f"{r['max_abs_diff']:.2g} | {r['top1_agreement']:.3f} |")
    return "\n".join(lines) + "\n"


def conv_profile(
    *,
    model: str = "r2plus1d_student",
    frames: int = 8,
    size: int = 56,
    num_classes: int = 10,
    batch: int = 8,
    threads: int = 1,
    runs: int = 25,
    float_below_channels: Sequence[int] = (8, 0),
    seed: int = 0,
) -> dict[str, Any]:
    """Per-convolution kernel time of the float32 export and its int8 versions, from ONNX Runtime's profiler:
    where int8 3-D convolution gains and where it loses.

    Args:
        model, frames, size, num_classes: the preset exported (seeded), as in `bench_ort`.
        batch: clips per call; threads: intra-op threads; runs: profiled calls (the median per node is kept).
        float_below_channels: one int8 model per value (`quantize_onnx`'s setting; 0: every conv int8).

    Returns:
        `{"rows": [{"conv", "weight" (O, I, kT, kH, kW), "fp32_ms", "int8_<k>_ms", ...}],
        "totals": {"fp32": ms, "int8_<k>": ms} (every node, not only convolutions), "markdown"}`.

    Raises:
        ValueError: batch, threads or runs < 1.
    """
    import collections
    import json

    import onnx
    import onnxruntime as ort

    from vidistill.export.onnx import export_onnx
    from vidistill.export.quantize import quantize_onnx
    from vidistill.models import create_model

    if batch < 1 or threads < 1 or runs < 1:
        raise ValueError(f"conv_profile: batch, threads and runs must be >= 1, got {batch}, {threads}, {runs}")
    torch.manual_seed(seed)
    net = create_model(model, num_classes=num_classes, frames=frames, size=size).eval()
    rng = np.random.default_rng(seed)
    x = rng.random((batch, 3, frames, size, size), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="vidistill-conv-profile-") as tmp:
        path = export_onnx(net, tmp)
        calib = rng.random((16, 3, frames, size, size), dtype=np.float32)
        files = {"fp32": path, **{f"int8_{k}": quantize_onnx(path, f"{tmp}/int8_{k}.onnx", [calib], float_below_channels=k)
                                  for k in float_below_channels}}
        weights = {n.name: (n.input[1], [list(i.dims) for i in onnx.load(str(path)).graph.initializer if i.name == n.input[1]])
                   for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"}
        per: dict[str, dict[str, float]] = {}
        totals: dict[str, float] = {}
        for key, file in files.items():
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.enable_profiling = True
            opts.profile_file_prefix = f"{tmp}/profile_{key}"
            session = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
            for _ in range(runs):
                session.run(None, {"input": x})
            events = json.loads(Path(session.end_profiling()).read_text())
            times = collections.defaultdict(list)
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    times[e["name"].removesuffix("_kernel_time")].append(e["dur"] / 1000.0)
            med = {name: float(np.median(v)) for name, v in times.items()}
            totals[key] = round(sum(med.values()), 3)
            for conv in weights:  # ORT renames fused nodes "<conv>_token_N"
                hits = [v for name, v in med.items() if name == conv or name.startswith(conv + "_token")]
                per.setdefault(conv, {})[f"{key}_ms"] = round(sum(hits), 3) if hits else float("nan")
    rows = [{"conv": conv.removeprefix("node_"), "weight": "x".join(map(str, dims[0])) if dims else "?", **per[conv]}
            for conv, (_, dims) in weights.items()]
    keys = list(files)
    lines = ["| convolution | weight (O×I×kT×kH×kW) | " + " | ".join(f"{k} ms" for k in keys) + " |",
             "|---|---|" + "---:|" * len(keys)]
    lines += [f"| {r['conv']} | {r['weight']} | " + " | ".join(f"{r[k + '_ms']:.2f}" for k in keys) + " |" for r in rows]
    lines.append("| **all nodes** | | " + " | ".join(f"**{totals[k]:.2f}**" for k in keys) + " |")
    return {"rows": rows, "totals": totals, "markdown": "\n".join(lines) + "\n",
            "setting": {"batch": batch, "threads": threads, "runs": runs, "frames": frames, "size": size}}
