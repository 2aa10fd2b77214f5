"""Durable store of each product's normal reference images, under `<state_dir>/references/`.

    <state_dir>/references/<product>/<sha256[:16]>.png    the images, lossless
    <state_dir>/references/<product>/manifest.json        [{file, source, width, height, added_at}]
    <state_dir>/references/<product>/config.json          {"tiles": "3x3", "overlap": 0.125} (optional)

Workers load every product at start and reload one product when a `references_changed`
ModelUpdate names it. Writes are atomic (temp file + rename), so a worker never reads half a file.

    >>> store = ReferenceStore(Path(".lineguard"))
    >>> store.add("bottle", [Path("good_000.png")])
    >>> images = store.load("bottle")
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from .model.tiles import NO_TILES, Tiling

PRODUCT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ReferenceError(ValueError):
    """A reference image or product name cannot be used; the message names it."""


@dataclass(frozen=True)
class ReferenceInfo:
    product: str
    file: str
    source: str
    width: int
    height: int
    added_at: str


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class ReferenceStore:
    def __init__(self, state_dir: Path):
        self.root = Path(state_dir) / "references"

    def _dir(self, product: str) -> Path:
        if not PRODUCT_NAME.match(product):
            raise ReferenceError(f"invalid product name {product!r}: use letters, digits, '_', '-', '.'")
        return self.root / product

    def manifest(self, product: str) -> list[ReferenceInfo]:
        path = self._dir(product) / "manifest.json"
        if not path.exists():
            return []
        return [ReferenceInfo(**entry) for entry in json.loads(path.read_text())]

    def products(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "manifest.json").exists())

    def add_images(self, product: str, images: list[tuple[str, np.ndarray]]) -> list[ReferenceInfo]:
        """Store (source, BGR image) pairs; identical pixels are stored once. Returns the new entries."""
        folder = self._dir(product)
        folder.mkdir(parents=True, exist_ok=True)
        entries = self.manifest(product)
        known = {entry.file for entry in entries}
        added = []
        for source, image in images:
            ok, png = cv2.imencode(".png", image)
            if not ok:
                raise ReferenceError(f"cannot encode reference image: {source}")
            name = hashlib.sha256(image.tobytes() + str(image.shape).encode()).hexdigest()[:16] + ".png"
            if name in known:
                continue
            _atomic_write(folder / name, png.tobytes())
            info = ReferenceInfo(product, name, source, image.shape[1], image.shape[0],
                                 datetime.now(UTC).isoformat(timespec="seconds"))
            entries.append(info)
            added.append(info)
            known.add(name)
        _atomic_write(folder / "manifest.json", json.dumps([e.__dict__ for e in entries], indent=2).encode())
        return added

    def add(self, product: str, paths: list[Path]) -> list[ReferenceInfo]:
        """Read image files (any OpenCV format, greyscale or colour) and store them."""
        images = []
        for path in paths:
            if not Path(path).exists():
                raise ReferenceError(f"path not found: {path}")
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise ReferenceError(f"cannot read image: {path}")
            images.append((str(path), image))
        if not images:
            raise ReferenceError("no reference images given")
        return self.add_images(product, images)

    def remove(self, product: str) -> int:
        folder = self._dir(product)
        entries = self.manifest(product)
        for entry in entries:
            (folder / entry.file).unlink(missing_ok=True)
        (folder / "manifest.json").unlink(missing_ok=True)
        (folder / "config.json").unlink(missing_ok=True)
        return len(entries)

    def tiling(self, product: str) -> Tiling:
        """How the product's frames are inspected: whole (1x1, the default) or in tiles (tiles.py)."""
        path = self._dir(product) / "config.json"
        if not path.exists():
            return NO_TILES
        try:
            config = json.loads(path.read_text())
            return Tiling.parse(config.get("tiles", "1x1"), float(config.get("overlap", NO_TILES.overlap)))
        except (ValueError, AttributeError) as exc:
            raise ReferenceError(f"{path}: {exc}") from None

    def set_tiling(self, product: str, tiling: Tiling) -> None:
        folder = self._dir(product)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / "config.json",
                      json.dumps({"tiles": str(tiling), "overlap": tiling.overlap}, indent=2).encode())

    def load(self, product: str) -> list[np.ndarray]:
        """The product's reference images (BGR), in the order they were added."""
        folder = self._dir(product)
        images = []
        for entry in self.manifest(product):
            image = cv2.imread(str(folder / entry.file), cv2.IMREAD_COLOR)
            if image is None:
                raise ReferenceError(f"reference image is unreadable: {folder / entry.file}")
            images.append(image)
        return images
