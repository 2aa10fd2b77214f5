"""Test helpers that read topics back from the real broker."""

from __future__ import annotations

import asyncio
import time

from lineguard.kafka import make_consumer, start_client


async def read_topic(settings, topic: str, *, expect: int | None = None, idle_s: float = 2.0,
                     timeout_s: float = 60.0) -> list:
    """All records of `topic` (a name without the prefix) from the beginning, in per-partition order.

    Stops when `expect` records arrived and nothing more came for `idle_s`, or after `timeout_s`.
    """
    consumer = make_consumer(settings, topic, group_id=None, auto_offset_reset="earliest")
    await start_client(settings, consumer)
    records: list = []
    deadline = time.monotonic() + timeout_s
    last_arrival = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                records.extend(batch)
                last_arrival = time.monotonic()
            enough = expect is None or len(records) >= expect
            if enough and time.monotonic() - last_arrival > idle_s:
                break
    finally:
        await consumer.stop()
    return records


def read_topic_sync(settings, topic: str, **kwargs) -> list:
    return asyncio.run(read_topic(settings, topic, **kwargs))
