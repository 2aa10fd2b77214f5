"""Learning from operators' labels: a candidate state of one product, from its references and labelled frames.

What the labels teach, and how:
- frames labelled **good** join the product's normal memory (bounded by the coreset as always), so that
  kind of normal part stops being flagged;
- frames confirmed **defective** join the simulated anomalies that fit the learned prototypes (encoders
  without a text tower), located by the operator's mask, or else by the live model's map (the verdict's
  regions); each is scored by prototypes fitted without it (cross-fitting), like a new defect of its kind;
- the **threshold** is re-derived from the labelled frames' scores under the candidate memory. A frame
  labelled good is scored by a memory that does not hold it (cross-fitting over `folds`), as a new part
  of its kind would be; a confirmed defect likewise by prototypes that did not learn from it.
  - A confirmed defect at or below the threshold was missed: the threshold falls to just below the lowest
    confirmed defect (`margin`). Defects never raise it: one above the threshold was caught. The lowest of
    a few labelled defects overstates where a product's defects begin (its rarer, fainter kinds are mostly
    not among them), so this is the defects' least optimistic reading.
  - Nor does it stay above the middle (log-score) of the labels' best range of cuts: the automatic
    threshold is on the live memory's scale, and a candidate whose memory learned a new kind of normal
    part scores defects lower too.
  - Frames labelled good join the memory, which is how they stop being flagged. Their cross-fitted scores
    come from part of that memory and so overstate a new good part's, so with defects present they only
    guard: the threshold rises (to the nearest cut between two labelled scores) only where its balanced
    accuracy on the labels falls short of the best cut's by more than `evidence_z` standard errors.
  - With goods only it rises to just above them; with defects only it falls to just below them.
  It never leaves [auto / max_factor, auto * max_factor], so a handful of labels cannot move it anywhere
  absurd, and the evaluation gate judges the rest.

    >>> candidate = learn(model, "bottle", [Labelled(image, is_defect=False), ...])
    >>> candidate.state.calibration.threshold, candidate.method
    (0.21, 'labels')
    >>> scores = score_with(model, "bottle", candidate.state, images)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from inference import metrics
from inference.model.api import InspectionModel, ProductState
from inference.model.verdict import Calibration


@dataclass
class LearnConfig:
    folds: int = 2                   # cross-fitting folds for the scores of frames labelled good
    max_factor: float = 4.0          # the learned threshold stays within [auto / 4, auto * 4]
    max_normals: int = 64            # at most this many frames labelled good join the memory (the newest)
    margin: float = 1.02             # one-class bounds sit this factor beyond the labelled scores
    defect_prototypes: bool = True   # confirmed defects join the simulated anomalies of the learned prototypes
    evidence_z: float = 1.5          # labelled goods raise a threshold set by defects only when its balanced accuracy
                                     # on the labels is this many standard errors below the best cut's


@dataclass
class Labelled:
    """One labelled frame: its pixels (H, W, 3 uint8 BGR, as the worker decodes frames), the operator's
    judgement and, for a defect, the operator's mask when one was drawn (any size: resized to the frame)."""

    image: np.ndarray
    is_defect: bool
    mask: np.ndarray | None = None


@dataclass
class Candidate:
    state: ProductState
    method: str                      # "labels", "labels: good only", "labels: defects only" or "auto"
    auto_threshold: float
    good_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))     # cross-fitted
    defect_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))


@contextlib.contextmanager
def _installed(model: InspectionModel, product: str, state: ProductState):
    """Score with `state` in place of the product's live one, then put the live one back."""
    live = model.states[product]
    model.states[product] = state
    try:
        yield
    finally:
        model.states[product] = live


def score_with(model: InspectionModel, product: str, state: ProductState, images: list[np.ndarray]) -> np.ndarray:
    """Image scores of `images` under a (candidate) state of the product."""
    if not images:
        return np.zeros(0)
    with _installed(model, product, state):
        return np.array([s.verdict.score for s in model.score([(product, image) for image in images])])


def _balanced_accuracy(good: np.ndarray, defect: np.ndarray, cut: float) -> float:
    return float(np.mean(defect > cut) + np.mean(good <= cut)) / 2


def _cuts(good: np.ndarray, defect: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labelled scores, the cuts between consecutive ones (geometric middle, and one beyond each end) and
    each cut's balanced accuracy on the labels."""
    scores = np.unique(np.concatenate([good, defect]))
    cuts = np.concatenate([[scores[0] / 2], np.sqrt(scores[:-1] * scores[1:]), [scores[-1] * 2]])
    return scores, cuts, np.array([_balanced_accuracy(good, defect, cut) for cut in cuts])


def _best_range_middle(good: np.ndarray, defect: np.ndarray) -> float:
    """The middle (log-score) of the range of cuts with the labels' best balanced accuracy, between the labelled
    scores that bound it."""
    scores, cuts, balanced = _cuts(good, defect)
    best = cuts[np.isclose(balanced, balanced.max())]
    low = float(max(scores[scores < best[0]], default=best[0]))
    high = float(min(scores[scores > best[-1]], default=best[-1]))
    return float(np.sqrt(low * high))


def _guarded(threshold: float, good: np.ndarray, defect: np.ndarray, z: float) -> float:
    """`threshold`, or the nearest cut above it whose balanced accuracy on the labels is within `z` standard errors
    of the best cut's. The standard error is a balanced accuracy's at its widest (each class's rate at 1/2), so
    a few labels move nothing."""
    _, cuts, balanced = _cuts(good, defect)
    enough = balanced.max() - z * 0.5 * np.sqrt(0.25 / good.size + 0.25 / defect.size)
    if _balanced_accuracy(good, defect, threshold) >= enough:
        return threshold
    # below the lowest defect every defect is caught, so a better cut can only lie above the threshold
    return float(cuts[(balanced >= enough) & (cuts > threshold)].min())


def choose_threshold(auto: float, good: np.ndarray, defect: np.ndarray,
                     config: LearnConfig | None = None) -> tuple[float, str]:
    """The threshold the labelled scores support, and which rule gave it (see the module docstring)."""
    config = config or LearnConfig()
    good, defect = np.asarray(good, np.float64), np.asarray(defect, np.float64)
    if defect.size:
        threshold, method = min(auto, float(defect.min()) / config.margin), "labels: defects only"
        if good.size:
            threshold = min(threshold, _best_range_middle(good, defect))
            threshold, method = _guarded(threshold, good, defect, config.evidence_z), "labels"
    elif good.size:
        threshold, method = max(auto, float(good.max()) * config.margin), "labels: good only"
    else:
        return auto, "auto"
    return float(np.clip(threshold, auto / config.max_factor, auto * config.max_factor)), method


def defect_mask(model: InspectionModel, product: str, image: np.ndarray) -> np.ndarray:
    """Where the live model sees the defect of a frame confirmed defective without a drawn mask: the verdict's
    regions (the map above the region level), or the map's top 1 % when the frame was not flagged."""
    anomaly_map = model.score([(product, image)])[0].anomaly_map
    mask = anomaly_map > model.states[product].calibration.region_level
    return mask if mask.any() else anomaly_map >= np.quantile(anomaly_map, 0.99)


def _folds(n: int, parts: int, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), min(parts, n)) if n else []


def learn(model: InspectionModel, product: str, labelled: list[Labelled], config: LearnConfig | None = None,
          seed: int = 0) -> Candidate:
    """A candidate state of `product` (the model's live state is left as it is)."""
    config = config or LearnConfig()
    live = model.states[product]
    auto = live.calibration.threshold
    goods = [x.image for x in labelled if not x.is_defect][-config.max_normals:]
    defects = [x for x in labelled if x.is_defect]
    # confirmed defects, with where they are, teach the learned prototypes (encoders without a text tower)
    confirmed = [(x.image, x.mask if x.mask is not None else defect_mask(model, product, x.image))
                 for x in defects] if config.defect_prototypes and model.learns_prototypes else []
    prompts = model.prototypes_with(product, confirmed) if confirmed else None
    good_scores = np.zeros(len(goods))
    for fold in _folds(len(goods), config.folds, seed):
        rest = [goods[i] for i in np.setdiff1d(np.arange(len(goods)), fold)]
        good_scores[fold] = score_with(model, product, model.widened(product, rest, prompts=prompts),
                                       [goods[i] for i in fold])
    state = model.widened(product, goods, prompts=prompts) if goods or confirmed else live
    defect_scores = np.zeros(len(defects))
    if confirmed:   # a confirmed defect is scored by prototypes that did not learn from it
        for fold in _folds(len(defects), config.folds, seed + 1):
            others = [confirmed[i] for i in np.setdiff1d(np.arange(len(defects)), fold)]
            held = model.widened(product, goods, prompts=model.prototypes_with(product, others))
            defect_scores[fold] = score_with(model, product, held, [defects[i].image for i in fold])
    else:
        defect_scores = score_with(model, product, state, [x.image for x in defects])
    threshold, method = choose_threshold(auto, good_scores, defect_scores, config)
    normal = float(np.median(good_scores)) if goods else live.calibration.normal_score * threshold / auto
    calibration = Calibration(threshold=threshold, normal_score=min(max(normal, 1e-6), threshold / 1.2),
                              method=method, n_samples=len(labelled), normal_sigmas=live.calibration.normal_sigmas)
    state = ProductState(state.memory, calibration, state.prompts, state.semantic_offset, state.references,
                         tiling=state.tiling)
    return Candidate(state, method, auto, good_scores, defect_scores)


def verdict_report(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """The automatic verdict's metrics at `threshold`, with the best any threshold reaches and the gap."""
    decided = metrics.verdict_metrics(labels, scores > threshold)
    best = metrics.best_balanced_accuracy(labels, scores)
    return {**decided, "best_balanced_accuracy": best, "threshold_gap": best - decided["balanced_accuracy"]}
