"""Frame sources: where ingest gets decoded frames from, before they are JPEG-encoded and published.

Three kinds, behind one protocol (`frames()` gives a fresh pass each call, so a caller can loop):

- `FolderSource`: images in a folder (recursive, sorted), understanding the MVTec AD layout
  (`<product>/train/good`, `<product>/test/<defect>`, `<product>/ground_truth/<defect>/<stem>_mask.png`);
- `VideoSource`: a video file, a camera index or a stream URL, through `cv2.VideoCapture`;
- `SimulatorSource`: the synthetic line of `ingest.simulator`, with ground-truth masks.

`open_source(spec)` picks one from a command-line string. Unusable inputs raise `SourceError`
with a one-line message that names them; in a folder, a bad image is skipped, logged and listed
in `skipped` instead.

Example:
    >>> source = open_source("simulator", seed=1)
    >>> frame = next(iter(source.frames()))
    >>> frame.image.shape, frame.source, frame.ground_truth is not None
    ((256, 256, 3), 'simulator', True)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import structlog

from ingest.simulator import PRODUCTS, LineSimulator
from lineguard.events import GroundTruth

log = structlog.get_logger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".avi", ".mp4", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv",
                              ".flv", ".ts", ".mjpeg", ".mjpg", ".h264", ".gif"})
_MVTEC_SPLITS = ("train", "test")
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass
class SourceFrame:
    image: np.ndarray                        # (H, W, 3) uint8 BGR
    product: str
    source: str                              # file path, stream URL or "simulator"
    ground_truth: GroundTruth | None = None  # mask as a single-channel PNG at frame resolution
    mm_per_px: float | None = None


class SourceError(Exception):
    """A source that cannot be used at all; the message is one line and names the path or URL."""


class Source(Protocol):
    skipped: list[tuple[str, str]]  # (path, reason) of bad inputs skipped so far

    def frames(self) -> Iterator[SourceFrame]: ...


def open_source(spec: str, product: str | None = None, *, defect_rate: float = 0.2, seed: int = 0,
                size: int = 256, products: Sequence[str] | None = None) -> Source:
    """The source a command-line string names.

    "simulator" or "sim": the synthetic line (`product`, if given and `products` is not, restricts
    it to that product); an existing folder or image file: `FolderSource`; a video file, a URL with
    a scheme (rtsp://, http://, ...) or a camera index ("0"): `VideoSource`.
    """
    if spec.strip().lower() in ("simulator", "sim"):
        if products is None:
            products = (product,) if product is not None else PRODUCTS
        try:
            simulator = LineSimulator(products=products, defect_rate=defect_rate, size=size, seed=seed)
        except ValueError as exc:
            raise SourceError(f"simulator: {exc}") from exc
        return SimulatorSource(simulator)
    if _URL_SCHEME.match(spec) or spec.isdigit():
        return VideoSource(spec, product or "unknown")
    path = Path(spec).expanduser()
    if path.suffix.lower() in VIDEO_EXTENSIONS and not path.is_dir():
        return VideoSource(spec, product or path.stem)  # raises "path not found" when it is missing
    if path.exists():
        return FolderSource(path, product)  # a folder, or one image ("cannot read image" if it is not)
    raise SourceError(f"path not found: {spec}")


# ---------------------------------------------------------------------------------------------
# folders of images


class FolderSource:
    """Images under a folder (recursive, sorted), or a single image file.

    In the MVTec AD layout the product is the dataset folder's name and ground truth comes from
    the path: `test/<defect>/x.png` is defective (unless <defect> is "good"), with its mask from
    `ground_truth/<defect>/x_mask.png`; `train/...` and `test/good/...` are good. The path may be
    the MVTec product folder, a folder above several of them, or one inside (`bottle/test`,
    `bottle/test/broken_large`). An explicit `product` overrides the folder name; outside the
    MVTec layout the product is `product` or the folder's name.

    Example:
        >>> source = FolderSource("/data/mvtec-ad/bottle/test")          # doctest: +SKIP
        >>> frame = next(iter(source.frames()))                          # doctest: +SKIP
        >>> frame.product, frame.ground_truth.defect_type                # doctest: +SKIP
        ('bottle', 'broken_large')
    """

    def __init__(self, path: str | Path, product: str | None = None):
        self.path = Path(path).expanduser()
        self.product = product
        self.skipped: list[tuple[str, str]] = []
        if not self.path.exists():
            raise SourceError(f"path not found: {path}")
        if self.path.is_file():
            if _read_image(self.path) is None:
                raise SourceError(f"cannot read image: {path}")
        elif not self._image_paths():
            raise SourceError(f"no images found: {path}")

    def frames(self) -> Iterator[SourceFrame]:
        if self.path.is_file():
            image = _read_image(self.path)
            if image is None:
                raise SourceError(f"cannot read image: {self.path}")
            yield self._frame(self.path, image)
            return
        for path in self._image_paths():
            image = _read_image(path)
            if image is None:
                self._skip(path, "cannot decode image")
                continue
            yield self._frame(path, image)

    def _image_paths(self) -> list[Path]:
        paths = (p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        return sorted(p for p in paths if not self._is_mask(p))

    def _is_mask(self, path: Path) -> bool:
        """An MVTec ground-truth mask (<root>/ground_truth/<defect>/<stem>_mask.png), not a frame."""
        parents = path.parents
        return (len(parents) >= 3 and parents[1].name == "ground_truth"
                and any((parents[2] / split).is_dir() for split in _MVTEC_SPLITS))

    def _frame(self, path: Path, image: np.ndarray) -> SourceFrame:
        root, split, category = self._mvtec_place(path)
        if root is None:
            folder = self.path if self.path.is_dir() else path.parent
            product = self.product or folder.resolve().name
            return SourceFrame(image=image, product=product, source=str(path))
        if split == "test" and category != "good":
            mask_png = self._mask_png(root / "ground_truth" / category / f"{path.stem}_mask.png", image.shape)
            truth = GroundTruth(is_defect=True, defect_type=category, mask_png=mask_png)
        else:
            truth = GroundTruth(is_defect=False)
        return SourceFrame(image=image, product=self.product or root.name, source=str(path), ground_truth=truth)

    def _mvtec_place(self, path: Path) -> tuple[Path | None, str, str]:
        """(root, split, category) when `path` is <root>/<train|test>/<category>/<file> in an MVTec tree."""
        parents = path.parents
        if len(parents) < 3 or parents[1].name not in _MVTEC_SPLITS:
            return None, "", ""
        root, split, category = parents[2], parents[1].name, parents[0].name
        inside_walk = root == self.path or self.path in root.parents
        # Above the path the user gave (`bottle/test/broken_large`): only trust a root that looks
        # like MVTec, so that a stray ".../test/photos" folder is not taken for one.
        if not inside_walk:
            markers = sum((root / name).is_dir() for name in ("train", "test", "ground_truth"))
            if markers < 2 and not (root / "test" / "good").is_dir():
                return None, "", ""
        return root, split, category

    def _mask_png(self, mask_path: Path, shape: tuple[int, ...]) -> bytes | None:
        if not mask_path.is_file():
            return None
        mask = _read_image(mask_path, cv2.IMREAD_GRAYSCALE)
        if mask is None:
            log.warning("mask_unreadable", path=str(mask_path))
            return None
        height, width = shape[:2]
        if mask.shape != (height, width):
            mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        return _encode_mask(mask > 127)

    def _skip(self, path: Path, reason: str) -> None:
        log.warning("frame_skipped", path=str(path), reason=reason)
        if (str(path), reason) not in self.skipped:  # a looping caller counts each bad file once
            self.skipped.append((str(path), reason))


def _read_image(path: Path, flags: int = cv2.IMREAD_COLOR_BGR) -> np.ndarray | None:
    """Decoded image (greyscale, alpha and 16-bit inputs come back as 8-bit BGR), None if unreadable."""
    try:
        data = np.fromfile(path, dtype=np.uint8)  # not cv2.imread: it cannot open non-ASCII paths everywhere
    except OSError:
        return None
    if data.size == 0:
        return None
    try:
        return cv2.imdecode(data, flags)
    except cv2.error:
        return None


def _encode_mask(mask: np.ndarray) -> bytes:
    ok, png = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise RuntimeError("PNG encoding of a mask failed")
    return png.tobytes()


# ---------------------------------------------------------------------------------------------
# video files, cameras and streams


class VideoSource:
    """Frames from a video file, a camera index ("0") or a stream URL (rtsp://, http://, ...).

    The stream is opened (and checked) once here; each `frames()` pass after the first opens it
    again, so a file restarts from its beginning. With `loop_safe=False` every pass reuses the
    first capture instead, which suits a live camera that should not be re-opened.

    Example:
        >>> frames = VideoSource("line.avi", product="disc").frames()  # doctest: +SKIP
    """

    def __init__(self, url: str, product: str, loop_safe: bool = True, open_timeout_s: float = 10.0):
        self.url = str(url)
        self.product = product
        self.loop_safe = loop_safe
        self.open_timeout_s = open_timeout_s
        self.skipped: list[tuple[str, str]] = []
        if not (_URL_SCHEME.match(self.url) or self.url.isdigit()) and not Path(self.url).expanduser().exists():
            raise SourceError(f"path not found: {self.url}")
        self._capture: cv2.VideoCapture | None = self._open()

    def _open(self) -> cv2.VideoCapture:
        target: int | str = int(self.url) if self.url.isdigit() else str(Path(self.url).expanduser())
        if _URL_SCHEME.match(self.url):
            target = self.url
        timeout_ms = int(self.open_timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        try:
            capture = cv2.VideoCapture(target, cv2.CAP_ANY, params)
        except cv2.error:
            capture = None
        if capture is None or not capture.isOpened():
            raise SourceError(f"cannot open stream: {self.url}")
        return capture

    def frames(self) -> Iterator[SourceFrame]:
        capture = self._capture if self._capture is not None else self._open()
        if self.loop_safe:
            self._capture = None  # the next pass opens the stream afresh
        try:
            count = 0
            while True:
                ok, image = capture.read()
                if not ok or image is None:
                    break
                if image.ndim == 2:
                    image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
                elif image.shape[2] == 4:
                    image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
                count += 1
                yield SourceFrame(image=image, product=self.product, source=self.url)
            if count == 0:
                raise SourceError(f"cannot read frames: {self.url}")
        finally:
            if self.loop_safe:
                capture.release()


# ---------------------------------------------------------------------------------------------
# the simulated line


@dataclass
class SimulatorSource:
    """Endless frames from a `LineSimulator`, each with its ground truth and mask."""

    simulator: LineSimulator
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def frames(self) -> Iterator[SourceFrame]:
        for part in self.simulator:
            truth = GroundTruth(is_defect=part.defect_type is not None, defect_type=part.defect_type,
                                mask_png=_encode_mask(part.mask > 0))
            yield SourceFrame(image=part.image, product=part.product, source="simulator",
                              ground_truth=truth, mm_per_px=self.simulator.mm_per_px)
