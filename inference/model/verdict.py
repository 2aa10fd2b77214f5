"""From an anomaly map to a verdict, with a threshold nobody types.

The threshold comes from the product's normal references alone (`calibrate`):

- `held-out` (k >= 8 references): leave-one-out over up to 8 folds, each fold scored against a memory
  of the others; they are genuine unseen normal parts, so threshold = mean + 3 std of their scores.
- `jitter` (1 <= k < 8): too few references to hold any out. Each reference is re-shot with a small
  random pose and lighting change (not in the memory) and scored; a new normal part sits about 2x
  further from the memory than such a re-shot reference, and a further 1.5x covers the tail, so
  threshold = 3 x their mean score.
- `zero-shot` (k = 0, text branch only): the map is an abnormal probability; threshold = 0.5.

Confidence is a logistic in log-score, 0.5 at the threshold and 0.95 at the typical normal score, so
it says how far a score is from the decision in units of the normal variation.

Regions are the connected components of map > threshold: a pixel is anomalous when it scores higher
than normal images score anywhere, so an anomalous frame always has a region and a normal one never
does. A region's position is the 3x3 grid cell (AnomalyGPT's words) of its centre, the centre of its
bounding box; the 1 or 2 regions with the largest anomaly mass give the verdict's position words.

Example:
    >>> calibration = calibrate(np.array([0.05, 0.06, 0.05]), method="jitter")
    >>> verdict = make_verdict(anomaly_map, calibration, mm_per_px=0.25)   # anomaly_map: (H, W) float32
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
    jitter_margin: float = 3.0       # threshold / mean score of jittered reference views
    held_out_sigmas: float = 3.0     # threshold = mean + 3 std of held-out reference scores
    min_held_out: int = 8            # references needed before holding some out
    normal_sigmas: float = 3.0       # the typical normal score lies this many logistic scales below
    max_positions: int = 2           # as in AnomalyGPT's answers


@dataclass
class Calibration:
    """A product's decision rule, derived from its normal references."""

    threshold: float
    normal_score: float              # typical score of a normal view (< threshold)
    method: str                      # "jitter", "held-out" or "zero-shot"
    n_samples: int = 0
    normal_sigmas: float = 3.0

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


# --- regions and positions -----------------------------------------------------------------------

def position_word(cx: float, cy: float, width: int, height: int) -> str:
    """The 3x3 grid cell of a point, as AnomalyGPT names it ("top left" ... "bottom right")."""
    col = min(2, max(0, int(3 * cx / width)))
    row = min(2, max(0, int(3 * cy / height)))
    return POSITIONS[row * 3 + col]


def find_regions(anomaly_map: np.ndarray, calibration: Calibration,
                 mm_per_px: float | None = None) -> list[Region]:
    """Connected anomalous regions of an (H, W) map, largest anomaly mass first."""
    H, W = anomaly_map.shape
    threshold = calibration.threshold
    mask = (anomaly_map > threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    found = []
    for label in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[label])
        values = anomaly_map[y:y + h, x:x + w][labels[y:y + h, x:x + w] == label]
        mass = float((values - threshold).sum())
        region = Region(x=x, y=y, w=w, h=h, area_px=area,
                        area_mm2=None if mm_per_px is None else round(area * mm_per_px**2, 4),
                        position=position_word(x + w / 2, y + h / 2, W, H), peak_score=round(float(values.max()), 6))
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
                 config: VerdictConfig | None = None) -> ModelVerdict:
    """(H, W) anomaly map at frame resolution -> ModelVerdict; the score is the map's maximum."""
    config = config or VerdictConfig()
    score = float(anomaly_map.max())
    is_anomalous = score > calibration.threshold
    regions = find_regions(anomaly_map, calibration, mm_per_px) if is_anomalous else []
    return ModelVerdict(score=score, threshold=float(calibration.threshold), is_anomalous=is_anomalous,
                        confidence=float(calibration.confidence(score)), regions=regions,
                        positions=main_positions(regions, config.max_positions))
