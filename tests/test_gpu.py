"""CUDA code paths: training steps, ONNX Runtime's CUDA provider, the flow stage on a GPU.

Every test here is `gpu`-marked and skips without a CUDA device (`make gpu-check` runs them on one;
the CUDA TV-L1 accuracy tests are in tests/test_flow.py). The CPU-side tests of the same code are in
tests/test_gpu_check.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vidistill.benchmarks.train import TrainStep, make_task, random_batch
from vidistill.distill import list_methods

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPE = {"num_classes": 5, "frames": 8, "size": 32}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", ["teacher", *list_methods()])
def test_cuda_training_steps_fit_a_batch(kind: str, precision: str, tmp_path: Path) -> None:
    """Repeated steps on one batch of random labels drive its loss down (forward, backward, clipping,
    optimizer and loss scaling all work on CUDA), and every loss stays finite."""
    torch.manual_seed(0)
    task, needs_flow = make_task(kind, teacher="r2plus1d_student", student="r2plus1d_student", workdir=tmp_path, **SHAPE)
    batch = random_batch(8, flow=needs_flow, device=torch.device("cuda"), **SHAPE)
    step = TrainStep(task, torch.device("cuda"), precision, lr=3e-3)
    losses = [float(step(batch)) for _ in range(15)]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.8 * losses[0], f"{kind} {precision}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("kind", ["teacher", *list_methods()])
def test_cuda_fp32_step_matches_cpu(kind: str, tmp_path: Path) -> None:
    """The same task, weights and batch give the same loss on CUDA and on CPU, before and after a step."""
    losses = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        task, needs_flow = make_task(kind, teacher="r2plus1d_student", student="r2plus1d_student",
                                     workdir=tmp_path / device, **SHAPE)
        batch = random_batch(4, flow=needs_flow, device=torch.device(device), **SHAPE)
        step = TrainStep(task, torch.device(device), "fp32")
        losses[device] = [float(step(batch)) for _ in range(2)]
    # cuDNN may run float32 convolutions in TF32 (PyTorch's default): agreement to ~1e-3 relative
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=1e-2)


@pytest.fixture(scope="module")
def student_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    from vidistill.export.onnx import export_onnx
    from vidistill.models import create_model

    torch.manual_seed(0)
    model = create_model("r2plus1d_student", num_classes=7, frames=8, size=56).eval()
    return model, export_onnx(model, tmp_path_factory.mktemp("onnx"))


def _needs_ort_cuda() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)")


def test_ort_cuda_provider_matches_pytorch(student_onnx) -> None:
    """ONNX Runtime's CUDA provider (float32, as the project's sessions run it) answers what PyTorch does."""
    _needs_ort_cuda()
    from vidistill.export.runtime import make_session

    model, path = student_onnx
    session = make_session(path, providers=["cuda"])
    assert session.get_providers()[0] == "CUDAExecutionProvider", session.get_providers()
    x = np.random.default_rng(0).random((5, 3, 8, 56, 56), dtype=np.float32)
    with torch.no_grad():
        ref = [t.numpy() for t in model(torch.from_numpy(x))]
    got = session.run(None, {"input": x})
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=0)
    assert (got[0].argmax(1) == ref[0].argmax(1)).all()


def test_export_parity_gate_passes_on_gpu(student_onnx) -> None:
    """`check_parity`, the export stage's gate, on a GPU machine's default providers (CUDA first)."""
    _needs_ort_cuda()
    from vidistill.export.onnx import check_parity

    model, path = student_onnx
    clips = torch.rand(6, 3, 8, 56, 56, generator=torch.Generator().manual_seed(1))
    parity = check_parity(model, path, clips)
    assert parity["passed"] and parity["top1_agreement"] == 1.0, parity


def test_flow_stage_on_cuda_matches_cpu(tmp_path: Path) -> None:
    """`vidistill flow` with device cuda writes the same uint8 flow as on CPU (within a code step or two)."""
    import vidistill.flow.stage as stage
    from test_flow_stage import _write_clips
    from vidistill.config import FlowConfig
    from vidistill.flow import TVL1Params

    clips = _write_clips(tmp_path / "clips")
    outs = {}
    for device in ("cpu", "cuda"):
        cfg = FlowConfig(clips=str(clips), out=str(tmp_path / f"flow_{device}"), device=device, batch_size=4, workers=1,
                         tvl1=TVL1Params(nscales=3, warps=3))
        summary = stage.run_flow(cfg, progress=False)
        assert summary["failed"] == 0 and summary["pairs"] > 0, summary
        outs[device] = np.load(Path(cfg.out) / "train" / "flow-00000.npy").astype(np.int16)
        assert json.loads((Path(cfg.out) / "manifest.json").read_text())["failed"] == []
    diff = np.abs(outs["cuda"] - outs["cpu"])
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())
