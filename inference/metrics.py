"""Anomaly-detection metrics, shared by `lineguard eval`, the benchmarks and the training job.

All functions take plain numpy arrays and return percentages (0..100) unless stated otherwise.

Example:
    >>> image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.9]))
    100.0
    >>> accuracy(np.array([0, 1]), np.array([False, True]))
    100.0
    >>> location_hit(mask, ["top left", "center"])   # mask: (H, W) ground truth, nonzero = defect
    True
    >>> verdict_metrics(np.array([0, 0, 1, 1]), np.array([False, True, True, True]))["balanced_accuracy"]
    75.0
    >>> best_balanced_accuracy(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.3, 0.9]))   # an upper bound
    75.0
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from lineguard.events import POSITIONS

# pixel AUROC on every pixel of a full-resolution test set is slow and no more precise than on a
# fixed, seeded subsample of this many pixels
MAX_PIXELS = 4_000_000


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level AUROC in percent; labels 1 = defective. NaN when only one class is present."""
    labels = np.asarray(labels).astype(int)
    if np.unique(labels).size < 2:
        return float("nan")
    return 100.0 * float(roc_auc_score(labels, np.asarray(scores, np.float64)))


def pixel_auroc(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], seed: int = 0) -> float:
    """Pixel-level AUROC in percent over all images; masks nonzero = defect, maps at mask resolution."""
    truth = np.concatenate([(np.asarray(m) > 0).ravel() for m in masks])
    values = np.concatenate([np.asarray(a, np.float32).ravel() for a in maps])
    if truth.size != values.size:
        raise ValueError("every anomaly map must have the shape of its mask")
    if truth.size > MAX_PIXELS:
        keep = np.random.default_rng(seed).choice(truth.size, MAX_PIXELS, replace=False)
        truth, values = truth[keep], values[keep]
    return image_auroc(truth, values)


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Share of correct anomalous/normal decisions, in percent."""
    labels = np.asarray(labels).astype(bool)
    return 100.0 * float((labels == np.asarray(predicted).astype(bool)).mean())


def verdict_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """The automatic verdict against the labels (1 = defective), in percent: `recall` (defective parts
    flagged), `false_alarm_rate` (good parts flagged) and `balanced_accuracy`, their mean of per-class
    accuracies, which a test set's share of defects does not sway. NaN where a class is absent."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    recall = 100.0 * float(predicted[labels].mean()) if labels.any() else float("nan")
    false_alarms = 100.0 * float(predicted[~labels].mean()) if (~labels).any() else float("nan")
    return {"recall": recall, "false_alarm_rate": false_alarms,
            "balanced_accuracy": (recall + 100.0 - false_alarms) / 2}


def best_balanced_accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    """The best balanced accuracy any single threshold reaches on these scores, in percent: an upper bound
    for reference (it looks at the test labels), never a rule the model may use. NaN with one class."""
    labels = np.asarray(labels).astype(int)
    if np.unique(labels).size < 2:
        return float("nan")
    false_positive, true_positive, _ = roc_curve(labels, np.asarray(scores, np.float64))
    return 100.0 * float(((true_positive + 1.0 - false_positive) / 2).max())


def largest_region_position(mask: np.ndarray) -> str | None:
    """The 3x3 grid word of the centre (bounding-box centre, as for predicted regions) of the largest
    connected region of a ground-truth mask."""
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        return None
    x, y, w, h, _ = stats[1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))]
    H, W = binary.shape
    col, row = min(2, int(3 * (x + w / 2) / W)), min(2, int(3 * (y + h / 2) / H))
    return POSITIONS[row * 3 + col]


def location_hit(mask: np.ndarray, positions: Sequence[str]) -> bool:
    """Does the largest ground-truth region fall in a cell among the predicted position words?"""
    truth = largest_region_position(mask)
    return truth is not None and truth in positions


def location_accuracy(masks: Sequence[np.ndarray], positions: Sequence[Sequence[str]]) -> float:
    """Share of defective images (non-empty mask) whose largest region's cell was predicted, in percent."""
    hits = [location_hit(m, p) for m, p in zip(masks, positions, strict=True) if np.asarray(m).any()]
    return 100.0 * float(np.mean(hits)) if hits else float("nan")


def per_defect_type_auroc(defect_types: Sequence[str | None], scores: np.ndarray) -> dict[str, float]:
    """Image AUROC of each defect type against the good images (type None or "good"), in percent."""
    types = np.array(["good" if t in (None, "good") else t for t in defect_types])
    scores = np.asarray(scores, np.float64)
    good = types == "good"
    result = {}
    for name in sorted(set(types) - {"good"}):
        chosen = good | (types == name)
        result[name] = image_auroc((types[chosen] == name).astype(int), scores[chosen])
    return result


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """ECE of P(anomalous) against the labels, in percent (0 = perfectly calibrated)."""
    labels = np.asarray(labels).astype(float)
    probabilities = np.asarray(probabilities, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        chosen = which == b
        if chosen.any():
            error += chosen.mean() * abs(probabilities[chosen].mean() - labels[chosen].mean())
    return 100.0 * float(error)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), NaNs ignored."""
    array = np.asarray([v for v in values if v == v], np.float64)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0
