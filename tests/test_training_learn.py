"""Learning from labels (training/learn.py): the threshold rules by hand, and the model learning a new
kind of normal part from frames labelled good, without losing its defects."""

from __future__ import annotations

import numpy as np
import pytest

from training.learn import Labelled, LearnConfig, choose_threshold, learn, score_with, verdict_report


def test_confirmed_defects_lower_the_threshold_and_labelled_goods_only_guard_it():
    config = LearnConfig(margin=1.0)
    good, defect = np.array([0.10, 0.12, 0.20]), np.array([0.30, 0.50])
    # defects above the automatic threshold were caught: it stays (labels never raise it on defects' evidence)
    assert choose_threshold(0.15, good, defect, config) == (0.15, "labels")
    # defects below it were missed: it falls below them, to the middle (log-score) of the labels' best range
    # [0.20, 0.30] when that is lower than the lowest defect
    assert choose_threshold(0.9, good, defect, config)[0] == pytest.approx(np.sqrt(0.20 * 0.30))
    # and to just below the lowest defect when the best range lies above it (a good at 0.35 among the defects)
    overlapping = np.array([0.10, 0.20, 0.35]), np.array([0.30, 0.50, 0.60, 0.70])
    assert choose_threshold(0.9, *overlapping, config)[0] == pytest.approx(0.30)
    assert choose_threshold(0.9, *overlapping)[0] == pytest.approx(0.30 / 1.02)     # the default margin
    # a good at 0.20 above 0.15 costs 1/6 of balanced accuracy, within 1.5 standard errors of the best cut's
    # (0.75 * sqrt(0.25/3 + 0.25/2) = 0.34) on 5 labels: not evidence enough to move
    # with a stricter test (0.5 standard errors: 0.11) it is: the threshold rises to the nearest cut between two
    # labelled scores whose balanced accuracy is close enough to the best, here between 0.20 and 0.30
    strict = LearnConfig(margin=1.0, evidence_z=0.5)
    assert choose_threshold(0.15, good, defect, strict)[0] == pytest.approx(np.sqrt(0.20 * 0.30))
    # overlapping classes: one good (0.6) above every defect; the nearest good-enough cut lies between 0.2 and 0.4
    threshold, _ = choose_threshold(0.15, np.array([0.1, 0.2, 0.6]), np.array([0.4, 0.5]), strict)
    assert threshold == pytest.approx(np.sqrt(0.2 * 0.4))
    # a defect scored among the goods drags the threshold down only as far as the goods' evidence allows
    many_good = np.linspace(0.10, 0.20, 12)
    threshold, _ = choose_threshold(0.25, many_good, np.array([0.11, 0.5, 0.6, 0.7]), config)
    assert 0.11 < threshold < 0.25 and np.mean(many_good > threshold) < 0.5


def test_one_class_bounds_and_the_sanity_clamp():
    config = LearnConfig(margin=1.0, max_factor=4.0)
    assert choose_threshold(0.15, np.array([0.1, 0.3]), np.array([]), config) == (0.3, "labels: good only")
    assert choose_threshold(0.15, np.array([0.1]), np.array([]), config)[0] == 0.15       # never below auto
    assert choose_threshold(0.15, np.array([]), np.array([0.12, 0.4]), config) == (0.12, "labels: defects only")
    assert choose_threshold(0.15, np.array([]), np.array([0.5]), config)[0] == 0.15       # never above auto
    assert choose_threshold(0.15, np.array([5.0]), np.array([]), config)[0] == pytest.approx(0.6)   # auto x 4
    assert choose_threshold(0.15, np.array([]), np.array([]), config) == (0.15, "auto")


def striped(image: np.ndarray, period: int = 9) -> np.ndarray:
    """A new supplier's surface: fine stripes the references never showed, on a part that is still good."""
    stripes = (18 * np.sin(np.arange(image.shape[1]) * 2 * np.pi / period)).astype(np.float32)
    return np.clip(image.astype(np.float32) + stripes[None, :, None], 0, 255).astype(np.uint8)


def test_frames_labelled_good_teach_a_new_normal_variation_and_defects_stay_flagged():
    from inference.model.api import InspectionModel, ModelConfig
    from ingest.simulator import LineSimulator

    simulator = LineSimulator(products=("disc",), seed=5)
    # the default encoder with a shorter calibration (fewer re-shots and prototype steps): a test budget
    model = InspectionModel(ModelConfig(device="cpu", n_jitter=4, prototype_views=8, prototype_steps=30))
    model.set_references("disc", simulator.normal_references("disc", 2))
    variation = [striped(simulator.part(i, "disc", defect_type=None).image) for i in range(16)]
    parts = [simulator.part(100 + i, "disc", defect_type="contamination") for i in range(10)]
    defects = [striped(part.image) for part in parts]
    fresh, taught = variation[:8], variation[8:]
    live = model.states["disc"]
    before = score_with(model, "disc", live, fresh) > live.calibration.threshold
    assert before.mean() >= 0.5, "the stripes should look anomalous to the references-only model"

    labelled = [Labelled(image, False) for image in taught] + [Labelled(image, True) for image in defects[:4]]
    candidate = learn(model, "disc", labelled)
    assert model.states["disc"] is live                       # learning never touches the live model
    assert candidate.method == "labels"
    threshold = candidate.state.calibration.threshold
    after = score_with(model, "disc", candidate.state, fresh) > threshold
    caught = score_with(model, "disc", candidate.state, defects[4:]) > threshold
    assert after.mean() <= 0.3 * before.mean(), (before.mean(), after.mean())
    assert caught.mean() >= 0.9
    report = verdict_report(np.array([0] * 8 + [1] * 6), np.concatenate([
        score_with(model, "disc", candidate.state, fresh), score_with(model, "disc", candidate.state, defects[4:])]),
        threshold)
    assert report["balanced_accuracy"] >= 85 and report["threshold_gap"] >= 0


def test_confirmed_defects_teach_the_learned_prototypes_with_the_operators_mask_or_the_verdicts_regions():
    """Confirmed defects join the simulated anomalies that fit the prototypes: new defects of their kind stand
    further above the good parts than under the references-only prototypes. A defect without a drawn mask is
    located by the live model's map."""
    import cv2
    import torch

    from inference.model.api import InspectionModel, ModelConfig
    from ingest.simulator import LineSimulator
    from training.learn import defect_mask

    simulator = LineSimulator(products=("disc",), seed=11)
    model = InspectionModel(ModelConfig(device="cpu", n_jitter=4, prototype_views=8, prototype_steps=30))
    model.set_references("disc", simulator.normal_references("disc", 2))
    live = model.states["disc"]
    parts = [simulator.part(200 + i, "disc", defect_type="dent") for i in range(12)]
    goods = [simulator.part(300 + i, "disc", defect_type=None).image for i in range(8)]
    confirmed, fresh = parts[:6], parts[6:]

    drawn = model.prototypes_with("disc", [(p.image, p.mask) for p in confirmed])
    assert not all(torch.equal(a, b) for a, b in zip(drawn, live.prompts, strict=True))
    taught = model.widened("disc", [], prompts=drawn)

    def separation(state) -> float:
        """How far the new defects' median score stands above the good parts' highest (log)."""
        defects = score_with(model, "disc", state, [p.image for p in fresh])
        return float(np.log(np.median(defects)) - np.log(score_with(model, "disc", state, goods).max()))

    assert separation(taught) > separation(live) + 0.05, (separation(taught), separation(live))

    # without a drawn mask, the verdict's regions stand in: they overlap the true defect
    located = defect_mask(model, "disc", confirmed[0].image)
    truth = confirmed[0].mask > 0
    located = cv2.resize(located.astype(np.uint8), truth.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    assert (located & truth).sum() > 0.3 * truth.sum()
    # (learn() takes this path whenever defects are labelled: the closed-loop test above goes through it)

