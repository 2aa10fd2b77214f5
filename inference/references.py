"""Each product's normal reference images: in the shared artifact store, cached under `<state_dir>/references/`.

    references/<product>/<sha256[:16]>.png    the images, lossless
    references/<product>/manifest.json        [{file, source, width, height, added_at}]
    references/<product>/config.json          {"tiles": "3x3", "overlap": 0.125} (optional)
    references/index.json                     the products (shared store only)
    references/<product>/states/<digest>.pt   calibrated product states (inference/registry.py bundles), one per
                                              model and set of references: a worker's start-up cache

Where they live:
- **shared** (`ReferenceStore.from_settings`): the artifact store every service reaches (a directory, or S3 /
  MinIO: `LINEGUARD_STORE_ARTIFACTS`), so a worker on another machine, given only the bootstrap servers, the
  database URL and the artifact store URL, serves every product. `lineguard refs add` writes there once;
  workers reload a product when a `references_changed` ModelUpdate names it;
- **cache**: `<state_dir>/references/` on each machine holds what it loaded. A read fetches the small manifest
  and config, and only the images the cache lacks; when the shared store cannot be reached, the cache serves
  (a restart needs no network when nothing changed). Without a shared store (`ReferenceStore(state_dir)`) the
  local folder is the store itself, as before.

Calibrating a product (memory, learned prototypes, threshold) costs seconds per product on a CPU, so the first
worker to calibrate a (model, references, tiling) combination stores the state it derived next to the
references (`keep_state`), and later workers, on this machine or another, load it (`cached_state`) instead of
calibrating again. The digest names the model's fingerprint, the reference files and the tiling, so changed
references or another model never meet an old state.

Writes are atomic (temp file + rename, or one object per put), so a reader never sees half a file; the manifest
is written after the images it names.

    >>> store = ReferenceStore.from_settings(settings)
    >>> store.add("bottle", [Path("good_000.png")])
    >>> images = store.load("bottle")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from lineguard.artifacts import ArtifactStore, StorageError, artifact_key, open_artifact_store
from lineguard.settings import Settings

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
    def __init__(self, state_dir: Path, shared: ArtifactStore | None = None):
        self.root = Path(state_dir) / "references"       # the store itself, or the cache of the shared one
        self.shared = shared

    @classmethod
    def from_settings(cls, settings) -> ReferenceStore:
        """The shared store of these settings (`artifacts_location()`), cached under their state dir."""
        return cls(settings.state_dir, open_artifact_store(settings.artifacts_location()))

    def _dir(self, product: str) -> Path:
        if not PRODUCT_NAME.match(product):
            raise ReferenceError(f"invalid product name {product!r}: use letters, digits, '_', '-', '.'")
        return self.root / product

    # -- the shared store ------------------------------------------------------------------------------
    @staticmethod
    def _key(key: str) -> str:
        """The artifact key of `<product>/<file>` (or `index.json`). Product and file names need no escaping, so
        the keys are those of earlier versions, except for a product ending in '_' or '.', which they folded into
        another's ('disc_' into 'disc'): its references must be added again."""
        return artifact_key("references", *key.split("/"))

    def _fetch(self, key: str) -> bytes | None:
        """The shared object `references/<key>`, or None when it is missing or the store cannot be reached."""
        if self.shared is None:
            return None
        try:
            return self.shared.get(self.shared.uri_of(self._key(key)))
        except StorageError:
            return None

    def _publish(self, key: str, data: bytes) -> None:
        if self.shared is not None:
            try:
                self.shared.put(self._key(key), data)
            except StorageError as exc:
                raise ReferenceError(f"cannot write the shared references ({self.shared.root}): {exc}") from exc

    @staticmethod
    def _keep(path: Path, data: bytes) -> None:
        """Write a fetched object into the cache, unless it holds these bytes already."""
        if not path.exists() or path.read_bytes() != data:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, data)

    # -- reads -----------------------------------------------------------------------------------------
    def manifest(self, product: str) -> list[ReferenceInfo]:
        path = self._dir(product) / "manifest.json"
        data = self._fetch(f"{product}/manifest.json")
        if data is not None:
            self._keep(path, data)
        if not path.exists():
            return []
        return [ReferenceInfo(**entry) for entry in json.loads(path.read_text())]

    def products(self) -> list[str]:
        local = sorted(p.name for p in self.root.iterdir() if (p / "manifest.json").exists()) \
            if self.root.exists() else []
        index = self._fetch("index.json")
        shared = set(json.loads(index)) if index else set()
        # cached products the shared index lacks: written before there was a shared store, or removed since
        # (their manifest, refreshed from the shared store, is then empty)
        return sorted(shared | {p for p in local if p in shared or self.manifest(p)})

    def tiling(self, product: str) -> Tiling:
        """How the product's frames are inspected: whole (1x1, the default) or in tiles (tiles.py)."""
        path = self._dir(product) / "config.json"
        data = self._fetch(f"{product}/config.json")
        if data is not None:
            self._keep(path, data)
        elif path.exists() and self.shared is not None and self._fetch(f"{product}/manifest.json") is not None:
            path.unlink(missing_ok=True)    # the shared store answers and has no config: whole frames again
        if not path.exists():
            return NO_TILES
        try:
            config = json.loads(path.read_text())
            return Tiling.parse(config.get("tiles", "1x1"), float(config.get("overlap", NO_TILES.overlap)))
        except (ValueError, AttributeError) as exc:
            raise ReferenceError(f"{path}: {exc}") from None

    def load(self, product: str) -> list[np.ndarray]:
        """The product's reference images (BGR), in the order they were added; images the cache lacks are
        fetched from the shared store once."""
        folder = self._dir(product)
        images = []
        for entry in self.manifest(product):
            path = folder / entry.file
            if not path.exists():
                data = self._fetch(f"{product}/{entry.file}")
                if data is None:
                    raise ReferenceError(f"reference image {product}/{entry.file} is neither cached in {folder} "
                                         "nor readable from the shared store")
                _atomic_write(path, data)
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise ReferenceError(f"reference image is unreadable: {path}")
            images.append(image)
        return images

    # -- calibrated states: a start-up cache -----------------------------------------------------------
    def state_digest(self, product: str, model_fingerprint: str) -> str:
        """The name of `product`'s state for this model, these reference files and this tiling."""
        files = [entry.file for entry in self.manifest(product)]
        text = json.dumps([model_fingerprint, files, str(self.tiling(product)), self.tiling(product).overlap])
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def cached_state(self, product: str, digest: str) -> bytes | None:
        """A state stored by `keep_state`: from this machine's cache, else from the shared store (then cached)."""
        path = self._dir(product) / "states" / f"{digest}.pt"
        if path.exists():
            return path.read_bytes()
        data = self._fetch(f"{product}/states/{digest}.pt")
        if data is not None:
            self._keep(path, data)
        return data

    def keep_state(self, product: str, digest: str, data: bytes) -> None:
        """Store a calibrated state for the next worker; a shared store that refuses it costs only the cache."""
        path = self._dir(product) / "states" / f"{digest}.pt"
        self._keep(path, data)
        with contextlib.suppress(ReferenceError):
            self._publish(f"{product}/states/{digest}.pt", data)

    # -- writes ----------------------------------------------------------------------------------------
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
            self._publish(f"{product}/{name}", png.tobytes())
            _atomic_write(folder / name, png.tobytes())
            info = ReferenceInfo(product, name, source, image.shape[1], image.shape[0],
                                 datetime.now(UTC).isoformat(timespec="seconds"))
            entries.append(info)
            added.append(info)
            known.add(name)
        self._write_manifest(product, entries)
        return added

    def _write_manifest(self, product: str, entries: list[ReferenceInfo]) -> None:
        data = json.dumps([e.__dict__ for e in entries], indent=2).encode()
        self._publish(f"{product}/manifest.json", data)        # after the images it names
        _atomic_write(self._dir(product) / "manifest.json", data)
        if self.shared is not None:
            index = set(json.loads(self._fetch("index.json") or b"[]"))
            changed = index | {product} if entries else index - {product}
            if changed != index:
                self._publish("index.json", json.dumps(sorted(changed)).encode())

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
        self._write_manifest(product, [])
        if self.shared is not None:
            for name in [e.file for e in entries] + ["config.json"]:
                with contextlib.suppress(StorageError):   # the manifest no longer names it: never read again
                    self.shared.delete(self.shared.uri_of(self._key(f"{product}/{name}")))
        for entry in entries:
            (folder / entry.file).unlink(missing_ok=True)
        (folder / "manifest.json").unlink(missing_ok=True)
        (folder / "config.json").unlink(missing_ok=True)
        return len(entries)

    def set_tiling(self, product: str, tiling: Tiling) -> None:
        folder = self._dir(product)
        folder.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"tiles": str(tiling), "overlap": tiling.overlap}, indent=2).encode()
        self._publish(f"{product}/config.json", data)
        _atomic_write(folder / "config.json", data)


SIMULATOR_REFERENCE_SHOTS = 8  # the demo's references per simulated product


def ensure_simulator_references(settings: Settings, size: int = 256) -> list[str]:
    """Register k good simulated parts per product, unless the product already has references.

    They go through the same JPEG encoding as the published frames, as a camera's references would.
    """
    from ingest.publisher import as_published
    from ingest.simulator import PRODUCTS, LineSimulator

    store = ReferenceStore.from_settings(settings)
    simulator = LineSimulator(size=size)
    added = []
    for product in PRODUCTS:
        if not store.manifest(product):
            images = [as_published(image, settings.jpeg_quality)
                      for image in simulator.normal_references(product, SIMULATOR_REFERENCE_SHOTS)]
            store.add_images(product, [(f"simulator:{product}:{i}", image) for i, image in enumerate(images)])
            added.append(product)
    return added

