"""The stats aggregator against the real broker and the real influxd (Debian influxd 1.6.7).

- N verdicts in: the counts InfluxQL returns match exactly, and re-delivered verdicts count once;
- influxd stopped and restarted mid-stream: every window arrives, with exact counts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from datetime import timedelta

import httpx
import numpy as np
import pytest
from storage_helpers import group_offsets, influx_query, make_verdicts, minute_ago, publish

from lineguard.health import serve_health, stop_server
from lineguard.stack import free_port
from storage.settings import load_storage_settings
from storage.stats import WINDOWS, StatsService, score_bucket, size_class


def window_start(verdict, name: str) -> int:
    ms = int(verdict.captured_at.timestamp() * 1000)
    return ms - ms % WINDOWS[name]


def expected_counts(verdicts, name: str) -> dict[tuple, tuple[int, int]]:
    """{(window start, camera, product): (frames, defects)} over unique frame_ids."""
    unique = {v.frame_id: v for v in verdicts}.values()
    frames, defects = Counter(), Counter()
    for v in unique:
        key = (window_start(v, name), v.camera_id, v.product)
        frames[key] += 1
        defects[key] += v.is_anomalous
    return {key: (frames[key], defects[key]) for key in frames}


def influx_counts(url: str, database: str, name: str, line: str) -> dict[tuple, tuple[int, int]]:
    series = influx_query(url, database, f'SELECT "frames", "defects", "camera", "product" FROM "defect_stats" '
                                         f"WHERE \"window\" = '{name}' AND \"line\" = '{line}' AND time > now() - 2h")
    out = {}
    for s in series:
        columns = s["columns"]
        for row in s["values"]:
            record = dict(zip(columns, row, strict=True))
            out[(record["time"], record["camera"], record["product"])] = (record["frames"], record["defects"])
    return out


async def run_until(service: StatsService, done, timeout_s: float = 60.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if await asyncio.to_thread(done):
            return True
        await asyncio.sleep(0.5)
    return False


def storage_settings_for(settings, **extra):
    return load_storage_settings(stats_group=f"stats-{settings.topic_prefix}", stats_lateness_s=5.0,
                                 stats_idle_close_s=0.5, influx_flush_interval_s=0.2, stats_lag_interval_s=2.0,
                                 **extra)


def test_counts_match_exactly_and_duplicates_count_once(settings, stack):
    line = f"line-{settings.topic_prefix}"
    verdicts = make_verdicts(180, start=minute_ago(10) + timedelta(seconds=25), spacing_s=0.5, lines=(line,))
    duplicates = verdicts[10:40] + verdicts[100:110]   # re-delivered: same frame_id, new offsets
    storage_settings = storage_settings_for(settings)
    url, db = settings.influx, settings.influx_database

    async def scenario() -> StatsService:
        service = StatsService(settings, storage_settings)
        await service.start()
        try:
            records = [(v.camera_id.encode(), v.to_bytes(), None) for v in verdicts + duplicates]
            await publish(settings, "verdicts", records)
            want_10s, want_1m = expected_counts(verdicts, "10s"), expected_counts(verdicts, "1m")
            complete = await run_until(service, lambda: influx_counts(url, db, "10s", line) == want_10s
                                       and influx_counts(url, db, "1m", line) == want_1m)
            assert complete, (influx_counts(url, db, "10s", line), want_10s)
        finally:
            await service.stop()
        return service

    service = asyncio.run(scenario())
    counters = service.aggregator.counters
    assert counters.counted == len(verdicts)
    assert counters.duplicates == len(duplicates)
    assert counters.late == 0

    # totals, exactly
    total = influx_query(url, db, f"SELECT sum(\"frames\"), sum(\"defects\") FROM \"defect_stats\" WHERE "
                                  f"\"window\" = '10s' AND \"line\" = '{line}' AND time > now() - 2h")
    assert total[0]["values"][0][1:] == [len(verdicts), sum(v.is_anomalous for v in verdicts)]

    # defects per position and per size class, over every window
    positions, sizes, buckets = Counter(), Counter(), Counter()
    for v in verdicts:
        buckets[score_bucket(v.score, v.threshold)] += 1
        for region in v.regions if v.is_anomalous else []:
            positions[region.position] += 1
            sizes[size_class(region.area_px, region.area_mm2)] += 1
    for measurement, tag, field, want in (("defect_positions", "position", "defects", positions),
                                          ("defect_sizes", "size_class", "defects", sizes),
                                          ("score_histogram", "bucket", "frames", buckets)):
        series = influx_query(url, db, f"SELECT sum(\"{field}\") FROM \"{measurement}\" WHERE \"window\" = '1m' "
                                       f"AND \"line\" = '{line}' AND time > now() - 2h GROUP BY \"{tag}\"")
        got = {s["tags"][tag]: s["values"][0][1] for s in series}
        assert got == dict(want), measurement

    # quantiles of one window equal numpy's on the same scores
    first = verdicts[0]
    start = window_start(first, "10s")
    same = [v for v in verdicts if window_start(v, "10s") == start and v.camera_id == first.camera_id
            and v.product == first.product]
    series = influx_query(url, db, f"SELECT \"score_p50\", \"score_p90\", \"latency_p95_ms\" FROM \"defect_stats\" "
                                   f"WHERE \"window\" = '10s' AND \"line\" = '{line}' AND \"camera\" = "
                                   f"'{first.camera_id}' AND \"product\" = '{first.product}' AND time = {start}ms")
    p50, p90, lat95 = series[0]["values"][0][1:]
    assert p50 == pytest.approx(np.percentile([v.score for v in same], 50))
    assert p90 == pytest.approx(np.percentile([v.score for v in same], 90))
    assert lat95 == pytest.approx(np.percentile([v.latency.model_ms for v in same], 95))


def test_influxd_restart_mid_stream_loses_no_window(settings, tmp_path):
    """A separate influxd is stopped while verdicts keep coming, then started again: every window arrives."""
    from structlog.testing import capture_logs

    from lineguard.settings import load_settings
    from lineguard.stack import EmbeddedStack

    own = EmbeddedStack(load_settings(state_dir=tmp_path / "influx-state", embedded_influx_port=0,
                                      embedded_kafka_port=0), with_influx=True)
    own.start_influx()
    try:
        influx_settings = settings.model_copy(update={"influx_url": own.influx_url})
        storage_settings = storage_settings_for(settings, influx_retry_max_s=0.5)
        line = "line-restart"
        start = minute_ago(20)
        first = make_verdicts(60, start=start, spacing_s=0.5, lines=(line,), prefix="a")           # 30 s
        second = make_verdicts(120, start=start + timedelta(seconds=30), spacing_s=0.5, lines=(line,),
                               prefix="b", seed=1)                                                  # 60 s
        want_10s = expected_counts(first + second, "10s")
        want_1m = expected_counts(first + second, "1m")
        url, db = own.influx_url, settings.influx_database

        port = free_port()

        async def healthz() -> tuple[int, dict]:
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{port}/healthz")
            return response.status_code, response.json()

        async def scenario() -> StatsService:
            service = StatsService(influx_settings, storage_settings)
            server = serve_health("lineguard stats", service.health, ("127.0.0.1", port))
            await asyncio.sleep(0.5)
            assert (await healthz())[0] == 503, "not serving before it started"
            await service.start()
            try:
                await publish(settings, "verdicts", [(v.camera_id.encode(), v.to_bytes(), None) for v in first])
                assert await run_until(service, lambda: len(influx_counts(url, db, "10s", line)) >= 9)
                status, body = await healthz()
                assert status == 200 and body["status"] == "ok" and body["influx"] == "up"
                assert body["verdicts"] == len(first) and body["points_written"] > 0
                await asyncio.to_thread(own.stop_influx)
                await publish(settings, "verdicts", [(v.camera_id.encode(), v.to_bytes(), None) for v in second])
                # the aggregator goes on counting while the writer keeps failing
                assert await run_until(service, lambda: service.writer.stats.failures >= 2 and
                                       service.aggregator.counters.counted == len(first) + len(second))
                assert service.writer.buffered > 0
                status, body = await healthz()     # an InfluxDB outage is reported, and the service stays up
                assert status == 200 and body["influx"] == "down" and body["points_buffered"] > 0
                await asyncio.to_thread(own.start_influx)
                complete = await run_until(service, lambda: influx_counts(url, db, "10s", line) == want_10s
                                           and influx_counts(url, db, "1m", line) == want_1m)
                assert complete, (influx_counts(url, db, "10s", line), want_10s)
                assert (await healthz())[1]["influx"] == "up"
            finally:
                await service.stop()
                await stop_server(server)
            return service

        with capture_logs() as logs:
            service = asyncio.run(scenario())
        events = [entry["event"] for entry in logs]
        assert "influx_unavailable" in events and "influx_recovered" in events
        assert service.writer.stats.outages == 1
        assert service.writer.stats.rejected == 0
    finally:
        with contextlib.suppress(Exception):
            own.stop()



def partition_of(camera: str, partitions: int = 6) -> int:
    """The partition the producer's default partitioner gives this camera's verdicts (keyed by camera)."""
    from aiokafka.partitioner import DefaultPartitioner

    return DefaultPartitioner()(camera.encode(), list(range(partitions)), list(range(partitions)))


def cameras_on_distinct_partitions(n: int) -> list[str]:
    chosen: dict[int, str] = {}
    for i in range(100):
        chosen.setdefault(partition_of(f"cam-{i}"), f"cam-{i}")
        if len(chosen) == n:
            return list(chosen.values())
    raise AssertionError("not enough distinct partitions")


def test_late_verdict_after_its_window_is_final_is_counted_late_not_written(settings):
    """A verdict for a window already final (watermark past end + lateness) is counted in `late`, logged,
    acknowledged at once, and never re-opens the window: the points in InfluxDB keep their final counts."""
    from structlog.testing import capture_logs

    line = f"late-{settings.topic_prefix}"
    cam_a, cam_b, cam_ahead = cameras_on_distinct_partitions(3)
    start = minute_ago(10)
    on_time = make_verdicts(40, start=start, spacing_s=0.5, lines=(line,), cameras=(cam_a, cam_b), prefix="ok")
    ahead = make_verdicts(1, start=start + timedelta(seconds=100), lines=(line,), cameras=(cam_ahead,), prefix="ahead")
    late_a = on_time[0].model_copy(update={"frame_id": "late-a", "captured_at": start + timedelta(seconds=5)})
    redelivered = on_time[0]                                          # same frame_id, its window final
    late_b = on_time[1].model_copy(update={"frame_id": "late-b", "captured_at": start + timedelta(seconds=7)})
    assert (late_a.camera_id, late_b.camera_id) == (cam_a, cam_b)
    storage_settings = storage_settings_for(settings)     # lateness 5 s
    url, db = settings.influx, settings.influx_database
    want_10s, want_1m = expected_counts(on_time + ahead, "10s"), expected_counts(on_time + ahead, "1m")
    on_time_windows = len(expected_counts(on_time, "10s")) + len(expected_counts(on_time, "1m"))

    def records(verdicts):
        return [(v.camera_id.encode(), v.to_bytes(), None) for v in verdicts]

    def late_partitions_committed() -> bool:
        offsets = group_offsets(settings, storage_settings.stats_group, ("verdicts",))
        return all(offsets[("verdicts", partition_of(c))][0] == offsets[("verdicts", partition_of(c))][1]
                   for c in (cam_a, cam_b))

    async def scenario() -> StatsService:
        service = StatsService(settings, storage_settings)
        agg = service.aggregator
        await service.start()
        try:
            await publish(settings, "verdicts", records(on_time + ahead))
            # the verdict 100 s ahead moves the watermark: every window of `on_time` becomes final and is written
            assert await run_until(service, lambda: agg.counters.windows_final == on_time_windows
                                   and influx_counts(url, db, "10s", line) == want_10s
                                   and influx_counts(url, db, "1m", line) == want_1m)
            assert {w.camera for w in agg.windows.values()} == {cam_ahead}
            # now the late ones; cam_a's partition wakes up after a silence, which holds the watermark back
            await publish(settings, "verdicts", records([late_a, redelivered, late_b]))
            assert await run_until(service, lambda: agg.counters.verdicts == len(on_time) + 4)
            await asyncio.sleep(2.0)   # time to (wrongly) re-emit a re-opened window: ticks 0.5 s, idle 0.5 s
            # acknowledged at once: faust commits both partitions to their end (cam_ahead's window stays open)
            assert await run_until(service, late_partitions_committed, timeout_s=20)
        finally:
            await service.stop()
        return service

    with capture_logs() as logs:
        service = asyncio.run(scenario())
    counters = service.aggregator.counters
    assert counters.late == 2                        # late_a and late_b
    assert counters.duplicates == 1                  # the re-delivery of a frame whose window is final
    assert counters.counted == len(on_time) + len(ahead)
    assert {entry["frame_id"] for entry in logs if entry["event"] == "verdict_late"} == {"late-a", "late-b"}
    # the final points are untouched: the late verdicts are in no window, the re-delivery is not counted again
    assert influx_counts(url, db, "10s", line) == want_10s
    assert influx_counts(url, db, "1m", line) == want_1m
