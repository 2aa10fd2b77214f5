"""The streaming inference worker (`lineguard infer`): frames in, a Verdict and a Heatmap out for each.

The whole loop is in this file. Five stages run concurrently, joined by bounded queues, so the
model never waits for I/O and a slow stage pushes back on the fetch:

    fetch    consumer.getmany() until --max-batch frames or --max-wait-ms   (event loop)
    decode   FrameMeta + JPEG → image, bad frames → dead letters            (thread pool)
    score    model.score(batch of mixed products)                           (model thread)
    publish  Verdict + Heatmap → send, await acks                           (event loop + PNG thread)
    explain  flagged frames only: the answer (model.explain), then Verdict  (text thread)

Commit rule: an offset is committed only when the broker acknowledged the outputs (verdict and
heatmap, or the dead letter) of every frame before it in its partition (`OffsetTracker`).
On a rebalance the revoked partitions are drained and committed before they are given up; on
SIGTERM the worker stops fetching, finishes what it holds, commits and leaves the group.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Protocol

import cv2
import numpy as np
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.structs import TopicPartition

from inference.offsets import OffsetTracker
from inference.outputs import heatmap_png, overlay_jpeg
from inference.references import ReferenceStore
from inference.telemetry import WorkerMetrics
from lineguard.events import (
    BadFrame,
    DeadLetter,
    FrameMeta,
    Heatmap,
    Latency,
    ModelUpdate,
    Region,
    Verdict,
    decode_frame,
)
from lineguard.kafka import consumer_kwargs, make_consumer, make_producer, publish_dead_letter, start_client
from lineguard.logging import get_logger
from lineguard.settings import Settings
from lineguard.topics import FRAMES, HEATMAPS, MODEL_UPDATES, VERDICTS

log = get_logger(__name__)

GROUP_ID = "lineguard-inference"
JOIN_TIMEOUT_S = 60.0
DEAD_LETTER_PAYLOAD_LIMIT = 256 * 1024


# --- what the worker needs from the model ---------------------------------------------------------

@dataclass
class FrameInput:
    image: np.ndarray          # (H, W, 3) uint8 BGR
    product: str
    mm_per_px: float | None = None


@dataclass
class Scored:
    score: float
    threshold: float
    is_anomalous: bool
    confidence: float
    regions: list[Region]
    positions: list[str]
    anomaly_map: np.ndarray    # (H, W) float32 at frame resolution


class Scorer(Protocol):
    version: str

    def products(self) -> set[str]: ...
    def set_references(self, product: str, images: list[np.ndarray]) -> None: ...
    def score(self, frames: list[FrameInput]) -> list[Scored]: ...
    def explain(self, items: list[tuple[FrameInput, Scored]]) -> list[str]: ...


# --- the work items flowing between stages ----------------------------------------------------------

@dataclass(eq=False)
class Item:
    record: object                         # aiokafka ConsumerRecord
    fetched_at: float                      # time.monotonic() when getmany() returned it
    meta: FrameMeta | None = None
    frame: FrameInput | None = None
    scored: Scored | None = None
    latency: dict[str, float] = field(default_factory=dict)

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.record.topic, self.record.partition)


@dataclass
class WorkerConfig:
    max_batch: int = 16
    max_wait_ms: int = 50
    decode_threads: int = 2
    text_batch: int = 8
    group_id: str = GROUP_ID
    queue_batches: int = 2            # batches buffered between stages
    model_threads: int = 2            # model calls in flight. CUDA: one batch's CPU pre/post-processing
                                      # overlaps the next one's GPU work. CPU: batches run side by side,
                                      # each on its share of the cores (model_cpu_threads)
    model_cpu_threads: int | None = None  # torch threads per model call on a CPU; None = torch's own thread
                                          # count (the usable cores) / model_threads
    drain_timeout_s: float = 30.0
    http_port: int | None = None      # /healthz and /metrics; None = off
    explain: bool = True              # attach LVLM answers to flagged verdicts


class InferenceWorker:
    def __init__(self, settings: Settings, model: Scorer, config: WorkerConfig | None = None,
                 metrics: WorkerMetrics | None = None):
        self.settings = settings
        self.model = model
        self.config = config or WorkerConfig()
        self.metrics = metrics or WorkerMetrics()
        self.references = ReferenceStore(settings.state_dir)
        self.tracker = OffsetTracker()
        self.decode_pool = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="decode")
        device = getattr(getattr(model, "device", None), "type", "cpu")
        self.model_threads = max(1, self.config.model_threads)
        initializer = None
        if device == "cpu":
            # one torch thread team per model thread, sized so the teams share the cores instead of
            # fighting over them (OpenMP teams spin-wait: two full-size teams halve the speed of both)
            per_call = self.config.model_cpu_threads or max(1, _torch_threads() // self.model_threads)
            initializer = partial(_set_torch_threads, per_call)
        self.model_pool = ThreadPoolExecutor(self.model_threads, thread_name_prefix="model", initializer=initializer)
        self.text_pool = ThreadPoolExecutor(1, thread_name_prefix="text")
        self.consumer: AIOKafkaConsumer | None = None
        self.producer = None
        self._stopping = asyncio.Event()
        self._ready = False

    # -- public ---------------------------------------------------------------------------------
    def load_references(self, products: list[str] | None = None) -> list[str]:
        loaded = []
        for product in products or self.references.products():
            images = self.references.load(product)
            if images:
                self.model.set_references(product, images)
                loaded.append(product)
        log.info("references_loaded", products=loaded)
        return loaded

    def stop(self) -> None:
        """Ask the worker to finish what it holds, commit and leave the group."""
        self._stopping.set()

    @property
    def ready(self) -> bool:
        return self._ready and not self._stopping.is_set()

    async def run(self) -> None:
        await asyncio.to_thread(self.load_references)
        self.producer = await start_client(self.settings, make_producer(self.settings))
        self.consumer = AIOKafkaConsumer(**consumer_kwargs(self.settings, self.config.group_id)
                                         | {"max_poll_records": self.config.max_batch})
        self.consumer.subscribe([self.settings.topic(FRAMES)], listener=_Rebalance(self))
        # start() also joins the group: a join waits for every member to rejoin (up to the rebalance
        # timeout, longer than a plain connect) and for a dead member's session to expire
        await start_client(self.settings, self.consumer, timeout_s=JOIN_TIMEOUT_S)
        decode_q: asyncio.Queue = asyncio.Queue(self.config.queue_batches)
        score_q: asyncio.Queue = asyncio.Queue(self.config.queue_batches)
        publish_q: asyncio.Queue = asyncio.Queue(self.config.queue_batches)
        text_q: asyncio.Queue = asyncio.Queue(self.config.queue_batches * 4)
        stages = [
            asyncio.create_task(self._decode_stage(decode_q, score_q), name="decode"),
            asyncio.create_task(self._score_stage(score_q, publish_q), name="score"),
            asyncio.create_task(self._publish_stage(publish_q, text_q), name="publish"),
            asyncio.create_task(self._explain_stage(text_q), name="explain"),
            asyncio.create_task(self._commit_loop(), name="commit"),
            asyncio.create_task(self._watch_model_updates(), name="model-updates"),
        ]
        server = None
        if self.config.http_port is not None:
            from inference.http import serve

            server = asyncio.create_task(serve(self, self.config.http_port), name="http")
        self._ready = True
        log.info("worker_started", group=self.config.group_id, max_batch=self.config.max_batch,
                 max_wait_ms=self.config.max_wait_ms, model_version=self.model.version)
        try:
            await self._fetch_stage(decode_q, stages)
        finally:
            self._ready = False
            await self._drain(stages)
            for pool in (self.decode_pool, self.model_pool, self.text_pool):
                pool.shutdown(wait=False, cancel_futures=True)
            if server:
                server.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await server
            log.info("worker_stopped")

    # -- stages ---------------------------------------------------------------------------------
    async def _fetch_stage(self, decode_q: asyncio.Queue, stages: list[asyncio.Task]) -> None:
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                for task in stages:
                    if task.done() and task.exception():
                        raise task.exception()
                batch = await self._collect_batch(stop)
                if not batch:
                    continue
                for record, _ in batch:
                    self.tracker.add(TopicPartition(record.topic, record.partition), [record.offset])
                items = [Item(record, arrived) for record, arrived in batch]
                self.metrics.batch_size.observe(len(items))
                await decode_q.put(items)
        finally:
            stop.cancel()
            await decode_q.put(None)

    async def _collect_batch(self, stop: asyncio.Future) -> list[tuple[object, float]]:
        """Up to max_batch (record, arrival time) pairs, waiting at most max_wait_ms after the first one
        arrived; a frame's queue time starts at its arrival, so the batching wait is part of it."""
        wanted = self.config.max_batch
        batch: list = []
        deadline = None
        while len(batch) < wanted and not self._stopping.is_set():
            timeout_ms = 500 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            fetched = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=wanted - len(batch))
            arrived = time.monotonic()
            for records in fetched.values():
                batch.extend((record, arrived) for record in records)
            if batch and deadline is None:
                deadline = time.monotonic() + self.config.max_wait_ms / 1000
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not batch and not fetched:
                return batch
        return batch

    async def _decode_stage(self, decode_q: asyncio.Queue, score_q: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while (items := await decode_q.get()) is not None:
            started = time.monotonic()
            decoded = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, self._decode, item)
                                             for item in items))
            good = []
            for item, error in zip(items, decoded, strict=True):
                if error is None:
                    item.latency["decode_ms"] = (time.monotonic() - started) * 1000
                    good.append(item)
                else:
                    await self._dead_letter(item, *error)
            if good:
                await score_q.put(good)
        await score_q.put(None)

    def _decode(self, item: Item) -> tuple[str, str] | None:
        """Fill item.meta and item.frame; on failure return (error_type, reason)."""
        try:
            meta, jpeg = decode_frame(item.record.value, item.record.headers)
        except BadFrame as exc:
            return "BadFrame", str(exc)
        item.meta = meta
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            return "UndecodableImage", f"cannot decode {meta.encoding} image of frame {meta.frame_id}"
        if meta.product not in self.model.products():
            return "UnknownProduct", f"product {meta.product!r} has no references (lineguard refs add)"
        item.frame = FrameInput(image, meta.product, meta.mm_per_px)
        return None

    async def _score_stage(self, score_q: asyncio.Queue, publish_q: asyncio.Queue) -> None:
        """Score decoded frames, `model_threads` batches in flight, and pass them on in fetch order.

        Batches that were decoded while the model was busy are merged, up to max_batch frames, so a
        busy model runs full batches instead of a queue of small ones."""
        in_flight: collections.deque[tuple[list[Item], asyncio.Future]] = collections.deque()
        pending: list[Item] = []
        ended = False
        while True:
            if not pending and not ended:
                batch = await self._next_batch(score_q, in_flight, publish_q)
                ended = batch is None
                pending.extend(batch or [])
            while len(pending) < self.config.max_batch and not ended and not score_q.empty():
                batch = score_q.get_nowait()
                ended = batch is None
                pending.extend(batch or [])
            if not pending:
                break
            items, pending = pending[:self.config.max_batch], pending[self.config.max_batch:]
            if len(in_flight) >= self.model_threads:
                await self._scored(*in_flight.popleft(), publish_q)
            future = asyncio.get_running_loop().run_in_executor(self.model_pool, self._timed_score,
                                                                [i.frame for i in items])
            in_flight.append((items, future))
        while in_flight:
            await self._scored(*in_flight.popleft(), publish_q)
        await publish_q.put(None)

    async def _next_batch(self, score_q: asyncio.Queue, in_flight: collections.deque,
                          publish_q: asyncio.Queue) -> list[Item] | None:
        """The next decoded batch (None at the end); batches the model finishes meanwhile are handed on."""
        if not in_flight:
            return await score_q.get()
        getter = asyncio.ensure_future(score_q.get())
        try:
            while in_flight and not getter.done():
                await asyncio.wait([getter, in_flight[0][1]], return_when=asyncio.FIRST_COMPLETED)
                while in_flight and in_flight[0][1].done():
                    await self._scored(*in_flight.popleft(), publish_q)
            return await getter
        finally:
            getter.cancel()

    def _timed_score(self, frames: list) -> tuple[list, float, float]:
        """In the model thread: (results, start, end) on the monotonic clock, so a batch that waited for
        a free model thread is not charged for the wait."""
        started = time.monotonic()
        results = self.model.score(frames)
        return results, started, time.monotonic()

    async def _scored(self, items: list[Item], future: asyncio.Future, publish_q: asyncio.Queue) -> None:
        results, started, ended = await future
        model_ms = (ended - started) * 1000
        for item, scored in zip(items, results, strict=True):
            item.scored = scored
            item.latency["model_ms"] = model_ms
            item.latency["queue_ms"] = max(0.0, (started - item.fetched_at) * 1000 - item.latency["decode_ms"])
        self.metrics.model_seconds.observe(model_ms / 1000)
        self.metrics.model_batch_size.observe(len(items))
        await publish_q.put(items)

    async def _publish_stage(self, publish_q: asyncio.Queue, text_q: asyncio.Queue) -> None:
        """Up to queue_batches + 1 batches encode their heatmaps and wait for acks at once; each hands its
        records to the producer only after the batch before it did, so outputs keep the fetch order."""
        pending: set[asyncio.Task] = set()
        turn: asyncio.Event | None = None
        while (items := await publish_q.get()) is not None:
            sent = asyncio.Event()
            task = asyncio.create_task(self._publish_batch(items, text_q, turn, sent))
            turn = sent
            pending.add(task)
            task.add_done_callback(pending.discard)
            if len(pending) > self.config.queue_batches:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            await asyncio.gather(*pending)
        await text_q.put(None)

    async def _publish_batch(self, items: list[Item], text_q: asyncio.Queue, turn: asyncio.Event | None,
                             sent: asyncio.Event) -> None:
        """`turn` is set once the batch before this one has handed its records to the producer (None for the
        first batch); this one sets `sent` once it has handed over its own."""
        started = time.monotonic()
        sends = []
        flagged = []
        try:
            heatmaps = await asyncio.to_thread(lambda: [self._heatmap(item) for item in items])
            if turn is not None:
                await turn.wait()   # the batch before this one has handed its records to the producer
            for item, heatmap in zip(items, heatmaps, strict=True):
                key = item.meta.camera_id.encode()
                sends.append(await self.producer.send(self.settings.topic(HEATMAPS), heatmap.to_bytes(), key=key))
                if item.scored.is_anomalous and self.config.explain:
                    flagged.append(item)
                else:
                    sends.append(await self.producer.send(self.settings.topic(VERDICTS),
                                                          self._verdict(item, started).to_bytes(), key=key))
        finally:
            sent.set()
        await asyncio.gather(*sends)
        flagged_ids = {id(item) for item in flagged}
        for item in items:
            if id(item) not in flagged_ids:
                self._finish(item, started)
        if flagged:
            await text_q.put(flagged)

    async def _explain_stage(self, text_q: asyncio.Queue) -> None:
        """Batch flagged frames across publish batches and attach the LVLM's answer to their verdicts."""
        loop = asyncio.get_running_loop()
        finished = False
        while not finished:
            waiting = await text_q.get()
            if waiting is None:
                break
            while len(waiting) < self.config.text_batch and not text_q.empty():
                more = text_q.get_nowait()
                if more is None:
                    finished = True
                    break
                waiting.extend(more)
            for start in range(0, len(waiting), self.config.text_batch):
                batch = waiting[start:start + self.config.text_batch]
                started = time.monotonic()
                answers = await loop.run_in_executor(self.text_pool, self.model.explain,
                                                     [(item.frame, item.scored) for item in batch])
                self.metrics.text_seconds.observe(time.monotonic() - started)
                publish_started = time.monotonic()
                sends = [await self.producer.send(self.settings.topic(VERDICTS),
                                                  self._verdict(item, publish_started, answer).to_bytes(),
                                                  key=item.meta.camera_id.encode())
                         for item, answer in zip(batch, answers, strict=True)]
                await asyncio.gather(*sends)
                for item in batch:
                    self._finish(item, publish_started)

    async def _commit_loop(self) -> None:
        while True:
            await self.tracker.wait_change(0.2)
            await self._commit()

    async def _commit(self) -> None:
        offsets = self.tracker.committable()
        assigned = self.consumer.assignment()
        offsets = {tp: position for tp, position in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except Exception as exc:  # noqa: BLE001 - a failed commit is retried on the next change
            log.warning("commit_failed", error=str(exc), partitions=len(offsets))
            return
        self.tracker.committed(offsets)
        self._update_lag(assigned)

    def _update_lag(self, assigned) -> None:
        lag = 0
        for tp in assigned:
            high = self.consumer.highwater(tp)
            committed = self.tracker._committed.get(tp)
            if high is not None and committed is not None:
                lag += max(0, high - committed)
        self.metrics.consumer_lag.set(lag)

    async def _watch_model_updates(self) -> None:
        """Reload a product's references when someone runs `lineguard refs add`."""
        consumer = make_consumer(self.settings, MODEL_UPDATES, group_id=None, auto_offset_reset="latest")
        await start_client(self.settings, consumer)
        try:
            async for record in consumer:
                try:
                    update = ModelUpdate.from_bytes(record.value)
                except ValueError as exc:
                    log.warning("bad_model_update", error=str(exc))
                    continue
                if update.kind == "references_changed" and update.product:
                    loaded = await asyncio.to_thread(self.load_references, [update.product])
                    log.info("references_reloaded", product=update.product, loaded=bool(loaded))
        finally:
            await consumer.stop()

    # -- helpers --------------------------------------------------------------------------------
    def _heatmap(self, item: Item) -> Heatmap:
        scored = item.scored
        overlay = None
        if scored.is_anomalous:
            boxes = [(r.x, r.y, r.w, r.h) for r in scored.regions]
            overlay = overlay_jpeg(item.frame.image, scored.anomaly_map, scored.threshold, boxes)
        return Heatmap(frame_id=item.meta.frame_id, camera_id=item.meta.camera_id, product=item.meta.product,
                       width=item.meta.width, height=item.meta.height,
                       map_png=heatmap_png(scored.anomaly_map, scored.threshold), overlay_jpeg=overlay)

    def _verdict(self, item: Item, publish_started: float, answer: str | None = None) -> Verdict:
        meta, scored = item.meta, item.scored
        latency = Latency(queue_ms=item.latency.get("queue_ms", 0.0), decode_ms=item.latency.get("decode_ms", 0.0),
                          model_ms=item.latency.get("model_ms", 0.0),
                          publish_ms=(time.monotonic() - publish_started) * 1000)
        truth = meta.ground_truth.is_defect if meta.ground_truth else None
        return Verdict(frame_id=meta.frame_id, line_id=meta.line_id, camera_id=meta.camera_id, product=meta.product,
                       captured_at=meta.captured_at, score=scored.score, threshold=scored.threshold,
                       is_anomalous=scored.is_anomalous, confidence=scored.confidence, regions=scored.regions,
                       positions=scored.positions, answer=answer, model_version=self.model.version,
                       latency=latency, ground_truth_defect=truth, produced_at=datetime.now(UTC))

    def _finish(self, item: Item, publish_started: float) -> None:
        self.tracker.done(item.tp, item.record.offset)
        self.metrics.frames.labels(verdict="anomalous" if item.scored.is_anomalous else "normal").inc()
        self.metrics.latency.labels(stage="publish").observe(time.monotonic() - publish_started)
        self.metrics.latency.labels(stage="end_to_end").observe(time.monotonic() - item.fetched_at)
        log.debug("frame_done", frame_id=item.meta.frame_id, camera_id=item.meta.camera_id,
                  score=round(item.scored.score, 4), anomalous=item.scored.is_anomalous)

    async def _dead_letter(self, item: Item, error_type: str, reason: str) -> None:
        record = item.record
        letter = DeadLetter(
            source_topic=record.topic, partition=record.partition, offset=record.offset,
            key=record.key.decode(errors="replace") if record.key else None, reason=reason, error_type=error_type,
            service="inference", payload=(record.value or b"")[:DEAD_LETTER_PAYLOAD_LIMIT],
            headers={k: v.decode(errors="replace")[:4096] for k, v in (record.headers or ())},
        )
        await publish_dead_letter(self.producer, self.settings, letter)
        self.metrics.dead_letters.labels(reason=error_type).inc()
        self.tracker.done(item.tp, record.offset)

    async def _drain(self, stages: list[asyncio.Task]) -> None:
        """Let the stages finish what they hold, commit, leave the group."""
        pipeline, background = stages[:4], stages[4:]
        try:
            await asyncio.wait_for(asyncio.gather(*pipeline, return_exceptions=True), self.config.drain_timeout_s)
        except TimeoutError:
            log.warning("drain_timeout", in_flight=self.tracker.in_flight())
        for task in pipeline:
            if not task.done():
                task.cancel()
        if self.consumer is not None and self.consumer.assignment():
            await self._commit()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if self.consumer is not None:
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()


class _Rebalance(ConsumerRebalanceListener):
    """Before partitions move to another worker, finish and commit what we hold of them."""

    def __init__(self, worker: InferenceWorker):
        self.worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        worker = self.worker
        deadline = time.monotonic() + worker.config.drain_timeout_s
        while worker.tracker.in_flight(revoked) and time.monotonic() < deadline:
            await worker.tracker.wait_change(0.05)
        offsets = {tp: pos for tp, pos in worker.tracker.committable().items() if tp in revoked}
        if offsets:
            with contextlib.suppress(Exception):
                await worker.consumer.commit(offsets)
                worker.tracker.committed(offsets)
        worker.tracker.forget(revoked)
        log.info("partitions_revoked", partitions=len(revoked), committed=len(offsets))

    async def on_partitions_assigned(self, assigned) -> None:
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))


def _set_torch_threads(n: int) -> None:
    """In a model thread, before its first torch op: its ops use n threads. Threads that already ran
    torch ops (the main thread, which built the model) keep their own count; threads started later
    begin with n."""
    import torch

    torch.set_num_threads(n)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
