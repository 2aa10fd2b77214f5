"""The shared metrics module (eval, benchmarks and the training job use it)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inference import metrics


def test_image_auroc_and_accuracy():
    assert metrics.image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.9])) == 100.0
    assert metrics.image_auroc(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.9])) == 75.0
    assert math.isnan(metrics.image_auroc(np.array([1, 1]), np.array([0.1, 0.2])))
    assert metrics.accuracy(np.array([0, 1, 1, 0]), np.array([False, True, False, False])) == 75.0


def test_pixel_auroc_over_images_of_different_sizes():
    masks = [np.zeros((4, 4), bool), np.pad(np.ones((2, 2), bool), 1)]
    maps = [np.full((4, 4), 0.1), np.pad(np.ones((2, 2)), 1) * 0.9 + 0.05]
    assert metrics.pixel_auroc(masks, maps) == 100.0
    with pytest.raises(ValueError):
        metrics.pixel_auroc([np.zeros((3, 3))], [np.zeros((4, 4))])
    # subsampling keeps the answer for big sets
    rng = np.random.default_rng(0)
    big_mask = rng.random((2100, 2100)) < 0.1
    big_map = big_mask + rng.normal(0, 0.5, big_mask.shape)
    assert metrics.pixel_auroc([big_mask], [big_map]) == pytest.approx(
        100 * 0.9214, abs=0.5)  # AUROC of N(1, .5) vs N(0, .5): Phi(1 / (0.5 * sqrt 2))


def test_location_uses_the_largest_region_centre():
    mask = np.zeros((90, 90), np.uint8)
    mask[5:15, 5:15] = 255          # largest: top left
    mask[70:75, 80:85] = 255        # smaller: bottom right
    assert metrics.largest_region_position(mask) == "top left"
    assert metrics.location_hit(mask, ["center", "top left"])
    assert not metrics.location_hit(mask, ["bottom right"])
    assert metrics.largest_region_position(np.zeros((5, 5))) is None
    # a crescent: its box centre, not its (empty) centroid's surroundings
    crescent = np.zeros((90, 90), np.uint8)
    crescent[60:85, 30:85] = 1
    crescent[60:75, 40:85] = 0
    assert metrics.largest_region_position(crescent) == "bottom"
    good = np.zeros((90, 90), np.uint8)
    # good images do not count; 1 hit out of 2 defective images
    assert metrics.location_accuracy([mask, good, crescent], [["top left"], [], ["top"]]) == 50.0


def test_per_defect_type_auroc_and_calibration_error():
    types = ["good", "good", "scratch", "scratch", "dent", None]
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.15, 0.05])
    result = metrics.per_defect_type_auroc(types, scores)
    assert result == {"dent": pytest.approx(100 * 2 / 3), "scratch": 100.0}
    labels = np.array([0, 0, 1, 1])
    assert metrics.expected_calibration_error(labels, np.array([0.0, 0.0, 1.0, 1.0])) == 0.0
    assert metrics.expected_calibration_error(labels, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.0)
    assert metrics.expected_calibration_error(labels, np.array([1.0, 1.0, 0.0, 0.0])) == 100.0
    assert metrics.mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2)))
    assert metrics.mean_std([2.0, float("nan")]) == (2.0, 0.0)


def test_verdict_metrics_by_hand():
    # 4 good parts, 1 flagged; 6 defective, 4 flagged
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    flagged = np.array([1, 0, 0, 0, 1, 1, 0, 1, 1, 0], bool)
    result = metrics.verdict_metrics(labels, flagged)
    assert result["recall"] == pytest.approx(100 * 4 / 6)
    assert result["false_alarm_rate"] == pytest.approx(25.0)
    assert result["balanced_accuracy"] == pytest.approx((100 * 4 / 6 + 75.0) / 2)
    only_good = metrics.verdict_metrics(np.array([0, 0]), np.array([False, True]))
    assert math.isnan(only_good["recall"]) and only_good["false_alarm_rate"] == 50.0


def test_best_balanced_accuracy_is_the_best_single_threshold():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.5, 0.2, 0.4, 0.6, 0.9])
    # thresholds by hand: > 0.45 → recall 2/3, false alarms 1/3 → 66.7; > 0.3 → recall 1, false alarms 1/3 → 83.3
    assert metrics.best_balanced_accuracy(labels, scores) == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert metrics.best_balanced_accuracy(np.array([0, 1]), np.array([0.9, 0.1])) == 50.0   # flag nothing
    assert metrics.best_balanced_accuracy(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3])) == 100.0
    assert math.isnan(metrics.best_balanced_accuracy(np.array([1, 1]), np.array([0.1, 0.2])))
    # never below the balanced accuracy of any threshold actually applied
    rng = np.random.default_rng(1)
    labels, scores = rng.integers(0, 2, 200), rng.random(200)
    for threshold in (0.1, 0.5, 0.77):
        applied = metrics.verdict_metrics(labels, scores > threshold)["balanced_accuracy"]
        assert metrics.best_balanced_accuracy(labels, scores) >= applied
