"""Simulated anomalies on normal images, the training data of the learned prototypes.

AnomalyGPT trains its decoder on normal images with pasted-in anomalies (NSA-style). Here the same idea
teaches a CNN encoder's `PrototypeBranch` what "abnormal" looks like in its feature space, per product,
from that product's references alone: no defect image is ever needed.

Three kinds, each with the mask of the pixels it changed:
- `cut-paste`: a patch of the same image, rotated and re-lit, pasted elsewhere (misplaced structure);
- `blob`: an irregular stain, darker or brighter, with a textured fill (contamination, dent);
- `scratch`: a thin polyline in a contrasting tone.

Example:
    >>> image, mask = simulate_anomaly(good_rgb, np.random.default_rng(0))  # (S, S, 3) uint8, (S, S) bool
"""

from __future__ import annotations

import cv2
import numpy as np

KINDS = ("cut-paste", "blob", "scratch")


def simulate_anomaly(image: np.ndarray, rng: np.random.Generator, kind: str | None = None,
                     min_change: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """(S, S, 3) uint8 -> (anomalous copy, mask (S, S) bool of the pixels that visibly changed)."""
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    if kind not in KINDS:
        raise ValueError(f"unknown anomaly kind {kind!r}: {', '.join(KINDS)}")
    H, W = image.shape[:2]
    out = image.astype(np.float32)
    region = np.zeros((H, W), np.float32)
    side = min(H, W)
    if kind == "cut-paste":
        h, w = (rng.uniform(0.08, 0.22, 2) * side).astype(int) + 4
        y0, x0 = rng.integers(0, H - h), rng.integers(0, W - w)
        y1, x1 = rng.integers(0, H - h), rng.integers(0, W - w)
        patch = image[y0:y0 + h, x0:x0 + w].astype(np.float32)
        patch = np.rot90(patch, int(rng.integers(1, 4)))
        patch = cv2.resize(np.ascontiguousarray(patch), (w, h)) * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30)
        out[y1:y1 + h, x1:x1 + w] = patch
        region[y1:y1 + h, x1:x1 + w] = 1.0
    elif kind == "blob":
        centre = rng.uniform(0.15, 0.85, 2) * (W, H)
        radius = rng.uniform(0.03, 0.12) * side
        angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        radii = radius * rng.uniform(0.6, 1.4, len(angles))
        points = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
        cv2.fillPoly(region, [points.astype(np.int32)], 1.0)
        region = cv2.GaussianBlur(region, (0, 0), max(1.0, radius / 6))
        texture = cv2.resize(rng.uniform(-1, 1, (8, 8)).astype(np.float32), (W, H), interpolation=cv2.INTER_CUBIC)
        tone = rng.choice([-1.0, 1.0]) * rng.uniform(50, 110) + 25 * texture
        out = out + (region * tone)[..., None] * rng.uniform(0.7, 1.0, 3)
    else:  # scratch
        start = rng.uniform(0.1, 0.9, 2) * (W, H)
        points = [start]
        for _ in range(int(rng.integers(2, 5))):
            step = rng.uniform(-0.15, 0.15, 2) * side
            points.append(np.clip(points[-1] + step, 0, (W - 1, H - 1)))
        cv2.polylines(region, [np.array(points, np.int32)], False, 1.0,
                      thickness=max(2, int(rng.uniform(0.008, 0.02) * side)))
        base = out[region > 0].mean() if region.any() else 128.0
        tone = 40.0 if base > 128 else 215.0
        out = out * (1 - region[..., None]) + tone * region[..., None]
    anomalous = np.clip(out, 0, 255).astype(np.uint8)
    changed = np.abs(anomalous.astype(np.int16) - image.astype(np.int16)).max(axis=-1) >= min_change
    return anomalous, changed & (region > 0.05)


def simulate_batch(images: list[np.ndarray], n: int, rng: np.random.Generator,
                   min_area: float = 0.002) -> tuple[np.ndarray, np.ndarray]:
    """n anomalous views cycled over the images -> ((n, S, S, 3) uint8, (n, S, S) bool); each view's
    mask covers at least `min_area` of the frame (a paste onto identical pixels changes nothing)."""
    views, masks = [], []
    attempts = 0
    while len(views) < n:
        image = images[len(views) % len(images)]
        view, mask = simulate_anomaly(image, rng)
        attempts += 1
        if mask.mean() >= min_area or attempts > 20 * n:
            views.append(view)
            masks.append(mask)
    return np.stack(views), np.stack(masks)
