"""Inspect a frame in tiles, for products whose defects are small next to the frame.

The encoder sees a square of `image_size` px (320 for lite0), so a 2048 px frame is shrunk 6.4x and a
defect a few pixels wide disappears. A product set to `Tiling(cols=3, rows=3)` is cut into a 3x3 grid of
overlapping crops; each crop is one view at model resolution, scored in the same batch as other frames,
and the crops' maps are stitched back into one map of the whole frame (overlaps averaged). References are
cut the same way, so the memory holds tiles and the threshold is derived from tile views as for whole
frames.

    >>> tiling = Tiling.parse("2x2")              # cols x rows, overlap 1/8 of a tile by default
    >>> crops = tiling.split(image)               # 4 crops, row by row
    >>> whole = tiling.stitch(maps, image.shape[1], image.shape[0])   # (h, w) map of the whole frame
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import cv2
import numpy as np

MAX_TILES = 64


@dataclass(frozen=True)
class Tiling:
    cols: int = 1
    rows: int = 1
    overlap: float = 0.125     # fraction of a tile shared with its neighbour

    def __post_init__(self):
        if not (self.cols >= 1 and self.rows >= 1 and self.cols * self.rows <= MAX_TILES):
            raise ValueError(f"tiles must be between 1x1 and {MAX_TILES} tiles in all, got {self.cols}x{self.rows}")
        if not 0.0 <= self.overlap < 0.5:
            raise ValueError(f"tile overlap must be in [0, 0.5), got {self.overlap}")

    @classmethod
    def parse(cls, text: str, overlap: float = 0.125) -> Tiling:
        """'3x2' (cols x rows) -> Tiling; raises ValueError naming the expected form."""
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
        if not match:
            raise ValueError(f"tiles must look like COLSxROWS, such as 2x2, got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)), overlap)

    def __str__(self) -> str:
        return f"{self.cols}x{self.rows}"

    @property
    def count(self) -> int:
        return self.cols * self.rows

    @property
    def active(self) -> bool:
        return self.count > 1

    def needed_pixels(self, side: int) -> tuple[int, int]:
        """(width, height) a frame needs so that every tile still has `side` px: what a reduced decode keeps."""
        return (round(side * (self.cols - (self.cols - 1) * self.overlap)),
                round(side * (self.rows - (self.rows - 1) * self.overlap)))

    def boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """The tiles of a width x height frame as (x0, y0, x1, y1), row by row; they cover the frame."""
        def spans(length: int, n: int) -> list[tuple[int, int]]:
            if n == 1:
                return [(0, length)]
            size = length / (n - (n - 1) * self.overlap)
            step = size * (1 - self.overlap)
            return [(round(i * step), min(length, round(i * step + size))) for i in range(n - 1)] + \
                   [(max(0, length - round(size)), length)]
        return [(x0, y0, x1, y1) for y0, y1 in spans(height, self.rows) for x0, x1 in spans(width, self.cols)]

    def split(self, image: np.ndarray) -> list[np.ndarray]:
        """The crops of a frame (views, not copies), row by row."""
        height, width = image.shape[:2]
        return [image[y0:y1, x0:x1] for x0, y0, x1, y1 in self.boxes(width, height)]

    def stitch(self, maps: np.ndarray, width: int, height: int) -> np.ndarray:
        """(count, S, S) tile maps of a width x height frame -> one (h, w) map at the tiles' model resolution
        (each tile keeps its S x S cells), overlaps averaged."""
        boxes = self.boxes(width, height)
        side = maps.shape[-1]
        tile_w, tile_h = boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1]
        sx, sy = side / max(tile_w, 1), side / max(tile_h, 1)
        out_w, out_h = max(1, round(width * sx)), max(1, round(height * sy))
        total = np.zeros((out_h, out_w), np.float32)
        weight = np.zeros((out_h, out_w), np.float32)
        for tile_map, (x0, y0, x1, y1) in zip(maps, boxes, strict=True):
            ox0, oy0 = round(x0 * sx), round(y0 * sy)
            ox1, oy1 = min(out_w, max(ox0 + 1, round(x1 * sx))), min(out_h, max(oy0 + 1, round(y1 * sy)))
            part = tile_map if tile_map.shape == (oy1 - oy0, ox1 - ox0) else \
                cv2.resize(tile_map, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_LINEAR)
            total[oy0:oy1, ox0:ox1] += part
            weight[oy0:oy1, ox0:ox1] += 1.0
        return total / np.maximum(weight, 1.0)


NO_TILES = Tiling()
