"""int8 students: ONNX Runtime static quantization (QDQ) and an accuracy gate against the float model.

`quantize_onnx` turns an exported float32 `model.onnx` into a QDQ int8 model: weights int8 with one
scale per output channel, activations uint8 with ranges calibrated (MinMax) on real training clips.
The classifier head (the Gemm producing `logits`, D × K multiply-adds) stays float32, so logits are not
rounded onto a uint8 grid (which would turn near ties of the top-1 decision into coin flips), and so
does the convolution reading the 3-channel RGB input (with the normalisation before it): ONNX Runtime's
int8 QLinearConv is ~4x slower than its float convolution there (docs/deployment.md), while the wider
convolutions gain 2-4x.
The graph's interface does not change (float32 `input` (B, 3, T, H, W) in [0, 1] -> float32 `logits`
(B, K), `features` (B, D)), nor does its `vidistill.*` metadata, so `vidistill serve`, the registry
and KServe load an int8 model exactly like the float one; the metadata gains
`vidistill.precision = int8` and `vidistill.quantization` (JSON: format, per-channel, calibration).

`accuracy_gate` compares the two models on labelled evaluation clips: clip-level top-1 of each, the
drop in points (percentage points: 1 point = 0.01 of accuracy), the top-1 agreement between them and
the largest logit difference. An int8 model whose drop exceeds `max_drop_points` fails the gate and
is never registered or promoted as int8 (`vidistill register --precision int8` refuses it).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from vidistill.export.runtime import INPUT_NAME, META_PREFIX, OUTPUT_NAMES, make_session

INT8_DIR = "int8"  # <export out>/int8/model.onnx
GATE_FILE = "gate.json"  # <export out>/int8/gate.json: the accuracy gate's numbers
DEFAULT_MAX_DROP_POINTS = 1.0


class QuantizationError(RuntimeError):
    """ONNX Runtime could not quantize the model (message names the model and the cause)."""


def _batches(clips: Iterable[np.ndarray] | np.ndarray, what: str) -> Iterator[np.ndarray]:
    """Yield float32 (B, 3, T, H, W) batches; a single 5-D array is one batch."""
    if isinstance(clips, np.ndarray):
        clips = [clips]
    for b in clips:
        arr = np.ascontiguousarray(np.asarray(b), dtype=np.float32)
        if arr.ndim != 5 or arr.shape[1] != 3:
            raise ValueError(f"{what} batches must be float32 (B, 3, T, H, W) clips in [0, 1], got shape {arr.shape}")
        yield arr


def quantize_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: Iterable[np.ndarray] | np.ndarray,
    *,
    per_channel: bool = True,
    float_below_channels: int = 8,
) -> Path:
    """Quantize an exported float32 student to int8 with ONNX Runtime static quantization (QDQ).

    Weights are int8 (symmetric, one scale per output channel when `per_channel`), activations uint8
    with MinMax ranges from `calibration`; the classifier head that produces `logits` stays float32. Inputs and outputs stay float32 with the same names and
    shapes; the `vidistill.*` metadata is kept and gains `precision` and `quantization`.

    Args:
        fp32_path: the float32 `model.onnx` written by `export_onnx`.
        out_path: where to write the int8 model (its folder is created).
        calibration: batches of training clips, each float32 (B, 3, T, H, W) RGB in [0, 1] with the
            model's T, H, W (or one such array). A few dozen clips are enough.
        per_channel: one weight scale per output channel (else one per tensor).
        float_below_channels: convolutions with fewer input channels (per group) than this stay float32,
            with everything before them (the normalisation): the RGB stem (3 input channels), where ONNX
            Runtime's int8 QLinearConv is ~4x slower than its float convolution (docs/deployment.md);
            0 quantizes every convolution.

    Returns:
        `out_path` as a Path.

    Raises:
        FileNotFoundError: `fp32_path` does not exist.
        ValueError: no calibration clips, or a batch that is not (B, 3, T, H, W).
        QuantizationError: ONNX Runtime failed to quantize the graph.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = Path(fp32_path)
    if not src.is_file():
        raise FileNotFoundError(f"float model {src} does not exist; export it first (vidistill export)")
    batches = list(_batches(calibration, "calibration"))
    n = sum(b.shape[0] for b in batches)
    if n == 0:
        raise ValueError("calibration needs at least one clip; pass training clips (export.calibration_clips >= 1)")
    dst = Path(out_path)
    dst.parent.mkdir(parents=True, exist_ok=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            b = next(self.it, None)
            return None if b is None else {INPUT_NAME: b}

    with tempfile.TemporaryDirectory(prefix="vidistill-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
            graph = onnx.load(str(pre)).graph
            head = [nd.name for nd in graph.node if nd.op_type in ("Gemm", "MatMul") and OUTPUT_NAMES[0] in nd.output]
            weights = {i.name: list(i.dims) for i in graph.initializer}
            narrow = [nd for nd in graph.node if nd.op_type == "Conv" and len(weights.get(nd.input[1], [])) > 1
                      and weights[nd.input[1]][1] < float_below_channels]
            # and everything before them (the normalisation): with a DequantizeLinear on its input ORT would fuse
            # the float convolution back into a QLinearConv at load time
            producer = {o: nd for nd in graph.node for o in nd.output}
            keep, stack = {nd.name for nd in narrow}, list(narrow)
            while stack:
                for name in stack.pop().input:
                    if name in producer and producer[name].name not in keep:
                        keep.add(producer[name].name)
                        stack.append(producer[name])
            quantize_static(
                str(pre), str(dst), Reader(), nodes_to_exclude=head + sorted(keep),
                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except Exception as e:  # ORT raises plain Exceptions of many kinds; name the model and the cause
            raise QuantizationError(f"ONNX Runtime could not quantize {src}: {type(e).__name__}: {e}") from e
    fp32 = onnx.load(str(src))
    proto = onnx.load(str(dst))
    meta = {p.key: p.value for p in fp32.metadata_props}
    meta[META_PREFIX + "precision"] = "int8"
    meta[META_PREFIX + "quantization"] = json.dumps({
        "format": "QDQ", "weights": "int8 symmetric", "per_channel": per_channel, "activations": "uint8 MinMax",
        "float32": f"classifier head, convolutions with < {float_below_channels} input channels and what precedes them",
        "calibration_clips": n,
    }, sort_keys=True)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = fp32.doc_string + " Quantized to int8 (ONNX Runtime static quantization, QDQ)."
    onnx.save_model(proto, str(dst))
    return dst


def accuracy_gate(
    fp32_path: str | Path,
    int8_path: str | Path,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    max_drop_points: float = DEFAULT_MAX_DROP_POINTS,
) -> dict[str, Any]:
    """Compare the int8 model with its float32 source on labelled evaluation clips.

    Args:
        fp32_path: the float32 model.
        int8_path: its quantized version.
        batches: `(clips, labels)` pairs: clips float32 (B, 3, T, H, W) in [0, 1], labels int (B,).
        max_drop_points: largest allowed top-1 drop, in percentage points (1.0 = one point = 0.01
            of clip-level top-1); >= 0.

    Returns:
        `{"passed", "top1_fp32", "top1_int8" (fractions in [0, 1]), "drop_points" (100 × (fp32 -
        int8); negative when int8 is better), "top1_agreement" (fraction of clips where both models
        predict the same class), "max_abs_logit_diff", "n" (clips), "max_drop_points"}`;
        `passed` is `drop_points <= max_drop_points` and every int8 output finite.

    Raises:
        ValueError: a negative or non-finite `max_drop_points`, no clips, or labels that do not match
            the clips (one line naming the shapes).
        FileNotFoundError: a model file does not exist.
    """
    if not (np.isfinite(max_drop_points) and max_drop_points >= 0):
        raise ValueError(f"max_drop_points must be a finite number of points >= 0 (1.0 = one point of top-1), got {max_drop_points}")
    ref, got = make_session(fp32_path, providers=["cpu"]), make_session(int8_path, providers=["cpu"])
    n = ok_fp32 = ok_int8 = agree = 0
    max_diff, finite = 0.0, True
    for clips, labels in batches:
        x = next(_batches(np.asarray(clips), "evaluation"))
        y = np.asarray(labels).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"evaluation labels have shape {y.shape} but the clips {x.shape}; pass one label per clip")
        a = ref.run([OUTPUT_NAMES[0]], {INPUT_NAME: x})[0]  # (B, K)
        b = got.run([OUTPUT_NAMES[0]], {INPUT_NAME: x})[0]
        finite = finite and bool(np.isfinite(b).all())
        max_diff = max(max_diff, float(np.max(np.abs(a.astype(np.float64) - b))))
        pa, pb = a.argmax(1), b.argmax(1)
        ok_fp32 += int((pa == y).sum())
        ok_int8 += int((pb == y).sum())
        agree += int((pa == pb).sum())
        n += x.shape[0]
    if n == 0:
        raise ValueError("the accuracy gate needs at least one evaluation clip; the test split is empty")
    top1_fp32, top1_int8 = ok_fp32 / n, ok_int8 / n
    drop = 100.0 * (top1_fp32 - top1_int8)
    return {
        "passed": bool(finite and drop <= max_drop_points + 1e-9),
        "top1_fp32": top1_fp32,
        "top1_int8": top1_int8,
        "drop_points": drop,
        "top1_agreement": agree / n,
        "max_abs_logit_diff": max_diff if finite else float("inf"),
        "n": n,
        "max_drop_points": float(max_drop_points),
    }



def quantize_and_gate(
    fp32_path: str | Path,
    calibration: Iterable[np.ndarray] | np.ndarray,
    evaluation: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    max_drop_points: float = DEFAULT_MAX_DROP_POINTS,
    per_channel: bool = True,
) -> dict[str, Any]:
    """Quantize `fp32_path` into `<its folder>/int8/model.onnx`, gate it, write `int8/gate.json`.

    A model that fails the gate is kept (for inspection) with `passed: false` in `gate.json`; the
    registry refuses to register it as int8.

    Args:
        fp32_path: the exported float32 model; calibration: training clip batches (see `quantize_onnx`);
        evaluation: `(clips, labels)` batches (see `accuracy_gate`); max_drop_points: allowed top-1 drop.

    Returns:
        The gate's result (`accuracy_gate`) plus `"onnx"` (the int8 path), `"bytes_fp32"`, `"bytes_int8"`.

    Raises:
        As `quantize_onnx` and `accuracy_gate`.
    """
    src = Path(fp32_path)
    dst = quantize_onnx(src, src.parent / INT8_DIR / src.name, calibration, per_channel=per_channel)
    gate = accuracy_gate(src, dst, evaluation, max_drop_points=max_drop_points)
    gate.update({"onnx": str(dst), "bytes_fp32": src.stat().st_size, "bytes_int8": dst.stat().st_size})
    (dst.parent / GATE_FILE).write_text(json.dumps(gate, indent=2))
    return gate


def read_gate(onnx_dir: str | Path) -> dict[str, Any]:
    """The int8 gate of an export folder (`<onnx_dir>/int8/gate.json`).

    Raises:
        FileNotFoundError: no int8 model or gate there (one line: export with `--int8`).
    """
    d = Path(onnx_dir) / INT8_DIR
    for need in (d / "model.onnx", d / GATE_FILE):
        if not need.is_file():
            raise FileNotFoundError(f"{need} does not exist; export with `vidistill export --int8` first")
    return json.loads((d / GATE_FILE).read_text())
