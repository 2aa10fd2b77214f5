"""Inspection records (`lineguard store`): every flagged frame kept durably, normal frames counted.

Design. A record needs three messages that travel apart: the JPEG (frames topic), the verdict
(verdicts) and the heatmap with its overlay (heatmaps). The recorder consumes all three, plus
labels, in one consumer group and joins them by frame_id in a bounded pending buffer:

- A frame or heatmap waits in the buffer for its verdict. The verdict decides: a flagged frame
  (`is_anomalous`), or a normal one picked by the deterministic sample (a hash of frame_id below
  `LINEGUARD_STORE_NORMAL_SAMPLE_RATE`), becomes a record once image and heatmap are there; any
  other frame is only counted, and its parts are dropped.
- A needed verdict whose image or heatmap has not come within `LINEGUARD_STORE_JOIN_TIMEOUT_S` is
  stored without it (the record says what is `missing`), so an upstream loss never blocks the line.
- Back-pressure: when `LINEGUARD_STORE_PENDING_FRAMES` frames wait for verdicts (the inference
  workers are behind), the recorder pauses the frames and heatmaps partitions until verdicts catch
  up; verdicts and labels keep flowing. If frames still wait after the join timeout while the
  buffer is full (their verdicts will never come, e.g. dead-lettered), the oldest are dropped, each
  logged with its frame_id.

At-least-once, idempotent by frame_id. Each loop is written out below: `getmany()` → join →
save (artifacts first, each fsynced and renamed into place, then one SQL transaction with the
records, the counts and the labels) → release the saved messages' offsets → commit. The offset
committed per partition is the lowest offset still pending (`OffsetTracker`), so nothing is
committed past a message whose record is not saved. Replays overwrite the same artifact paths and
upsert the same frame_id. Counts are exact on replay because `count_progress` keeps, in the same
transaction, the last verdict offset counted per partition; a verdict re-delivered under a new
offset (an inference worker that re-published it) is recognised by its frame_id and not counted
again: in memory (the last 100 000) and, across restarts, in `counted_frames`.

A save that fails (unwritable artifact directory, full disk, database error) raises
`StorageError` with the path and the reason; the recorder commits only the offsets before the first
unsaved message and stops, and `lineguard store` exits 1 with that message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

from lineguard.db import redact_url
from lineguard.events import BadFrame, FrameMeta, Heatmap, Label, Verdict, decode_frame
from lineguard.health import serve_health, stop_server
from lineguard.logging import get_logger
from lineguard.offsets import OffsetTracker
from lineguard.settings import Settings
from lineguard.topics import FRAMES, HEATMAPS, LABELS, VERDICTS
from storage.artifacts import StorageError
from storage.records import (
    COMMIT_INTERVAL_S,
    RECENT_VERDICTS,
    RETENTION_INTERVAL_S,
    Counted,
    PendingRecord,
    RecordStore,
    SaveBatch,
    sampled,
)
from storage.settings import StorageSettings

log = get_logger(__name__)

Ref = tuple[Hashable, int]   # (TopicPartition, offset)



@dataclass
class Pending:
    """The parts of one frame seen so far."""

    frame_id: str
    first_seen: float
    frame: tuple[Ref, FrameMeta, bytes] | None = None
    heatmap: tuple[Ref, Heatmap] | None = None
    verdict: tuple[Ref, Verdict] | None = None
    verdict_seen: float | None = None
    kind: Literal["flagged", "sample"] | None = None

    def refs(self) -> list[Ref]:
        return [part[0] for part in (self.frame, self.heatmap, self.verdict) if part is not None]


class Joiner:
    """The bounded pending buffer: frame, heatmap and verdict of one frame_id meet here."""

    def __init__(self, *, capacity: int, join_timeout_s: float, sample_rate: float):
        self.capacity = capacity
        self.join_timeout_s = join_timeout_s
        self.sample_rate = sample_rate
        self.entries: OrderedDict[str, Pending] = OrderedDict()
        self.resolved: OrderedDict[str, None] = OrderedDict()   # frame_ids done with: later parts are dropped
        self.evicted = 0

    def _entry(self, frame_id: str, now: float) -> Pending:
        entry = self.entries.get(frame_id)
        if entry is None:
            entry = self.entries[frame_id] = Pending(frame_id, now)
        return entry

    def _resolve(self, frame_id: str) -> None:
        self.entries.pop(frame_id, None)
        self.resolved[frame_id] = None
        while len(self.resolved) > RECENT_VERDICTS:
            self.resolved.popitem(last=False)

    @property
    def awaiting_verdict(self) -> int:
        return sum(1 for entry in self.entries.values() if entry.verdict is None)

    def add_frame(self, ref: Ref, meta: FrameMeta, jpeg: bytes, now: float) -> list[Ref]:
        """Returns refs that can be released at once (a frame nobody needs any more)."""
        if meta.frame_id in self.resolved:
            return [ref]
        entry = self._entry(meta.frame_id, now)
        if entry.frame is not None:
            return [ref]        # the same frame re-delivered while pending
        entry.frame = (ref, meta, jpeg)
        return []

    def add_heatmap(self, ref: Ref, heatmap: Heatmap, now: float) -> list[Ref]:
        if heatmap.frame_id in self.resolved:
            return [ref]
        entry = self._entry(heatmap.frame_id, now)
        if entry.heatmap is not None:
            return [ref]
        entry.heatmap = (ref, heatmap)
        return []

    def add_verdict(self, ref: Ref, verdict: Verdict, now: float) -> list[Ref]:
        """Returns refs to release once this loop's counts are saved (a frame that needs no record)."""
        if verdict.frame_id in self.resolved:
            return [ref]
        entry = self._entry(verdict.frame_id, now)
        if entry.verdict is not None:
            return [ref]
        entry.verdict = (ref, verdict)
        entry.verdict_seen = now
        if verdict.is_anomalous:
            entry.kind = "flagged"
        elif sampled(verdict.frame_id, self.sample_rate):
            entry.kind = "sample"
        else:
            refs = entry.refs()
            self._resolve(verdict.frame_id)
            return refs
        return []

    def take_ready(self, now: float) -> tuple[list[tuple[PendingRecord, list[Ref]]], list[Ref]]:
        """Records ready to save (complete, or timed out), and refs of frames dropped for good."""
        ready: list[tuple[PendingRecord, list[Ref]]] = []
        for frame_id, entry in list(self.entries.items()):
            if entry.verdict is None:
                continue
            complete = entry.frame is not None and entry.heatmap is not None
            timed_out = entry.verdict_seen is not None and now - entry.verdict_seen > self.join_timeout_s
            if complete or timed_out:
                if not complete:
                    log.warning("record_incomplete", frame_id=frame_id, camera_id=entry.verdict[1].camera_id,
                                frame=entry.frame is not None, heatmap=entry.heatmap is not None,
                                waited_s=round(now - (entry.verdict_seen or now), 1))
                record = PendingRecord(entry.verdict[1], entry.frame[2] if entry.frame else None,
                                       entry.heatmap[1] if entry.heatmap else None, entry.kind or "flagged")
                ready.append((record, entry.refs()))
        dropped: list[Ref] = []
        if self.awaiting_verdict >= self.capacity:
            for frame_id, entry in list(self.entries.items()):
                if self.awaiting_verdict < self.capacity:
                    break
                if entry.verdict is None and now - entry.first_seen > self.join_timeout_s:
                    log.warning("frame_dropped_no_verdict", frame_id=frame_id,
                                waited_s=round(now - entry.first_seen, 1), pending=len(self.entries))
                    dropped.extend(entry.refs())
                    self._resolve(frame_id)
                    self.evicted += 1
        return ready, dropped

    def done(self, frame_id: str) -> None:
        self._resolve(frame_id)

    def forget(self) -> None:
        self.entries.clear()


# -- the consumer loop -------------------------------------------------------------------------
@dataclass
class RecorderCounters:
    frames: int = 0
    verdicts: int = 0
    duplicates: int = 0
    records: int = 0
    flagged: int = 0
    sampled: int = 0
    labels: int = 0
    bad: int = 0
    saves: int = 0


class Recorder:
    """The `lineguard store` consumer (see the module docstring for the design)."""

    def __init__(self, settings: Settings, storage_settings: StorageSettings, store: RecordStore | None = None):
        self.settings = settings
        self.storage_settings = storage_settings
        self.store = store or RecordStore.from_settings(settings, storage_settings)
        self.tracker = OffsetTracker()
        self.joiner = Joiner(capacity=storage_settings.store_pending_frames,
                             join_timeout_s=storage_settings.store_join_timeout_s,
                             sample_rate=storage_settings.store_normal_sample_rate)
        self.recent_verdicts: OrderedDict[str, None] = OrderedDict()
        self.counters = RecorderCounters()
        self.consumer = None
        self.state = "starting"             # starting, ok, stopping, failed: what /healthz answers
        self._paused = False

    async def run(self, *, stop: asyncio.Event | None = None, seconds: float | None = None,
                  commit: bool = True) -> RecorderCounters:
        """Consume until `stop` is set, `seconds` pass, or cancelled. `commit=False` never commits (tests)."""
        from aiokafka import ConsumerRebalanceListener

        from lineguard.kafka import ensure_topics, make_consumer, start_client

        await ensure_topics(self.settings)
        recorder = self

        class Rebalance(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked):
                if revoked and recorder.consumer is not None and commit:
                    await recorder._commit(recorder.consumer)
                recorder.tracker.forget()   # the next owner replays what was not saved
                recorder.joiner.forget()
                recorder._paused = False

            async def on_partitions_assigned(self, assigned):
                log.info("store_partitions_assigned", n=len(assigned))

        consumer = make_consumer(self.settings, group_id=self.storage_settings.store_group,
                                 max_poll_records=500)
        consumer.subscribe([self.settings.topic(t) for t in (FRAMES, VERDICTS, HEATMAPS, LABELS)],
                           listener=Rebalance())
        await start_client(self.settings, consumer)
        self.consumer = consumer
        await asyncio.to_thread(self._purge)
        self.state = "ok"
        log.info("store_started", group=self.storage_settings.store_group, db=redact_url(self.store.url),
                 artifacts=self.store.artifacts.root, sample_rate=self.storage_settings.store_normal_sample_rate)
        deadline = None if seconds is None else time.monotonic() + seconds
        last_commit = last_purge = time.monotonic()
        failed = False
        try:
            while not (stop is not None and stop.is_set()) and (deadline is None or time.monotonic() < deadline):
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
                now = time.monotonic()
                batch, release_after_save = SaveBatch(), []
                for tp, messages in batches.items():
                    for message in messages:
                        release_after_save += self._dispatch(tp, message, batch, now)
                ready, dropped = self.joiner.take_ready(now)
                batch.records = [record for record, _ in ready]
                if batch:
                    try:
                        await asyncio.to_thread(self.store.save, batch)
                    except StorageError as exc:
                        failed = True
                        log.error("store_failed", error=str(exc), unsaved_records=len(batch.records),
                                  action="stopping; offsets are committed only up to the first unsaved message")
                        raise
                    self.counters.saves += 1
                for record, refs in ready:
                    release_after_save += refs
                    self.joiner.done(record.verdict.frame_id)
                    self.counters.records += 1
                    self.counters.flagged += record.kind == "flagged"
                    self.counters.sampled += record.kind == "sample"
                for ref in release_after_save + dropped:
                    self.tracker.done(*ref)
                self._flow_control(consumer)
                if commit and now - last_commit >= COMMIT_INTERVAL_S:
                    await self._commit(consumer)
                    last_commit = now
                if now - last_purge >= RETENTION_INTERVAL_S:
                    await asyncio.to_thread(self._purge)
                    last_purge = now
        finally:
            self.state = "failed" if failed else "stopping"
            if commit:
                with contextlib.suppress(Exception):
                    await self._commit(consumer)   # only offsets below every unsaved message
            await consumer.stop()
            self.consumer = None
            log.info("store_stopped", failed=failed, **vars(self.counters), pending=len(self.joiner.entries))
        return self.counters

    def health(self) -> dict:
        """What `/healthz` answers: the state and what was kept so far."""
        return {"status": self.state, **vars(self.counters), "pending": len(self.joiner.entries)}

    def _dispatch(self, tp, message, batch: SaveBatch, now: float) -> list[Ref]:
        """Route one message into the join; returns refs to release after this loop's save."""
        self.tracker.add(tp, [message.offset])
        ref = (tp, message.offset)
        topic = message.topic[len(self.settings.topic_prefix):]
        try:
            if topic == FRAMES:
                meta, jpeg = decode_frame(message.value, message.headers)
                self.counters.frames += 1
                return self.joiner.add_frame(ref, meta, jpeg, now)
            if topic == HEATMAPS:
                return self.joiner.add_heatmap(ref, Heatmap.from_bytes(message.value), now)
            if topic == VERDICTS:
                verdict = Verdict.from_bytes(message.value)
                self.counters.verdicts += 1
                if verdict.frame_id in self.recent_verdicts:
                    self.counters.duplicates += 1
                    batch.counted.append(Counted(message.topic, message.partition, message.offset, None))
                    return [ref]
                self.recent_verdicts[verdict.frame_id] = None
                while len(self.recent_verdicts) > RECENT_VERDICTS:
                    self.recent_verdicts.popitem(last=False)
                sample = not verdict.is_anomalous and sampled(verdict.frame_id, self.joiner.sample_rate)
                batch.counted.append(Counted(message.topic, message.partition, message.offset, verdict, sample))
                return self.joiner.add_verdict(ref, verdict, now)
            if topic == LABELS:
                batch.labels.append(Label.from_bytes(message.value))
                self.counters.labels += 1
                return [ref]
        except (BadFrame, ValueError) as exc:
            # unreadable input is the producer's to dead-letter; the recorder skips it, visibly
            self.counters.bad += 1
            log.warning("store_skipped_bad_message", topic=message.topic, partition=message.partition,
                        offset=message.offset, error=str(exc).splitlines()[0][:200])
        return [ref]

    def _flow_control(self, consumer) -> None:
        """Pause frames and heatmaps while too many frames wait for their verdicts."""
        waiting = self.joiner.awaiting_verdict
        held = [tp for tp in consumer.assignment()
                if tp.topic in (self.settings.topic(FRAMES), self.settings.topic(HEATMAPS))]
        if not self._paused and waiting >= self.joiner.capacity:
            consumer.pause(*held)
            self._paused = True
            log.warning("store_paused_frames", waiting_for_verdicts=waiting, capacity=self.joiner.capacity)
        elif self._paused and waiting < self.joiner.capacity * 0.8:
            consumer.resume(*held)
            self._paused = False
            log.info("store_resumed_frames", waiting_for_verdicts=waiting)

    async def _commit(self, consumer) -> None:
        offsets = self.tracker.committable()
        if offsets:
            await consumer.commit(offsets)
            self.tracker.committed(offsets)

    def _purge(self) -> None:
        ss = self.storage_settings
        self.store.purge(retention_days=ss.store_retention_days, normal_retention_days=ss.store_normal_retention_days,
                         keep_labelled=ss.store_keep_labelled)


async def run_recorder(settings: Settings, storage_settings: StorageSettings, *, seconds: float | None = None,
                       stop: asyncio.Event | None = None, http: tuple[str, int] | None = None) -> RecorderCounters:
    """Run `lineguard store` until cancelled (or for `seconds`); `http` (host, port): serve /healthz there."""
    recorder = Recorder(settings, storage_settings)
    server = serve_health("lineguard store", recorder.health, http)
    try:
        return await recorder.run(seconds=seconds, stop=stop)
    finally:
        await stop_server(server)
        recorder.store.close()
