"""Operators' defect masks: the one decoder that the label API (dialogue) and training both use.

A mask is a single-channel 8-bit PNG (255 = defect) at the frame's resolution. Its header is read before
any pixel is decoded, so a PNG claiming 100 000 x 100 000 pixels (a decompression bomb: a few kB that
decode to 10 GB) is refused for the price of reading 33 bytes.

    >>> mask = decode_mask(png_bytes, shape=(480, 640))     # (H, W) uint8, or MaskError
    >>> image_size(jpeg_bytes)                              # (H, W) from a JPEG or PNG header
    (480, 640)
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_MASK_PIXELS = 4096 * 4096        # 16 MB once decoded; the label API and training refuse anything larger
GRAYSCALE = 0                        # PNG colour type 0: one channel, no palette


class MaskError(ValueError):
    """A mask that is not a single-channel PNG within the pixel limit (and, when asked, the frame's shape)."""


def png_header(data: bytes) -> tuple[int, int, int, int]:
    """(height, width, bit depth, colour type) from a PNG's IHDR chunk, checked against its CRC."""
    if not data.startswith(PNG_SIGNATURE) or len(data) < 33:
        raise MaskError("the mask must be a PNG image")
    length, kind = struct.unpack(">I4s", data[8:16])
    ihdr = data[16:29]
    if kind != b"IHDR" or length != 13 or struct.unpack(">I", data[29:33])[0] != zlib.crc32(data[12:29]):
        raise MaskError("the mask's PNG header is damaged")
    width, height, depth, colour = struct.unpack(">IIBB", ihdr[:10])
    return height, width, depth, colour


def decode_mask(data: bytes, *, max_pixels: int = MAX_MASK_PIXELS,
                shape: tuple[int, int] | None = None) -> np.ndarray:
    """The mask as (H, W) uint8; MaskError when it is not a grayscale 8-bit PNG, has more than `max_pixels`
    pixels, does not decode, or (when `shape` is given) is not `shape` = (H, W)."""
    height, width, depth, colour = png_header(data)
    if width * height == 0 or width * height > max_pixels:
        raise MaskError(f"the mask has {width} x {height} pixels; at most {max_pixels} are accepted")
    if colour != GRAYSCALE or depth != 8:
        raise MaskError("the mask must be a single-channel 8-bit PNG (grayscale, 255 = defect)")
    if shape is not None and (height, width) != tuple(shape):
        raise MaskError(f"the mask is {width} x {height} px; the frame is {shape[1]} x {shape[0]} px")
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.shape != (height, width) or mask.dtype != np.uint8:
        raise MaskError("the mask's PNG data cannot be decoded")
    return mask   # (H, W)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's SOF marker or a PNG's IHDR, without decoding; None when unreadable."""
    if data.startswith(PNG_SIGNATURE):
        try:
            return png_header(data)[:2]
        except MaskError:
            return None
    if not data.startswith(b"\xff\xd8"):
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:   # no length field
            at += 2
            continue
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        # SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if at + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return height, width
        at += 2 + length
    return None
