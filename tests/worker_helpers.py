"""Shared by the inference-worker tests (their `model` fixture is in conftest.py)."""

from __future__ import annotations

import json
import os
import urllib.request

from aiokafka.structs import TopicPartition

from lineguard.kafka import make_consumer, start_client
from lineguard.topics import FRAMES


def group(settings) -> str:
    """This test's own consumer group: a worker SIGKILLed by another test stays in a shared group
    until its session times out, and would hold up every later join."""
    return f"inference-{settings.topic_prefix}"


def dead_letters(worker) -> float:
    return sum(sample.value for metric in worker.metrics.dead_letters.collect() for sample in metric.samples
               if sample.name.endswith("_total"))


async def group_lag(settings) -> int:
    """Frames on the frames topic past the test group's committed offsets."""
    consumer = make_consumer(settings, group_id=group(settings))  # no subscription: only reads commits
    await start_client(settings, consumer)
    try:
        partitions = [TopicPartition(settings.topic(FRAMES), p) for p in range(6)]
        ends = await consumer.end_offsets(partitions)
        committed = [await consumer.committed(tp) or 0 for tp in partitions]
        return sum(ends[tp] - offset for tp, offset in zip(partitions, committed, strict=True))
    finally:
        await consumer.stop()


def worker_env(settings) -> dict:
    """Environment of a `lineguard infer` subprocess on this test's broker, topics and state dir."""
    return dict(os.environ) | {"LINEGUARD_KAFKA_BOOTSTRAP": settings.bootstrap,
                               "LINEGUARD_TOPIC_PREFIX": settings.topic_prefix,
                               "LINEGUARD_STATE_DIR": str(settings.state_dir), "LINEGUARD_LOG_JSON": "1"}


def healthy(port: int) -> dict | None:
    """The worker's /healthz answer, None while it is not serving."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return json.loads(response.read())
    except OSError:
        return None
