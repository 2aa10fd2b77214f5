"""Kafka plumbing: client factories, topic creation and dead letters, on aiokafka.

The embedded profile adds the Tansu work-arounds from `lineguard.tansu`; the production
profile passes SASL/SSL settings straight to aiokafka.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from lineguard import tansu
from lineguard.events import DeadLetter
from lineguard.logging import get_logger
from lineguard.settings import Settings
from lineguard.topics import DEADLETTER, TOPICS, TopicSpec

log = get_logger(__name__)


class KafkaUnavailable(Exception):
    """The bootstrap servers cannot be reached; the message names them and the setting."""


def client_kwargs(settings: Settings) -> dict:
    """Connection arguments shared by producers, consumers and the admin client."""
    kwargs: dict = {
        "bootstrap_servers": settings.bootstrap,
        "client_id": settings.kafka_client_id,
        "security_protocol": settings.kafka_security_protocol,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
    }
    if settings.kafka_sasl_mechanism:
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            kwargs["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    if "SSL" in settings.kafka_security_protocol:
        from aiokafka.helpers import create_ssl_context

        kwargs["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_cafile, certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
        )
    if settings.embedded:
        kwargs["request_timeout_ms"] = max(kwargs["request_timeout_ms"], tansu.REQUEST_TIMEOUT_MS)
    return kwargs


def producer_kwargs(settings: Settings) -> dict:
    """Producer arguments: wait for all in-sync replicas (acks=all) before a send counts."""
    kwargs = client_kwargs(settings) | {
        "acks": "all",
        "max_request_size": settings.kafka_max_message_bytes,
        "linger_ms": 5,
    }
    if settings.embedded:
        kwargs |= tansu.producer_overrides()
    return kwargs


def consumer_kwargs(settings: Settings, group_id: str | None) -> dict:
    """Consumer arguments, with manual commits: services commit only after their results are published."""
    kwargs = client_kwargs(settings) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": settings.kafka_max_message_bytes + 64 * 1024,
        "fetch_max_bytes": max(52428800, settings.kafka_max_message_bytes * 4),
    }
    if settings.embedded:
        kwargs |= tansu.consumer_overrides()
    return kwargs


def make_producer(settings: Settings, **overrides) -> AIOKafkaProducer:
    return AIOKafkaProducer(**(producer_kwargs(settings) | overrides))


def make_consumer(settings: Settings, *topics: str, group_id: str | None, **overrides) -> AIOKafkaConsumer:
    """A consumer of the given topic names (without prefix)."""
    return AIOKafkaConsumer(*(settings.topic(t) for t in topics), **(consumer_kwargs(settings, group_id) | overrides))


def unavailable(settings: Settings, exc: BaseException) -> KafkaUnavailable:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return KafkaUnavailable(
        f"cannot reach Kafka bootstrap server {settings.bootstrap} (LINEGUARD_KAFKA_BOOTSTRAP): {reason}"
    )


async def start_client(settings: Settings, client, timeout_s: float = 15.0):
    """Start a producer/consumer/admin client, turning connection failures into KafkaUnavailable."""
    try:
        await asyncio.wait_for(client.start(), timeout_s)
    except (KafkaConnectionError, OSError, TimeoutError) as exc:
        await _close_quietly(client)
        raise unavailable(settings, exc) from None
    return client


async def _close_quietly(client) -> None:
    closer = getattr(client, "stop", None) or getattr(client, "close", None)
    with contextlib.suppress(Exception):  # best effort on a client that never started
        await closer()


async def ensure_topics(settings: Settings, specs: tuple[TopicSpec, ...] = TOPICS) -> dict[str, str]:
    """Create every topic with its partition count and configs; harmless when they exist.

    Returns {topic: "created" | "exists"}. A topic that exists with another partition count is
    reported in the log (partitions cannot be changed here: Tansu has no create_partitions).
    """
    admin = AIOKafkaAdminClient(**client_kwargs(settings) | (tansu.admin_overrides() if settings.embedded else {}))
    await start_client(settings, admin)
    outcome: dict[str, str] = {}
    try:
        for topic in specs:
            name = settings.topic(topic.name)
            configs = {"max.message.bytes": str(settings.kafka_max_message_bytes)} | topic.configs
            new = NewTopic(name, topic.partitions, settings.kafka_replication_factor, topic_configs=configs)
            try:
                response = await admin.create_topics([new])
                errors = {t[0]: t[1] for t in getattr(response, "topic_errors", [])}
                code = errors.get(name, 0)
                if code == TopicAlreadyExistsError.errno:
                    outcome[name] = "exists"
                elif code:
                    raise KafkaError(f"create topic {name} failed with error code {code}")
                else:
                    outcome[name] = "created"
            except TopicAlreadyExistsError:
                outcome[name] = "exists"
        described = await admin.describe_topics(list(outcome))
        for info in described:
            want = next(t.partitions for t in specs if settings.topic(t.name) == info["topic"])
            have = len(info["partitions"])
            if have != want:
                log.warning("topic_partition_mismatch", topic=info["topic"], want=want, have=have)
    finally:
        await admin.close()
    log.info("topics_ready", **outcome)
    return outcome


async def publish_dead_letter(producer: AIOKafkaProducer, settings: Settings, letter: DeadLetter) -> None:
    """Send a DeadLetter and wait for the broker's acknowledgement."""
    await producer.send_and_wait(settings.topic(DEADLETTER), letter.to_bytes(),
                                 key=(letter.key or "").encode() or None)
    log.warning("dead_letter", source_topic=letter.source_topic, offset=letter.offset, reason=letter.reason)
