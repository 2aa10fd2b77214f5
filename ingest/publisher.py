"""Publish frames from a source onto the frames topic.

The loop, in one place: next frame → JPEG-encode (thread) → pace → send (acks=all) →
collect the broker's acknowledgement. Every send's outcome is checked: a delivery failure
is logged with the frame_id and makes the run fail, so no frame is dropped silently.

Each acknowledgement has a deadline (`ack_timeout_s`): aiokafka gives up on a batch by itself
only when its partition has no leader, so a broker that dies mid-stream would leave the frames
in flight, and the run, waiting for ever. A frame not acknowledged in time counts as failed; the
first failure stops reading the source, the frames still in flight are settled, and the run
raises DeliveryFailed.

    >>> from ingest.sources import open_source
    >>> report = asyncio.run(publish(open_source("simulator"), settings, limit=100, rate=20))
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from ingest.sources import SourceError
from lineguard.events import FrameMeta, encode_frame
from lineguard.kafka import client_kwargs, make_producer, start_client
from lineguard.logging import get_logger
from lineguard.settings import Settings
from lineguard.topics import FRAMES

log = get_logger(__name__)

MAX_IN_FLIGHT = 64
STOP_AFTER_FAILURE_S = 5.0  # a producer whose broker is gone cannot flush: do not wait long for it
# room for the record envelope and headers besides the JPEG and the meta JSON
RECORD_OVERHEAD_BYTES = 512


class FrameTooLarge(Exception):
    """An encoded frame exceeds the broker's maximum message size."""


class DeliveryFailed(Exception):
    """The broker did not acknowledge one or more frames."""


@dataclass
class PublishReport:
    published: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    per_camera: dict[str, int] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.published / self.seconds if self.seconds else 0.0


def encode_jpeg(image: np.ndarray, quality: int, max_side: int | None = None) -> tuple[bytes, int, int]:
    """(jpeg bytes, width, height), downscaling so the longer side is at most max_side."""
    height, width = image.shape[:2]
    if max_side and max(height, width) > max_side:
        scale = max_side / max(height, width)
        image = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        height, width = image.shape[:2]
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buffer.tobytes(), width, height


def ack_timeout_s(settings: Settings) -> float:
    """How long a frame may wait for its acknowledgement: a produce request may wait the request
    timeout in the producer's queue and as long again on the wire."""
    return 2 * client_kwargs(settings)["request_timeout_ms"] / 1000


def as_published(image: np.ndarray, quality: int) -> np.ndarray:
    """The image as a consumer of the frames topic sees it (after the JPEG round trip)."""
    jpeg, _, _ = encode_jpeg(image, quality)
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)


def _frames(source, loop: bool) -> Iterator:
    while True:
        produced = False
        for frame in source.frames():
            produced = True
            yield frame
        if not (loop and produced):
            return


async def publish(
    source,
    settings: Settings,
    *,
    rate: float | None = None,
    cameras: int = 1,
    limit: int | None = None,
    loop: bool = False,
    max_side: int | None = None,
    producer=None,
    on_published: Callable[[FrameMeta], None] | None = None,
) -> PublishReport:
    """Publish frames from `source` until it ends, `limit` is reached, or the task is cancelled.

    rate: frames per second over all cameras (None = as fast as the broker acknowledges).
    cameras: frames are dealt round-robin to cam-0 … cam-{N-1}; the camera is the Kafka key.
    Raises FrameTooLarge before sending a frame above `kafka_max_message_bytes`, and
    DeliveryFailed once the frames in flight are settled if any frame was not acknowledged within
    `ack_timeout_s` (the first failure stops the run) or could not be sent.
    """
    if cameras < 1:
        raise ValueError("cameras must be >= 1")
    own_producer = producer is None
    if own_producer:
        producer = await start_client(settings, make_producer(settings))
    topic = settings.topic(FRAMES)
    run_id = secrets.token_hex(3)
    report = PublishReport()
    ack_timeout = ack_timeout_s(settings)
    in_flight: deque[tuple[FrameMeta, asyncio.Future, float]] = deque()   # (meta, ack, deadline)
    seq_by_camera = [0] * cameras
    frames = _frames(source, loop)
    started = time.monotonic()

    async def settle(entry: tuple[FrameMeta, asyncio.Future, float]) -> None:
        meta, future, deadline = entry
        try:
            await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - every delivery error is reported, none swallowed
            report.failed += 1
            error = (f"no acknowledgement within {ack_timeout:.0f} s" if isinstance(exc, TimeoutError)
                     else str(exc) or type(exc).__name__)
            log.error("frame_delivery_failed", frame_id=meta.frame_id, camera_id=meta.camera_id, error=error)
            return
        report.published += 1
        report.per_camera[meta.camera_id] = report.per_camera.get(meta.camera_id, 0) + 1
        if on_published:
            on_published(meta)

    try:
        index = 0
        while (limit is None or index < limit) and not report.failed:
            frame = await asyncio.to_thread(next, frames, None)
            if frame is None:
                break
            if index == 0:
                paced_from = time.monotonic()  # pace from the first frame, not from opening the source
            if rate:
                delay = paced_from + index / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            camera = index % cameras
            camera_id = f"cam-{camera}"
            seq = seq_by_camera[camera]
            seq_by_camera[camera] += 1
            jpeg, width, height = await asyncio.to_thread(encode_jpeg, frame.image, settings.jpeg_quality, max_side)
            try:
                meta = FrameMeta(
                    frame_id=f"{settings.line_id}.{camera_id}.{run_id}.{seq:07d}",
                    line_id=settings.line_id, camera_id=camera_id, product=frame.product, seq=seq,
                    width=width, height=height, source=frame.source, mm_per_px=frame.mm_per_px,
                    ground_truth=frame.ground_truth,
                )
            except ValidationError as exc:   # e.g. a product named after a folder with spaces in its name
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))} {e['input']!r:.60}: {e['msg']}"
                                     for e in exc.errors()[:2])
                raise SourceError(f"cannot describe the frames of {frame.source}: {problems} "
                                  "(name the product with --product)") from None
            value, headers = encode_frame(meta, jpeg)
            size = len(value) + sum(len(k) + len(v) for k, v in headers) + RECORD_OVERHEAD_BYTES
            if size > settings.kafka_max_message_bytes:
                raise FrameTooLarge(
                    f"frame {meta.frame_id} from {frame.source} is {size} bytes, above the broker's maximum "
                    f"message size of {settings.kafka_max_message_bytes} bytes (LINEGUARD_KAFKA_MAX_MESSAGE_BYTES); "
                    "lower --jpeg-quality or pass --max-side"
                )
            try:
                future = await producer.send(topic, value=value, key=camera_id.encode(), headers=headers)
            except KafkaError as exc:
                report.failed += 1
                log.error("frame_delivery_failed", frame_id=meta.frame_id, camera_id=camera_id,
                          error=str(exc) or type(exc).__name__)
                break
            in_flight.append((meta, future, time.monotonic() + ack_timeout))
            report.bytes += len(value)
            index += 1
            log.debug("frame_sent", frame_id=meta.frame_id, camera_id=camera_id, bytes=len(value))
            while len(in_flight) > MAX_IN_FLIGHT or (in_flight and in_flight[0][1].done()):
                await settle(in_flight.popleft())
        while in_flight:
            await settle(in_flight.popleft())
    finally:
        while in_flight:  # cancelled or failed: still account for what is already on its way
            await settle(in_flight.popleft())
        if own_producer:
            try:
                await asyncio.wait_for(producer.stop(), STOP_AFTER_FAILURE_S if report.failed else None)
            except TimeoutError:
                log.warning("producer_stop_timeout", bootstrap=settings.bootstrap, waited_s=STOP_AFTER_FAILURE_S)
        report.seconds = time.monotonic() - started
        report.skipped = list(getattr(source, "skipped", []))
    if report.failed:
        raise DeliveryFailed(f"{report.failed} frame(s) were not acknowledged by {settings.bootstrap} "
                             f"({report.published} acknowledged); see the frame_delivery_failed log lines")
    log.info("ingest_done", published=report.published, skipped=len(report.skipped),
             fps=round(report.fps, 1), per_camera=report.per_camera)
    return report
