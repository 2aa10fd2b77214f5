"""A compact descriptor of a flagged frame's defect, for the similar-parts search of the dialogue service.

The encoder's patch features of the memory stages are pooled over the frame's main anomalous region
(the connected component of map > threshold with the largest anomaly mass, each patch weighted by how far
it exceeds the threshold), L2-normalised per stage, concatenated, folded to at most 256 values and stored
as float16: 512 bytes that travel on the Verdict (`Verdict.descriptor`, base64 in JSON). Two defects that
look alike have a high cosine similarity whatever their position in the frame.

Example:
    >>> vector = defect_descriptor([s[i] for s in out.patch_features], map_s, threshold=0.2, stages=(1, 2))
    >>> vector.dtype, vector.shape            # lite0: 40 + 112 channels
    (dtype('float16'), (152,))
    >>> from_bytes(to_bytes(vector)).shape
    (152,)
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MAX_DIMS = 256


def main_region_weights(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """(S, S) map -> (S, S) float32 weights: the excess over the threshold inside the region with the largest
    anomaly mass; a one-hot at the map's maximum when nothing exceeds the threshold."""
    excess = np.maximum(anomaly_map.astype(np.float32) - threshold, 0.0)
    mask = (excess > 0).astype(np.uint8)
    n, labels = cv2.connectedComponents(mask, connectivity=8)
    if n <= 1:
        weights = np.zeros_like(excess)
        weights.flat[int(np.argmax(anomaly_map))] = 1.0
        return weights
    masses = np.bincount(labels.ravel(), weights=excess.ravel(), minlength=n)
    masses[0] = 0.0
    return np.where(labels == int(np.argmax(masses)), excess, 0.0).astype(np.float32)


@torch.inference_mode()
def defect_descriptor(stages: list[torch.Tensor], anomaly_map: np.ndarray, threshold: float,
                      stage_ids: tuple[int, ...]) -> np.ndarray:
    """One frame's stage features [(C_s, h_s, w_s)] + its (S, S) anomaly map -> (≤256,) float16, unit norm."""
    weights = main_region_weights(anomaly_map, threshold)                   # (S, S)
    pooled = []
    for s in stage_ids:
        features = stages[s].float()                                        # (C, h, w)
        C, h, w = features.shape
        cell = cv2.resize(weights, (w, h), interpolation=cv2.INTER_AREA)     # (h, w)
        if cell.sum() <= 0:                                                 # a region smaller than a patch
            cell = np.zeros((h, w), np.float32)
            y, x = np.unravel_index(int(np.argmax(weights)), weights.shape)
            cell[min(h - 1, y * h // weights.shape[0]), min(w - 1, x * w // weights.shape[1])] = 1.0
        cell_t = torch.from_numpy(cell / cell.sum()).to(features.device)
        vector = (features * cell_t).sum(dim=(1, 2))                         # (C,)
        pooled.append(F.normalize(vector, dim=0))
    vector = torch.cat(pooled)                                              # (sum C,)
    if vector.numel() > MAX_DIMS:                                           # ViT: 4 x 1024 -> 256 by averaging
        vector = F.adaptive_avg_pool1d(vector[None, None], MAX_DIMS)[0, 0]
    vector = F.normalize(vector, dim=0)
    return vector.cpu().numpy().astype(np.float16)


def to_bytes(vector: np.ndarray) -> bytes:
    """float16 little-endian bytes (what `Verdict.descriptor` carries)."""
    return np.asarray(vector, dtype="<f2").tobytes()


def from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f2")
