"""The streaming inference worker against the real broker and the real model.

Every frame yields exactly one verdict and one heatmap after dedupe by frame_id, across a
crashed worker and across a rebalance; bad frames land in the dead-letter topic with a reason.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from aiokafka.structs import TopicPartition

from inference.references import ensure_simulator_references
from inference.worker import InferenceWorker, WorkerConfig
from ingest.publisher import publish
from ingest.sources import open_source
from lineguard.events import DeadLetter, FrameMeta, Heatmap, Verdict, encode_frame
from lineguard.kafka import make_producer, start_client
from lineguard.offsets import OffsetTracker
from lineguard.stack import free_port
from lineguard.topics import DEADLETTER, FRAMES, HEATMAPS, VERDICTS
from tests.helpers import read_topic
from tests.storage_helpers import migrated
from tests.worker_helpers import dead_letters, group, group_lag, healthy, worker_env

# --- the offset rule, without Kafka ----------------------------------------------------------------------


def test_offsets_commit_only_below_the_oldest_unfinished_frame():
    tracker = OffsetTracker()
    tp = TopicPartition("frames", 0)
    tracker.add(tp, [10, 11, 12])
    tracker.done(tp, 11)
    tracker.done(tp, 12)
    assert tracker.committable() == {tp: 10}  # 10 still pending: nothing past it
    tracker.done(tp, 10)
    assert tracker.committable() == {tp: 13}
    tracker.committed({tp: 13})
    assert tracker.committable() == {}
    tracker.add(tp, [13])
    tracker.forget([tp])  # revoked: late completions are ignored
    tracker.done(tp, 13)
    assert tracker.committable() == {}


# --- helpers ---------------------------------------------------------------------------------------------




def start_worker_process(settings, tmp_path, name: str, port: int) -> subprocess.Popen:
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "deploy", "infer", "--http-port", str(port), "--no-text",
                             "--group-id", group(settings)],
                            env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT)


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def frames_done(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("lineguard_frames_total"))


class Outputs:
    """Verdicts and heatmaps read back, keyed by frame_id (consumers dedupe by frame_id)."""

    def __init__(self, settings):
        self.settings = settings
        self.verdicts: dict[str, list[Verdict]] = {}
        self.heatmaps: dict[str, int] = {}

    def read(self, expect: int, timeout_s: float = 120) -> Outputs:
        verdicts = asyncio.run(read_topic(self.settings, VERDICTS, expect=expect, idle_s=2, timeout_s=timeout_s))
        heatmaps = asyncio.run(read_topic(self.settings, HEATMAPS, expect=expect, idle_s=1, timeout_s=timeout_s))
        self.verdicts, self.heatmaps = {}, {}
        for record in verdicts:
            verdict = Verdict.from_bytes(record.value)
            self.verdicts.setdefault(verdict.frame_id, []).append(verdict)
        for record in heatmaps:
            heatmap = Heatmap.from_bytes(record.value)
            self.heatmaps[heatmap.frame_id] = self.heatmaps.get(heatmap.frame_id, 0) + 1
        return self


def published_ids(settings) -> list[str]:
    records = asyncio.run(read_topic(settings, FRAMES, idle_s=1, timeout_s=30))
    return [FrameMeta.from_bytes(dict(r.headers)["lineguard-meta"]).frame_id for r in records]


# --- in-process worker -----------------------------------------------------------------------------------


async def _run_worker_until(settings, model, expect_verdicts: int, produce, config=None, timeout_s=120):
    worker = InferenceWorker(settings, model, config or WorkerConfig(max_batch=8, max_wait_ms=30, explain=False,
                                                                      group_id=group(settings)))
    task = asyncio.create_task(worker.run())
    await produce()
    deadline = time.monotonic() + timeout_s
    while worker.metrics.frames_total() + dead_letters(worker) < expect_verdicts and time.monotonic() < deadline:
        if task.done():
            task.result()
        await asyncio.sleep(0.2)
    worker.stop()
    await asyncio.wait_for(task, 60)
    return worker




def test_simulated_defects_are_flagged(settings, model):
    """With the `lineguard infer` default of measuring the model threading at start-up."""
    from structlog.testing import capture_logs

    n = 48

    async def produce():
        await publish(open_source("simulator", defect_rate=0.5, seed=11), settings, cameras=2, limit=n)

    config = WorkerConfig(max_batch=8, max_wait_ms=30, explain=False, group_id=group(settings), model_threads=0)
    with capture_logs() as logs:
        worker = asyncio.run(_run_worker_until(settings, model, n, produce, config))
    [tuned] = [entry for entry in logs if entry["event"] == "model_threads_tuned"]
    assert len(tuned["frames_per_s"]) == 3 and "1x1" in tuned["frames_per_s"]     # 1x1, 1xN and Nx1 on N cores
    best = max(tuned["frames_per_s"], key=tuned["frames_per_s"].get)
    assert f"{tuned['threads']}x{tuned['torch_threads']}" == best
    # one call at a time on one core: the model's time is in Python, so it scores in a process of its own
    in_process = worker.scoring is not model
    assert in_process == (best == "1x1") and worker.model_threads == (2 if in_process else tuned["threads"])
    outputs = Outputs(settings).read(expect=n)
    verdicts = [v[0] for v in outputs.verdicts.values()]
    assert len(verdicts) == n and set(outputs.heatmaps) == set(outputs.verdicts)
    defects = [v for v in verdicts if v.ground_truth_defect]
    normals = [v for v in verdicts if v.ground_truth_defect is False]
    recall = sum(v.is_anomalous for v in defects) / len(defects)
    false_alarms = sum(v.is_anomalous for v in normals) / len(normals)
    assert recall >= 0.9, f"recall {recall:.2f}"
    assert false_alarms <= 0.2, f"false-alarm rate {false_alarms:.2f}"
    for verdict in defects:
        if verdict.is_anomalous:
            assert verdict.regions and 1 <= len(verdict.positions) <= 2
            assert verdict.latency.model_ms > 0 and verdict.model_version == model.version


def test_two_model_calls_in_flight_keep_each_cameras_order(settings, model):
    """On a GPU two batches are scored at once; verdicts still leave in fetch order, one per frame."""
    n = 40

    async def produce():
        await publish(open_source("simulator", defect_rate=0.3, seed=5), settings, cameras=2, limit=n)

    class Overlapping:
        """The real model, counting how many of its calls run at the same time."""

        def __init__(self, inner):
            self.inner, self.device, self.version = inner, inner.device, inner.version
            self.lock, self.running, self.most = threading.Lock(), 0, 0

        def products(self):
            return self.inner.products()

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def score(self, frames):
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            try:
                time.sleep(0.02)  # hold the call open long enough for the next batch to arrive
                return self.inner.score(frames)
            finally:
                with self.lock:
                    self.running -= 1

    counting = Overlapping(model)
    config = WorkerConfig(max_batch=4, max_wait_ms=10, explain=False, model_threads=2, group_id=group(settings))
    worker = asyncio.run(_run_worker_until(settings, counting, n, produce, config=config))
    assert counting.most == 2, "two model calls never overlapped"
    assert worker.metrics.frames_total() == n

    def per_camera(records, frame_id) -> dict[bytes, list[str]]:
        order: dict[bytes, list[str]] = {}
        for record in records:
            order.setdefault(record.key, []).append(frame_id(record))
        return order

    frames = asyncio.run(read_topic(settings, FRAMES, expect=n, idle_s=1, timeout_s=30))
    verdicts = asyncio.run(read_topic(settings, VERDICTS, expect=n, idle_s=2, timeout_s=60))
    sent = per_camera(frames, lambda r: FrameMeta.from_bytes(dict(r.headers)["lineguard-meta"]).frame_id)
    scored = per_camera(verdicts, lambda r: Verdict.from_bytes(r.value).frame_id)
    assert len(sent) == 2 and scored == sent


def test_bad_frames_go_to_the_dead_letter_topic(settings, model):
    meta = FrameMeta(frame_id="bad-jpeg", line_id="line-1", camera_id="cam-0", product="disc", width=8, height=8)
    unknown = meta.model_copy(update={"frame_id": "unknown-product", "product": "gearbox"})

    async def produce():
        producer = await start_client(settings, make_producer(settings))
        topic = settings.topic(FRAMES)
        try:
            value, headers = encode_frame(meta, b"\xff\xd8 definitely not a jpeg")
            await producer.send_and_wait(topic, value, key=b"cam-0", headers=headers)
            await producer.send_and_wait(topic, b"\xff\xd8", key=b"cam-0")  # no metadata header
            await producer.send_and_wait(topic, b"\xff\xd8", key=b"cam-0",
                                         headers=[("lineguard-meta", b'{"frame_id": 3}')])
            import cv2
            import numpy as np

            jpeg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
            value, headers = encode_frame(unknown, jpeg)
            await producer.send_and_wait(topic, value, key=b"cam-0", headers=headers)
        finally:
            await producer.stop()
        await publish(open_source("simulator", seed=2), settings, limit=2)

    worker = asyncio.run(_run_worker_until(settings, model, 6, produce))
    letters = [DeadLetter.from_bytes(r.value)
               for r in asyncio.run(read_topic(settings, DEADLETTER, expect=4, idle_s=1))]
    reasons = {letter.error_type: letter.reason for letter in letters}
    assert set(reasons) == {"UndecodableImage", "BadFrame", "UnknownProduct"}
    assert len(letters) == 4
    assert "gearbox" in reasons["UnknownProduct"] and "no references" in reasons["UnknownProduct"]
    assert any("missing lineguard-meta" in letter.reason for letter in letters)
    assert any("invalid FrameMeta" in letter.reason for letter in letters)
    assert all(letter.source_topic == settings.topic(FRAMES) and letter.offset is not None for letter in letters)
    # the worker kept going: the good frames after the bad ones have verdicts
    assert len(Outputs(settings).read(expect=2).verdicts) == 2
    assert worker.metrics.frames_total() == 2


# --- worker processes: crash, restart, rebalance --------------------------------------------------------


@pytest.fixture
def refs_settings(settings, tmp_path):
    settings = settings.model_copy(update={"state_dir": tmp_path / "state"})
    migrated(settings)                      # `lineguard infer` opens the model registry: the schema comes first
    ensure_simulator_references(settings)
    return settings


def test_exactly_one_verdict_per_frame_across_a_worker_crash(refs_settings, tmp_path):
    settings, n = refs_settings, 60
    asyncio.run(publish(open_source("simulator", seed=4), settings, cameras=3, limit=n))
    port = free_port()
    first = start_worker_process(settings, tmp_path, "first", port)
    try:
        wait_until(lambda: healthy(port), 120, "first worker")
        wait_until(lambda: frames_done(port) >= 15, 120, "some frames scored")
        first.send_signal(signal.SIGKILL)  # a crash: no drain, no commit
        first.wait(10)
        second_port = free_port()
        second = start_worker_process(settings, tmp_path, "second", second_port)
        try:
            wait_until(lambda: healthy(second_port), 120, "second worker")
            outputs = Outputs(settings).read(expect=n)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(60) == 0
    finally:
        if first.poll() is None:
            first.kill()
    ids = set(published_ids(settings))
    assert len(ids) == n
    assert set(outputs.verdicts) == ids, "every frame has a verdict, and only published frames do"
    assert set(outputs.heatmaps) == ids
    # after dedupe by frame_id, each frame has one verdict; re-deliveries carry the same decision
    for frame_id, copies in outputs.verdicts.items():
        assert len({(v.is_anomalous, round(v.score, 5)) for v in copies}) == 1, frame_id


def test_rebalance_between_two_workers_loses_nothing(refs_settings, tmp_path):
    """The line keeps running while a second worker starts (its model load takes 10-40 s on 2 busy cores) and
    for a while after it joined, so the partitions move mid-stream."""
    settings = refs_settings
    port_a, port_b = free_port(), free_port()
    worker_a = start_worker_process(settings, tmp_path, "a", port_a)
    worker_b = None
    line_stop = threading.Event()
    published = []

    async def line():
        seed = 100
        while not line_stop.is_set():
            report = await publish(open_source("simulator", seed=seed), settings, cameras=6, limit=8, rate=8)
            published.append(report.published)
            seed += 1

    thread = threading.Thread(target=lambda: asyncio.run(line()))
    try:
        wait_until(lambda: healthy(port_a), 120, "worker a")
        thread.start()
        wait_until(lambda: frames_done(port_a) >= 5, 120, "worker a scoring")
        worker_b = start_worker_process(settings, tmp_path, "b", port_b)  # joins the group: rebalance
        wait_until(lambda: healthy(port_b), 180, "worker b")
        wait_until(lambda: frames_done(port_b) >= 8, 60, "worker b scoring")
        line_stop.set()
        thread.join(60)
        n = sum(published)
        outputs = Outputs(settings).read(expect=n)
        done_a, done_b = frames_done(port_a), frames_done(port_b)
        # SIGTERM: both finish what they hold, commit and leave the group
        for process in (worker_a, worker_b):
            process.send_signal(signal.SIGTERM)
        assert worker_a.wait(60) == 0 and worker_b.wait(60) == 0
    finally:
        line_stop.set()
        for process in (worker_a, worker_b):
            if process is not None and process.poll() is None:
                process.kill()
    ids = set(published_ids(settings))
    assert len(ids) == n
    assert set(outputs.verdicts) == ids and set(outputs.heatmaps) == ids
    assert done_a > 0 and done_b > 0, f"both workers should have scored frames: a={done_a} b={done_b}"
    # every offset is committed after the graceful stop
    assert asyncio.run(group_lag(settings)) == 0




def test_refs_add_reaches_a_running_worker_without_restart(settings, model, tmp_path):
    """A product without references is dead-lettered; after `lineguard refs add` the same worker scores it."""
    import cv2

    from ingest.simulator import LineSimulator

    state = tmp_path / "state"
    settings = settings.model_copy(update={"state_dir": state})
    model.states.pop("gasket", None)
    simulator = LineSimulator(products=("tile",), seed=21)
    paths = []
    for i, image in enumerate(simulator.normal_references("tile", 2)):
        paths.append(tmp_path / f"good_{i}.png")
        cv2.imwrite(str(paths[-1]), image)

    async def scenario():
        worker = InferenceWorker(settings, model, WorkerConfig(max_batch=4, max_wait_ms=20, explain=False,
                                                               group_id=group(settings)))
        task = asyncio.create_task(worker.run())
        while not worker.ready:
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # the model-updates watcher has joined

        # frames of a product "gasket" that has no references yet (tile images)
        from ingest.sources import SimulatorSource

        class Gasket(SimulatorSource):
            def frames(self):
                for frame in super().frames():
                    frame.product = "gasket"
                    yield frame

        await publish(Gasket(simulator), settings, limit=2)
        while dead_letters(worker) < 2:
            await asyncio.sleep(0.1)
        env = worker_env(settings)
        added = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "deploy", "refs", "add",
                                                         "--product", "gasket", *map(str, paths)],
                                        env=env, capture_output=True, text=True, timeout=120)
        assert added.returncode == 0, added.stderr
        assert "gasket: added 2 reference image(s)" in added.stdout
        # the reload encodes the references and calibrates the threshold: seconds on a 2-core CPU
        deadline = time.monotonic() + 90
        while "gasket" not in model.products():
            assert time.monotonic() < deadline, "the worker never reloaded gasket's references"
            await asyncio.sleep(0.1)
        await publish(Gasket(simulator), settings, limit=3)
        while worker.metrics.frames_total() < 3:
            await asyncio.sleep(0.1)
        worker.stop()
        await task
        return worker

    worker = asyncio.run(asyncio.wait_for(scenario(), 180))
    assert dead_letters(worker) == 2 and worker.metrics.frames_total() == 3
    listed = subprocess.run([sys.executable, "-m", "deploy", "refs", "list"], env=worker_env(settings),
                            capture_output=True, text=True, timeout=60)
    assert "gasket\t2 image(s)" in listed.stdout
    model.states.pop("gasket", None)
