"""The demo hook: aggregator and recorder together in one event loop, stopped cleanly by cancellation."""

from __future__ import annotations

import asyncio

from storage_helpers import frame_record, heatmap_for, influx_query, make_verdicts, minute_ago, publish

from storage.demo import run_storage_services, where_data_lives
from storage.records import RecordStore
from storage.settings import load_storage_settings


def test_storage_services_run_together_and_stop_cleanly(settings, tmp_path):
    line = f"demo-{settings.topic_prefix}"
    verdicts = make_verdicts(30, start=minute_ago(8), lines=(line,), defect_rate=0.5, prefix="demo")
    storage_settings = load_storage_settings(
        stats_group=f"stats-{settings.topic_prefix}", store_group=f"store-{settings.topic_prefix}",
        stats_idle_close_s=0.5, stats_lateness_s=2.0, influx_flush_interval_s=0.2,
        store_db_url=f"sqlite:///{tmp_path}/records.db", store_artifacts=str(tmp_path / "artifacts"))
    flagged = sum(v.is_anomalous for v in verdicts)

    def stored() -> bool:
        store = RecordStore.from_settings(settings, storage_settings)
        try:
            records = store.count_records()
        finally:
            store.close()
        frames = influx_query(settings.influx, settings.influx_database,
                              f"SELECT sum(\"frames\") FROM \"defect_stats\" WHERE \"window\" = '1m' "
                              f"AND \"line\" = '{line}' AND time > now() - 2h")
        return records >= flagged and bool(frames) and frames[0]["values"][0][1] == len(verdicts)

    async def scenario() -> bool:
        services = asyncio.create_task(run_storage_services(settings, storage_settings))
        await asyncio.sleep(1.0)
        await publish(settings, "frames", [frame_record(v) for v in verdicts])
        await publish(settings, "heatmaps", [(v.camera_id.encode(), heatmap_for(v).to_bytes(), None)
                                             for v in verdicts])
        await publish(settings, "verdicts", [(v.camera_id.encode(), v.to_bytes(), None) for v in verdicts])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        ok = False
        while loop.time() < deadline and not services.done():
            if await asyncio.to_thread(stored):
                ok = True
                break
            await asyncio.sleep(0.5)
        services.cancel()
        await asyncio.wait_for(asyncio.gather(services, return_exceptions=True), 30)
        return ok

    assert asyncio.run(scenario())
    text = where_data_lives(settings, storage_settings)
    assert settings.influx in text and "records.db" in text and str(tmp_path / "artifacts") in text
