"""Start-up checks for a first real deployment (issue 25): topics created only where missing, topic replication
settings, and the production profile's refusal to fall back to a container's own SQLite file and disk."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from lineguard import tansu
from lineguard.kafka import NOT_ALLOWED_TO_CREATE, client_kwargs, ensure_topics, topic_configs
from lineguard.settings import ConfigError, load_settings
from lineguard.topics import TOPICS


async def _topics(settings) -> set[str]:
    admin = AIOKafkaAdminClient(**client_kwargs(settings) | tansu.admin_overrides())
    await admin.start()
    try:
        return {name for name in await admin.list_topics() if name.startswith(settings.topic_prefix)}
    finally:
        await admin.close()


def test_only_the_missing_topics_are_created(stack):
    settings = load_settings(kafka_bootstrap=stack.kafka_bootstrap, topic_prefix="missing-only.")
    first = asyncio.run(ensure_topics(settings, TOPICS[:2]))          # an operator made two of them
    assert first == {settings.topic(t.name): "created" for t in TOPICS[:2]}
    outcome = asyncio.run(ensure_topics(settings))
    assert outcome == {settings.topic(t.name): "exists" if t in TOPICS[:2] else "created" for t in TOPICS}
    assert asyncio.run(_topics(settings)) == {settings.topic(t.name) for t in TOPICS}
    assert set(asyncio.run(ensure_topics(settings)).values()) == {"exists"}


def test_topics_get_min_insync_replicas_when_set(stack):
    settings = load_settings(kafka_bootstrap=stack.kafka_bootstrap, topic_prefix="min-isr.",
                             kafka_min_insync_replicas=1)
    assert topic_configs(settings, TOPICS[0])["min.insync.replicas"] == "1"
    assert "min.insync.replicas" not in topic_configs(load_settings(), TOPICS[0])
    assert set(asyncio.run(ensure_topics(settings, TOPICS[:1])).values()) == {"created"}


def test_authorization_errors_are_the_not_allowed_ones():
    from aiokafka.errors import ClusterAuthorizationFailedError, PolicyViolationError, TopicAuthorizationFailedError

    assert set(NOT_ALLOWED_TO_CREATE) == {TopicAuthorizationFailedError.errno, ClusterAuthorizationFailedError.errno,
                                          PolicyViolationError.errno}


def test_min_insync_replicas_above_the_replication_factor_is_refused(monkeypatch):
    monkeypatch.setenv("LINEGUARD_KAFKA_REPLICATION_FACTOR", "2")
    monkeypatch.setenv("LINEGUARD_KAFKA_MIN_INSYNC_REPLICAS", "3")
    with pytest.raises(ConfigError, match="LINEGUARD_KAFKA_MIN_INSYNC_REPLICAS=3 is above "
                                          "LINEGUARD_KAFKA_REPLICATION_FACTOR=2"):
        load_settings()
    monkeypatch.setenv("LINEGUARD_KAFKA_MIN_INSYNC_REPLICAS", "2")
    assert load_settings().kafka_min_insync_replicas == 2


def test_production_profile_refuses_the_local_fallbacks(tmp_path):
    production = load_settings(profile="production", kafka_bootstrap="kafka:9092", state_dir=tmp_path)
    with pytest.raises(ConfigError, match="LINEGUARD_STORE_DB_URL is not set"):
        production.records_db_url()
    with pytest.raises(ConfigError, match="LINEGUARD_STORE_ARTIFACTS is not set"):
        production.artifacts_location()
    from storage.settings import load_storage_settings

    with pytest.raises(ConfigError, match="LINEGUARD_STORE_DB_URL"):
        load_storage_settings().db_url(production)
    explicit = production.model_copy(update={"store_db_url": "postgresql+psycopg://u:p@db/lineguard",
                                             "store_artifacts": "s3://bucket/artifacts"})
    assert explicit.records_db_url().startswith("postgresql") and explicit.artifacts_location().startswith("s3://")
    embedded = load_settings(state_dir=tmp_path)
    assert embedded.records_db_url() == f"sqlite:///{(tmp_path / 'records.sqlite').resolve()}"
    assert list(tmp_path.iterdir()) == []


def test_a_production_service_stops_at_start_naming_the_setting(tmp_path, monkeypatch):
    """`lineguard store` in the production profile with no records URL: one line, the config exit code."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEGUARD_")}
    env |= {"LINEGUARD_PROFILE": "production", "LINEGUARD_KAFKA_BOOTSTRAP": "127.0.0.1:9",
            "LINEGUARD_STATE_DIR": str(tmp_path), "LINEGUARD_STORE_ARTIFACTS": str(tmp_path / "a")}
    result = subprocess.run([sys.executable, "-m", "deploy", "store", "--seconds", "1"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "LINEGUARD_STORE_DB_URL is not set" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "records.sqlite").exists()


def test_nightly_training_runs_under_the_sigterm_handler(tmp_path):
    """`lineguard train --nightly` (the CronJob's and the compose loop's command) still runs and says it has
    nothing to do; the handler it runs under (lineguard.cli.sigterm_as_interrupt) is removed afterwards."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEGUARD_")} | {
        "LINEGUARD_STATE_DIR": str(tmp_path)}
    upgrade = subprocess.run([sys.executable, "-m", "deploy", "db", "upgrade"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert upgrade.returncode == 0, upgrade.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "deploy", "train", "--nightly"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nothing to do" in result.stdout
