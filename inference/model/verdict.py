"""From an anomaly map to a verdict, with a threshold nobody types.

The threshold comes from the product's normal references alone. The default rule, `tail`
(`calibrate_tail`), takes the tighter of two estimates of the upper tail of normal scores:

- `reshot` (every k): each reference is shot again with a strong random pose and lighting change (up to
  20 degrees, 12 % shift and scale, 20 % light; not in the memory). Such views score about as a new normal
  part does (on the development categories the mean of 8 of them lies within 0.9-1.6x the median normal
  test score, where the mild re-shots of the older rule lie 1.8-2.8x below it), so
  threshold = 2 x their mean.
- `held-out` (k >= 2): leave-one-out over up to 8 folds, each held-out reference scored against a memory of
  the others, a genuinely unseen normal part; their log-scores are fitted with a normal distribution
  (spread at least 0.2, as a handful of samples under-states it) and the threshold is its 95th percentile.

The result is capped by the first quartile of the scores of 16 simulated anomalies (cut-paste, stains,
scratches: synthetic.py) on the references themselves. Where a product's defects are subtle next to its
normal variation (on transistor, normal parts score about as high as its simulated defects), the normal
estimates would pass most defects; a defect on a known-good part must still be flagged (method `simulated`).

With k >= 2, it is also capped by the `balanced` point: log-normal fits of the held-out scores (normal parts)
and of the simulated anomalies' scores (defects), and the score between them that maximises the balanced
accuracy the two fits predict, never below the normal median + 1 spread. Where simulated defects score far
above normal parts (bottle) the point lies above the tail estimate and changes nothing; where they come
close (transistor), a 95th-percentile threshold passes many defects to spare a few false alarms, and the
point trades them evenly, as balanced accuracy counts them.

The older rule, `margin`, is kept as the benchmark's baseline:

- `held-out` (k >= 8 references): leave-one-out over up to 8 folds, each fold scored against a memory
  of the others; they are genuine unseen normal parts, so threshold = mean + 3 std of their scores.
- `jitter` (1 <= k < 8): too few references to hold any out. Each reference is re-shot with a small
  random pose and lighting change (not in the memory) and scored; a new normal part sits about 2x
  further from the memory than such a re-shot reference, and a further 1.5x covers the tail, so
  threshold = 3 x their mean score.
- `zero-shot` (k = 0, text branch only): the map is an abnormal probability; threshold = 0.5.

Confidence is a logistic in log-score, 0.5 at the threshold and 0.95 at the typical normal score, so
it says how far a score is from the decision in units of the normal variation.

Regions are the connected components of map > the region level, found on the map at model resolution (a
5-20 MP frame costs what a 512 px one does) and scaled to frame pixels, computed only for a frame above the
threshold, so an anomalous frame always has a region and a normal one never does. The level is halfway,
in log-score, between the typical normal part's maximum and the threshold: a pixel belongs to a defect
once it scores above what a normal part reaches almost everywhere, and the region keeps the defect's
shoulders, not only its peak (1-shot bottle: the tighter re-shot threshold cut defects to their hottest
blob, which put 16 % of them in the wrong grid cell; this level, measured on all three development
categories, is never worse than the threshold). Under the `simulated` cap the threshold already lies
below the normal estimates, and is the level.

A region's position is the 3x3 grid cell (AnomalyGPT's words) of its centre, the centre of its
bounding box; the 1 or 2 regions with the largest anomaly mass give the verdict's position words.

Example:
    >>> calibration = calibrate(np.array([0.05, 0.06, 0.05]), method="jitter")
    >>> verdict = make_verdict(anomaly_map, calibration, mm_per_px=0.25, frame_size=(2448, 2048))
    >>> # anomaly_map: (h, w) float32 at model resolution; regions come back in frame pixels
    >>> verdict.is_anomalous, verdict.positions
    (True, ['top left'])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from lineguard.events import POSITIONS, Region


@dataclass
class VerdictConfig:
    rule: str = "tail"               # "tail" (calibrate_tail) or "margin" (the older rule, a baseline)
    reshot_strength: float = 4.0     # tail: re-shot views 4x the pose/lighting change of the margin rule's
    reshot_margin: float = 2.0       # tail: threshold / mean score of the re-shot views
    tail_quantile_z: float = 1.645   # tail: held-out threshold at the 95th percentile of a log-normal fit
    min_log_spread: float = 0.2      # tail: the fit's spread of log-scores is at least this
    simulated_quantile: float | None = 0.25  # tail: the threshold is at most this quantile of the scores of
                                             # simulated anomalies on the references (None: not used)
    balance_floor_z: float | None = 1.0      # tail: the balanced point between normal and simulated-defect scores
                                             # lies at least this many normal spreads above the normal median
                                             # (None: the balanced point is not used)
    balance_min_spread: float = 0.1          # tail: the spread of either log-score fit is at least this
    jitter_margin: float = 3.0       # threshold / mean score of jittered reference views
    held_out_sigmas: float = 3.0     # threshold = mean + 3 std of held-out reference scores
    min_held_out: int = 8            # margin rule: references needed before holding some out (tail: 2)
    normal_sigmas: float = 3.0       # the typical normal score lies this many logistic scales below
    max_positions: int = 2           # as in AnomalyGPT's answers


@dataclass
class Calibration:
    """A product's decision rule, derived from its normal references."""

    threshold: float
    normal_score: float              # typical score of a normal view (< threshold)
    method: str                      # "reshot", "held-out", "simulated", "balanced", "jitter", "zero-shot"
    n_samples: int = 0
    normal_sigmas: float = 3.0

    @property
    def region_level(self) -> float:
        """Map level that outlines a flagged frame's regions (<= threshold; see the module docstring)."""
        if self.method in ("simulated", "zero-shot"):
            return self.threshold
        return min(self.threshold, math.sqrt(max(self.normal_score, 1e-9) * self.threshold))

    def probability(self, score: float) -> float:
        """P(anomalous): logistic in log-score, 0.5 at the threshold, ~0.05 at the normal score."""
        scale = math.log(self.threshold / max(self.normal_score, 1e-6)) / self.normal_sigmas
        z = (math.log(max(score, 1e-9)) - math.log(self.threshold)) / max(scale, 1e-6)
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))

    def confidence(self, score: float) -> float:
        """Confidence in the verdict the threshold gives, in [0.5, 1]."""
        p = self.probability(score)
        return p if score > self.threshold else 1.0 - p


def calibrate(normal_scores: np.ndarray, method: str, config: VerdictConfig | None = None) -> Calibration:
    """Threshold from scores of normal views the memory has not seen (see the module docstring)."""
    config = config or VerdictConfig()
    scores = np.asarray(normal_scores, np.float64)
    if method == "zero-shot":
        return Calibration(threshold=0.5, normal_score=0.5 / config.jitter_margin, method=method,
                           normal_sigmas=config.normal_sigmas)
    if scores.size == 0:
        raise ValueError("calibration needs at least one normal score")
    mean = float(scores.mean())
    if method == "held-out":
        spread = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
        # never below the jitter rule's idea of "normal": a held-out score can't be beaten by re-shooting
        threshold = mean + config.held_out_sigmas * max(spread, 0.1 * mean)
    elif method == "jitter":
        threshold = config.jitter_margin * mean
    else:
        raise ValueError(f"unknown calibration method {method!r}")
    return Calibration(threshold=max(threshold, 1e-6), normal_score=max(mean, 1e-6), method=method,
                       n_samples=int(scores.size), normal_sigmas=config.normal_sigmas)


def calibrate_tail(reshot_scores: np.ndarray, held_out_scores: np.ndarray | None,
                   config: VerdictConfig | None = None, simulated_scores: np.ndarray | None = None) -> Calibration:
    """The `tail` rule: the tighter of the re-shot estimate and, with k >= 2 references, the held-out one,
    capped by a low quantile of simulated anomalies' scores (see the module docstring)."""
    config = config or VerdictConfig()
    reshot = np.asarray(reshot_scores, np.float64)
    if reshot.size == 0:
        raise ValueError("calibration needs at least one re-shot score")
    typical = max(float(reshot.mean()), 1e-6)
    best = Calibration(threshold=max(config.reshot_margin * typical, 2e-6), normal_score=typical, method="reshot",
                       n_samples=int(reshot.size), normal_sigmas=config.normal_sigmas)
    held = np.asarray(held_out_scores if held_out_scores is not None else [], np.float64)
    if held.size >= 2:
        logs = np.log(np.maximum(held, 1e-6))
        spread = max(float(logs.std(ddof=1)), config.min_log_spread)
        median = float(np.exp(np.median(logs)))
        threshold = float(np.exp(np.median(logs) + config.tail_quantile_z * spread))
        if threshold < best.threshold:
            best = Calibration(threshold=threshold, normal_score=median, method="held-out", n_samples=int(held.size),
                               normal_sigmas=config.normal_sigmas)
    simulated = np.asarray(simulated_scores if simulated_scores is not None else [], np.float64)
    if config.simulated_quantile is not None and simulated.size:
        cap = float(np.quantile(simulated, config.simulated_quantile))
        if 1e-6 < cap < best.threshold:
            # the normal estimates sit above most simulated defects: this product's defects are subtle next to
            # its normal variation, and a defect on a known-good part must still be flagged
            best = Calibration(threshold=cap, normal_score=min(best.normal_score, cap / 1.5), method="simulated",
                               n_samples=best.n_samples, normal_sigmas=config.normal_sigmas)
    if config.balance_floor_z is not None and held.size >= 2 and simulated.size >= 2:
        point = balanced_point(held, simulated, config)
        if point < best.threshold:
            best = Calibration(threshold=point, normal_score=min(best.normal_score, float(np.median(held))),
                               method="balanced", n_samples=int(held.size), normal_sigmas=config.normal_sigmas)
    return best


def balanced_point(normal_scores: np.ndarray, defect_scores: np.ndarray, config: VerdictConfig) -> float:
    """The score that best separates two log-normal fits, held-out normal parts and simulated defects on the
    references: it maximises P(normal below) + P(defect above), the balanced accuracy the two fits predict.
    It lies at least `balance_floor_z` normal spreads above the normal median."""
    normal, defect = np.log(np.maximum(normal_scores, 1e-6)), np.log(np.maximum(defect_scores, 1e-6))
    normal_mid, defect_mid = float(np.median(normal)), float(np.median(defect))
    normal_spread = max(float(normal.std(ddof=1)), config.balance_min_spread)
    defect_spread = max(float(defect.std(ddof=1)), config.balance_min_spread)
    low = normal_mid + config.balance_floor_z * normal_spread
    grid = np.linspace(low, max(defect_mid, low), 256)
    cdf = np.frompyfunc(lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0))), 1, 1)
    separated = (cdf((grid - normal_mid) / normal_spread) - cdf((grid - defect_mid) / defect_spread)).astype(float)
    return float(np.exp(grid[int(np.argmax(separated))]))


# --- regions and positions -----------------------------------------------------------------------

def position_word(cx: float, cy: float, width: int, height: int) -> str:
    """The 3x3 grid cell of a point, as AnomalyGPT names it ("top left" ... "bottom right")."""
    col = min(2, max(0, int(3 * cx / width)))
    row = min(2, max(0, int(3 * cy / height)))
    return POSITIONS[row * 3 + col]


def find_regions(anomaly_map: np.ndarray, calibration: Calibration, mm_per_px: float | None = None,
                 frame_size: tuple[int, int] | None = None) -> list[Region]:
    """Connected anomalous regions of an (h, w) map, largest anomaly mass first, in the pixels of a
    frame_size = (W, H) frame (default: the map's own size); mm_per_px is per frame pixel."""
    h, w = anomaly_map.shape
    W, H = frame_size or (w, h)
    sx, sy = W / w, H / h
    level = calibration.region_level
    mask = (anomaly_map > level).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    found = []
    for label in range(1, n):
        x, y, bw, bh, cells = (int(v) for v in stats[label])
        values = anomaly_map[y:y + bh, x:x + bw][labels[y:y + bh, x:x + bw] == label]
        mass = float((values - level).sum())
        # the box's edges, scaled to frame pixels; the area is the region's map cells times a cell's pixels
        x0, y0 = math.floor(x * sx), math.floor(y * sy)
        x1, y1 = min(W, math.ceil((x + bw) * sx)), min(H, math.ceil((y + bh) * sy))
        area = max(1, round(cells * sx * sy))
        region = Region(x=x0, y=y0, w=max(1, x1 - x0), h=max(1, y1 - y0), area_px=area,
                        area_mm2=None if mm_per_px is None else round(area * mm_per_px**2, 4),
                        position=position_word(x + bw / 2, y + bh / 2, w, h), peak_score=round(float(values.max()), 6))
        found.append((mass, region))
    found.sort(key=lambda item: -item[0])
    return [region for _, region in found]


def main_positions(regions: list[Region], limit: int = 2) -> list[str]:
    """Distinct position words of the (at most `limit`) main regions."""
    positions: list[str] = []
    for region in regions[:limit]:
        if region.position not in positions:
            positions.append(region.position)
    return positions


@dataclass
class ModelVerdict:
    """What the model decides about one frame. Field names match `lineguard.events.Verdict`."""

    score: float
    threshold: float
    is_anomalous: bool
    confidence: float
    regions: list[Region] = field(default_factory=list)
    positions: list[str] = field(default_factory=list)

    @property
    def n_anomalies(self) -> int:
        """How many anomalies the answer speaks of: one per main position (AnomalyGPT says 1 or 2)."""
        return len(self.positions) if self.is_anomalous else 0

    def event_fields(self) -> dict:
        """Keyword arguments for `lineguard.events.Verdict` (add frame ids, timestamps, version)."""
        return dict(score=self.score, threshold=self.threshold, is_anomalous=self.is_anomalous,
                    confidence=self.confidence, regions=list(self.regions), positions=list(self.positions))


def make_verdict(anomaly_map: np.ndarray, calibration: Calibration, mm_per_px: float | None = None,
                 config: VerdictConfig | None = None, frame_size: tuple[int, int] | None = None) -> ModelVerdict:
    """(h, w) anomaly map, at model resolution or any other -> ModelVerdict; the score is the map's maximum.
    Regions are in the pixels of a frame_size = (W, H) frame (default: the map's size)."""
    config = config or VerdictConfig()
    score = float(anomaly_map.max())
    is_anomalous = score > calibration.threshold
    regions = find_regions(anomaly_map, calibration, mm_per_px, frame_size) if is_anomalous else []
    return ModelVerdict(score=score, threshold=float(calibration.threshold), is_anomalous=is_anomalous,
                        confidence=float(calibration.confidence(score)), regions=regions,
                        positions=main_positions(regions, config.max_positions))
