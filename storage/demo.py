"""Storage in the demo: the aggregator and the recorder as asyncio tasks, and where their data lives.

    >>> print(where_data_lives(settings))
    >>> await run_storage_services(settings)      # until cancelled; both stop cleanly
"""

from __future__ import annotations

import asyncio
import contextlib

from lineguard.logging import get_logger
from lineguard.settings import Settings
from storage.settings import StorageSettings, load_storage_settings

log = get_logger(__name__)


async def run_storage_services(settings: Settings, storage_settings: StorageSettings | None = None) -> None:
    """Run `lineguard stats` and `lineguard store` in this event loop until cancelled, then stop both.

    If one of them fails (say the artifact disk is full), the other is stopped too and the error is raised.
    """
    from storage.records import run_recorder
    from storage.stats import run_stats

    storage_settings = storage_settings or load_storage_settings()
    tasks = [asyncio.create_task(run_stats(settings, storage_settings), name="lineguard-stats"),
             asyncio.create_task(run_recorder(settings, storage_settings), name="lineguard-store")]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def where_data_lives(settings: Settings, storage_settings: StorageSettings | None = None) -> str:
    """A few lines for the console: InfluxDB URL and database, records database, artifacts."""
    storage_settings = storage_settings or load_storage_settings()
    from storage.records import _redact

    influx = f"{settings.influx} (database {settings.influx_database}, api {storage_settings.influx_api})"
    return "\n".join([
        f"statistics  {influx}: measurements defect_stats, defect_positions, defect_sizes, score_histogram, "
        "dead_letters, kafka_lag",
        f"records     {_redact(storage_settings.db_url(settings))} (`lineguard records` queries them)",
        f"artifacts   {storage_settings.artifacts(settings)}",
        "dashboards  deploy/grafana/dashboards/*.json (`lineguard grafana push --url ... --token ...`)",
    ])
