"""Verdicts from maps: calibration rules, regions, positions, confidence; no model needed."""

from __future__ import annotations

import numpy as np
import pytest

from inference.model.verdict import Calibration, VerdictConfig, calibrate, make_verdict, position_word


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
