"""The size policy for camera frames: width and height come from the JPEG header, before any pixel is decoded.

A 2 MB JPEG of one colour can say 12000x12000 and decode to 432 MB; a gateway can send a FrameMeta that
does not describe its image. Both are refused here, each with a reason a camera integrator can act on:

    >>> frame_size(jpeg_bytes)          # read from the SOF marker, no decoding
    (2448, 2048)
    >>> check_size(meta, (12000, 12000), max_pixels=36_000_000)
    ('OversizeFrame', 'frame ... is 12000x12000 = 144.0 MP, above LINEGUARD_MAX_FRAME_PIXELS = 36.0 MP')
"""

from __future__ import annotations

import cv2
import numpy as np

from lineguard.events import FrameMeta

# Start-of-frame markers carry the image size: SOF0-3, 5-7, 9-11, 13-15 (not DHT C4, JPG C8, DAC CC)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}   # RSTn and TEM: no length field
_SOS = 0xDA


class FrameRejected(ValueError):
    """A frame that breaks the size policy; `error_type` is the dead-letter type."""

    def __init__(self, error_type: str, reason: str):
        super().__init__(reason)
        self.error_type = error_type


def frame_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG's start-of-frame marker; raises FrameRejected("UndecodableImage")."""
    if data[:2] != b"\xff\xd8":
        raise FrameRejected("UndecodableImage", "payload is not a JPEG (no start-of-image marker)")
    if not data.rstrip(b"\x00")[-2:] == b"\xff\xd9":
        # libjpeg would fill the missing part with grey and the model would flag the grey
        raise FrameRejected("UndecodableImage", "JPEG is truncated (no end-of-image marker): the frame was cut off "
                                                "between the camera and the broker")
    index, end = 2, len(data)
    while index + 4 <= end:
        if data[index] != 0xFF:
            raise FrameRejected("UndecodableImage", f"corrupt JPEG header at byte {index}")
        marker = data[index + 1]
        if marker == 0xFF:              # fill byte before a marker
            index += 1
            continue
        if marker in _STANDALONE:
            index += 2
            continue
        length = int.from_bytes(data[index + 2:index + 4], "big")
        if marker in _SOF_MARKERS:
            if index + 9 > end or length < 8:
                break
            height = int.from_bytes(data[index + 5:index + 7], "big")
            width = int.from_bytes(data[index + 7:index + 9], "big")
            if width == 0 or height == 0:
                raise FrameRejected("UndecodableImage", f"JPEG header gives an empty size {width}x{height}")
            return width, height
        if marker == _SOS or length < 2:
            break
        index += 2 + length
    raise FrameRejected("UndecodableImage", "JPEG has no start-of-frame header with the image size")


def check_size(meta: FrameMeta, size: tuple[int, int], max_pixels: int) -> None:
    """Refuse a frame above the pixel limit (OversizeFrame) or unlike its FrameMeta (MetaMismatch)."""
    width, height = size
    if width * height > max_pixels:
        raise FrameRejected("OversizeFrame",
                            f"frame {meta.frame_id} is {width}x{height} = {width * height / 1e6:.1f} MP, above "
                            f"LINEGUARD_MAX_FRAME_PIXELS = {max_pixels / 1e6:.1f} MP; send frames of at most "
                            "that size (ingest --max-side downscales)")
    if (width, height) != (meta.width, meta.height):
        raise FrameRejected("MetaMismatch",
                            f"frame {meta.frame_id}: the JPEG is {width}x{height} but its FrameMeta says "
                            f"{meta.width}x{meta.height}; set width and height from the encoded image")


_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def scaled_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """(width, height) of a JPEG of `size` decoded at 1/factor: libjpeg rounds up."""
    return -(-size[0] // factor), -(-size[1] // factor)


def reduction(size: tuple[int, int], needed: tuple[int, int] | None) -> int:
    """The largest libjpeg DCT scale-down (1, 2, 4 or 8) that keeps at least `needed` = (width, height)."""
    if needed is None:
        return 1
    for factor in (8, 4, 2):
        width, height = scaled_size(size, factor)
        if width >= needed[0] and height >= needed[1]:
            return factor
    return 1


def decode(data: bytes, meta: FrameMeta, size: tuple[int, int], needed: tuple[int, int] | None = None) -> np.ndarray:
    """The (H, W, 3) BGR image of a frame whose header passed `check_size`, decoded at the largest DCT
    scale-down (1/2, 1/4, 1/8: libjpeg skips the discarded coefficients) that still gives `needed` =
    (width, height) pixels; None: full size."""
    # EXIF orientation is ignored: the size policy and the regions are in the sensor's pixels, as the header says
    factor = reduction(size, needed)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[factor] | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as exc:   # libjpeg errors that OpenCV raises instead of returning None
        raise FrameRejected("UndecodableImage", f"cannot decode {meta.encoding} image of frame {meta.frame_id}: "
                            f"{str(exc).strip().splitlines()[-1][:200]}") from None
    if image is None:
        raise FrameRejected("UndecodableImage", f"cannot decode {meta.encoding} image of frame {meta.frame_id}")
    size = scaled_size(size, factor)
    if (image.shape[1], image.shape[0]) != size:
        raise FrameRejected("MetaMismatch", f"frame {meta.frame_id}: decoded to {image.shape[1]}x{image.shape[0]}, "
                                            f"its header says {size[0]}x{size[1]}")
    return image
