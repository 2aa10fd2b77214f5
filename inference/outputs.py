"""Turn an anomaly map into the images a Heatmap event carries: a bounded PNG and an overlay JPEG."""

from __future__ import annotations

import cv2
import numpy as np

HEATMAP_MAX_SIDE = 128   # per tile side: the map's detail is the encoder's patch grid (40x40 for lite0), smoothed;
                         # 128 px keeps 3 px a patch, with a quarter of a 256 px PNG's pixels to encode
HEATMAP_LIMIT = 512
OVERLAY_MAX_SIDE = 512


def _fit(image: np.ndarray, max_side: int, interpolation=cv2.INTER_AREA) -> np.ndarray:
    height, width = image.shape[:2]
    if max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    return cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                      interpolation=interpolation)


def map_to_u8(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """0..255 covers 0..2x the product's threshold, so 128 is the decision boundary on every product."""
    scale = 127.5 / threshold if threshold > 0 else 255.0
    return np.clip(anomaly_map.astype(np.float32) * scale, 0, 255).astype(np.uint8)


def heatmap_side(tiles_per_side: int = 1) -> int:
    """The longest side of a heatmap PNG: HEATMAP_MAX_SIDE per tile along the frame's longer grid side."""
    return min(HEATMAP_LIMIT, HEATMAP_MAX_SIDE * max(1, tiles_per_side))


def heatmap_png(anomaly_map: np.ndarray, threshold: float, max_side: int = HEATMAP_MAX_SIDE,
                frame_size: tuple[int, int] | None = None) -> bytes:
    """Single-channel 8-bit PNG of the map, in the shape of a frame_size = (W, H) frame (default: the map's)
    shrunk to a longer side of at most max_side."""
    width, height = frame_size or (anomaly_map.shape[1], anomaly_map.shape[0])
    scale = min(1.0, max_side / max(width, height))
    out = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = anomaly_map.astype(np.float32, copy=False)
    if (resized.shape[1], resized.shape[0]) != out:
        shrink = out[0] < resized.shape[1] and out[1] < resized.shape[0]
        resized = cv2.resize(resized, out, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    ok, png = cv2.imencode(".png", map_to_u8(resized, threshold))
    if not ok:
        raise ValueError("PNG encoding failed")
    return png.tobytes()


def overlay_jpeg(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, boxes: list[tuple[int, int, int, int]],
                 quality: int = 85, max_side: int = OVERLAY_MAX_SIDE,
                 frame_size: tuple[int, int] | None = None) -> bytes:
    """The frame with the map blended in (colour where above half the threshold) and region boxes drawn,
    longer side at most max_side. Boxes are in the pixels of a frame_size = (W, H) frame (default: the
    image's size; the image may be a reduced decode of it).

    The frame is shrunk first, so a 20 MP frame costs a 512 px overlay's memory, not 40 bytes a frame pixel."""
    small = _fit(image, max_side)
    width, height = frame_size or (image.shape[1], image.shape[0])
    out_height, out_width = small.shape[:2]
    scale_x, scale_y = out_width / width, out_height / height
    heat = map_to_u8(cv2.resize(anomaly_map.astype(np.float32), (out_width, out_height),
                                interpolation=cv2.INTER_AREA), threshold)
    colour = cv2.applyColorMap(heat, cv2.COLORMAP_JET)
    # colour weight: 0 below half the threshold (64), rising to 0.55 at the threshold (128) and above
    weight = cv2.convertScaleAbs(heat, alpha=1.0, beta=-64.0).astype(np.float32)
    np.minimum(weight, 64.0, out=weight)
    weight *= 0.55 / 64
    if small.ndim == 2:
        small = cv2.cvtColor(small, cv2.COLOR_GRAY2BGR)
    blended = cv2.blendLinear(small, colour, 1.0 - weight, weight)
    for x, y, w, h in boxes:
        top_left = (int(x * scale_x), int(y * scale_y))
        bottom_right = (max(top_left[0], round((x + w) * scale_x) - 1), max(top_left[1], round((y + h) * scale_y) - 1))
        cv2.rectangle(blended, top_left, bottom_right, (0, 0, 255), max(1, round(max(out_height, out_width) / 256)))
    ok, jpeg = cv2.imencode(".jpg", blended, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return jpeg.tobytes()
