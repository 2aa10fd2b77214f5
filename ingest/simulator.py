"""A synthetic production line: parts on a conveyor, some with injected defects.

Every part is a pure function of (seed, index): `part(i)` can be rendered in any order and
always gives the same pixels. Three independent random streams are drawn per part, so that
the same base part can be rendered with or without its defect:

- base:     pose jitter, belt position, brightness, sensor-noise offset (never the defect)
- decision: whether a "random" part is defective, and which type
- defect:   the defect's geometry and colour

so `part(i, defect_type=None)` is exactly `part(i, defect_type="scratch")` minus the scratch,
and `part(i)` equals `part(i, defect_type=t)` for whatever t the decision stream picked.

The heavy lifting (part templates, belt texture, a noise bank) is done once per (product,
size) and cached; a part is then one affine warp, a composite and the defect, about 1 ms
at 256 px.

Example:
    >>> sim = LineSimulator(defect_rate=0.5, seed=7)
    >>> p = sim.part(3, product="disc", defect_type="dent")
    >>> p.image.shape, p.mask.dtype, p.defect_type, bool(p.mask.any())
    ((256, 256, 3), dtype('uint8'), 'dent', True)
    >>> good = sim.part(3, product="disc", defect_type=None)
    >>> bool(good.mask.any())
    False
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import cv2
import numpy as np

PRODUCTS = ("disc", "tile")
DEFECT_TYPES = ("scratch", "dent", "missing_piece", "contamination")

# random stream tags, the third word of each part's seed
_BASE, _DECISION, _DEFECT, _REFERENCE = 0, 1, 2, 3
# a pixel belongs to the ground-truth mask when a defect changed it by more than this (0..255)
MASK_THRESHOLD = 12.0
# field of view of the simulated camera, so a `size` px frame is this many mm wide
FIELD_OF_VIEW_MM = 64.0
_LIGHT = np.array([-0.7071, -0.7071], np.float32)  # light comes from the top left (x, y)


@dataclass(frozen=True)
class SimulatedPart:
    image: np.ndarray         # (H, W, 3) uint8, BGR
    mask: np.ndarray          # (H, W) uint8, 255 where the defect changed the image, else 0
    product: str
    defect_type: str | None   # None when good


@dataclass(frozen=True)
class _Pose:
    """Where the template landed in the frame, for defects that need the part's outline."""

    matrix: np.ndarray        # (2, 3) template -> frame affine
    product: str
    size: int


class LineSimulator:
    """Renders an endless, reproducible stream of parts, a fraction of them defective.

    Args:
        products: product kinds, cycled by index (`PRODUCTS` lists the known ones).
        defect_rate: probability that a part rendered with defect_type="random" is defective.
        size: frame side in pixels (frames are square).
        seed: the line's seed; with the index it fixes every pixel.
        defect_types: the defect kinds a random defective part is drawn from, uniformly.
    """

    def __init__(self, products: Sequence[str] = PRODUCTS, defect_rate: float = 0.2, size: int = 256,
                 seed: int = 0, defect_types: Sequence[str] = DEFECT_TYPES):
        self.products = tuple(products)
        self.defect_types = tuple(defect_types)
        for name in self.products:
            _check(name, PRODUCTS, "product")
        for name in self.defect_types:
            _check(name, DEFECT_TYPES, "defect type")
        if not self.products:
            raise ValueError("products must not be empty")
        if not 0.0 <= defect_rate <= 1.0:
            raise ValueError(f"defect_rate must be in [0, 1], got {defect_rate}")
        if defect_rate > 0 and not self.defect_types:
            raise ValueError("defect_types must not be empty when defect_rate > 0")
        if size < 32:
            raise ValueError(f"size must be at least 32, got {size}")
        self.defect_rate = float(defect_rate)
        self.size = int(size)
        self.seed = int(seed)

    @property
    def mm_per_px(self) -> float:
        return FIELD_OF_VIEW_MM / self.size

    def part(self, index: int, product: str | None = None,
             defect_type: str | None | Literal["random"] = "random") -> SimulatedPart:
        """Part number `index`; `product` None cycles `products`, `defect_type` None renders it good."""
        product = self.products[index % len(self.products)] if product is None else product
        _check(product, PRODUCTS, "product")
        if defect_type == "random":
            decision = self._rng(index, _DECISION)
            defective = decision.random() < self.defect_rate
            defect_type = self.defect_types[decision.integers(len(self.defect_types))] if defective else None
        elif defect_type is not None:
            _check(defect_type, DEFECT_TYPES, "defect type")
        return self._render(product, self._rng(index, _BASE), defect_type, self._rng(index, _DEFECT))

    def __iter__(self) -> Iterator[SimulatedPart]:
        index = 0
        while True:
            yield self.part(index)
            index += 1

    def normal_references(self, product: str, k: int) -> list[np.ndarray]:
        """k good images of `product`, drawn from a stream disjoint from the line's parts."""
        _check(product, PRODUCTS, "product")
        product_code = PRODUCTS.index(product)
        return [self._render(product, self._rng(j, _REFERENCE, product_code), None, None).image
                for j in range(k)]

    def _rng(self, index: int, *stream: int) -> np.random.Generator:
        words = [self.seed % 2**64, index % 2**64, *stream]
        return np.random.default_rng(np.random.SeedSequence(words))

    def _render(self, product: str, base_rng: np.random.Generator, defect_type: str | None,
                defect_rng: np.random.Generator | None) -> SimulatedPart:
        S = self.size
        template = _template(product, S)
        belt, noise_bank = _belt(S), _noise_bank(S)

        # base randomness, drawn in a fixed order whatever the defect is
        shift = S / 64 * 4
        dx, dy = base_rng.uniform(-shift, shift, 2)
        angle = base_rng.uniform(-4.0, 4.0)
        gain = base_rng.uniform(0.94, 1.06)
        belt_row = int(base_rng.integers(0, belt.shape[0] - S))
        noise_y, noise_x = base_rng.integers(0, noise_bank.shape[0] - S, 2)

        center = ((S - 1) / 2, (S - 1) / 2)
        matrix = cv2.getRotationMatrix2D(center, angle, 1.0)
        matrix[:, 2] += (dx, dy)
        color, alpha, shadow = _warp(template, matrix)  # (S, S, 3), (S, S), (S, S)
        background = cv2.multiply(belt[belt_row:belt_row + S], cv2.merge([1.0 - shadow] * 3))
        composite = cv2.add(background, cv2.multiply(cv2.subtract(color, background), cv2.merge([alpha] * 3)))
        mask = np.zeros((S, S), np.uint8)
        if defect_type is not None:
            pose = _Pose(matrix, product, S)
            for _ in range(8):  # a defect that happened to change nothing visible is drawn again
                y0, y1, x0, x1 = _DEFECTS[defect_type](defect_rng, color, alpha, pose)  # edits in place
                box = slice(y0, y1), slice(x0, x1)
                defective = _composite(background[box], color[box], alpha[box])
                changed = np.abs(defective - composite[box]).max(axis=2) > MASK_THRESHOLD
                if changed.any():
                    composite[box] = defective
                    mask[box] = changed.astype(np.uint8) * 255
                    break
                color, alpha, _ = _warp(template, matrix)

        noise = noise_bank[noise_y:noise_y + S, noise_x:noise_x + S]
        image = cv2.convertScaleAbs(cv2.scaleAdd(composite, gain, noise))  # saturating cast to uint8
        return SimulatedPart(image=image, mask=mask, product=product, defect_type=defect_type)


def _warp(template: tuple[np.ndarray, np.ndarray], matrix: np.ndarray) -> tuple[np.ndarray, ...]:
    """The template moved into the frame: color (S, S, 3), alpha (S, S) and shadow (S, S)."""
    template_color, template_alpha_shadow = template
    S = template_color.shape[0]
    color = cv2.warpAffine(template_color, matrix, (S, S), flags=cv2.INTER_LINEAR)
    alpha, shadow = cv2.split(cv2.warpAffine(template_alpha_shadow, matrix, (S, S), flags=cv2.INTER_LINEAR))
    return color, alpha, shadow


def _check(name: str, known: Sequence[str], what: str) -> None:
    if name not in known:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(known)}")


def _composite(background: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return background + alpha[..., None] * (color - background)


# ---------------------------------------------------------------------------------------------
# templates: rendered once per (product, size), float32 0..255


def _grid(S: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:S, 0:S].astype(np.float32)
    return x, y


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, float]) -> np.ndarray:
    """Zero-mean, unit-std blurred noise; sigma = (x, y) so it can be streaky."""
    noise = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma[0], sigmaY=sigma[1])
    return noise / (noise.std() + 1e-6)


def _edge(distance: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (px, positive inside)."""
    return np.clip(distance + 0.5, 0.0, 1.0)


@lru_cache(maxsize=16)
def _template(product: str, S: int) -> tuple[np.ndarray, np.ndarray]:
    """A good part, centred and upright: (S, S, 3) BGR and (S, S, 2) alpha + cast shadow on the belt."""
    template = _disc(S) if product == "disc" else _tile(S)
    alpha = template[..., 3]
    shadow = cv2.GaussianBlur(np.roll(alpha, (S // 80 + 1, S // 80 + 1), axis=(0, 1)), (0, 0), S / 70)
    shadow = 0.45 * shadow * (1.0 - alpha)
    color = np.ascontiguousarray(template[..., :3], np.float32)
    alpha_shadow = np.dstack([alpha, shadow]).astype(np.float32)
    color.setflags(write=False)
    alpha_shadow.setflags(write=False)
    return color, alpha_shadow


def _disc(S: int) -> np.ndarray:
    """A turned steel flange: bore, hub groove, six bolt holes, bevelled rim."""
    rng = np.random.default_rng(1001)
    x, y = _grid(S)
    c = (S - 1) / 2
    dx, dy = x - c, y - c
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    lit = np.cos(theta - np.arctan2(_LIGHT[1], _LIGHT[0]))  # +1 on the side facing the light
    outer, bore, hub = 0.40 * S, 0.12 * S, 0.20 * S
    bevel = 0.035 * S

    value = np.full((S, S), 150.0, np.float32)
    value += 5.0 * np.sin(2 * np.pi * r / (0.011 * S)) + 4.0 * np.sin(2 * np.pi * r / (0.07 * S))  # lathe rings
    value += 20.0 * np.cos(2 * (theta - 0.5)) * np.clip((r - bore) / (0.1 * S), 0, 1)  # anisotropic sheen
    value += 14.0 * (dx * _LIGHT[0] + dy * _LIGHT[1]) / outer  # brighter towards the light
    value += 3.0 * _smooth_noise(rng, (S, S), (S / 60, S / 60))
    rim = np.clip((r - (outer - bevel)) / bevel, 0, 1)
    value += rim * 45.0 * lit - rim * 10.0
    bore_bevel = np.clip(1 - (r - bore) / (0.025 * S), 0, 1) * (r >= bore)
    value += bore_bevel * 40.0 * -lit
    value += np.where(r < hub, 10.0, 0.0)                     # the hub face is finished differently
    value -= 45.0 * np.clip(1.2 - np.abs(r - hub), 0, 1)        # groove between hub and flange

    alpha = _edge(outer - r) * _edge(r - bore)
    bolt_circle, hole = 0.29 * S, 0.034 * S
    for k in range(6):
        hx, hy = c + bolt_circle * np.cos(k * np.pi / 3), c + bolt_circle * np.sin(k * np.pi / 3)
        d = np.hypot(x - hx, y - hy)
        alpha *= _edge(d - hole)
        chamfer = np.clip(1 - (d - hole) / (0.015 * S), 0, 1) * (d >= hole)
        hole_lit = np.cos(np.arctan2(y - hy, x - hx) - np.arctan2(_LIGHT[1], _LIGHT[0]))
        value += chamfer * (35.0 * -hole_lit - 10.0)

    tint = np.array([1.03, 1.0, 0.95], np.float32)  # cool steel, BGR
    color = np.clip(value[..., None] * tint, 0, 255)
    return np.dstack([color, alpha]).astype(np.float32)


def _tile(S: int) -> np.ndarray:
    """A square of woven fabric-like material with a bevelled edge, filling most of the frame."""
    rng = np.random.default_rng(1002)
    x, y = _grid(S)
    c = (S - 1) / 2
    half = 0.42 * S
    period = S / 32
    u, v = x / period, y / period
    over = (np.floor(u) + np.floor(v)) % 2 == 0
    across = np.sin(np.pi * (v - np.floor(v))) ** 0.6   # profile of a horizontal thread
    along = np.sin(np.pi * (u - np.floor(u))) ** 0.6    # profile of a vertical thread
    weave = np.where(over, across, along)
    fibres = np.where(over, _smooth_noise(rng, (S, S), (3.0, 0.4)), _smooth_noise(rng, (S, S), (0.4, 3.0)))
    value = 0.55 + 0.45 * weave + 0.06 * fibres + 0.04 * _smooth_noise(rng, (S, S), (S / 16, S / 16))

    # bevelled edge, lit from the top left
    inset = np.minimum(half - np.abs(x - c), half - np.abs(y - c))  # distance to the nearest edge
    bevel_width = 0.02 * S
    bevel = np.clip(1 - inset / bevel_width, 0, 1)
    left_or_top = np.where(np.abs(x - c) > np.abs(y - c), x < c, y < c)
    value = value * (1 - 0.35 * bevel) + bevel * np.where(left_or_top, 0.55, -0.05)

    base = np.array([105.0, 150.0, 185.0], np.float32)  # tan, BGR
    color = np.clip(value[..., None] * base, 0, 255)
    alpha = _edge(inset)
    return np.dstack([color, alpha]).astype(np.float32)


@lru_cache(maxsize=8)
def _belt(S: int) -> np.ndarray:
    """(2S, S, 3) conveyor belt texture; each part sees a window at a random row."""
    rng = np.random.default_rng(1003)
    rows = 2 * S
    y = np.arange(rows, dtype=np.float32)[:, None]
    value = 50.0 + 2.5 * np.sin(2 * np.pi * y / 5.0) + 4.0 * _smooth_noise(rng, (rows, S), (1.0, 1.0))
    value += 3.0 * _smooth_noise(rng, (rows, S), (S / 10, S / 10))
    belt = np.clip(value[..., None] * np.array([0.98, 1.0, 0.94], np.float32), 0, 255).astype(np.float32)
    belt.setflags(write=False)
    return belt


@lru_cache(maxsize=8)
def _noise_bank(S: int) -> np.ndarray:
    """(S + S/4, S + S/4, 3) Gaussian sensor noise; each part takes a window at a random offset."""
    side = S + S // 4
    noise = np.random.default_rng(1004).normal(0.0, 2.0, (side, side, 3)).astype(np.float32)
    noise.setflags(write=False)
    return noise


# ---------------------------------------------------------------------------------------------
# defects: each edits a copy of the warped part (color (S, S, 3), alpha (S, S)) in place


def _point_on_part(rng: np.random.Generator, alpha: np.ndarray) -> tuple[float, float]:
    inside = np.flatnonzero(alpha > 0.99)
    index = inside[rng.integers(len(inside))]
    y, x = divmod(int(index), alpha.shape[1])
    return x + rng.uniform(-0.5, 0.5), y + rng.uniform(-0.5, 0.5)


def _point_on_outline(rng: np.random.Generator, pose: _Pose) -> tuple[float, float, float]:
    """A point on the part's outer edge, in frame coordinates, and the outward normal's angle."""
    S = pose.size
    c = (S - 1) / 2
    if pose.product == "disc":
        phi = rng.uniform(0, 2 * np.pi)
        point = (c + 0.40 * S * np.cos(phi), c + 0.40 * S * np.sin(phi))
        normal = phi
    else:
        half = 0.42 * S
        if rng.random() < 0.4:  # a broken corner
            sx, sy = rng.choice([-1.0, 1.0], 2)
            point, normal = (c + sx * half, c + sy * half), np.arctan2(sy, sx)
        else:                   # a chip anywhere along an edge
            side, along = int(rng.integers(4)), rng.uniform(-1, 1) * half
            normal = side * np.pi / 2
            point = (c + half * np.cos(normal) + along * np.sin(normal),
                     c + half * np.sin(normal) + along * np.cos(normal))
    x, y = pose.matrix @ np.array([point[0], point[1], 1.0])
    rotation = np.arctan2(pose.matrix[1, 0], pose.matrix[0, 0])
    return float(x), float(y), float(normal + rotation)


Box = tuple[int, int, int, int]  # y0, y1, x0, x1: the pixels a defect may have changed


def _box(cx: float, cy: float, radius: float, S: int) -> Box:
    return (max(int(cy - radius), 0), min(int(cy + radius) + 2, S),
            max(int(cx - radius), 0), min(int(cx + radius) + 2, S))


def _scratch(rng: np.random.Generator, color: np.ndarray, alpha: np.ndarray, pose: _Pose) -> Box:
    """A thin bright or dark line, straight or gently curved, anywhere on the part."""
    S = pose.size
    x0, y0 = _point_on_part(rng, alpha)
    heading = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.20, 0.45) * S
    bend = rng.uniform(-0.25, 0.25) * length
    end = np.array([x0 + length * np.cos(heading), y0 + length * np.sin(heading)])
    start = np.array([x0, y0])
    control = (start + end) / 2 + bend * np.array([-np.sin(heading), np.cos(heading)])
    t = np.linspace(0, 1, 32)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end  # quadratic Bezier, (32, 2)
    thickness = 3 if rng.random() < 0.6 else 4
    delta = rng.uniform(100, 140) if rng.random() < 0.6 else -rng.uniform(90, 120)

    (left, top), (right, bottom) = curve.min(axis=0), curve.max(axis=0)
    y0, y1 = max(int(top) - 4, 0), min(int(bottom) + 5, S)
    x0, x1 = max(int(left) - 4, 0), min(int(right) + 5, S)
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    points = np.round((curve - (x0, y0)) * 16).astype(np.int32)
    cv2.polylines(canvas, [points], False, 255, thickness, cv2.LINE_AA, shift=4)
    stroke = canvas.astype(np.float32) * (alpha[y0:y1, x0:x1] / 255.0)
    patch = color[y0:y1, x0:x1]
    patch += (delta * stroke)[..., None]
    np.clip(patch, 0, 255, out=patch)
    return y0, y1, x0, x1


def _dent(rng: np.random.Generator, color: np.ndarray, alpha: np.ndarray, pose: _Pose) -> Box:
    """An elliptical depression: darker in the middle, its wall facing the light brighter."""
    S = pose.size
    cx, cy = _point_on_part(rng, alpha)
    a = rng.uniform(0.06, 0.10) * S
    b = a * rng.uniform(0.5, 1.0)
    angle = rng.uniform(0, np.pi)
    depth = rng.uniform(0.50, 0.70)
    y0, y1, x0, x1 = box = _box(cx, cy, a * 1.2, S)
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    x, y = x - cx, y - cy
    u = (x * np.cos(angle) + y * np.sin(angle)) / a
    v = (-x * np.sin(angle) + y * np.cos(angle)) / b
    height = np.clip(1 - (u * u + v * v), 0, 1) ** 1.5  # depth profile, 1 at the bottom of the dent
    grad_y, grad_x = np.gradient(height)
    facing = (grad_x * _LIGHT[0] + grad_y * _LIGHT[1]) * b  # > 0 on the wall that faces the light
    shade = 1.0 - depth * height + 1.2 * depth * facing
    shade = 1.0 + (shade - 1.0) * alpha[y0:y1, x0:x1]
    patch = color[y0:y1, x0:x1]
    patch *= shade[..., None]
    np.clip(patch, 0, 255, out=patch)
    return box


def _missing_piece(rng: np.random.Generator, color: np.ndarray, alpha: np.ndarray, pose: _Pose) -> Box:
    """A chunk broken off the rim (disc) or an edge/corner (tile): the belt shows through."""
    S = pose.size
    x, y, normal = _point_on_outline(rng, pose)
    radius = rng.uniform(0.10, 0.15) * S
    inward = radius * rng.uniform(0.0, 0.45)
    cx, cy = x - inward * np.cos(normal), y - inward * np.sin(normal)
    n = int(rng.integers(7, 13))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.55, 1.15, n)
    polygon = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)

    y0, y1, x0, x1 = box = _box(cx, cy, radius * 1.15 + 6, S)
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(canvas, [np.round((polygon - (x0, y0)) * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    chunk = canvas.astype(np.float32) / 255.0
    fracture = np.clip(cv2.GaussianBlur(chunk, (0, 0), 1.5) * 2.0 - chunk, 0, 1)  # rough edge, darker
    color[y0:y1, x0:x1] *= (1.0 - 0.4 * fracture)[..., None]
    alpha[y0:y1, x0:x1] *= 1.0 - chunk
    return box


_STAINS = (  # (BGR colour, opacity range, blur as a fraction of the size)
    ((30.0, 45.0, 40.0), (0.70, 0.90), 0.25),    # oily smear
    ((35.0, 80.0, 165.0), (0.65, 0.90), 0.15),   # rust
    ((175.0, 95.0, 35.0), (0.75, 0.95), 0.08),   # blue paint/fibre
    ((60.0, 150.0, 50.0), (0.65, 0.90), 0.10),   # green coolant residue
    ((25.0, 25.0, 28.0), (0.85, 1.00), 0.05),    # black particle
)


def _contamination(rng: np.random.Generator, color: np.ndarray, alpha: np.ndarray, pose: _Pose) -> Box:
    """A foreign coloured spot or smear: a few overlapping blobs, soft-edged, tinted."""
    S = pose.size
    cx, cy = _point_on_part(rng, alpha)
    stain_color, opacity_range, softness = _STAINS[rng.integers(len(_STAINS))]
    size = rng.uniform(0.06, 0.10) * S
    sigma = max(0.6, size * softness)
    y0, y1, x0, x1 = box = _box(cx, cy, size * 1.7 + 3 * sigma + 2, S)
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        ox, oy = np.clip(rng.normal(0, size * 0.45, 2), -0.9 * size, 0.9 * size)
        axes = (max(1, int(size * rng.uniform(0.3, 0.8))), max(1, int(size * rng.uniform(0.2, 0.6))))
        center = (int(round(cx + ox - x0)), int(round(cy + oy - y0)))
        cv2.ellipse(canvas, center, axes, rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA)
    coverage = cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), sigma)
    coverage *= rng.uniform(*opacity_range) * alpha[y0:y1, x0:x1]
    tint = np.array(stain_color, np.float32) * rng.uniform(0.85, 1.15)
    patch = color[y0:y1, x0:x1]
    patch += coverage[..., None] * (tint - patch)
    return box


_DEFECTS: dict[str, Callable[[np.random.Generator, np.ndarray, np.ndarray, _Pose], Box]] = {
    "scratch": _scratch,
    "dent": _dent,
    "missing_piece": _missing_piece,
    "contamination": _contamination,
}
