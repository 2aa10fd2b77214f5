"""`lineguard bench store`: how fast the aggregator and the recorder go, each against a baseline.

On a fresh embedded stack (Tansu + influxd on free ports, a temporary state directory):
- aggregator_verdicts_per_s: N verdicts waiting on the topic, then the faust aggregator runs; the
  clock runs from its first verdict until InfluxDB holds every window (all N frames counted).
- baseline_unbatched_verdicts_per_s: the naive writer: one point per verdict, one HTTP request each.
- recorder_records_per_s: M flagged frames (frame + heatmap + verdict) waiting, then the recorder
  runs; the clock runs from its first message until all M records are saved (SQLite + artifacts).
- baseline_one_record_per_txn_per_s: the same records saved one per transaction (no Kafka), the
  unbatched way.

    >>> print(markdown_section(store_benchmark(verdicts=4000, records=400)))
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.report import machine
from lineguard.settings import Settings, load_settings

COMMAND = "lineguard bench store --json"


def _frame_and_heatmap(verdict, size: int = 256):
    """A (key, value, headers) frame record with a noisy JPEG, and a Heatmap with an overlay."""
    import cv2
    import numpy as np

    from lineguard.events import FrameMeta, Heatmap, encode_frame

    rng = np.random.default_rng(abs(hash(verdict.frame_id)) % 2**32)
    image = cv2.GaussianBlur(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), (5, 5), 0)
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    heat = cv2.imencode(".png", image[:, :, 0])[1].tobytes()
    meta = FrameMeta(frame_id=verdict.frame_id, line_id=verdict.line_id, camera_id=verdict.camera_id,
                     product=verdict.product, captured_at=verdict.captured_at, width=size, height=size)
    value, headers = encode_frame(meta, jpeg)
    heatmap = Heatmap(frame_id=verdict.frame_id, camera_id=verdict.camera_id, product=verdict.product, width=size,
                      height=size, map_png=heat, overlay_jpeg=jpeg)
    return (verdict.camera_id.encode(), value, headers), heatmap


def _verdicts(n: int, prefix: str, *, defect_rate: float = 0.2):
    """Synthetic verdicts, 20 per second of event time over 4 cameras and 2 products."""
    import random
    from datetime import timedelta

    from lineguard.events import POSITIONS, Latency, Region, Verdict

    rng = random.Random(0)
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=30)
    out = []
    for i in range(n):
        anomalous = rng.random() < defect_rate
        score = rng.uniform(1.1, 3) if anomalous else rng.uniform(0, 0.9)
        regions = [Region(x=10, y=10, w=20, h=20, area_px=400, position=rng.choice(POSITIONS), peak_score=score)
                   ] if anomalous else []
        out.append(Verdict(frame_id=f"{prefix}-{i:06d}", line_id="bench", camera_id=f"cam-{i % 4}",
                           product=("disc", "tile")[i % 2], captured_at=start + timedelta(seconds=i / 20),
                           score=score, threshold=1.0, is_anomalous=anomalous, confidence=0.9, regions=regions,
                           positions=[r.position for r in regions], answer="bench", model_version="bench",
                           latency=Latency(model_ms=rng.uniform(5, 40))))
    return out


async def _publish(settings: Settings, topic: str, records) -> None:
    from lineguard.kafka import make_producer, start_client

    producer = await start_client(settings, make_producer(settings))
    try:
        futures = [await producer.send(settings.topic(topic), value, key=key, headers=headers)
                   for key, value, headers in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _influx_frames(url: str, database: str) -> int:
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(f"{url}/query", params={
            "db": database, "q": "SELECT sum(\"frames\") FROM \"defect_stats\" WHERE \"window\" = '10s' "
                                 "AND \"line\" = 'bench'"})
    series = answer.json()["results"][0].get("series", [])
    return int(series[0]["values"][0][1]) if series else 0


async def aggregator_benchmark(settings: Settings, n: int) -> dict:
    from storage.settings import load_storage_settings
    from storage.stats import StatsService

    verdicts = _verdicts(n, "agg")
    await _publish(settings, "verdicts", [(v.camera_id.encode(), v.to_bytes(), None) for v in verdicts])
    storage_settings = load_storage_settings(stats_group="bench-stats", stats_lateness_s=5.0,
                                             stats_idle_close_s=0.3, influx_flush_interval_s=0.2,
                                             stats_lag_interval_s=3600)
    service = StatsService(settings, storage_settings)
    await service.start()
    try:
        while service.aggregator.counters.verdicts == 0:
            await asyncio.sleep(0.005)
        started = time.perf_counter()
        while await _influx_frames(settings.influx, settings.influx_database) < n:
            await asyncio.sleep(0.05)
        seconds = time.perf_counter() - started
    finally:
        await service.stop()

    # baseline: one point per verdict, one HTTP request per point, no batching
    baseline_n = min(n, 400)
    async with httpx.AsyncClient(timeout=10) as client:
        started = time.perf_counter()
        for verdict in verdicts[:baseline_n]:
            line = (f"verdict_raw,line=bench,camera={verdict.camera_id},product={verdict.product} "
                    f"score={verdict.score},defect={str(verdict.is_anomalous).lower()} "
                    f"{int(verdict.captured_at.timestamp() * 1000)}")
            response = await client.post(f"{settings.influx}/write", params={"db": settings.influx_database,
                                                                              "precision": "ms"}, content=line)
            response.raise_for_status()
        baseline_seconds = time.perf_counter() - started
    return {"aggregator_verdicts": n, "aggregator_seconds": round(seconds, 2),
            "aggregator_verdicts_per_s": round(n / seconds, 1),
            "baseline_unbatched_verdicts_per_s": round(baseline_n / baseline_seconds, 1),
            "aggregator_points_written": service.writer.stats.written,
            "aggregator_write_batches": service.writer.stats.batches}


async def recorder_benchmark(settings: Settings, m: int, state: Path) -> dict:
    from lineguard.db import upgrade
    from storage.recorder import Recorder
    from storage.records import PendingRecord, RecordStore, SaveBatch
    from storage.settings import load_storage_settings

    verdicts = _verdicts(m, "rec", defect_rate=1.0)
    parts = [_frame_and_heatmap(v) for v in verdicts]
    await _publish(settings, "frames", [frame for frame, _ in parts])
    await _publish(settings, "heatmaps", [(v.camera_id.encode(), heatmap.to_bytes(), None)
                                          for v, (_, heatmap) in zip(verdicts, parts, strict=True)])
    await _publish(settings, "verdicts", [(v.camera_id.encode(), v.to_bytes(), None) for v in verdicts])
    storage_settings = load_storage_settings(store_group="bench-store", store_db_url=f"sqlite:///{state}/rec.db",
                                             store_artifacts=str(state / "artifacts"))
    upgrade(storage_settings.db_url(settings))
    recorder = Recorder(settings, storage_settings)
    stop = asyncio.Event()
    task = asyncio.create_task(recorder.run(stop=stop))
    try:
        while recorder.counters.frames == 0 and not task.done():
            await asyncio.sleep(0.005)
        started = time.perf_counter()
        while recorder.counters.records < m and not task.done():
            await asyncio.sleep(0.02)
        seconds = time.perf_counter() - started
    finally:
        stop.set()
        await task
        recorder.store.close()

    # baseline: the same records, one transaction (and fsyncs) per record, no Kafka
    baseline_m = min(m, 200)
    upgrade(f"sqlite:///{state}/baseline.db")
    store = RecordStore(f"sqlite:///{state}/baseline.db", recorder.store.artifacts.__class__(state / "baseline"))
    started = time.perf_counter()
    for verdict, (frame, heatmap) in zip(verdicts[:baseline_m], parts[:baseline_m], strict=True):
        store.save(SaveBatch(records=[PendingRecord(verdict, frame[1], heatmap, "flagged")]))
    baseline_seconds = time.perf_counter() - started
    store.close()
    return {"recorder_records": m, "recorder_seconds": round(seconds, 2),
            "recorder_records_per_s": round(m / seconds, 1),
            "baseline_one_record_per_txn_per_s": round(baseline_m / baseline_seconds, 1)}


def store_benchmark(verdicts: int = 4000, records: int = 400) -> dict:
    """Both runs on a fresh embedded stack; returns one flat dict of figures."""
    from lineguard.kafka import ensure_topics
    from lineguard.stack import EmbeddedStack

    with tempfile.TemporaryDirectory(prefix="lineguard-bench-store-") as scratch:
        state = Path(scratch)
        settings = load_settings(state_dir=state, embedded_kafka_port=0, embedded_influx_port=0,
                                 topic_prefix="bench.")
        with EmbeddedStack(settings) as stack:
            settings = settings.model_copy(update={"kafka_bootstrap": stack.kafka_bootstrap,
                                                   "influx_url": stack.influx_url})

            async def both() -> dict:
                await ensure_topics(settings)
                result = await aggregator_benchmark(settings, verdicts)
                result |= await recorder_benchmark(settings, records, state)
                return result

            result = asyncio.run(both())
    result["aggregator_vs_baseline"] = round(result["aggregator_verdicts_per_s"]
                                             / result["baseline_unbatched_verdicts_per_s"], 1)
    result["recorder_vs_baseline"] = round(result["recorder_records_per_s"]
                                           / result["baseline_one_record_per_txn_per_s"], 1)
    result["machine"] = machine(torch_info=False)
    result["date"] = datetime.now(UTC).strftime("%Y-%m-%d")
    return result


def markdown_section(result: dict | None = None) -> str:
    """The storage section of BENCHMARKS.md, without its markers (runs the benchmark when no result is given)."""
    result = result or store_benchmark()
    return "\n".join([
        "## Storage: stats aggregator and inspection recorder",
        "",
        f"Command: `{COMMAND}` (embedded Tansu broker + influxd 1.6.7 on loopback, SQLite, local artifacts). "
        f"Machine: {result['machine']}. Date: {result['date']}.",
        "",
        "| figure | value | baseline (same run) | ratio |",
        "|---|---|---|---|",
        f"| aggregator, verdicts/s into InfluxDB ({result['aggregator_verdicts']} verdicts, 10 s + 1 min windows) "
        f"| {result['aggregator_verdicts_per_s']} | {result['baseline_unbatched_verdicts_per_s']} "
        "(one point per verdict, one HTTP request each) "
        f"| {result['aggregator_vs_baseline']}x |",
        f"| recorder, records/s ({result['recorder_records']} flagged frames: JPEG + heatmap + overlay + verdict, "
        f"from Kafka) | {result['recorder_records_per_s']} | {result['baseline_one_record_per_txn_per_s']} "
        "(one record per transaction, no Kafka) "
        f"| {result['recorder_vs_baseline']}x |",
        "",
        f"The aggregator wrote {result['aggregator_points_written']} points in "
        f"{result['aggregator_write_batches']} batches. Both figures are end to end: the clock starts at the "
        "first message consumed and stops when InfluxDB holds every window / the last record is saved.",
    ]) + "\n"
