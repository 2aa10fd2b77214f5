"""The inference worker's batching, outputs, latency breakdown, HTTP surface and graceful stop,
against the real broker and the real model.

- a backlog runs full model batches of `max_batch`; frames trickling in are scored one by one, fast;
- every Heatmap carries a bounded single-channel PNG that keeps the frame's aspect ratio, and an
  overlay JPEG exactly when the frame is flagged; flagged verdicts carry the AnomalyGPT answer;
- the latency breakdown is complete and fits inside the frame's real capture → verdict time;
- `/healthz` and `/metrics` report what the worker did;
- a stop while a model call is running finishes it, commits, and a second worker re-delivers nothing.
"""

from __future__ import annotations

import asyncio
import collections
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference.outputs import HEATMAP_MAX_SIDE, OVERLAY_MAX_SIDE
from inference.worker import InferenceWorker, WorkerConfig
from ingest.publisher import as_published, publish
from ingest.simulator import LineSimulator
from ingest.sources import SourceFrame, open_source
from lineguard.events import FrameMeta, Heatmap, Verdict, encode_frame
from lineguard.kafka import ensure_topics, make_producer, start_client
from lineguard.settings import load_settings
from lineguard.stack import free_port
from lineguard.topics import FRAMES, HEATMAPS, VERDICTS
from tests.helpers import read_topic
from tests.worker_helpers import dead_letters, group, group_lag


class Recording:
    """The real model, recording the frames of every score() call; `delay_s` holds each call open."""

    def __init__(self, inner, delay_s: float = 0.0):
        self.inner, self.delay_s = inner, delay_s
        self.lock = threading.Lock()
        self.calls: list[int] = []      # frames per finished call
        self.running: list[int] = []    # frames of the calls in progress

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, frames):
        with self.lock:
            self.running.append(len(frames))
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            return self.inner.score(frames)
        finally:
            with self.lock:
                self.running.remove(len(frames))
                self.calls.append(len(frames))


async def _start(worker: InferenceWorker) -> asyncio.Task:
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 90
    while not worker.ready:
        if task.done():
            task.result()
        assert time.monotonic() < deadline, "worker did not start"
        await asyncio.sleep(0.05)
    return task


async def _until(predicate, task: asyncio.Task, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if task.done():
            task.result()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _verdicts(settings, expect: int) -> list[Verdict]:
    records = asyncio.run(read_topic(settings, VERDICTS, expect=expect, idle_s=1, timeout_s=60))
    return [Verdict.from_bytes(r.value) for r in records]


def _heatmaps(settings, expect: int) -> list[Heatmap]:
    records = asyncio.run(read_topic(settings, HEATMAPS, expect=expect, idle_s=1, timeout_s=60))
    return [Heatmap.from_bytes(r.value) for r in records]


def _histogram(histogram) -> dict[str, float]:
    """{'count': .., 'sum': .., 'le=8.0': ..} of an unlabelled prometheus_client Histogram."""
    out = {}
    for metric in histogram.collect():
        for sample in metric.samples:
            key = sample.name.rsplit("_", 1)[-1]
            out[f"le={sample.labels['le']}" if key == "bucket" else key] = sample.value
    return out


def _gauge(gauge) -> float:
    return gauge.collect()[0].samples[0].value


async def _http_up(port: int, task: asyncio.Task) -> None:
    deadline = time.monotonic() + 30
    while await asyncio.to_thread(_get_quietly, port, "/healthz") is None:
        if task.done():
            task.result()
        assert time.monotonic() < deadline, "the HTTP server did not come up"
        await asyncio.sleep(0.1)


# --- 1. dynamic batching -----------------------------------------------------------------------------


def test_a_backlog_is_scored_in_full_batches_of_max_batch(settings, model):
    n, max_batch = 32, 8
    asyncio.run(publish(open_source("simulator", seed=3), settings, cameras=2, limit=n))  # the backlog
    recording = Recording(model)

    async def scenario():
        worker = InferenceWorker(settings, recording, WorkerConfig(max_batch=max_batch, max_wait_ms=50,
                                                                   explain=False, group_id=group(settings)))
        task = await _start(worker)
        await _until(lambda: worker.metrics.frames_total() >= n, task, 180, "the backlog scored")
        worker.stop()
        await asyncio.wait_for(task, 60)
        return worker

    worker = asyncio.run(scenario())
    calls = recording.calls
    assert sum(calls) == n and max(calls) == max_batch, calls
    # the first fetch may catch a partly filled buffer and the last takes the rest; all others are full
    assert all(size == max_batch for size in calls[1:-1]), calls
    assert len(calls) <= n // max_batch + 1, calls
    model_batches = _histogram(worker.metrics.model_batch_size)
    assert model_batches["count"] == len(calls) and model_batches["sum"] == n
    fetched = _histogram(worker.metrics.batch_size)
    assert fetched["sum"] == n and fetched[f"le={float(max_batch)}"] == fetched["count"], "a fetch above max_batch"


def test_frames_trickling_in_are_scored_one_by_one_without_waiting_for_a_batch(settings, model):
    """One frame every 200 ms (or 3x the model's time on a busy machine), max_wait_ms=20: nothing waits to
    fill a batch of 16, so every model call holds one frame and capture → verdict stays short."""
    n, max_batch, max_wait_ms = 6, 16, 20
    recording = Recording(model)
    simulator = LineSimulator(seed=8)
    timings = []
    for i in range(3):  # the first call warms up
        started = time.monotonic()
        model.score([_frame_input(simulator.part(i))])
        timings.append(time.monotonic() - started)
    single_s = min(timings)
    gap_s = max(0.2, 3 * single_s)

    async def scenario():
        worker = InferenceWorker(settings, recording, WorkerConfig(max_batch=max_batch, max_wait_ms=max_wait_ms,
                                                                   explain=False, group_id=group(settings)))
        task = await _start(worker)
        await publish(open_source("simulator", seed=8), settings, limit=n, rate=1 / gap_s)
        await _until(lambda: worker.metrics.frames_total() >= n, task, 120, "the trickle scored")
        worker.stop()
        await asyncio.wait_for(task, 60)
        return worker

    worker = asyncio.run(scenario())
    assert recording.calls == [1] * n, f"model calls {recording.calls} with a frame every {gap_s * 1000:.0f} ms"
    assert _histogram(worker.metrics.batch_size)["le=1.0"] == n, "a fetch waited for a second frame"
    verdicts = _verdicts(settings, n)
    assert len(verdicts) == n
    # capture → verdict, less the model's own time: transport + max_wait, not 15 more frames' worth of waiting
    waits = [(v.produced_at - v.captured_at).total_seconds() - v.latency.model_ms / 1000 for v in verdicts]
    assert max(waits) < min(1.0, (max_batch - 1) * gap_s), waits
    assert statistics.median(waits) < 0.5, waits


def _frame_input(part):
    from inference.worker import FrameInput

    return FrameInput(as_published(part.image, 90), part.product)


# --- 2-5. outputs, answers, latency, /healthz and /metrics: one run with explain=True -------------------


class Reshaped:
    """Simulated parts stretched to non-square frames, some larger than the heatmap's bound."""

    skipped: list = []

    def __init__(self, sizes: list[tuple[int, int]], seed: int):
        self.sizes, self.simulator = sizes, LineSimulator(seed=seed)

    def frames(self):
        for i, (width, height) in enumerate(self.sizes):
            part = self.simulator.part(i)
            yield SourceFrame(image=cv2.resize(part.image, (width, height)), product=part.product, source="test")


RESHAPED = [(600, 360), (300, 520), (1000, 250), (200, 120)]
N_SIMULATED = 16


@dataclass
class ExplainedRun:
    settings: object
    worker: InferenceWorker
    frame_ids: list[str]
    verdicts: list[Verdict]
    heatmaps: list[Heatmap]
    wall_s: float
    health_while_running: tuple[int, dict]
    metrics_text: str
    lag_after: float


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def explained(stack, model):
    settings = load_settings(state_dir=stack.settings.state_dir, kafka_bootstrap=stack.kafka_bootstrap,
                             influx_url=stack.influx_url, topic_prefix=f"outputs-{time.monotonic_ns()}.")
    asyncio.run(ensure_topics(settings))
    port = free_port()
    n = N_SIMULATED + len(RESHAPED)

    async def scenario():
        config = WorkerConfig(max_batch=8, max_wait_ms=30, group_id=group(settings), http_port=port)
        assert config.explain, "explain=True is the default"
        worker = InferenceWorker(settings, model, config)
        started = time.monotonic()
        task = await _start(worker)
        await _http_up(port, task)
        health = await asyncio.to_thread(_get, port, "/healthz")
        await publish(open_source("simulator", defect_rate=0.5, seed=13), settings, cameras=2, limit=N_SIMULATED)
        await publish(Reshaped(RESHAPED, seed=17), settings, limit=len(RESHAPED))
        producer = await start_client(settings, make_producer(settings))
        try:
            meta = FrameMeta(frame_id="corrupt-1", line_id="line-1", camera_id="cam-0", product="disc",
                             width=8, height=8)
            value, headers = encode_frame(meta, b"\xff\xd8 not a jpeg")
            await producer.send_and_wait(settings.topic(FRAMES), value, key=b"cam-0", headers=headers)
        finally:
            await producer.stop()
        await _until(lambda: worker.metrics.frames_total() + dead_letters(worker) >= n + 1, task, 180, "all frames")
        await _until(lambda: _gauge(worker.metrics.consumer_lag) == 0, task, 30, "lag 0 after commits")
        lag = _gauge(worker.metrics.consumer_lag)
        status, body = await asyncio.to_thread(_get, port, "/metrics")
        assert status == 200
        worker.stop()
        await asyncio.wait_for(task, 60)
        return worker, time.monotonic() - started, (health[0], json.loads(health[1])), body.decode(), lag

    worker, wall_s, health, metrics_text, lag = asyncio.run(scenario())
    frames = asyncio.run(read_topic(settings, FRAMES, expect=n + 1, idle_s=1, timeout_s=30))
    frame_ids = [FrameMeta.from_bytes(dict(r.headers)["lineguard-meta"]).frame_id for r in frames]
    return ExplainedRun(settings, worker, [f for f in frame_ids if f != "corrupt-1"], _verdicts(settings, n),
                        _heatmaps(settings, n), wall_s, health, metrics_text, lag)


def _get_quietly(port: int, path: str):
    try:
        return _get(port, path)
    except OSError:
        return None


def test_heatmap_png_is_single_channel_bounded_and_keeps_the_aspect_ratio(explained):
    assert sorted(h.frame_id for h in explained.heatmaps) == sorted(explained.frame_ids), "one heatmap per frame"
    shapes = set()
    for heatmap in explained.heatmaps:
        image = cv2.imdecode(np.frombuffer(heatmap.map_png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image is not None and heatmap.map_png[:8] == b"\x89PNG\r\n\x1a\n"
        assert image.ndim == 2 and image.dtype == np.uint8, image.shape
        height, width = image.shape
        assert max(height, width) <= HEATMAP_MAX_SIDE
        scale = min(1.0, HEATMAP_MAX_SIDE / max(heatmap.width, heatmap.height))  # shrunk, never enlarged
        assert abs(width - heatmap.width * scale) <= 1 and abs(height - heatmap.height * scale) <= 1, \
            (heatmap.width, heatmap.height, width, height)
        shapes.add((heatmap.width, heatmap.height))
    assert {(256, 256), *RESHAPED} <= shapes  # the frames above 128 px were really shrunk


def test_overlay_jpeg_is_attached_exactly_to_flagged_frames(explained):
    flagged = {v.frame_id: v.is_anomalous for v in explained.verdicts}
    assert any(flagged.values()) and not all(flagged.values()), "the run should hold flagged and normal frames"
    for heatmap in explained.heatmaps:
        if not flagged[heatmap.frame_id]:
            assert heatmap.overlay_jpeg is None, heatmap.frame_id
            continue
        assert heatmap.overlay_jpeg is not None, heatmap.frame_id
        overlay = cv2.imdecode(np.frombuffer(heatmap.overlay_jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert overlay is not None and overlay.ndim == 3
        assert max(overlay.shape[:2]) <= OVERLAY_MAX_SIDE


def _anomalygpt_answer(positions: list[str]) -> str:
    if len(positions) == 2:
        return (f"Yes, there are 2 anomalies in the image, they are at the {positions[0]} and {positions[1]} "
                "of the image.")
    if len(positions) == 1:
        return f"Yes, there is an anomaly in the image, at the {positions[0]} of the image."
    return "Yes, there is an anomaly in the image."


def test_flagged_verdicts_carry_the_anomalygpt_answer_and_each_frame_has_one_verdict(explained):
    ids = [v.frame_id for v in explained.verdicts]
    assert sorted(ids) == sorted(explained.frame_ids), "exactly one verdict per frame, the answer included"
    flagged = [v for v in explained.verdicts if v.is_anomalous]
    assert flagged and any(v.positions for v in flagged)
    for verdict in explained.verdicts:
        if verdict.is_anomalous:
            assert verdict.answer == _anomalygpt_answer(verdict.positions), (verdict.positions, verdict.answer)
        else:
            assert verdict.answer is None, verdict.answer
    assert explained.worker.metrics.text_seconds.collect()[0].samples  # the text stage ran
    assert _histogram(explained.worker.metrics.text_seconds)["count"] >= 1


def test_latency_breakdown_is_complete_and_fits_the_real_time(explained):
    model_calls = set()
    for verdict in explained.verdicts:
        latency = verdict.latency
        parts = [latency.queue_ms, latency.decode_ms, latency.model_ms, latency.publish_ms]
        assert all(part >= 0 for part in parts), latency
        assert latency.model_ms > 0 and latency.decode_ms > 0 and latency.publish_ms > 0, latency
        assert latency.model_ms / 1000 < explained.wall_s
        # the stages are disjoint slices of capture → verdict
        real_ms = (verdict.produced_at - verdict.captured_at).total_seconds() * 1000
        assert sum(parts) <= real_ms + 5, (latency, real_ms)
        model_calls.add(round(latency.model_ms, 6))
    # the model calls happened one after another (one model thread on a CPU) inside the run
    assert sum(model_calls) / 1000 < explained.wall_s


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_healthz_and_metrics_report_what_the_worker_did(explained):
    status, health = explained.health_while_running
    assert status == 200 and health["status"] == "ok", health
    assert health["model_version"] == explained.worker.model.version and {"disc", "tile"} <= set(health["products"])

    n = len(explained.frame_ids)
    samples = _samples(explained.metrics_text)

    def value(name: str, **labels) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    def total(name: str) -> float:
        return sum(v for (sample, _), v in samples.items() if sample == name)

    flagged = sum(v.is_anomalous for v in explained.verdicts)
    assert total("lineguard_frames_total") == n
    assert value("lineguard_frames_total", verdict="anomalous") == flagged
    assert value("lineguard_dead_letters_total", reason="UndecodableImage") == 1
    assert total("lineguard_dead_letters_total") == 1
    assert value("lineguard_batch_size_sum") == n + 1  # every fetched record, the corrupt one included
    assert value("lineguard_batch_size_bucket", le="8.0") == value("lineguard_batch_size_count")
    assert value("lineguard_model_batch_size_sum") == n  # only decodable frames reach the model
    assert value("lineguard_model_seconds_count") == value("lineguard_model_batch_size_count") >= 1
    assert value("lineguard_text_seconds_count") >= 1
    for stage in ("publish", "end_to_end"):
        assert value("lineguard_latency_seconds_count", stage=stage) == n
        assert value("lineguard_latency_seconds_sum", stage=stage) > 0
    assert value("lineguard_consumer_lag") == 0 == explained.lag_after


# --- 6. stop while a model call is running --------------------------------------------------------------


def test_stop_during_a_model_call_finishes_commits_and_a_second_worker_redelivers_nothing(settings, model):
    n, max_batch = 48, 4
    asyncio.run(publish(open_source("simulator", seed=6), settings, cameras=3, limit=n))
    slow = Recording(model, delay_s=0.5)
    port = free_port()

    async def first():
        worker = InferenceWorker(settings, slow, WorkerConfig(max_batch=max_batch, max_wait_ms=20, explain=False,
                                                              group_id=group(settings), http_port=port))
        task = await _start(worker)
        await _http_up(port, task)
        # stop while the second (or a later) model call is in progress
        await _until(lambda: worker.metrics.frames_total() >= max_batch and slow.running, task, 120,
                     "a model call in progress")
        in_call, done_at_stop = sum(slow.running), worker.metrics.frames_total()
        worker.stop()
        stopping = await asyncio.to_thread(_get, port, "/healthz")
        await asyncio.wait_for(task, 90)
        return worker, in_call, done_at_stop, stopping

    worker, in_call, done_at_stop, stopping = asyncio.run(first())
    assert in_call > 0 and not slow.running
    assert stopping[0] == 503 and json.loads(stopping[1])["status"] == "stopping"
    done = int(worker.metrics.frames_total())
    assert done >= done_at_stop + in_call, "the batch in the model when stop() came was not finished"
    assert done < n, "the first worker scored everything: the stop came too late to test anything"
    first_ids = [v.frame_id for v in _verdicts(settings, done)]
    assert len(first_ids) == len(set(first_ids)) == done
    assert asyncio.run(group_lag(settings)) == n - done, "the first worker did not commit what it published"

    async def second():
        worker = InferenceWorker(settings, Recording(model), WorkerConfig(max_batch=8, max_wait_ms=20, explain=False,
                                                                          group_id=group(settings)))
        task = await _start(worker)
        await _until(lambda: worker.metrics.frames_total() >= n - done, task, 180, "the rest scored")
        await asyncio.sleep(1.0)  # anything re-delivered would arrive now
        worker.stop()
        await asyncio.wait_for(task, 60)
        return worker

    second_worker = asyncio.run(second())
    assert second_worker.metrics.frames_total() == n - done, "the second worker re-scored published frames"
    records = asyncio.run(read_topic(settings, FRAMES, expect=n, idle_s=1, timeout_s=30))
    all_ids = {FrameMeta.from_bytes(dict(r.headers)["lineguard-meta"]).frame_id for r in records}
    copies = collections.Counter(v.frame_id for v in _verdicts(settings, n))
    assert [f for f in first_ids if copies[f] > 1] == [], "frames published by the first worker were re-delivered"
    assert set(copies) == all_ids and set(copies.values()) == {1}, "every frame exactly once"
    assert sorted(h.frame_id for h in _heatmaps(settings, n)) == sorted(all_ids)
    assert asyncio.run(group_lag(settings)) == 0
