"""Streams a careless camera integrator would send: decompression bombs, frames unlike their FrameMeta,
oversize ids, broken payloads, large legal frames, mixed with good frames. Each message carries the one
outcome it must have, so a test or a benchmark can check that the worker gave exactly that.

    >>> stream = hostile_stream(bomb_jpeg())
    >>> sent = await send(settings, stream)          # [(partition, offset, acknowledged_at), ...]
    >>> stream.expected_dead()                       # {(partition, offset): "OversizeFrame", ...} given `sent`

Used by `tests/test_hostile_frames.py` and by the memory section of `make bench`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from ingest.publisher import encode_jpeg
from ingest.simulator import LineSimulator
from lineguard.events import META_HEADER, FrameMeta, encode_frame
from lineguard.kafka import make_producer, start_client
from lineguard.settings import Settings
from lineguard.topics import FRAMES

BOMB_SIDE = 10_000          # 100 MP: 300 MB decoded, 1.5 MB as a one-colour JPEG
LARGE = (5472, 3648)        # 20 MP: a real high-resolution camera, inside the default limit


@dataclass
class Message:
    value: bytes | None
    headers: list
    outcome: str            # "verdict" or "dead"
    detail: str             # the frame_id of the verdict, or the dead letter's error_type


@dataclass
class FrameStream:
    seed: int = 21
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self):
        self.simulator = LineSimulator(defect_rate=0.2, seed=self.seed)

    def meta(self, width: int, height: int, **overrides) -> FrameMeta:
        return FrameMeta(**{"frame_id": f"s{self.seed}-{len(self.messages):05d}", "line_id": "line-1",
                            "camera_id": "cam-0", "product": "disc", "width": width, "height": height} | overrides)

    def good(self, n: int, size: tuple[int, int] | None = None) -> None:
        for _ in range(n):
            part = self.simulator.part(len(self.messages))
            image = part.image if size is None else cv2.resize(part.image, size, interpolation=cv2.INTER_LINEAR)
            jpeg, width, height = encode_jpeg(image, 90)
            meta = self.meta(width, height, product=part.product)
            self.messages.append(Message(*encode_frame(meta, jpeg), "verdict", meta.frame_id))

    def dead(self, value: bytes | None, headers: list, error_type: str) -> None:
        self.messages.append(Message(value, headers, "dead", error_type))

    def raw_meta(self, width: int, height: int, **fields) -> list:
        """Headers with a FrameMeta JSON written by hand, so it can break the contract."""
        data = json.loads(self.meta(width, height).to_bytes()) | fields
        return [("lineguard-type", b"FrameMeta"), (META_HEADER, json.dumps(data).encode())]

    def verdict_ids(self) -> set[str]:
        return {m.detail for m in self.messages if m.outcome == "verdict"}

    def expected_dead(self, sent: list[tuple[int, int, float]]) -> dict[tuple[int, int], str]:
        return {(partition, offset): m.detail for (partition, offset, _), m in zip(sent, self.messages, strict=True)
                if m.outcome == "dead"}


def bomb_jpeg(side: int = BOMB_SIDE) -> bytes:
    """A real JPEG of one colour, side x side: small on the wire, side² x 3 bytes decoded."""
    ok, jpeg = cv2.imencode(".jpg", np.full((side, side, 3), 127, np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return jpeg.tobytes()


def forged_bomb(width: int, height: int) -> bytes:
    """A 16 px JPEG whose start-of-frame header claims width x height (a decoder would allocate all of it)."""
    jpeg = bytearray(cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes())
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 7] = height.to_bytes(2, "big")
    jpeg[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(jpeg)


def hostile_stream(bomb: bytes, bombs: int = 10, large: int = 5, seed: int = 21) -> FrameStream:
    """Good frames; `bombs` decompression bombs (every fifth a forged header) with mismatched and bad frames
    among them; good frames right after; `large` legal 20 MP frames; good frames at the end."""
    stream = FrameStream(seed)
    stream.good(6)
    small = cv2.imencode(".jpg", np.full((512, 512, 3), 90, np.uint8))[1].tobytes()
    for i in range(bombs):   # each with a valid FrameMeta that tells the truth
        if i % 5 == 4:
            stream.dead(*encode_frame(stream.meta(60_000, 60_000), forged_bomb(60_000, 60_000)), "OversizeFrame")
        else:
            stream.dead(*encode_frame(stream.meta(BOMB_SIDE, BOMB_SIDE), bomb), "OversizeFrame")
        if i == 4:
            stream.dead(*encode_frame(stream.meta(64, 9000), small), "MetaMismatch")
    stream.dead(*encode_frame(stream.meta(512, 511), small), "MetaMismatch")
    # oversize or hostile ids fail the contract itself
    stream.dead(small, stream.raw_meta(512, 512, frame_id="f" * 20_000), "BadFrame")
    stream.dead(small, stream.raw_meta(512, 512, camera_id="cam-0\nINJECTED"), "BadFrame")
    stream.dead(small, stream.raw_meta(512, 512, product="p" * 129), "BadFrame")
    stream.dead(small, stream.raw_meta(512, 512, line_id="../../etc"), "BadFrame")
    # the bad cases that were already handled
    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    stream.dead(*encode_frame(stream.meta(8, 8), png), "UndecodableImage")
    stream.dead(*encode_frame(stream.meta(512, 512), small[:600] + b"\x00" * 64), "UndecodableImage")
    stream.dead(*encode_frame(stream.meta(8, 8), b"\xff\xd8 not a jpeg at all"), "UndecodableImage")
    stream.dead(b"", encode_frame(stream.meta(8, 8), b"x")[1], "BadFrame")
    stream.dead(small, [], "BadFrame")
    stream.dead(small, [(META_HEADER, b"{not json")], "BadFrame")
    stream.dead(small, stream.raw_meta(512, 512, schema_version=2), "BadFrame")
    stream.dead(*encode_frame(stream.meta(512, 512, product="gearbox"), small), "UnknownProduct")
    stream.good(8)
    stream.good(large, LARGE)
    stream.good(3)
    return stream


def normal_stream(n: int, large: int = 0, seed: int = 22) -> FrameStream:
    """What a line sends: n good frames (a few of them at 20 MP when `large`)."""
    stream = FrameStream(seed)
    stream.good(n - large)
    stream.good(large, LARGE)
    return stream


async def send(settings: Settings, stream: FrameStream, key: bytes = b"cam-0") -> list[tuple[int, int, float]]:
    """Send every message with one key (one partition: the worker sees them in this order); (partition,
    offset, acknowledged at, wall clock) of each."""
    producer = await start_client(settings, make_producer(settings))
    try:
        sent = []
        for message in stream.messages:
            metadata = await producer.send_and_wait(settings.topic(FRAMES), message.value, key=key,
                                                    headers=message.headers)
            sent.append((metadata.partition, metadata.offset, time.time()))
        return sent
    finally:
        await producer.stop()
