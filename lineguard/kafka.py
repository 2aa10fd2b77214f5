"""Kafka plumbing: client factories, topic creation and dead letters, on aiokafka.

The embedded profile adds the Tansu work-arounds from `lineguard.tansu`; the production
profile passes SASL/SSL settings straight to aiokafka.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    PolicyViolationError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)

from lineguard import tansu
from lineguard.events import DeadLetter
from lineguard.logging import get_logger
from lineguard.settings import ConfigError, Settings
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
        kwargs["ssl_context"] = _ssl_context(settings)
    if settings.embedded:
        kwargs["request_timeout_ms"] = max(kwargs["request_timeout_ms"], tansu.REQUEST_TIMEOUT_MS)
    return kwargs


def _ssl_context(settings: Settings):
    from aiokafka.helpers import create_ssl_context

    return create_ssl_context(cafile=settings.kafka_ssl_cafile, certfile=settings.kafka_ssl_certfile,
                              keyfile=settings.kafka_ssl_keyfile)


def faust_kwargs(settings: Settings) -> dict:
    """faust.App keyword arguments for the broker: the same servers, security and timeouts as the aiokafka
    clients above (faust runs on aiokafka), with the embedded profile's Tansu work-arounds from tansu.py."""
    import faust

    conf: dict = {
        "broker": ";".join(f"kafka://{server.strip()}" for server in settings.bootstrap.split(",")),
        "broker_client_id": settings.kafka_client_id,
        "consumer_auto_offset_reset": "earliest",
        "consumer_max_fetch_size": settings.kafka_max_message_bytes + 64 * 1024,
        "topic_allow_declare": False,   # `lineguard topics create` / `up` create every topic
        "topic_disable_leader": True,   # no tables, so no leader topic
        "web_enabled": False,
        "store": "memory://",
        "broker_commit_interval": 1.0,
        "stream_wait_empty": False,     # open windows hold unacked verdicts by design: do not wait at stop
    }
    if settings.kafka_security_protocol != "PLAINTEXT":
        context = _ssl_context(settings) if "SSL" in settings.kafka_security_protocol else None
        if settings.kafka_sasl_mechanism:
            password = settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
            conf["broker_credentials"] = faust.SASLCredentials(
                username=settings.kafka_sasl_username, password=password, mechanism=settings.kafka_sasl_mechanism,
                ssl_context=context)
        else:
            conf["broker_credentials"] = faust.SSLCredentials(context)
    if settings.embedded:
        conf |= tansu.faust_overrides()
    else:
        conf["broker_request_timeout"] = max(settings.kafka_request_timeout_ms / 1000, 90.0)
    return conf


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


# Create-topics answers that mean "this client may not create topics here", not "the cluster is broken": fine as
# long as the topics exist (a managed Kafka whose topics an operator made).
NOT_ALLOWED_TO_CREATE = {
    TopicAuthorizationFailedError.errno: "TopicAuthorizationFailed",
    ClusterAuthorizationFailedError.errno: "ClusterAuthorizationFailed",
    PolicyViolationError.errno: "PolicyViolation",
}


class TopicsMissing(ConfigError):
    """A topic does not exist and could not be created; the message names it and why (fatal at start-up: waiting
    cannot help, an operator must create it or grant the right)."""


def topic_configs(settings: Settings, topic: TopicSpec) -> dict[str, str]:
    """The configs a topic is created with: the message size, min.insync.replicas when set, the table's."""
    configs = {"max.message.bytes": str(settings.kafka_max_message_bytes)}
    if settings.kafka_min_insync_replicas is not None:
        configs["min.insync.replicas"] = str(settings.kafka_min_insync_replicas)
    return configs | topic.configs


async def ensure_topics(settings: Settings, specs: tuple[TopicSpec, ...] = TOPICS) -> dict[str, str]:
    """Create the topics that are missing, with their partition counts and configs; harmless when they exist.

    Lists the topics first and creates only the missing ones, so a client without the right to create topics
    (a managed Kafka) starts when an operator made them. Returns {topic: "created" | "exists"}; raises
    TopicsMissing naming the topic when one is missing and cannot be created. A topic that exists with another
    partition count is reported in the log (partitions cannot be changed here: Tansu has no create_partitions).
    """
    admin = AIOKafkaAdminClient(**client_kwargs(settings) | (tansu.admin_overrides() if settings.embedded else {}))
    await start_client(settings, admin)
    outcome: dict[str, str] = {}
    try:
        existing = set(await admin.list_topics())
        for topic in specs:
            name = settings.topic(topic.name)
            if name in existing:
                outcome[name] = "exists"
                continue
            new = NewTopic(name, topic.partitions, settings.kafka_replication_factor,
                           topic_configs=topic_configs(settings, topic))
            try:
                response = await admin.create_topics([new])
                code, message = next(((t[1], t[2] if len(t) > 2 else None)
                                      for t in getattr(response, "topic_errors", []) if t[0] == name), (0, None))
            except TopicAlreadyExistsError:
                code, message = TopicAlreadyExistsError.errno, None
            except KafkaConnectionError as exc:
                raise unavailable(settings, exc) from None
            except KafkaError as exc:
                code, message = getattr(exc, "errno", -1), str(exc)
            if code == 0:
                outcome[name] = "created"
            elif code == TopicAlreadyExistsError.errno:     # made meanwhile, by another service's start
                outcome[name] = "exists"
            elif code in NOT_ALLOWED_TO_CREATE and await _exists(admin, name):
                # there, though not listed to this client: fine, an operator made it
                log.warning("topic_create_not_allowed", topic=name, error=NOT_ALLOWED_TO_CREATE[code],
                            action="using the existing topic")
                outcome[name] = "exists"
            elif code in NOT_ALLOWED_TO_CREATE:
                raise TopicsMissing(f"topic {name} does not exist and this client may not create it "
                                    f"({NOT_ALLOWED_TO_CREATE[code]}: {message or 'no detail'}): create it with "
                                    f"{topic.partitions} partitions, or grant CREATE to the client "
                                    f"({settings.kafka_sasl_username or settings.kafka_client_id})")
            else:
                raise TopicsMissing(f"topic {name} does not exist and creating it failed with error code {code}"
                                    f" ({message or 'no detail'}); replication factor "
                                    f"{settings.kafka_replication_factor} (LINEGUARD_KAFKA_REPLICATION_FACTOR), "
                                    f"min.insync.replicas {settings.kafka_min_insync_replicas or 'the broker default'}"
                                    " (LINEGUARD_KAFKA_MIN_INSYNC_REPLICAS)")
        try:
            described = await admin.describe_topics(list(outcome))
        except KafkaError as exc:   # a client that may use the topics but not describe them: nothing to check
            log.warning("topics_not_described", error=str(exc)[:200])
            described = []
        for info in described:
            want = next(t.partitions for t in specs if settings.topic(t.name) == info["topic"])
            have = len(info["partitions"])
            if info.get("error_code"):
                log.warning("topic_not_described", topic=info["topic"], error_code=info["error_code"])
            elif have != want:
                log.warning("topic_partition_mismatch", topic=info["topic"], want=want, have=have)
    finally:
        await admin.close()
    log.info("topics_ready", **outcome)
    return outcome


async def _exists(admin: AIOKafkaAdminClient, name: str) -> bool:
    with contextlib.suppress(KafkaError):
        return any(info["topic"] == name and not info.get("error_code") for info in await admin.describe_topics([name]))
    return False


async def publish_dead_letter(producer: AIOKafkaProducer, settings: Settings, letter: DeadLetter) -> None:
    """Send a DeadLetter and wait for the broker's acknowledgement."""
    await producer.send_and_wait(settings.topic(DEADLETTER), letter.to_bytes(),
                                 key=(letter.key or "").encode() or None)
    log.warning("dead_letter", source_topic=letter.source_topic, offset=letter.offset, reason=letter.reason)
