"""The stats aggregator (`lineguard stats`): verdicts in, defect statistics out to InfluxDB.

A faust-streaming app with one agent on the verdicts topic and one on the dead-letter topic. Per
line, camera and product it keeps 10 s and 1 min tumbling windows on the verdicts' event time
(`captured_at`) and writes, per window, one point of each of these measurements:

| measurement | extra tag | fields |
|---|---|---|
| `defect_stats` | – | frames, defects, defect_rate, score_p50/p90/p99/max, |
|  |  | latency_p50/p95/p99/max_ms (model), total_latency_p95_ms |
| `defect_positions` | position (3x3 word) | defects (regions in that cell) |
| `defect_sizes` | size_class (small/medium/large) | defects (regions of that size) |
| `score_histogram` | bucket (upper edge of score/threshold) | frames |
| `dead_letters` | service, source_topic, error_type (10 s only) | count |
| `kafka_lag` | group, topic (every `stats_lag_interval_s`) | lag, partitions |

Every point carries the tags `window` (10s or 1m), `line`, `camera`, `product`, and the window start
as its time. Writing the same point again replaces it, so a window can be re-emitted.

When a window is written, and at-least-once:
- A window is written once the watermark (the newest event time seen) passes its end, or at once
  when no verdict arrived for `stats_idle_close_s` (so dashboards stay fresh when the line stops),
  and written again when more verdicts arrive. It is final when the watermark passes end +
  `stats_lateness_s`; wall-clock time never finalises a window, so a backlog replayed after an
  upstream outage still lands in its windows.
- A verdict's Kafka offset is acknowledged only when both its windows are final and InfluxDB has
  confirmed the write, so faust never commits past a verdict whose windows are not stored. After a
  restart the open windows are rebuilt from the uncommitted verdicts.
- The final close of each window is recorded in `stats_progress` (per group and topic); after a
  restart, verdicts of windows already final are counted as late instead of overwriting the window.
- A re-delivered verdict (same frame_id in the same window) is not counted again. A verdict that
  arrives after its window is final is counted in the aggregator's `late` counter (logged), not in
  the window, and acknowledged at once; a final window is never re-opened (its point would lose its
  counts), even when a partition that was silent wakes up and holds the watermark back.
- When InfluxDB is down the writer keeps the points in its bounded buffer and retries; the
  aggregator keeps its windows in memory (up to `MAX_PENDING_VERDICTS`, then it stops reading), and
  both catch up when the server is back. The logs say `influx_unavailable` and `influx_recovered`.
- At start-up it reads (`stats_progress`) and writes (one `stats_startup` point) once: credentials that may not
  read or write the database stop it with one line naming the missing permission, instead of an endless wait.

    >>> asyncio.run(run_stats(load_settings(), load_storage_settings()))   # until cancelled
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lineguard.events import POSITIONS, DeadLetter, Verdict
from lineguard.health import serve_health, stop_server
from lineguard.kafka import faust_kwargs
from lineguard.logging import get_logger
from lineguard.settings import Settings
from lineguard.topics import DEADLETTER, VERDICTS
from storage.influx import (
    InfluxRejected,
    InfluxUnavailable,
    InfluxWriter,
    Point,
    check_permissions,
    credential_settings,
)
from storage.settings import StorageSettings

log = get_logger(__name__)

WINDOWS: dict[str, int] = {"10s": 10_000, "1m": 60_000}
SCORE_BUCKETS: tuple[tuple[float, str], ...] = (
    (0.25, "0.25"), (0.5, "0.50"), (0.75, "0.75"), (1.0, "1.00"), (1.25, "1.25"), (1.5, "1.50"),
    (2.0, "2.00"), (float("inf"), "inf"),
)
# region size classes: by area in mm² when the camera is calibrated, else in pixels
SIZE_CLASSES_MM2 = ((1.0, "small"), (10.0, "medium"), (float("inf"), "large"))
SIZE_CLASSES_PX = ((256, "small"), (4096, "medium"), (float("inf"), "large"))
MAX_PENDING_VERDICTS = 200_000
RECENT_FINAL_FRAMES = 100_000  # re-deliveries after a window is final are recognised as duplicates
RECENT_FINAL_WINDOWS = 100_000  # windows already final are never re-opened
PROGRESS_MEASUREMENT = "stats_progress"
PROBE_MEASUREMENT = "stats_startup"   # one point per start: the write-permission probe (check_influx)


def size_class(area_px: int, area_mm2: float | None) -> str:
    table = SIZE_CLASSES_MM2 if area_mm2 is not None else SIZE_CLASSES_PX
    area = area_mm2 if area_mm2 is not None else area_px
    return next(name for edge, name in table if area < edge)


def score_bucket(score: float, threshold: float) -> str:
    ratio = score / threshold if threshold > 0 else float("inf")
    return next(name for edge, name in SCORE_BUCKETS if ratio <= edge)


def epoch_ms(verdict: Verdict) -> int:
    return int(verdict.captured_at.timestamp() * 1000)


class _Ack:
    """Acknowledges one Kafka message once every window holding its verdict is stored."""

    __slots__ = ("ack", "remaining", "on_done")

    def __init__(self, ack: Callable[[], object] | None, remaining: int, on_done: Callable[[], None]):
        self.ack = ack
        self.remaining = remaining
        self.on_done = on_done

    def release(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.on_done()
            if self.ack is not None:
                self.ack()


@dataclass
class Window:
    """One tumbling window of one (line, camera, product)."""

    name: str
    start_ms: int
    line: str
    camera: str
    product: str
    frame_ids: set[str] = field(default_factory=set)
    defects: int = 0
    scores: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    total_latency_ms: list[float] = field(default_factory=list)
    positions: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)
    buckets: Counter = field(default_factory=Counter)
    acks: list[_Ack] = field(default_factory=list)
    changed: bool = True

    @property
    def end_ms(self) -> int:
        return self.start_ms + WINDOWS[self.name]

    def add(self, verdict: Verdict) -> None:
        self.frame_ids.add(verdict.frame_id)
        self.scores.append(verdict.score)
        latency = verdict.latency
        self.latency_ms.append(latency.model_ms)
        self.total_latency_ms.append(latency.queue_ms + latency.decode_ms + latency.model_ms + latency.publish_ms)
        self.buckets[score_bucket(verdict.score, verdict.threshold)] += 1
        if verdict.is_anomalous:
            self.defects += 1
            if verdict.regions:
                for region in verdict.regions:
                    self.positions[region.position] += 1
                    self.sizes[size_class(region.area_px, region.area_mm2)] += 1
            else:
                for position in verdict.positions:
                    self.positions[position] += 1
        self.changed = True

    def points(self) -> list[Point]:
        tags = {"window": self.name, "line": self.line, "camera": self.camera, "product": self.product}
        frames = len(self.frame_ids)
        scores = np.asarray(self.scores)
        latency = np.asarray(self.latency_ms)
        score_q = np.percentile(scores, [50, 90, 99])
        latency_q = np.percentile(latency, [50, 95, 99])
        fields = {
            "frames": frames, "defects": self.defects, "defect_rate": self.defects / frames,
            "score_p50": float(score_q[0]), "score_p90": float(score_q[1]), "score_p99": float(score_q[2]),
            "score_max": float(scores.max()),
            "latency_p50_ms": float(latency_q[0]), "latency_p95_ms": float(latency_q[1]),
            "latency_p99_ms": float(latency_q[2]), "latency_max_ms": float(latency.max()),
            "total_latency_p95_ms": float(np.percentile(self.total_latency_ms, 95)),
        }
        points = [Point("defect_stats", tags, fields, self.start_ms)]
        points += [Point("defect_positions", tags | {"position": p}, {"defects": n}, self.start_ms)
                   for p, n in sorted(self.positions.items())]
        points += [Point("defect_sizes", tags | {"size_class": s}, {"defects": n}, self.start_ms)
                   for s, n in sorted(self.sizes.items())]
        points += [Point("score_histogram", tags | {"bucket": b}, {"frames": n}, self.start_ms)
                   for b, n in sorted(self.buckets.items())]
        return points


@dataclass
class Emission:
    """What one tick of the aggregator wants written: points, and the acks to release after."""

    points: list[Point] = field(default_factory=list)
    on_written: list[Callable[[], None]] = field(default_factory=list)
    final_windows: int = 0
    closed_through_ms: int | None = None

    def callback(self) -> Callable[[], None] | None:
        if not self.on_written:
            return None
        callbacks = list(self.on_written)

        def run() -> None:
            for callback in callbacks:
                callback()

        return run


@dataclass
class AggregatorCounters:
    verdicts: int = 0
    counted: int = 0
    duplicates: int = 0
    late: int = 0
    windows_final: int = 0


class WindowAggregator:
    """Tumbling windows of verdicts, deduplicated by frame_id; pure Python, no I/O.

        >>> agg = WindowAggregator(lateness_ms=0, idle_close_ms=0)
        >>> agg.add(verdict)                         # True: counted
        >>> emission = agg.due(now_ms=...)           # points of windows that closed
    """

    def __init__(self, *, lateness_ms: int = 30_000, idle_close_ms: int = 2_000, floor_ms: int = 0):
        self.lateness_ms = lateness_ms
        self.idle_close_ms = idle_close_ms
        self.floor_ms = floor_ms            # windows ending at or before this are already final
        self.windows: dict[tuple, Window] = {}
        self.max_event_ms = floor_ms
        # per source partition: [newest event time, wall time of the last arrival]
        self.partitions: dict[object, list[float]] = {}
        self.last_arrival_ms: float | None = None
        self.counters = AggregatorCounters()
        self.pending = 0  # verdicts counted but not yet acknowledged (windows not final or not written)
        self.recent_final: OrderedDict[str, None] = OrderedDict()  # frame_ids of recently final windows
        self.final_windows: OrderedDict[tuple, None] = OrderedDict()  # keys of recently final windows

    def _done(self) -> None:
        self.pending -= 1

    def watermark(self, now_ms: float | None = None) -> float:
        """Event time up to which every partition has delivered; windows become final by it alone.

        Partitions are read at different speeds, so the watermark is the slowest active partition's
        newest event time. A partition silent for longer than lateness + idle time (a camera that
        stopped) no longer holds it back.
        """
        if not self.partitions:
            return self.max_event_ms
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        quiet_ms = self.lateness_ms + self.idle_close_ms
        active = [newest for newest, arrival in self.partitions.values() if now_ms - arrival < quiet_ms]
        return max(min(active), self.floor_ms) if active else self.max_event_ms

    def idle(self, now_ms: float) -> bool:
        """No verdict for `idle_close_ms` of wall time: emit what is open, so dashboards stay fresh."""
        return self.last_arrival_ms is not None and now_ms - self.last_arrival_ms >= self.idle_close_ms

    def add(self, verdict: Verdict, ack: Callable[[], object] | None = None, now_ms: float | None = None,
            partition: object = None) -> bool:
        """Count a verdict; False when it was a duplicate or late (then `ack` runs at once).

        `partition` names the Kafka partition it came from (for the watermark).
        """
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        self.counters.verdicts += 1
        event_ms = epoch_ms(verdict)
        source = self.partitions.setdefault(partition, [float(self.floor_ms), now_ms])
        watermark = self.watermark(now_ms)
        targets: list[Window] = []
        duplicate = late = False
        for name, size in WINDOWS.items():
            start = event_ms - event_ms % size
            key = (name, start, verdict.line_id, verdict.camera_id, verdict.product)
            window = self.windows.get(key)
            if window is not None and verdict.frame_id in window.frame_ids:
                duplicate = True
                continue
            # A final window is never re-opened: its point in InfluxDB holds its final counts. The watermark
            # alone cannot say so, since a partition waking up after a silence holds it back again.
            if (key in self.final_windows or start + size <= self.floor_ms
                    or start + size + self.lateness_ms <= watermark):
                late = True
                continue
            if window is None:
                window = self.windows[key] = Window(name, start, verdict.line_id, verdict.camera_id,
                                                    verdict.product)
            targets.append(window)
        self.last_arrival_ms = now_ms
        self.max_event_ms = max(self.max_event_ms, event_ms)
        source[0] = max(source[0], event_ms)
        source[1] = now_ms
        if not targets:
            if duplicate or verdict.frame_id in self.recent_final:
                self.counters.duplicates += 1
            else:
                self.counters.late += 1
                log.warning("verdict_late", frame_id=verdict.frame_id, camera_id=verdict.camera_id,
                            captured_at=verdict.captured_at.isoformat(), late_total=self.counters.late)
            if ack is not None:
                ack()
            return False
        if late and not duplicate:
            self.counters.late += 1
        pending = _Ack(ack, len(targets), self._done)
        self.pending += 1
        for window in targets:
            window.add(verdict)
            window.acks.append(pending)
        self.counters.counted += 1
        return True

    def _remember(self, frame_ids: set[str]) -> None:
        for frame_id in frame_ids:
            self.recent_final[frame_id] = None
        while len(self.recent_final) > RECENT_FINAL_FRAMES:
            self.recent_final.popitem(last=False)

    def due(self, now_ms: float | None = None, *, flush_all: bool = False) -> Emission:
        """Points of windows to (re-)write, and the windows that became final.

        A changed window is emitted once the watermark passes its end, or at once when the stream is
        idle. It becomes final (dropped from memory, its verdicts acknowledged after the write) only
        when the event-time watermark passes end + lateness: wall-clock time never finalises a
        window, so a backlog replayed after an upstream outage still lands in its windows.
        `flush_all` emits every open window as it stands (at shutdown) without finalising any.
        """
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        watermark = self.watermark(now_ms)
        idle = self.idle(now_ms)
        emission = Emission()
        for key, window in list(self.windows.items()):
            final = not flush_all and window.end_ms + self.lateness_ms <= watermark
            if window.changed and (flush_all or final or idle or window.end_ms <= watermark):
                emission.points.extend(window.points())
                window.changed = False
            if final:
                del self.windows[key]
                self.final_windows[key] = None
                while len(self.final_windows) > RECENT_FINAL_WINDOWS:
                    self.final_windows.popitem(last=False)
                if window.name == "10s":
                    self._remember(window.frame_ids)
                emission.on_written.extend(a.release for a in window.acks)
                emission.final_windows += 1
        if emission.final_windows:
            self.counters.windows_final += emission.final_windows
            size = WINDOWS["1m"]
            closed = int(watermark - self.lateness_ms)
            # every 10 s window and every 1 min window ending at or before this is final
            emission.closed_through_ms = closed - closed % size
        return emission


class DeadLetterCounter:
    """Dead letters per 10 s (by `failed_at`), per service, source topic and error type.

    An open window is (re-)written whenever it changed; it is final `lateness_ms` after its end
    (wall clock: a dead letter is stamped when it is written), and its messages are acknowledged then.
    """

    def __init__(self, lateness_ms: int = 10_000):
        self.lateness_ms = lateness_ms
        self.windows: dict[tuple, list] = {}   # key -> [seen, acks, changed]

    def add(self, letter: DeadLetter, ack: Callable[[], object] | None = None) -> None:
        size = WINDOWS["10s"]
        at = int(letter.failed_at.timestamp() * 1000)
        key = (at - at % size, letter.service, letter.source_topic, letter.error_type)
        window = self.windows.setdefault(key, [set(), [], False])
        identity = (letter.source_topic, letter.partition, letter.offset, letter.key, letter.reason)
        if identity not in window[0]:
            window[0].add(identity)
            window[2] = True
        if ack is not None:
            window[1].append(ack)

    def due(self, now_ms: float | None = None, *, flush_all: bool = False) -> Emission:
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        emission = Emission()
        for key, window in list(self.windows.items()):
            seen, acks, changed = window
            start, service, source_topic, error_type = key
            final = not flush_all and start + WINDOWS["10s"] + self.lateness_ms <= now_ms
            if changed:
                tags = {"window": "10s", "service": service, "source_topic": source_topic, "error_type": error_type}
                emission.points.append(Point("dead_letters", tags, {"count": len(seen)}, start))
                window[2] = False
            if final:
                del self.windows[key]
                emission.on_written.extend(acks)
        return emission


# -- the faust app -----------------------------------------------------------------------------

class StatsService:
    """The aggregator's state and its I/O: faust app, InfluxDB writer, windows, lag probe."""

    def __init__(self, settings: Settings, storage_settings: StorageSettings, writer: InfluxWriter | None = None):
        self.settings = settings
        self.storage_settings = storage_settings
        self.writer = writer or InfluxWriter.from_settings(settings, storage_settings)
        self.aggregator = WindowAggregator(lateness_ms=int(storage_settings.stats_lateness_s * 1000),
                                           idle_close_ms=int(storage_settings.stats_idle_close_s * 1000))
        self.dead_letters = DeadLetterCounter(lateness_ms=int(storage_settings.stats_lateness_s * 1000))
        self.bad_verdicts = 0
        self.app = None
        self.state = "starting"             # starting, ok, stopping: what /healthz answers
        self._tick_lock = asyncio.Lock()
        self._dead_letter_producer = None

    @property
    def progress_tags(self) -> dict[str, str]:
        return {"group": self.storage_settings.stats_group, "topic": self.settings.topic(VERDICTS)}

    # -- start-up ---------------------------------------------------------------------------
    def _progress_query(self) -> str:
        tags = self.progress_tags
        return (f'SELECT last("closed_through_ms") FROM "{PROGRESS_MEASUREMENT}" '
                f"WHERE \"group\" = '{tags['group']}' AND \"topic\" = '{tags['topic']}'")

    async def check_influx(self, retry_s: float = 2.0) -> None:
        """Read and write once each before consuming: a token without read (or write) is fatal, in one line that
        names the missing permission (InfluxPermissionError, a ConfigError); an unreachable server is waited for."""
        transport = self.writer.transport
        target = getattr(transport, "bucket", None) or getattr(transport, "database", "?")
        probe = Point(PROBE_MEASUREMENT, {"group": self.storage_settings.stats_group}, {"started": True},
                      int(time.time() * 1000))
        reported = False
        while True:
            try:
                await check_permissions(transport, self._progress_query(), probe, target=f"'{target}'",
                                        credentials=credential_settings(self.storage_settings))
                break
            except InfluxUnavailable as exc:
                if not reported:
                    log.warning("influx_unavailable", url=transport.url, error=str(exc)[:200],
                                action="waiting to check read and write permissions")
                    reported = True
                await asyncio.sleep(retry_s)
        if reported:
            log.info("influx_recovered", url=transport.url)

    async def read_progress(self, retry_s: float = 2.0) -> int:
        """The end of the last final window written before (0 if none); waits for InfluxDB."""
        query = self._progress_query()
        reported = False
        while True:
            try:
                series = await self.writer.transport.query(query)
                break
            except InfluxRejected as exc:
                if "database not found" in str(exc):
                    return 0
                raise
            except InfluxUnavailable as exc:
                if not reported:
                    log.warning("influx_unavailable", url=self.writer.transport.url, error=str(exc)[:200],
                                action="waiting to read the aggregator's progress")
                    reported = True
                await asyncio.sleep(retry_s)
        if reported:
            log.info("influx_recovered", url=self.writer.transport.url)
        if not series:
            return 0
        return int(series[0]["values"][0][1] or 0)

    def make_app(self):
        import faust

        conf = faust_kwargs(self.settings)
        app = faust.App(self.storage_settings.stats_group, **conf)
        verdicts = app.topic(self.settings.topic(VERDICTS), value_serializer="raw", key_serializer="raw")
        dead = app.topic(self.settings.topic(DEADLETTER), value_serializer="raw", key_serializer="raw")

        @app.agent(verdicts, name="count_verdicts")
        async def count_verdicts(stream):
            async for event in stream.noack().events():
                while self.aggregator.pending > MAX_PENDING_VERDICTS:  # noqa: ASYNC110 - polled back-pressure
                    await asyncio.sleep(0.1)   # the writer is behind (InfluxDB down?): stop reading
                await self.on_verdict(event.message, event.ack)

        @app.agent(dead, name="count_dead_letters")
        async def count_dead_letters(stream):
            async for event in stream.noack().events():
                try:
                    letter = DeadLetter.from_bytes(event.message.value)
                except ValueError as exc:
                    log.error("bad_dead_letter", offset=event.message.offset, error=str(exc)[:200])
                    event.ack()
                    continue
                self.dead_letters.add(letter, event.ack)

        @app.timer(0.5, name="close_windows")
        async def close_windows():
            await self.tick()

        @app.timer(self.storage_settings.stats_lag_interval_s, name="probe_lag")
        async def probe_lag():
            await self.probe_lag()

        self.app = app
        return app

    # -- stream ---------------------------------------------------------------------------
    async def on_verdict(self, message, ack: Callable[[], object]) -> None:
        try:
            verdict = Verdict.from_bytes(message.value)
        except ValueError as exc:
            self.bad_verdicts += 1
            await self._dead_letter(message, exc)
            ack()
            return
        self.aggregator.add(verdict, ack, partition=message.partition)

    async def tick(self, *, flush_all: bool = False) -> None:
        async with self._tick_lock:
            for emission in (self.aggregator.due(flush_all=flush_all), self.dead_letters.due(flush_all=flush_all)):
                points = list(emission.points)
                if emission.closed_through_ms:
                    points.append(Point(PROGRESS_MEASUREMENT, self.progress_tags,
                                        {"closed_through_ms": emission.closed_through_ms},
                                        emission.closed_through_ms))
                if points or emission.on_written:
                    await self.writer.put(points, emission.callback())
                if emission.final_windows:
                    log.debug("windows_final", n=emission.final_windows, points=len(points),
                              buffered=self.writer.buffered)

    async def probe_lag(self) -> None:
        """Write `kafka_lag` for the configured consumer groups (best effort)."""
        try:
            points = await consumer_lag_points(self.settings, self.storage_settings.lag_groups)
        except Exception as exc:  # noqa: BLE001 - a lag probe must never stop the aggregator
            log.debug("lag_probe_failed", error=str(exc)[:200])
            return
        if points:
            await self.writer.put(points)

    async def _dead_letter(self, message, exc: Exception) -> None:
        from lineguard.kafka import make_producer, publish_dead_letter, start_client

        if self._dead_letter_producer is None:
            self._dead_letter_producer = make_producer(self.settings)
            await start_client(self.settings, self._dead_letter_producer)
        letter = DeadLetter(source_topic=message.topic, partition=message.partition, offset=message.offset,
                            key=message.key.decode(errors="replace") if message.key else None,
                            reason=str(exc).splitlines()[0][:500], error_type=type(exc).__name__,
                            service="stats", payload=message.value or b"")
        await publish_dead_letter(self._dead_letter_producer, self.settings, letter)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        from lineguard.kafka import ensure_topics

        logging.getLogger("faust").setLevel(logging.WARNING)
        logging.getLogger("mode").setLevel(logging.WARNING)
        await ensure_topics(self.settings)
        await self.check_influx()
        await self.writer.start()
        floor = await self.read_progress()
        self.aggregator.floor_ms = floor
        self.aggregator.max_event_ms = max(self.aggregator.max_event_ms, floor)
        app = self.make_app()
        await app.start()
        self.state = "ok"
        log.info("stats_started", group=self.storage_settings.stats_group, topic=self.settings.topic(VERDICTS),
                 influx=self.writer.transport.url, api=getattr(self.writer.transport, "name", "?"),
                 resume_after_ms=floor or None)

    async def stop(self) -> None:
        """Write the open windows as they stand (not final, so not acknowledged), then stop."""
        self.state = "stopping"
        with contextlib.suppress(Exception):
            await self.tick(flush_all=True)
        if self.app is not None:
            await self.app.stop()
        await self.writer.close()
        if self._dead_letter_producer is not None:
            await self._dead_letter_producer.stop()
        counters = self.aggregator.counters
        log.info("stats_stopped", verdicts=counters.verdicts, counted=counters.counted,
                 duplicates=counters.duplicates, late=counters.late, windows_final=counters.windows_final,
                 points_written=self.writer.stats.written, bad_verdicts=self.bad_verdicts)

    def health(self) -> dict:
        """What `/healthz` answers: the state, and whether InfluxDB takes the points (they wait in a bounded
        buffer while it does not, so an outage alone does not make the service unhealthy)."""
        counters, stats = self.aggregator.counters, self.writer.stats
        return {"status": self.state, "verdicts": counters.verdicts, "windows_final": counters.windows_final,
                "bad_verdicts": self.bad_verdicts, "influx": "up" if stats.down_since is None else "down",
                "points_written": stats.written, "points_buffered": self.writer.buffered}


async def consumer_lag_points(settings: Settings, groups: list[str]) -> list[Point]:
    """Lag (end offset - committed offset) per consumer group and topic, as `kafka_lag` points.

    Committed offsets are read the way a consumer reads its own (OffsetFetch through the group
    coordinator, with manual assignment, so no group is joined): the admin client's
    list_consumer_group_offsets is not understood by the embedded broker.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from lineguard.kafka import client_kwargs
    from lineguard.topics import TOPICS

    now = int(time.time() * 1000)
    points: list[Point] = []
    probe = AIOKafkaConsumer(**client_kwargs(settings), group_id=None, enable_auto_commit=False)
    await probe.start()
    try:
        partitions = [TopicPartition(settings.topic(t.name), p)
                      for t in TOPICS for p in sorted(probe.partitions_for_topic(settings.topic(t.name)) or ())]
        ends = await probe.end_offsets(partitions) if partitions else {}
    finally:
        await probe.stop()
    for group in groups:
        consumer = AIOKafkaConsumer(**client_kwargs(settings), group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign(partitions)
            per_topic: dict[str, list[int]] = {}
            for tp in partitions:
                committed = await consumer.committed(tp)
                if committed is not None and committed >= 0:
                    per_topic.setdefault(tp.topic, []).append(max(0, ends.get(tp, committed) - committed))
        finally:
            await consumer.stop()
        for topic, lags in per_topic.items():
            points.append(Point("kafka_lag", {"group": group, "topic": topic},
                                {"lag": int(sum(lags)), "partitions": len(lags)}, now))
    return points


async def run_stats(settings: Settings, storage_settings: StorageSettings, *, seconds: float | None = None,
                    ready: asyncio.Event | None = None, stop: asyncio.Event | None = None,
                    http: tuple[str, int] | None = None) -> StatsService:
    """Run the aggregator until `stop` is set, `seconds` pass, or it is cancelled; then stop it cleanly.
    `http` (host, port): serve /healthz there meanwhile."""
    service = StatsService(settings, storage_settings)
    server = serve_health("lineguard stats", service.health, http)
    try:
        await service.start()
        if ready is not None:
            ready.set()
        stop = stop or asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
    finally:
        await asyncio.shield(service.stop())
        await stop_server(server)
    return service


__all__ = ["POSITIONS", "WINDOWS", "StatsService", "WindowAggregator", "run_stats"]
