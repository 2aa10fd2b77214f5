"""Verdicts from maps: calibration rules, regions, positions, confidence; no model needed."""

from __future__ import annotations

import numpy as np
import pytest

from inference.model.verdict import (
    Calibration,
    VerdictConfig,
    balanced_point,
    calibrate,
    calibrate_tail,
    make_verdict,
    position_word,
)


def blob(shape, cy, cx, radius, value):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2, value, 0.0).astype(np.float32)


def test_calibration_rules():
    jitter = calibrate(np.array([0.04, 0.05, 0.06]), "jitter")
    assert jitter.threshold == pytest.approx(3 * 0.05) and jitter.normal_score == pytest.approx(0.05)
    held = calibrate(np.array([0.08, 0.10, 0.12, 0.10]), "held-out")
    assert held.threshold == pytest.approx(0.10 + 3 * np.std([0.08, 0.10, 0.12, 0.10], ddof=1))
    zero = calibrate(np.array([]), "zero-shot")
    assert zero.threshold == 0.5
    assert calibrate(np.array([0.05]), "jitter", VerdictConfig(jitter_margin=2.0)).threshold == pytest.approx(0.1)
    with pytest.raises(ValueError):
        calibrate(np.array([]), "jitter")


def test_tail_rule_takes_the_tighter_estimate_by_hand():
    reshot = np.array([0.08, 0.10, 0.12])                        # mean 0.10 → 2 x 0.10 = 0.20
    alone = calibrate_tail(reshot, None)
    assert (alone.method, alone.threshold, alone.normal_score) == ("reshot", pytest.approx(0.20), pytest.approx(0.10))
    # held-out scores 0.05 and 0.06: log spread 0.129 < 0.2, so 0.2 is used; median exp(mean log) = sqrt(0.003)
    tight = calibrate_tail(reshot, np.array([0.05, 0.06]))
    expected = np.exp(np.log([0.05, 0.06]).mean() + 1.645 * 0.2)
    assert tight.method == "held-out" and tight.threshold == pytest.approx(expected)
    assert tight.normal_score == pytest.approx(np.sqrt(0.05 * 0.06)) and tight.n_samples == 2
    # held-out parts that score far apart: their own spread counts, and the re-shot estimate is tighter
    spread = np.log([0.05, 0.30]).std(ddof=1)
    assert np.exp(np.log([0.05, 0.30]).mean() + 1.645 * spread) > 0.20
    assert calibrate_tail(reshot, np.array([0.05, 0.30])).method == "reshot"
    assert calibrate_tail(reshot, np.array([0.05])).method == "reshot"          # one held-out score is no fit
    with pytest.raises(ValueError):
        calibrate_tail(np.array([]), None)
    margin = VerdictConfig(reshot_margin=3.0)
    assert calibrate_tail(reshot, None, margin).threshold == pytest.approx(0.30)
    # simulated defects on the references that score below the normal estimate cap it at their first quartile
    simulated = np.array([0.10, 0.14, 0.18, 0.22, 0.40])              # quartile 0.14 < 0.20
    capped = calibrate_tail(reshot, None, simulated_scores=simulated)
    assert capped.method == "simulated" and capped.threshold == pytest.approx(0.14)
    assert capped.normal_score == pytest.approx(0.14 / 1.5) and capped.probability(0.14) == pytest.approx(0.5)
    assert calibrate_tail(reshot, None, simulated_scores=simulated + 0.2).method == "reshot"   # far above: no cap
    assert calibrate_tail(reshot, None, VerdictConfig(simulated_quantile=None), simulated).method == "reshot"


def test_balanced_point_between_normal_and_simulated_defects_by_hand():
    """Normal log-scores [-a, 0, a] and defect log-scores [m - a, m, m + a]: equal spreads (a), so the score
    that best separates them is halfway, exp(m / 2), when that lies above the floor (median + 1 spread)."""
    a = 0.15
    normal = np.exp(np.array([-a, 0.0, a]))
    for m, expected in ((1.0, np.exp(0.5)), (0.4, np.exp(0.2)), (0.2, np.exp(a))):    # the last: the floor
        defects = np.exp(np.array([m - a, m, m + a]))
        assert balanced_point(normal, defects, VerdictConfig()) == pytest.approx(expected, rel=5e-3), m
    # tail rule: held-out [-a, 0, a] gives exp(1.645 * 0.2) = 1.39 (spread floor 0.2); re-shot far above
    reshot = np.full(4, 5.0)
    far = calibrate_tail(reshot, normal, simulated_scores=np.exp(np.array([1.0 - a, 1.0, 1.0 + a])))
    assert far.method == "held-out" and far.threshold == pytest.approx(np.exp(1.645 * 0.2))   # 1.65 > 1.39
    close = calibrate_tail(reshot, normal, simulated_scores=np.exp(np.array([0.4 - a, 0.4, 0.4 + a])))
    assert close.method == "balanced" and close.threshold == pytest.approx(np.exp(0.2), rel=5e-3)
    assert close.normal_score <= 1.0 and close.probability(close.threshold) == pytest.approx(0.5)
    off = VerdictConfig(balance_floor_z=None)
    assert calibrate_tail(reshot, normal, off, np.exp(np.array([0.4 - a, 0.4, 0.4 + a]))).method == "simulated"
    assert calibrate_tail(reshot, None, simulated_scores=normal * 3).method != "balanced"   # k = 1: no held-out


def test_confidence_is_calibrated_around_the_threshold():
    c = Calibration(threshold=0.3, normal_score=0.1, method="jitter")
    assert c.probability(0.3) == pytest.approx(0.5)
    assert c.probability(0.1) == pytest.approx(1 / (1 + np.exp(3)), rel=1e-6)   # ~0.05 at the normal score
    assert c.probability(0.9) > 0.95
    assert c.confidence(0.1) > 0.9 and c.confidence(0.9) > 0.9 and c.confidence(0.31) < 0.6
    scores = np.linspace(0.01, 1.0, 50)
    assert np.all(np.diff([c.probability(s) for s in scores]) >= 0)


def test_regions_positions_and_areas():
    c = Calibration(threshold=0.3, normal_score=0.1, method="jitter")
    anomaly_map = np.full((90, 120), 0.05, np.float32)
    anomaly_map += blob(anomaly_map.shape, 10, 10, 6, 0.6)        # top left, big and hot
    anomaly_map += blob(anomaly_map.shape, 80, 110, 4, 0.4)       # bottom right
    anomaly_map += blob(anomaly_map.shape, 45, 60, 2, 0.35)       # center, small: a third region
    verdict = make_verdict(anomaly_map, c, mm_per_px=0.5)
    assert verdict.is_anomalous and verdict.score == pytest.approx(0.65)
    assert [r.position for r in verdict.regions] == ["top left", "bottom right", "center"]
    assert verdict.positions == ["top left", "bottom right"]       # never more than two
    top_left = verdict.regions[0]
    assert top_left.area_px == int((blob(anomaly_map.shape, 10, 10, 6, 1) > 0).sum())
    assert top_left.area_mm2 == pytest.approx(top_left.area_px * 0.25)
    assert (top_left.x, top_left.y, top_left.w, top_left.h) == (4, 4, 13, 13)
    assert top_left.peak_score == pytest.approx(0.65)

    normal = make_verdict(np.full((40, 40), 0.2, np.float32), c)
    assert not normal.is_anomalous and normal.regions == [] and normal.positions == [] and normal.n_anomalies == 0
    assert normal.regions == [] and make_verdict(anomaly_map, c).regions[0].area_mm2 is None


def test_position_words():
    assert position_word(0, 0, 90, 90) == "top left"
    assert position_word(45, 45, 90, 90) == "center"
    assert position_word(89, 10, 90, 90) == "top right"
    assert position_word(10, 89, 90, 90) == "bottom left"
    assert position_word(90, 90, 90, 90) == "bottom right"   # edges clamp into the grid


def test_regions_keep_a_defects_shoulders_below_the_threshold():
    """A flagged defect is outlined where it rises above what normal parts reach, not only where it
    crosses the decision: the level is halfway (log) between the normal score and the threshold."""
    c = Calibration(threshold=0.4, normal_score=0.1, method="reshot")
    assert c.region_level == pytest.approx(0.2)
    anomaly_map = np.full((60, 60), 0.05, np.float32)
    anomaly_map += blob(anomaly_map.shape, 30, 30, 10, 0.2)       # shoulder: 0.25, below the threshold
    anomaly_map += blob(anomaly_map.shape, 30, 30, 3, 0.3)        # peak: 0.55
    verdict = make_verdict(anomaly_map, c)
    assert verdict.is_anomalous and len(verdict.regions) == 1
    assert verdict.regions[0].area_px == int((blob(anomaly_map.shape, 30, 30, 10, 1) > 0).sum())
    # under the simulated cap the threshold is below the normal estimates: it is the level itself
    capped = Calibration(threshold=0.4, normal_score=0.1, method="simulated")
    assert capped.region_level == 0.4
    peak_area = int((blob(anomaly_map.shape, 30, 30, 3, 1) > 0).sum())
    assert make_verdict(anomaly_map, capped).regions[0].area_px == peak_area
    # a frame below the threshold has no region, whatever its shoulders
    assert make_verdict(np.minimum(anomaly_map, 0.39), c).regions == []
