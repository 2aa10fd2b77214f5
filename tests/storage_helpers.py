"""Helpers for the storage tests: synthetic verdicts, heatmaps and frames, published to the real broker.

The inference worker is not needed: verdicts are built directly as `lineguard.events.Verdict`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.parse
import urllib.request
import zlib
from datetime import UTC, datetime, timedelta

import cv2
import numpy as np

from lineguard.events import POSITIONS, FrameMeta, Heatmap, Latency, Region, Verdict, encode_frame
from lineguard.kafka import make_consumer, make_producer, start_client


def minute_ago(minutes: int = 10) -> datetime:
    """A minute-aligned UTC time `minutes` ago: windows of test data start on round boundaries."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    return now - timedelta(minutes=minutes)


def make_verdicts(n: int, *, start: datetime, spacing_s: float = 0.5, seed: int = 0, prefix: str = "f",
                  cameras=("cam-0", "cam-1", "cam-2"), products=("disc", "tile"), lines=("line-1",),
                  defect_rate: float = 0.3) -> list[Verdict]:
    rng = random.Random(seed)
    verdicts = []
    for i in range(n):
        anomalous = rng.random() < defect_rate
        threshold = 1.0
        score = rng.uniform(1.05, 3.0) if anomalous else rng.uniform(0.0, 0.95)
        regions = []
        if anomalous:
            for _ in range(rng.randint(1, 2)):
                area = rng.choice([40, 900, 9000])
                side = int(area ** 0.5)
                regions.append(Region(x=rng.randint(0, 200), y=rng.randint(0, 200), w=side, h=side, area_px=area,
                                      position=rng.choice(POSITIONS), peak_score=score))
        verdicts.append(Verdict(
            frame_id=f"{prefix}-{i:05d}", line_id=lines[i % len(lines)], camera_id=cameras[i % len(cameras)],
            product=products[(i // len(cameras)) % len(products)],
            captured_at=start + timedelta(seconds=i * spacing_s), score=score, threshold=threshold,
            is_anomalous=anomalous, confidence=0.9, regions=regions,
            positions=[r.position for r in regions][:2], answer="Yes, there is an anomaly." if anomalous else "No.",
            model_version="test-1", latency=Latency(queue_ms=rng.uniform(0, 5), decode_ms=1.0,
                                                    model_ms=rng.uniform(5, 50), publish_ms=0.5),
        ))
    return verdicts


async def publish(settings, topic: str, items: list[tuple[bytes | None, bytes, list | None]],
                  producer=None) -> list:
    """Send (key, value, headers) records to `topic` (name without prefix); waits for every ack.

    Returns the brokers' RecordMetadata (partition, offset), one per item, in order.
    """
    own = producer is None
    if own:
        producer = make_producer(settings)
        await start_client(settings, producer)
    try:
        futures = [await producer.send(settings.topic(topic), value, key=key, headers=headers)
                   for key, value, headers in items]
        return list(await asyncio.gather(*futures))
    finally:
        if own:
            await producer.stop()


def group_offsets(settings, group: str, topics) -> dict[tuple[str, int], tuple[int | None, int]]:
    """{(topic, partition): (offset `group` committed, or None; end offset)}, read from the broker.

    The probe fetches the group's offsets (OffsetFetch) without joining the group.
    """
    from aiokafka import TopicPartition

    async def go():
        probe = make_consumer(settings, group_id=group)
        await start_client(settings, probe)
        try:
            partitions = [TopicPartition(settings.topic(t), p) for t in topics
                          for p in sorted(probe.partitions_for_topic(settings.topic(t)) or ())]
            ends = await probe.end_offsets(partitions)
            return {(tp.topic[len(settings.topic_prefix):], tp.partition): (await probe.committed(tp), ends[tp])
                    for tp in partitions}
        finally:
            await probe.stop()

    return asyncio.run(go())


def publish_verdicts(settings, verdicts: list[Verdict]) -> None:
    asyncio.run(publish(settings, "verdicts", [(v.camera_id.encode(), v.to_bytes(), None) for v in verdicts]))


def frame_jpeg(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    ok, buffer = cv2.imencode(".jpg", image)
    assert ok
    return buffer.tobytes()


def frame_record(verdict: Verdict, size: int = 64) -> tuple[bytes, bytes, list]:
    meta = FrameMeta(frame_id=verdict.frame_id, line_id=verdict.line_id, camera_id=verdict.camera_id,
                     product=verdict.product, captured_at=verdict.captured_at, width=size, height=size,
                     source="test")
    value, headers = encode_frame(meta, frame_jpeg(zlib.crc32(verdict.frame_id.encode()), size))
    return verdict.camera_id.encode(), value, headers


def heatmap_for(verdict: Verdict, size: int = 64) -> Heatmap:
    ok, png = cv2.imencode(".png", np.full((size, size), 128, dtype=np.uint8))
    overlay = frame_jpeg(7, size) if verdict.is_anomalous else None
    return Heatmap(frame_id=verdict.frame_id, camera_id=verdict.camera_id, product=verdict.product, width=size,
                   height=size, map_png=png.tobytes(), overlay_jpeg=overlay)


def influx_query(url: str, database: str, query: str) -> list[dict]:
    """Series of an InfluxQL query (epoch ms); raises on a statement error."""
    params = urllib.parse.urlencode({"db": database, "q": query, "epoch": "ms"})
    with urllib.request.urlopen(f"{url}/query?{params}", timeout=10) as response:
        payload = json.loads(response.read())
    series = []
    for result in payload["results"]:
        if "error" in result:
            raise AssertionError(f"{query}: {result['error']}")
        series.extend(result.get("series", []))
    return series


def wait_until(predicate, timeout_s: float = 60.0, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    return last


def migrated(where):
    """The records database at this build's schema, as `lineguard db upgrade` (or the embedded stack) leaves it:
    `where` is a URL or Settings (their records_db_url()); returns the URL. Services only check the revision."""
    from lineguard.db import upgrade

    url = where if isinstance(where, str) else where.records_db_url()
    upgrade(url)
    return url
