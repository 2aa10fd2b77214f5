"""Storage in the demo: where the aggregator's and the recorder's data lives.

`lineguard demo` (deploy/demo.py) runs `lineguard stats` and `lineguard store` as child processes
(lineguard/services.py) and prints this before and after the run:

    >>> print(where_data_lives(settings))
"""

from __future__ import annotations

from lineguard.settings import Settings
from storage.settings import StorageSettings, load_storage_settings


def where_data_lives(settings: Settings, storage_settings: StorageSettings | None = None) -> str:
    """A few lines for the console: InfluxDB URL and database, records database, artifacts."""
    storage_settings = storage_settings or load_storage_settings()
    from lineguard.db import redact_url

    influx = f"{settings.influx} (database {settings.influx_database}, api {storage_settings.influx_api})"
    return "\n".join([
        f"statistics  {influx}: measurements defect_stats, defect_positions, defect_sizes, score_histogram, "
        "dead_letters, kafka_lag",
        f"records     {redact_url(storage_settings.db_url(settings))} (`lineguard records` queries them)",
        f"artifacts   {storage_settings.artifacts(settings)}",
        "dashboards  deploy/grafana/dashboards/*.json (`lineguard grafana push --url ... --token ...`)",
    ])
