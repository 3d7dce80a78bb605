"""The comparison report a person opens: its Markdown (the Kubeflow UI's and the console's), its HTML page
opened in headless Chromium (sections present, every figure decoded and drawn), and what each model
costs, measured (`vidistill.evaluate.cost`).

The pipeline's own report (from a real tiny run) is checked in tests/test_e2e.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from helpers_browser import Sections, chromium, open_in_chromium
from vidistill.evaluate.report import decision_text, render_report

CLASSES = ["left", "right", "up", "down", "spin"]
SECTIONS = ["summary", "decision", "cost", "curves", "confusion", "dataset", "settings", "encoder"]


def _history(epochs: int, terms: tuple[str, ...]) -> list[dict]:
    return [{"epoch": e, "loss": 2.0 - 0.1 * e, **{t: 1.0 - 0.05 * e for t in terms}, "train_acc": 0.2 + 0.05 * e,
             "lr": 0.003, "epoch_seconds": 3.0} for e in range(epochs)]


def _confusion(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return (np.eye(5, dtype=int) * 5 + rng.integers(0, 3, (5, 5))).tolist()


def _model(name: str, role: str, top1: float, **extra) -> dict:
    return {"name": name, "role": role, "model": "r2plus1d_student", "modality": "rgb", "seeds": 1,
            "history": _history(6, ("ce",)), "confusion": _confusion(len(name)), "classes": CLASSES, "n_test_videos": 30,
            "top1": top1, "top5": 0.9, "mAP": top1 + 0.05, "mean_class_accuracy": top1, "params": 230_000,
            "onnx_bytes": 950_000, "latency_ms": 4.2, "runtime": "onnxruntime", "iters": 20, "threads": 1,
            "train_seconds": 40.0, **extra}


def report_data() -> dict:
    """A comparison as `vidistill_pipeline.report.build_comparison` writes it, plus the decision `publish` adds."""
    models = [
        _model("two-stream (RGB + flow teachers)", "teacher", 0.6, history=[], params=5_300_000, onnx_bytes=21_000_000,
               latency_ms=310.0, runtime="TV-L1 + both teachers", latency_note="TV-L1 of 7 frame pairs (290 ms) + teachers"),
        _model("RGB teacher", "teacher", 0.5, params=2_650_000, onnx_bytes=10_600_000, latency_ms=21.0),
        _model("student: kd", "student", 0.45, method="kd", settings={"tau": 4.0, "alpha": 0.5},
               history=_history(6, ("ce", "kd"))),
        _model("student: <b>none</b>", "student", 0.3, method="none", onnx_bytes=None, runtime="pytorch",
               error="ExportError: unsupported op"),
    ]
    return {
        "dataset": {"dataset": "folder", "root": "/videos", "classes": CLASSES, "frames": 8, "size": 56,
                    "splits": {"train": {"clips": 70, "videos": 70, "per_class": {c: 14 for c in CLASSES}},
                               "test": {"clips": 30, "videos": 30, "per_class": {c: 6 for c in CLASSES}}},
                    "skipped": [{"file": "/videos/left/notes.txt", "reason": "not a video (text)"}],
                    "notes": [{"file": "/videos/up/cut.mp4", "note": "39 frames declared, 25 used"}], "data_hash": "abc123"},
        "chance": {"top1": 0.2, "top5": 1.0, "classes": 5},
        "models": models,
        "encoder": {**_model("pre-trained encoder (sd's source)", "encoder", 0.7, classes=["1x", "2x", "3x"],
                             confusion=[[5, 1, 0], [1, 5, 0], [0, 0, 6]]),
                    "source": {"dataset": "synthetic", "root": "/data/raw/synthetic_d1", "classes": list("abcdef"),
                               "splits": {"train": {"clips": 100}, "test": {"clips": 40}}}},
        "machine": "test-host: x86_64, 2 CPUs",
        "decision": {"model_name": "my-videos", "registered": True, "version": "3", "method": "kd",
                     "decision": {"decision": "champion", "metric": "top1", "candidate": 0.45, "champion": 0.4,
                                  "champion_version": "2", "margin": 0.0,
                                  "reason": "top1 0.4500 beats champion v2 (0.4000) by >= margin 0"}},
        "export": {"method": "kd", "onnx_bytes": 950_000, "parity_passed": True, "parity_max_abs_diff": 2e-6,
                   "parity_top1_agreement": 1.0, "opset": 18},
    }


@pytest.fixture(scope="module")
def rendered() -> tuple[str, str]:
    """`(markdown, html)` of `report_data()` (rendered once: a dozen matplotlib figures)."""
    return render_report(report_data())


def test_markdown_has_the_table_chance_and_the_decision_with_its_numbers(rendered):
    md, _ = rendered
    assert "| model | top-1 | top-5 | mAP | params | ONNX | latency / clip |" in md
    assert "| student: kd | 0.450 | 0.900 | 0.500 | 230.0 k | 928 KiB | 4.20 ms |" in md
    assert "| chance | 0.200 | 1.000 |" in md
    assert "5 classes" in md and "1 input(s) skipped" in md
    assert "**champion**: `my-videos` version 3 (student kd); top1 0.450 against champion 0.400 (v2), margin 0." in md


def test_seed_spread_shows_where_there_are_seeds(rendered):
    data = report_data()
    data["models"][2].update(seeds=3, top1_std=0.03)
    data["encoder"] = None
    data["models"] = data["models"][2:3]
    md, page = render_report(data)
    assert "| student: kd | 0.450 ± 0.030 |" in md
    assert "standard deviation over 3 seeds" in page
    md, page = rendered
    assert "±" not in md and "One seed per model in this run" in page


@pytest.mark.parametrize("decision, expected", [
    ({"registered": False, "reason": "ONNX parity failed (max |diff| 0.3)"}, "**Not registered**: ONNX parity failed"),
    ({"registered": True, "model_name": "m", "version": "4", "method": "d3d",
      "decision": {"decision": "challenger", "metric": "top1", "candidate": 0.3, "champion": 0.5, "champion_version": "1",
                   "margin": 0.02, "reason": "does not beat"}},
     "**challenger**: `m` version 4 (student d3d); top1 0.300 against champion 0.500 (v1), margin 0.02."),
])
def test_decision_text_names_the_outcome_and_its_numbers(decision, expected):
    assert decision_text(decision).startswith(expected)


def test_html_escapes_names_and_lists_every_section(rendered):
    _, page = rendered
    assert "<b>none</b>" not in page and "&lt;b&gt;none&lt;/b&gt;" in page
    parsed = Sections(page)
    assert parsed.sections == SECTIONS
    # top-1 bars, cost scatter, a curve per model with a history and a confusion matrix per model (+ encoder)
    alts = [a for a, inline in parsed.images if inline]
    assert len(alts) == len(parsed.images) == 2 + 4 + 5
    assert "training curves of student: kd" in " ".join(alts) and "confusion matrix of RGB teacher" in " ".join(alts)
    for needle in ("/videos/left/notes.txt", "not a video (text)", "39 frames declared, 25 used", "tau=4.0, alpha=0.5",
                   "not exported to ONNX (ExportError: unsupported op), timed in PyTorch", "chance (uniform guess among 5"):
        assert needle in page, needle


def test_a_report_without_models_is_refused():
    data = copy.deepcopy(report_data())
    data["models"] = []
    with pytest.raises(ValueError, match="no models"):
        render_report(data)


def test_the_report_opens_in_a_browser(rendered, tmp_path):
    """Rendered by headless Chromium: every section is in the DOM, every image decoded with a width, and
    the screenshot is not blank."""
    if chromium() is None:
        pytest.skip("chromium is not installed and `make test` could not install it (apt-get needs root)")
    _, page = rendered
    path = tmp_path / "report.html"
    path.write_text(page)
    seen = open_in_chromium(path, tmp_path)
    dom = Sections(seen["dom"])
    assert dom.sections == SECTIONS
    assert len(seen["image_widths"]) == 11 and all(w > 100 for w in seen["image_widths"]), seen["image_widths"]
    import matplotlib.image

    pixels = matplotlib.image.imread(seen["screenshot"])
    assert pixels.shape[0] > 1000 and pixels[..., :3].std() > 0.05  # text, tables and figures, not a blank page


def test_cost_is_measured_for_rgb_and_flow_models():
    """Parameters, ONNX size and ONNX Runtime latency per clip, for an RGB student and a flow model."""
    from vidistill.evaluate.cost import model_cost, parameter_count
    from vidistill.models import create_model

    for modality in ("rgb", "flow"):
        model = create_model("r2plus1d_student", num_classes=3, frames=4, size=32, modality=modality)
        cost = model_cost(model, iters=3, warmup=1)
        assert cost["params"] == parameter_count(model) > 0
        assert cost["runtime"] == "onnxruntime", cost["error"]
        assert cost["onnx_bytes"] > 4 * cost["params"] * 0.9  # float32 weights are most of the file
        assert 0 < cost["latency_ms"] < 10_000
