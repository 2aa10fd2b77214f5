"""Settings: one pydantic-settings class, read from `LINEGUARD_*` environment variables.

Two profiles:
- `embedded` (default): the local stack that `lineguard up` starts (Tansu broker + influxd).
  The bootstrap address and the InfluxDB URL are read from the stack file that `lineguard up`
  writes (`<state_dir>/stack.json`) unless set explicitly.
- `production`: any Kafka cluster (`LINEGUARD_KAFKA_BOOTSTRAP`, with SASL/SSL passed to aiokafka)
  and any InfluxDB (`LINEGUARD_INFLUX_URL`). It never falls back to a file of the pod's own: a service that
  needs the records database or the artifact store refuses to start without `LINEGUARD_STORE_DB_URL` and
  `LINEGUARD_STORE_ARTIFACTS`.

A bad value fails at start-up with a message that names the environment variable.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lineguard.events import ID_MAX_LENGTH, ID_PATTERN

ENV_PREFIX = "LINEGUARD_"


# What one frame in flight costs the worker, per frame pixel: the decoded BGR image (3 bytes) plus the
# anomaly map, its smoothing and its regions at frame resolution and the outputs (measured: 16.5 bytes
# beyond the image for 5-36 MP frames), with headroom for the decoder's own buffers.
FRAME_BYTES_PER_PIXEL = 24


def frame_cost_bytes(pixels: int) -> int:
    """Bytes of worker memory that a frame of `pixels` holds while it is in flight."""
    return pixels * FRAME_BYTES_PER_PIXEL


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the environment variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    profile: Literal["embedded", "production"] = "embedded"
    state_dir: Path = Path(".lineguard")

    # Kafka
    kafka_bootstrap: str | None = None
    kafka_client_id: str = "lineguard"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_request_timeout_ms: int = Field(default=15_000, ge=1_000)
    kafka_max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    kafka_replication_factor: int = Field(default=1, ge=1)
    kafka_min_insync_replicas: int | None = Field(default=None, ge=1)   # topic config min.insync.replicas
    topic_prefix: str = "lineguard."

    # InfluxDB
    influx_url: str | None = None
    influx_database: str = "lineguard"

    # Shared state: the records database (records, labels, the model registry's index) and the artifact store
    # (images, heatmaps, model bundles). StorageSettings reads the same variables for the recorder.
    store_db_url: str | None = None     # default: sqlite:///<state_dir>/records.sqlite
    store_artifacts: str | None = None  # default: <state_dir>/artifacts; or s3://bucket/prefix

    # Embedded stack ports (0 = pick a free one)
    embedded_kafka_port: int = Field(default=19092, ge=0, le=65535)
    embedded_influx_port: int = Field(default=18086, ge=0, le=65535)

    # Inference worker: hostile frames cannot make it grow (see inference/frames.py)
    max_frame_pixels: int = Field(default=36_000_000, ge=64 * 64)  # width x height read from the JPEG header
    worker_memory_mb: int = Field(default=1024, ge=64)              # decoded frames in flight, all stages

    # Ingest
    line_id: str = Field(default="line-1", min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)
    jpeg_quality: int = Field(default=90, ge=1, le=100)

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_port(cls, value: str | None) -> str | None:
        if value is None:
            return value
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value

    @model_validator(mode="after")
    def _production_needs_bootstrap(self) -> Settings:
        if self.profile == "production" and not self.kafka_bootstrap:
            raise ValueError("the production profile needs LINEGUARD_KAFKA_BOOTSTRAP")
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_mechanism:
            raise ValueError("LINEGUARD_KAFKA_SASL_MECHANISM is required with SASL security protocols")
        return self

    # -- deployment checks (issue 25): topic replication and the production profile's shared state --------------
    @model_validator(mode="after")
    def _min_insync_fits_the_replication(self) -> Settings:
        if self.kafka_min_insync_replicas is not None and \
                self.kafka_min_insync_replicas > self.kafka_replication_factor:
            raise ValueError(f"LINEGUARD_KAFKA_MIN_INSYNC_REPLICAS={self.kafka_min_insync_replicas} is above "
                             f"LINEGUARD_KAFKA_REPLICATION_FACTOR={self.kafka_replication_factor}: no write could "
                             "ever be acknowledged (acks=all); lower it or raise the replication factor")
        return self

    def _production_needs(self, name: str) -> None:
        if self.profile == "production":
            raise ConfigError(f"{ENV_PREFIX}{name.upper()} is not set: the production profile does not fall back "
                              f"to a file of this container's own (set {ENV_PREFIX}{name.upper()}, or "
                              f"{ENV_PREFIX}PROFILE=embedded for a single machine)")

    def records_db_url(self) -> str:
        if not self.store_db_url:
            self._production_needs("store_db_url")
        return self.store_db_url or f"sqlite:///{(self.state_dir / 'records.sqlite').resolve()}"

    def artifacts_location(self) -> str:
        if not self.store_artifacts:
            self._production_needs("store_artifacts")
        return self.store_artifacts or str((self.state_dir / "artifacts").resolve())

    @model_validator(mode="after")
    def _budget_holds_the_largest_frame(self) -> Settings:
        needed = frame_cost_bytes(self.max_frame_pixels)
        if needed > self.worker_memory_mb * 2**20:
            raise ValueError(f"LINEGUARD_WORKER_MEMORY_MB={self.worker_memory_mb} cannot hold one frame of "
                             f"LINEGUARD_MAX_FRAME_PIXELS={self.max_frame_pixels} (needs {needed / 2**20:.0f} MB); "
                             "raise the first or lower the second")
        return self

    @property
    def embedded(self) -> bool:
        return self.profile == "embedded"

    @property
    def stack_file(self) -> Path:
        return self.state_dir / "stack.json"

    @cached_property
    def _stack(self) -> dict:
        if self.embedded and self.stack_file.exists():
            try:
                return json.loads(self.stack_file.read_text())
            except (OSError, ValueError):
                return {}
        return {}

    @property
    def bootstrap(self) -> str:
        """The Kafka bootstrap servers in force."""
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        return self._stack.get("kafka_bootstrap") or f"127.0.0.1:{self.embedded_kafka_port or 19092}"

    @property
    def influx(self) -> str:
        """The InfluxDB base URL in force."""
        if self.influx_url:
            return self.influx_url.rstrip("/")
        return self._stack.get("influx_url") or f"http://127.0.0.1:{self.embedded_influx_port or 18086}"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"


def load_env(cls, prefix: str = ENV_PREFIX, **overrides):
    """`cls` (a settings class of any room) from the environment and `overrides`; a bad value raises one
    ConfigError that names each variable (`prefix` + the field) and what is wrong with it."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            name = f"{prefix}{field.upper()}" if field else "settings"
            problems.append(f"{name}: {error['msg']}".replace("Value error, ", ""))
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def load_settings(**overrides) -> Settings:
    """Settings from the environment; raises ConfigError naming the variable on a bad value."""
    return load_env(Settings, **overrides)
