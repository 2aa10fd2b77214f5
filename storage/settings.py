"""Settings of the storage services (`lineguard stats`, `lineguard store`), from `LINEGUARD_*` variables.

The shared `lineguard.settings.Settings` says where Kafka and InfluxDB are; this class adds what
only storage needs: which InfluxDB API to write with, batching and buffer sizes, the windows'
lateness, the records database and artifact store, sampling and retention.

    >>> from storage.settings import load_storage_settings
    >>> load_storage_settings(influx_api="v2", influx_token="...").influx_api
    'v2'
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lineguard.settings import ENV_PREFIX, Settings, load_env


class StorageSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # InfluxDB writers
    influx_api: Literal["v1", "v2"] = "v1"
    influx_username: str | None = None          # v1 basic auth
    influx_password: SecretStr | None = None
    influx_retention_policy: str | None = None  # v1 only
    influx_token: SecretStr | None = None       # v2 (also sent as "Token" by v1 when set)
    influx_org: str = "lineguard"               # v2
    influx_bucket: str | None = None            # v2; default: the database name
    influx_batch_size: int = Field(default=1000, ge=1, le=50_000)
    influx_flush_interval_s: float = Field(default=1.0, gt=0, le=60)
    influx_buffer_points: int = Field(default=200_000, ge=100)
    influx_retry_max_s: float = Field(default=30.0, ge=0.1)
    influx_timeout_s: float = Field(default=10.0, gt=0)

    # stats aggregator
    stats_group: str = "lineguard-stats"
    stats_lateness_s: float = Field(default=30.0, ge=0)
    stats_idle_close_s: float = Field(default=2.0, ge=0)
    stats_lag_groups: str = "lineguard-stats,lineguard-store,lineguard-inference"
    stats_lag_interval_s: float = Field(default=10.0, gt=0)

    # inspection records
    store_group: str = "lineguard-store"
    store_db_url: str | None = None     # default: sqlite:///<state_dir>/records.sqlite
    store_artifacts: str | None = None  # default: <state_dir>/artifacts; or s3://bucket/prefix
    store_normal_sample_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    store_retention_days: float = Field(default=90.0, gt=0)
    store_normal_retention_days: float = Field(default=14.0, gt=0)
    store_keep_labelled: bool = True
    store_pending_frames: int = Field(default=2000, ge=10)
    store_join_timeout_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _v2_needs_token(self) -> StorageSettings:
        if self.influx_api == "v2" and self.influx_token is None:
            raise ValueError("LINEGUARD_INFLUX_API=v2 needs LINEGUARD_INFLUX_TOKEN")
        return self

    def db_url(self, settings: Settings) -> str:
        return self.store_db_url or settings.records_db_url()

    def artifacts(self, settings: Settings) -> str:
        return self.store_artifacts or settings.artifacts_location()

    def bucket(self, settings: Settings) -> str:
        return self.influx_bucket or settings.influx_database

    @property
    def lag_groups(self) -> list[str]:
        return [group.strip() for group in self.stats_lag_groups.split(",") if group.strip()]


def load_storage_settings(**overrides) -> StorageSettings:
    """StorageSettings from the environment; raises ConfigError naming the variable on a bad value."""
    return load_env(StorageSettings, ENV_PREFIX, **overrides)


def sqlite_path(url: str) -> Path | None:
    """The file of an sqlite URL, else None."""
    prefix = "sqlite:///"
    return Path(url[len(prefix):]) if url.startswith(prefix) else None
