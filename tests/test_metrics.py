"""Metrics against values computed by hand."""

import numpy as np
import pytest

from vidistill.evaluate.metrics import (
    aggregate_videos,
    average_precision,
    classification_metrics,
    confusion_matrix,
    mean_average_precision,
    plot_confusion,
    topk_accuracy,
)

# 4 samples, 3 classes
SCORES = np.array([
    [0.7, 0.2, 0.1],  # label 0: rank 1
    [0.5, 0.4, 0.1],  # label 1: rank 2
    [0.1, 0.3, 0.6],  # label 2: rank 1
    [0.2, 0.5, 0.3],  # label 2: rank 2
])
LABELS = np.array([0, 1, 2, 2])


def test_topk_by_hand():
    assert topk_accuracy(SCORES, LABELS, 1) == pytest.approx(2 / 4)
    assert topk_accuracy(SCORES, LABELS, 2) == pytest.approx(4 / 4)
    assert topk_accuracy(SCORES, LABELS, 5) == 1.0  # k larger than K is clipped


def test_average_precision_by_hand():
    # class 2 scores: [0.1, 0.1, 0.6, 0.3] -> ranking: s2 (pos), s3 (pos), ... -> AP = (1/1 + 2/2) / 2 = 1
    assert average_precision(SCORES[:, 2], LABELS == 2) == pytest.approx(1.0)
    # class 1 scores: [0.2, 0.4, 0.3, 0.5] -> ranking s3 (neg), s1 (pos) -> AP = 1/2
    assert average_precision(SCORES[:, 1], LABELS == 1) == pytest.approx(0.5)
    # class 0 scores: [0.7, 0.5, 0.1, 0.2] -> s0 first -> AP = 1
    assert mean_average_precision(SCORES, LABELS) == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    assert np.isnan(average_precision(np.array([0.1, 0.2]), np.array([False, False])))


def test_confusion_and_per_class():
    m = classification_metrics(SCORES, LABELS, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    assert m["per_class_accuracy"] == {"a": 1.0, "b": 0.0, "c": 0.5}
    assert m["mean_class_accuracy"] == pytest.approx(0.5)
    assert confusion_matrix(np.array([0, 0]), np.array([1, 1]), 2).tolist() == [[0, 2], [0, 0]]


def test_multiclip_aggregation_averages_per_video():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    labels = np.array([0, 0, 1])
    vids = np.array([5, 5, 7])
    agg, vlabels = aggregate_videos(probs, labels, vids)
    np.testing.assert_allclose(agg, [[0.55, 0.45], [0.3, 0.7]])
    assert vlabels.tolist() == [0, 1]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="labels must be in"):
        topk_accuracy(SCORES, np.array([0, 1, 2, 3]), 1)
    with pytest.raises(ValueError, match="scores must be"):
        topk_accuracy(SCORES[0], LABELS, 1)
    with pytest.raises(ValueError, match="class names"):
        classification_metrics(SCORES, LABELS, ["a", "b"])


def test_confusion_png(tmp_path):
    path = plot_confusion([[3, 1], [0, 4]], ["left", "right"], tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
