"""The streaming inference worker (`lineguard infer`): frames in, a Verdict and a Heatmap out for each.

The whole loop is in this file. Five stages run concurrently, joined by bounded queues, so the
model never waits for I/O and a slow stage pushes back on the fetch:

    fetch    consumer.getmany() until --max-batch frames or --max-wait-ms   (event loop)
    decode   FrameMeta + JPEG header → size policy → memory budget → image   (thread pool)
             bad, oversize or mismatched frames → dead letters
    score    model.score(batch of mixed products); a frame that makes it     (model thread, or a
             raise is isolated by halving the batch and dead-lettered         model process)
    publish  Verdict + Heatmap → send, await acks                           (event loop + PNG thread)
    explain  flagged frames only: the answer (model.explain), then Verdict  (text thread)

Commit rule: an offset is committed only when the broker acknowledged the outputs (verdict and
heatmap, or the dead letter) of every frame before it in its partition (`OffsetTracker`).
On a rebalance the revoked partitions are drained and committed before they are given up; on
SIGTERM the worker stops fetching, finishes what it holds, commits and leaves the group.

Memory: every frame reserves its cost (from the size in its JPEG header) in a `MemoryBudget` before it
is decoded and gives it back once it is published or dead-lettered; a spent budget stops the decode
stage, whose full queue stops the fetch. A model that fails on every frame, references included, stops
the worker (`ModelBroken`) instead of dead-lettering the line; nothing past the failed frames is committed.

Start-up: a product's calibrated state (memory, prototypes, threshold) is loaded from the state cache next to its
references (inference/references.py) when a worker has already derived it for this model and these references,
and calibrated (then stored there) otherwise; the threading choice below is cached per machine and model in
`<state_dir>/model_threads.json`. `--no-start-cache` takes the old path (calibrate and measure every time).

Threading: at start-up the worker times the model on its references (`tune_threads`). A model whose time is
in Python (one call at a time on one core scores fastest) is moved into a process of its own
(inference/model_process.py), so the pipeline's Python does not take turns with it for the GIL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Protocol

import numpy as np
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.structs import TopicPartition

from inference import frames
from inference.budget import MemoryBudget
from inference.model_process import ModelProcessDied
from inference.outputs import heatmap_png, heatmap_side, overlay_jpeg
from inference.references import ReferenceStore
from inference.registry import LVLM_PRODUCT, state_bytes, state_from_bytes
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
from lineguard.offsets import OffsetTracker
from lineguard.settings import Settings, frame_cost_bytes
from lineguard.topics import FRAMES, HEATMAPS, MODEL_UPDATES, VERDICTS

log = get_logger(__name__)

GROUP_ID = "lineguard-inference"
TUNING_CACHE = "model_threads.json"   # under the state dir: the start-up measure's choice per machine and model
JOIN_TIMEOUT_S = 60.0
DEAD_LETTER_PAYLOAD_LIMIT = 256 * 1024
MODEL_BROKEN_AFTER = 16   # frames in a row that made the model raise, with none scored between: the model is broken


# What the worker holds besides its frames: the model (lite0 on a CPU: 0.55 GB resident with references),
# torch, OpenCV and the Kafka client's fetch buffers. The README documents the sum below.
WORKER_BASE_BYTES = 1024 * 2**20


def documented_peak_bytes(settings: Settings) -> int:
    """The peak resident memory of a worker with the default model, whatever its input: the base plus
    LINEGUARD_WORKER_MEMORY_MB (2 GiB with the defaults)."""
    return WORKER_BASE_BYTES + settings.worker_memory_mb * 2**20


class ModelBroken(RuntimeError):
    """The model raises on every frame, a reference image included: stop rather than dead-letter the line."""


# --- what the worker needs from the model ---------------------------------------------------------

@dataclass
class FrameInput:
    image: np.ndarray          # (h, w, 3) uint8 BGR, possibly decoded at a reduced scale
    product: str
    mm_per_px: float | None = None
    size: tuple[int, int] | None = None   # (W, H) of the camera's frame: the pixels regions are given in


@dataclass
class Scored:
    score: float
    threshold: float
    is_anomalous: bool
    confidence: float
    regions: list[Region]
    positions: list[str]
    anomaly_map: np.ndarray    # (h, w) float32 at model resolution


class Scorer(Protocol):
    version: str

    def products(self) -> set[str]: ...
    def set_references(self, product: str, images: list[np.ndarray], tiling=None) -> None: ...
    def needed_pixels(self, product: str) -> tuple[int, int]: ...
    def tiling(self, product: str): ...
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
    size: tuple[int, int] = (0, 0)         # (width, height) from the JPEG header
    needed: tuple[int, int] | None = None  # (width, height) the model needs: the decode may shrink to it
    reserved: int = 0                      # bytes of the worker's memory budget this frame holds
    model_version: str = ""                # the model and product version that scored it (set at submission)

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
                                      # each on its share of the cores (model_cpu_threads). 0 = measured at
                                      # start-up (CPU): see `tune_threads`
    model_cpu_threads: int | None = None  # torch threads per model call on a CPU; None = torch's own thread
                                          # count (the usable cores) / model_threads
    drain_timeout_s: float = 30.0
    http_port: int | None = None      # /healthz and /metrics; None = off
    http_host: str = "127.0.0.1"      # 0.0.0.0: reachable from outside (a pod's HTTP probes, Prometheus)
    explain: bool = True              # attach LVLM answers to flagged verdicts
    reduced_decode: bool = True       # decode JPEGs at the DCT scale the model needs (1/2, 1/4, 1/8)
    model_process: bool | None = None  # score in a child process (inference/model_process.py), away from the
                                       # pipeline's GIL; None = when the start-up measure finds one call at a
                                       # time on one core fastest (the model's time is in Python), on a CPU
    start_cache: bool = True          # load calibrated product states and the threading choice from their caches
                                      # (False: calibrate and measure at every start, the old path)


class InferenceWorker:
    def __init__(self, settings: Settings, model: Scorer, config: WorkerConfig | None = None,
                 metrics: WorkerMetrics | None = None, registry=None):
        self.settings = settings
        self.model = model
        self.config = config or WorkerConfig()
        self.metrics = metrics or WorkerMetrics()
        self.references = ReferenceStore.from_settings(settings)
        self.tracker = OffsetTracker()
        self.budget = MemoryBudget(settings.worker_memory_mb * 2**20)
        self._canaries: dict[str, np.ndarray] = {}   # product → a reference image: is the model itself broken?
        self.registry = registry                      # released model versions (None: references only)
        self._swaps: dict[str, object] = {}           # product → a loaded ProductState, installed between batches
        self._failures_in_a_row = 0
        self.failure: BaseException | None = None    # why the worker stopped on its own
        self.decode_pool = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="decode")
        self.device = getattr(getattr(model, "device", None), "type", "cpu")
        self.cores = _torch_threads()    # torch's thread count here, at start: the cores it may use
        self.model_threads = max(1, self.config.model_threads or 2)   # auto (0): until measured in run()
        self.model_pool = self._model_pool(self.model_threads, self.config.model_cpu_threads)
        self.scoring = model          # what scores batches: the model, or its ModelProcess
        self.text_pool = ThreadPoolExecutor(1, thread_name_prefix="text")
        self.consumer: AIOKafkaConsumer | None = None
        self.producer = None
        self._stopping = asyncio.Event()
        self._ready = False
        self.states_from_cache: list[str] = []   # products whose calibrated state the last load took from the cache
        self.rebalances = 0        # partitions revoked so far: records fetched before a revoke are not ours to keep

    def _model_pool(self, threads: int, per_call: int | None) -> ThreadPoolExecutor:
        initializer = None
        self._model_torch_threads = None
        if self.device == "cpu":
            # one torch thread team per model thread, sized so the teams share the cores instead of
            # fighting over them (OpenMP teams spin-wait: two full-size teams halve the speed of both)
            per_call = per_call or max(1, self.cores // threads)
            self._model_torch_threads = per_call
            initializer = partial(_set_torch_threads, per_call)
        return ThreadPoolExecutor(threads, thread_name_prefix="model", initializer=initializer)

    def tune_threads(self) -> tuple[int, int | None]:
        """(model threads, torch threads per call) that score fastest on this CPU, timed on a batch of the
        products' references: one call at a time on one core, one call on every core, or one call per core.
        A compute-bound model (efficientnet-lite0) gains from calls side by side; a model whose time is in
        Python (a tiny ViT) loses, because its calls take turns with the GIL. CUDA, or nothing to time on:
        the configured default."""
        cores = self.cores
        canaries = list(self._canaries.items()) or [
            (product, state.references[0]) for product, state in getattr(self.model, "states", {}).items()
            if getattr(state, "references", None)]
        if self.device != "cpu" or not canaries or cores < 2:
            return max(1, self.config.model_threads or 2), self.config.model_cpu_threads
        key = self._tuning_key()
        cached = self._tuning_cache().get(key) if key else None
        if cached:
            log.info("model_threads_tuned", threads=cached[0], torch_threads=cached[1], cached=True)
            return cached[0], cached[1]
        batch = [FrameInput(canaries[i % len(canaries)][1], canaries[i % len(canaries)][0])
                 for i in range(self.config.max_batch)]
        speeds = {}
        for threads, per_call in ((1, 1), (1, cores), (cores, 1)):
            with ThreadPoolExecutor(threads, initializer=partial(_set_torch_threads, per_call)) as pool:
                list(pool.map(self.model.score, [batch] * threads))               # warm-up
                started = time.perf_counter()
                list(pool.map(self.model.score, [batch] * threads))
                speeds[threads, per_call] = threads * len(batch) / (time.perf_counter() - started)
        best = max(speeds, key=speeds.get)
        log.info("model_threads_tuned", threads=best[0], torch_threads=best[1],
                 frames_per_s={f"{t}x{c}": round(v, 1) for (t, c), v in speeds.items()})
        if key:
            self._keep_tuning(key, best)
        return best

    # -- start-up caches ------------------------------------------------------------------------
    def _model_fingerprint(self) -> str | None:
        """What a product's calibrated state depends on in the model: its version and configuration, less the
        fields that only change how it runs. None for a scorer that is not an InspectionModel, or with the
        caches off."""
        config = getattr(self.model, "config", None)
        if not self.config.start_cache or not dataclasses.is_dataclass(config) or not hasattr(self.model, "states"):
            return None
        config = dataclasses.replace(config, batch_size=0, llm=None, device=str(getattr(self.model, "device", "")))
        return f"{self.model.version}|{config!r}"

    def _load_cached_state(self, product: str) -> bool:
        """Install the product's state from the state cache; False when there is none (or it is unreadable)."""
        fingerprint = self._model_fingerprint()
        if fingerprint is None:
            return False
        digest = self.references.state_digest(product, fingerprint)
        data = self.references.cached_state(product, digest)
        if data is None:
            return False
        try:
            state = state_from_bytes(data, getattr(self.model, "device", "cpu"))
        except Exception as exc:  # noqa: BLE001 - a bad cache entry costs a calibration, never the start
            log.warning("state_cache_unreadable", product=product, digest=digest, error=_first_line(exc))
            return False
        self.model.states[product] = state
        return True

    def _keep_state(self, product: str) -> None:
        fingerprint = self._model_fingerprint()
        if fingerprint is None:
            return
        try:
            self.references.keep_state(product, self.references.state_digest(product, fingerprint),
                                       state_bytes(self.model.states[product]))
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: the worker serves without it
            log.warning("state_cache_not_written", product=product, error=_first_line(exc))

    def _tuning_key(self) -> str | None:
        fingerprint = self._model_fingerprint()
        if fingerprint is None:
            return None
        return f"{fingerprint}|cpu={_cpu_name()}|cores={self.cores}|max_batch={self.config.max_batch}"

    def _tuning_cache(self) -> dict:
        try:
            return json.loads((self.settings.state_dir / TUNING_CACHE).read_text())
        except (OSError, ValueError):
            return {}

    def _keep_tuning(self, key: str, best: tuple[int, int]) -> None:
        path = self.settings.state_dir / TUNING_CACHE
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._tuning_cache() | {key: list(best)}, indent=1))
            tmp.replace(path)

    def _wants_model_process(self) -> bool:
        if self.config.model_process is not None:
            return self.config.model_process
        from inference.model_process import ModelProcess

        return (self.config.model_threads == 0 and self.device == "cpu" and self.cores >= 2
                and self.model_threads == 1 and self._model_torch_threads == 1 and ModelProcess.supports(self.model))

    def _start_model_process(self) -> None:
        """Score in a child process; two calls in flight, so the next batch is sent while the child scores."""
        from inference.model_process import ModelProcess

        self.scoring = ModelProcess(self.model, torch_threads=self._model_torch_threads or 1)
        self.model_pool.shutdown()
        self.model_threads = 2
        self.model_pool = ThreadPoolExecutor(self.model_threads, thread_name_prefix="model")
        log.info("model_process_used", pid=self.scoring.pid, torch_threads=self._model_torch_threads or 1)

    # -- public ---------------------------------------------------------------------------------
    def load_references(self, products: list[str] | None = None) -> list[str]:
        """Each product's references, and its calibrated state: from the state cache when a worker already
        derived it for this model and these references, else calibrated here (and cached)."""
        loaded, cached = [], []
        started = time.monotonic()
        for product in products or self.references.products():
            images = self.references.load(product)
            if images:
                if self._load_cached_state(product):
                    cached.append(product)
                else:
                    self.model.set_references(product, images, tiling=self.references.tiling(product))
                    self._keep_state(product)
                self._canaries[product] = images[0]
                loaded.append(product)
        self.states_from_cache = cached
        log.info("references_loaded", products=loaded, from_cache=cached,
                 seconds=round(time.monotonic() - started, 2))
        for product in loaded:
            live = self._live_version(product)
            if live is not None:
                state = self._load_version(product, live)
                if state is not None:
                    self.model.states[product] = state
        return loaded

    def _live_version(self, product: str) -> str | None:
        if self.registry is None:
            return None
        try:
            found = self.registry.live(product)
        except Exception as exc:  # noqa: BLE001 - the registry is unreachable: serve the references
            log.warning("registry_unavailable", product=product, error=str(exc).splitlines()[0][:200])
            return None
        return found.version if found else None

    def _load_version(self, product: str, version: str):
        """A released version's state, checked against this model; None (and a log line saying why) when it
        cannot be loaded: the worker keeps what it runs."""
        try:
            return self.registry.checked_state(self.model, version, product)
        except Exception as exc:  # noqa: BLE001 - a bad release must never stop the line
            log.error("model_version_not_loaded", product=product, version=version,
                      error=str(exc).splitlines()[0][:300], keeps=self.version_of(product))
            return None

    def version_of(self, product: str) -> str:
        """What verdicts of `product` carry as model_version: the model, plus the registry version if any."""
        return self._label(self.model.states.get(product))

    def upcoming_version(self, product: str) -> str:
        """The version the next batch of `product` runs: a loaded release waiting for the batch boundary, or
        the installed one."""
        return self._label(self._swaps[product]) if product in self._swaps else self.version_of(product)

    def _label(self, state) -> str:
        version = getattr(state, "version", None)
        return self.model.version if version is None else f"{self.model.version}/{version}"

    def _apply_swaps(self) -> None:
        """Between batches (nothing in flight): install the versions loaded since the last batch."""
        swaps, self._swaps = self._swaps, {}
        for product, state in swaps.items():
            before = self.version_of(product)
            self.model.states[product] = state
            log.info("model_swapped", product=product, before=before, after=self.version_of(product))

    def stop(self) -> None:
        """Ask the worker to finish what it holds, commit and leave the group."""
        self._stopping.set()

    @property
    def ready(self) -> bool:
        return self._ready and not self._stopping.is_set()

    async def run(self) -> None:
        await asyncio.to_thread(self.load_references)
        if self.config.model_threads == 0:
            threads, per_call = await asyncio.to_thread(self.tune_threads)
            self.model_pool.shutdown()
            self.model_threads, self.model_pool = threads, self._model_pool(threads, per_call)
        if self._wants_model_process():
            await asyncio.to_thread(self._start_model_process)
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

            server = asyncio.create_task(serve(self, self.config.http_port, self.config.http_host),
                                         name="http")
        self._ready = True
        log.info("worker_started", group=self.config.group_id, max_batch=self.config.max_batch,
                 max_wait_ms=self.config.max_wait_ms, model_version=self.model.version)
        for task in stages:
            task.add_done_callback(self._stage_ended)
        try:
            await self._fetch_stage(decode_q)
        finally:
            self._ready = False
            await self._drain(stages)
            for pool in (self.decode_pool, self.model_pool, self.text_pool):
                pool.shutdown(wait=False, cancel_futures=True)
            if self.scoring is not self.model:
                await asyncio.to_thread(self.scoring.close)
            if server:
                server.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await server
            log.info("worker_stopped", error=str(self.failure) if self.failure else None)
        if self.failure is not None:
            raise self.failure

    def _stage_ended(self, task: asyncio.Task) -> None:
        """A stage that raised stops the worker: nothing it held is committed, and run() re-raises."""
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()
            log.error("worker_failed", stage=task.get_name(), error=str(self.failure))
            self._stopping.set()

    # -- stages ---------------------------------------------------------------------------------
    async def _fetch_stage(self, decode_q: asyncio.Queue) -> None:
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                batch = await self._collect_batch(stop)
                if not batch:
                    continue
                for record, _ in batch:
                    self.tracker.add(TopicPartition(record.topic, record.partition), [record.offset])
                items = [Item(record, arrived) for record, arrived in batch]
                self.metrics.batch_size.observe(len(items))
                # back-pressure: a full queue (the memory budget is spent, or the model is behind) stops the
                # fetch here; a stop while waiting leaves the batch uncommitted, to be fetched again
                put = asyncio.ensure_future(decode_q.put(items))
                await asyncio.wait([put, stop], return_when=asyncio.FIRST_COMPLETED)
                if not put.done():
                    put.cancel()
                    break
        finally:
            stop.cancel()
            if self.failure is None:
                await decode_q.put(None)

    async def _collect_batch(self, stop: asyncio.Future) -> list[tuple[object, float]]:
        """Up to max_batch (record, arrival time) pairs, waiting at most max_wait_ms after the first one
        arrived; a frame's queue time starts at its arrival, so the batching wait is part of it."""
        wanted = self.config.max_batch
        batch: list = []
        deadline = None
        generation = self.rebalances
        while len(batch) < wanted and not self._stopping.is_set():
            timeout_ms = 500 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            fetched = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=wanted - len(batch))
            arrived = time.monotonic()
            if self.rebalances != generation:
                # partitions were revoked while this batch was filling: its records were never tracked, so the
                # revoke neither waited for nor committed them, and their partition may be another worker's now.
                # Drop them: whoever owns the partition fetches them again from its committed offset.
                if batch:
                    log.info("fetch_dropped_on_rebalance", frames=len(batch))
                batch, deadline, generation = [], None, self.rebalances
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
        """Check each frame's header, reserve its memory, decode it in the pool. A frame that does not fit
        the budget first sends on what its batch has decoded, since that is what frees the budget."""
        loop = asyncio.get_running_loop()
        while (items := await decode_q.get()) is not None:
            started = time.monotonic()
            decoding: list[tuple[Item, asyncio.Future]] = []
            for item in items:
                try:
                    cost = self._admit(item)
                except frames.FrameRejected as exc:
                    await self._dead_letter(item, exc.error_type, str(exc))
                    continue
                if decoding and not self.budget.fits(cost):
                    await self._hand_on(decoding, started, score_q)
                    decoding = []
                await self.budget.acquire(cost)
                item.reserved = cost
                self.metrics.frame_memory.set(self.budget.in_use)
                decoding.append((item, loop.run_in_executor(self.decode_pool, self._decode, item)))
            if decoding:
                await self._hand_on(decoding, started, score_q)
        await score_q.put(None)

    async def _hand_on(self, decoding: list[tuple[Item, asyncio.Future]], started: float,
                       score_q: asyncio.Queue) -> None:
        good = []
        for item, future in decoding:
            try:
                await future
            except frames.FrameRejected as exc:
                await self._dead_letter(item, exc.error_type, str(exc))
                continue
            item.latency["decode_ms"] = (time.monotonic() - started) * 1000
            good.append(item)
        if good:
            await score_q.put(good)

    def _admit(self, item: Item) -> int:
        """Read the FrameMeta and the JPEG header, apply the size policy; the frame's memory cost in bytes.
        Cheap (no pixel is decoded), so it runs on the event loop."""
        try:
            meta, jpeg = decode_frame(item.record.value, item.record.headers)
        except BadFrame as exc:
            raise frames.FrameRejected("BadFrame", str(exc)) from None
        item.meta = meta
        if meta.product not in self.model.products():
            raise frames.FrameRejected("UnknownProduct",
                                       f"product {meta.product!r} has no references (lineguard refs add)")
        item.size = frames.frame_size(jpeg)
        frames.check_size(meta, item.size, self.settings.max_frame_pixels)
        item.needed = self.model.needed_pixels(meta.product) if self.config.reduced_decode else None
        width, height = frames.scaled_size(item.size, frames.reduction(item.size, item.needed))
        return frame_cost_bytes(width * height)                 # what the decode will hold

    def _decode(self, item: Item) -> None:
        """In the decode pool: fill item.frame; raises FrameRejected."""
        image = frames.decode(item.record.value, item.meta, item.size, item.needed)
        item.frame = FrameInput(image, item.meta.product, item.meta.mm_per_px, item.size)

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
            if self._swaps:   # a released version goes in at a batch boundary: finish what is in flight first
                while in_flight:
                    await self._scored(*in_flight.popleft(), publish_q)
                self._apply_swaps()
            if len(in_flight) >= self.model_threads:
                await self._scored(*in_flight.popleft(), publish_q)
            for item in items:
                item.model_version = self.version_of(item.meta.product)
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

    def _timed_score(self, batch: list[FrameInput]) -> tuple[list, float, float]:
        """In the model thread: (results, start, end) on the monotonic clock, so a batch that waited for
        a free model thread is not charged for the wait. A result is a Scored or the exception its frame
        raised."""
        started = time.monotonic()
        results = self._score_isolating(batch)
        return results, started, time.monotonic()

    def _score_isolating(self, batch: list[FrameInput]) -> list:
        """Score the batch; if it raises, score each half, down to the frame that raises: one poison frame
        costs log2(batch) extra calls and never its neighbours' verdicts."""
        try:
            results = list(self.scoring.score(batch))
            if len(results) != len(batch):
                raise RuntimeError(f"the model returned {len(results)} results for {len(batch)} frames")
            return results
        except Exception as exc:  # noqa: BLE001 - any model error is isolated, then judged in _scored
            if len(batch) == 1 or isinstance(exc, ModelProcessDied):   # a dead process fails every frame alike
                return [exc] * len(batch)
            half = len(batch) // 2
            return self._score_isolating(batch[:half]) + self._score_isolating(batch[half:])

    def _canary(self, product: str) -> BaseException | None:
        """In the model thread: does the model still score one of the product's own references?"""
        try:
            self.scoring.score([FrameInput(self._canaries[product], product)])
        except Exception as exc:  # noqa: BLE001
            return exc
        return None

    async def _scored(self, items: list[Item], future: asyncio.Future, publish_q: asyncio.Queue) -> None:
        results, started, ended = await future
        model_ms = (ended - started) * 1000
        failed = [(item, result) for item, result in zip(items, results, strict=True)
                  if isinstance(result, BaseException)]
        if failed:
            await self._judge_failures(items, failed)
        else:
            self._failures_in_a_row = 0
        scored = []
        for item, result in zip(items, results, strict=True):
            if isinstance(result, BaseException):
                await self._dead_letter(item, "ModelError", _first_line(result))
                continue
            item.scored = result
            item.latency["model_ms"] = model_ms
            item.latency["queue_ms"] = max(0.0, (started - item.fetched_at) * 1000 - item.latency["decode_ms"])
            scored.append(item)
        self.metrics.model_seconds.observe(model_ms / 1000)
        self.metrics.model_batch_size.observe(len(items))
        if scored:
            await publish_q.put(scored)

    async def _judge_failures(self, items: list[Item], failed: list[tuple[Item, BaseException]]) -> None:
        """Poison frames, or a broken model? Raises ModelBroken when the model also fails on a reference
        image, or when MODEL_BROKEN_AFTER frames in a row failed."""
        self._failures_in_a_row = 0 if len(failed) < len(items) else self._failures_in_a_row + len(failed)
        item, error = failed[0]
        reason = None
        if isinstance(error, ModelProcessDied):
            reason = str(error)
        elif len(failed) == len(items) and item.meta.product in self._canaries:
            canary = await asyncio.get_running_loop().run_in_executor(self.model_pool, self._canary,
                                                                      item.meta.product)
            if canary is not None:
                reason = f"it fails on a reference image of {item.meta.product!r} too: {_first_line(canary)}"
        if reason is None and self._failures_in_a_row >= MODEL_BROKEN_AFTER:
            reason = f"{self._failures_in_a_row} frames in a row made it raise, the last: {_first_line(error)}"
        if reason is not None:
            raise ModelBroken(f"the model is broken, stopping instead of dead-lettering the line: {reason}")
        log.warning("model_error", frames=len(failed), batch=len(items), error=_first_line(error))

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
        broken: list[tuple[Item, BaseException]] = []
        try:
            outputs = await asyncio.to_thread(lambda: [self._outputs(item, started) for item in items])
            if turn is not None:
                await turn.wait()   # the batch before this one has handed its records to the producer
            for item, output in zip(items, outputs, strict=True):
                if isinstance(output, BaseException):
                    broken.append((item, output))
                    continue
                heatmap, verdict = output
                key = item.meta.camera_id.encode()
                sends.append(await self.producer.send(self.settings.topic(HEATMAPS), heatmap, key=key))
                if verdict is None:
                    flagged.append(item)
                else:
                    sends.append(await self.producer.send(self.settings.topic(VERDICTS), verdict, key=key))
        finally:
            sent.set()
        await asyncio.gather(*sends)
        for item, error in broken:
            await self._dead_letter(item, "ModelError", _first_line(error))
        done = {id(item) for item in flagged} | {id(item) for item, _ in broken}
        for item in items:
            if id(item) not in done:
                self._finish(item, started)
        if flagged:
            await text_q.put(flagged)

    def _outputs(self, item: Item, started: float) -> tuple[bytes, bytes | None] | BaseException:
        """In a thread: the Heatmap and (unless an answer is to come) the Verdict, serialised; or the exception
        that post-processing raised, so one frame's bad map cannot take its batch down."""
        try:
            verdict = None
            if not (item.scored.is_anomalous and self.config.explain):
                verdict = self._verdict(item, started).to_bytes()
            return self._heatmap(item).to_bytes(), verdict
        except Exception as exc:  # noqa: BLE001 - dead-lettered as ModelError by the caller
            return exc

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
                answers = await loop.run_in_executor(self.text_pool, self._explain, batch)
                self.metrics.text_seconds.observe(time.monotonic() - started)
                publish_started = time.monotonic()
                sends = [await self.producer.send(self.settings.topic(VERDICTS),
                                                  self._verdict(item, publish_started, answer).to_bytes(),
                                                  key=item.meta.camera_id.encode())
                         for item, answer in zip(batch, answers, strict=True)]
                await asyncio.gather(*sends)
                for item in batch:
                    self._finish(item, publish_started)

    def _explain(self, batch: list[Item]) -> list[str | None]:
        """In the text thread: the answers; a batch that raises is answered frame by frame, and a frame that
        still raises gets no answer (its verdict stands without one)."""
        try:
            return list(self.model.explain([(item.frame, item.scored) for item in batch]))
        except Exception as exc:  # noqa: BLE001
            if len(batch) == 1:
                log.warning("explain_failed", frame_id=batch[0].meta.frame_id, error=_first_line(exc))
                return [None]
            return [answer for item in batch for answer in self._explain([item])]

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
                elif update.kind == "model_released" and update.product and self.registry is not None:
                    try:
                        await self._model_released(update.product, update.model_version)
                    except Exception as exc:  # noqa: BLE001 - a bad release must never stop the line
                        log.error("model_version_not_loaded", product=update.product, version=update.model_version,
                                  error=str(exc).splitlines()[0][:300], keeps=self.version_of(update.product))
        finally:
            await consumer.stop()

    async def _model_released(self, product: str, version: str | None) -> None:
        """Load a released version (None: back to the references alone) for the next batch boundary. A release
        of the LVLM's adapters (training/lvlm.py) is kept for the model's LLM answers."""
        if product == LVLM_PRODUCT:
            weights = None if version is None else await asyncio.to_thread(self.registry.bundle, version)
            self.model.use_lvlm_adapters(version, weights)
            log.info("lvlm_adapters_released", version=version or "untrained")
            return
        if version is None:
            images = await asyncio.to_thread(self.references.load, product)
            if not images:
                log.error("model_version_not_loaded", product=product, version=None, error="no references",
                          keeps=self.version_of(product))
                return
            self._swaps[product] = await asyncio.to_thread(self.model.state_from_references, product, images)
            return
        state = await asyncio.to_thread(self._load_version, product, version)
        if state is not None:
            self._swaps[product] = state
            log.info("model_release_loaded", product=product, version=version)

    # -- helpers --------------------------------------------------------------------------------
    def _tiles_per_side(self, product: str) -> int:
        tiling = self.model.tiling(product)
        return max(tiling.cols, tiling.rows)

    def _heatmap(self, item: Item) -> Heatmap:
        scored = item.scored
        overlay = None
        if scored.is_anomalous:
            boxes = [(r.x, r.y, r.w, r.h) for r in scored.regions]
            overlay = overlay_jpeg(item.frame.image, scored.anomaly_map, scored.threshold, boxes, frame_size=item.size)
        return Heatmap(frame_id=item.meta.frame_id, camera_id=item.meta.camera_id, product=item.meta.product,
                       width=item.meta.width, height=item.meta.height,
                       map_png=heatmap_png(scored.anomaly_map, scored.threshold, frame_size=item.size,
                                           max_side=heatmap_side(self._tiles_per_side(item.meta.product))),
                       overlay_jpeg=overlay)

    def _verdict(self, item: Item, publish_started: float, answer: str | None = None) -> Verdict:
        meta, scored = item.meta, item.scored
        latency = Latency(queue_ms=item.latency.get("queue_ms", 0.0), decode_ms=item.latency.get("decode_ms", 0.0),
                          model_ms=item.latency.get("model_ms", 0.0),
                          publish_ms=(time.monotonic() - publish_started) * 1000)
        truth = meta.ground_truth.is_defect if meta.ground_truth else None
        return Verdict(frame_id=meta.frame_id, line_id=meta.line_id, camera_id=meta.camera_id, product=meta.product,
                       captured_at=meta.captured_at, score=scored.score, threshold=scored.threshold,
                       is_anomalous=scored.is_anomalous, confidence=scored.confidence, regions=scored.regions,
                       positions=scored.positions, answer=answer,
                       model_version=item.model_version or self.model.version, latency=latency,
                       ground_truth_defect=truth, produced_at=datetime.now(UTC),
                       descriptor=_descriptor_bytes(scored))

    def _finish(self, item: Item, publish_started: float) -> None:
        self.tracker.done(item.tp, item.record.offset)
        self._release(item)
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
        self._release(item)

    def _release(self, item: Item) -> None:
        """Give the frame's memory back (its image and maps go with the item)."""
        if item.reserved:
            self.budget.release(item.reserved)
            item.reserved = 0
            self.metrics.frame_memory.set(self.budget.in_use)

    async def _drain(self, stages: list[asyncio.Task]) -> None:
        """Let the stages finish what they hold, commit, leave the group."""
        pipeline, background = stages[:4], stages[4:]
        try:
            # a failed worker does not wait: its stages are stuck behind the one that raised
            timeout = 0 if self.failure is not None else self.config.drain_timeout_s
            await asyncio.wait_for(asyncio.gather(*pipeline, return_exceptions=True), timeout)
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
        worker.rebalances += 1     # the fetch stage drops what it gathered before this (see _collect_batch)
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
        # positions start again from the group's committed offsets: no state of an earlier ownership may
        # survive into this one (a completion seen for it would count towards this one's commit point)
        self.worker.tracker.forget(assigned)
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))


def _descriptor_bytes(scored) -> bytes | None:
    """The flagged frame's defect descriptor as Verdict bytes; None for scorers that have none."""
    vector = getattr(scored, "descriptor", None)
    return None if vector is None else np.asarray(vector, dtype="<f2").tobytes()


def _first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, at most 500 characters: what a dead letter's reason carries."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


def _set_torch_threads(n: int) -> None:
    """In a model thread, before its first torch op: its ops use n threads. Threads that already ran
    torch ops (the main thread, which built the model) keep their own count; threads started later
    begin with n."""
    import torch

    torch.set_num_threads(n)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):  # noqa: SIM115 - read to the first match
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
