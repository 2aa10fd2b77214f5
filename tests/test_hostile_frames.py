"""Hostile input against the real broker and the real model: decompression bombs, frames unlike their
FrameMeta, oversize ids, the old bad cases, large legal frames, and frames that make the model raise.

Every message ends as exactly one verdict or one dead letter with the right reason; the worker's peak
memory, read from /proc, stays under the documented bound; a poison frame costs only itself; a model
that fails on everything stops the worker instead of dead-lettering the line.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from bench.hostile import BOMB_SIDE, bomb_jpeg, hostile_stream, send
from inference.references import ensure_simulator_references
from inference.worker import InferenceWorker, ModelBroken, WorkerConfig, documented_peak_bytes
from ingest.publisher import encode_jpeg
from ingest.simulator import LineSimulator
from lineguard.events import DeadLetter, FrameMeta, Verdict, encode_frame
from lineguard.kafka import make_producer, start_client
from lineguard.processes import memory_bytes
from lineguard.stack import free_port
from lineguard.topics import DEADLETTER, FRAMES, VERDICTS
from tests.helpers import read_topic
from tests.storage_helpers import migrated
from tests.worker_helpers import dead_letters, group, group_lag, healthy, worker_env


@pytest.mark.slow
def test_hostile_stream_ends_in_one_outcome_each_with_bounded_memory(settings, tmp_path):
    settings = settings.model_copy(update={"state_dir": tmp_path / "state"})
    migrated(settings)                      # `lineguard infer` opens the model registry: the schema comes first
    ensure_simulator_references(settings)
    bomb = bomb_jpeg()
    assert len(bomb) < settings.kafka_max_message_bytes   # a bomb fits in a message
    stream = hostile_stream(bomb)
    port = free_port()
    log = open(tmp_path / "infer.log", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen([sys.executable, "-m", "deploy", "infer", "--http-port", str(port), "--no-text",
                               "--group-id", group(settings)], env=worker_env(settings), stdout=log,
                              stderr=subprocess.STDOUT)
    samples: list[int] = []
    sampling = threading.Event()

    def sample() -> None:   # resident memory during the stream, read from /proc
        while not sampling.wait(0.05):
            samples.append(memory_bytes(worker.pid)[0])

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        deadline = time.monotonic() + 180
        while not healthy(port):
            assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "infer.log").read_text()[-3000:]
            time.sleep(0.3)
        sampler.start()
        sent = asyncio.run(send(settings, stream))
        n_verdicts = len(stream.verdict_ids())
        n_dead = len(stream.messages) - n_verdicts
        verdicts = [Verdict.from_bytes(r.value)
                    for r in asyncio.run(read_topic(settings, VERDICTS, expect=n_verdicts, idle_s=3, timeout_s=180))]
        letters = [DeadLetter.from_bytes(r.value)
                   for r in asyncio.run(read_topic(settings, DEADLETTER, expect=n_dead, idle_s=1, timeout_s=60))]
        sampling.set()
        sampler.join(5)
        peak = max(memory_bytes(worker.pid)[1], *samples)   # VmHWM can trail VmRSS by the per-thread caches
    finally:
        sampling.set()
        worker.terminate()
        worker.wait(60)
        log.close()
    assert worker.returncode == 0, (tmp_path / "infer.log").read_text()[-3000:]

    # every message: exactly one verdict or exactly one dead letter, with the right reason
    by_id: dict[str, list[Verdict]] = {}
    for verdict in verdicts:
        by_id.setdefault(verdict.frame_id, []).append(verdict)
    assert set(by_id) == stream.verdict_ids() and all(len(v) == 1 for v in by_id.values())
    expected_dead = stream.expected_dead(sent)
    got_dead = {(letter.partition, letter.offset): letter for letter in letters}
    assert len(letters) == len(got_dead) == len(expected_dead)
    assert {key: letter.error_type for key, letter in got_dead.items()} == expected_dead
    oversize = [letter.reason for letter in letters if letter.error_type == "OversizeFrame"]
    assert all("LINEGUARD_MAX_FRAME_PIXELS" in reason for reason in oversize)
    assert any(f"{BOMB_SIDE}x{BOMB_SIDE} = 100.0 MP" in reason for reason in oversize)
    assert any("60000x60000" in reason for reason in oversize)
    mismatch = [letter.reason for letter in letters if letter.error_type == "MetaMismatch"]
    assert any("512x512 but its FrameMeta says 64x9000" in reason for reason in mismatch)
    assert all(len(letter.reason) < 1000 for letter in letters)

    # memory: under the documented bound for the defaults, whatever came in
    bound = documented_peak_bytes(settings)
    assert len(samples) > 20 and peak <= bound, f"peak {peak / 2**20:.0f} MB > bound {bound / 2**20:.0f} MB"

    # the good frames right after the bombs were scored within a few seconds of being sent
    first_after = next(i for i, message in enumerate(stream.messages) if message.outcome == "verdict" and i > 10)
    for index in range(first_after, first_after + 8):
        frame_id = stream.messages[index].detail
        waited = by_id[frame_id][0].produced_at.timestamp() - sent[index][2]
        assert waited < 8.0, f"{frame_id} waited {waited:.1f} s behind the bombs"


# --- poison frames and a broken model, in-process with the real model ------------------------------------


class _Poisoned:
    """The real model, but frames 200 px wide make `score` raise, and frames 300 px wide get an anomaly map
    that the post-processing (heatmap PNG) cannot encode: two inputs a model can trip on."""

    def __init__(self, inner, always: bool = False):
        self.inner, self.always = inner, always
        self.calls: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def set_references(self, product, images, tiling=None):  # the inner model already holds these products
        pass

    def score(self, frames):
        self.calls.append(len(frames))
        if self.always or any(frame.image.shape[1] == 200 for frame in frames):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\n(second line not kept)")
        results = self.inner.score(frames)
        for frame, result in zip(frames, results, strict=True):
            if frame.image.shape[1] == 300:
                result.anomaly_map = np.zeros((0, 0), np.float32)
        return results


async def _produce_frames(settings, sizes: list[int]) -> list[str]:
    simulator = LineSimulator(seed=4)
    producer = await start_client(settings, make_producer(settings))
    ids = []
    try:
        for i, size in enumerate(sizes):
            part = simulator.part(i)
            jpeg, width, height = encode_jpeg(cv2.resize(part.image, (size, size)), 90)
            meta = FrameMeta(frame_id=f"poison-{i:03d}-{size}", line_id="line-1", camera_id="cam-0",
                             product=part.product, width=width, height=height)
            value, headers = encode_frame(meta, jpeg)
            await producer.send_and_wait(settings.topic(FRAMES), value, key=b"cam-0", headers=headers)
            ids.append(meta.frame_id)
    finally:
        await producer.stop()
    return ids


def test_a_poison_frame_is_dead_lettered_alone_and_its_batch_is_scored(settings, model):
    sizes = [256] * 4 + [200] + [256] * 3 + [300] + [256] * 3
    ids = asyncio.run(_produce_frames(settings, sizes))   # all waiting before the worker starts: one batch
    poisoned = _Poisoned(model)
    worker = InferenceWorker(settings, poisoned, WorkerConfig(max_batch=16, max_wait_ms=200, explain=False,
                                                              group_id=group(settings)))

    async def run() -> None:
        task = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 120
        while worker.metrics.frames_total() + dead_letters(worker) < len(ids) and time.monotonic() < deadline:
            assert not task.done(), task.exception() if task.done() else None
            await asyncio.sleep(0.1)
        worker.stop()
        await asyncio.wait_for(task, 60)

    asyncio.run(run())
    assert poisoned.calls[0] == len(ids), "the frames were not scored as one batch"
    letters = [DeadLetter.from_bytes(r.value) for r in asyncio.run(read_topic(settings, DEADLETTER, expect=2))]
    assert sorted((letter.offset, letter.error_type) for letter in letters) == [(4, "ModelError"), (8, "ModelError")]
    raised = next(letter for letter in letters if letter.offset == 4)
    assert raised.reason == "RuntimeError: CUDA error: an illegal memory access was encountered"
    verdicts = {Verdict.from_bytes(r.value).frame_id
                for r in asyncio.run(read_topic(settings, VERDICTS, expect=len(ids) - 2))}
    assert verdicts == {frame_id for frame_id, size in zip(ids, sizes, strict=True) if size == 256}
    assert asyncio.run(group_lag(settings)) == 0   # everything committed, dead letters included


def test_a_broken_model_stops_the_worker_without_dead_lettering_the_line(settings, model, tmp_path):
    settings = settings.model_copy(update={"state_dir": tmp_path / "state"})
    ensure_simulator_references(settings)   # the worker checks the model on one of these before giving up
    ids = asyncio.run(_produce_frames(settings, [256] * 6))
    worker = InferenceWorker(settings, _Poisoned(model, always=True),
                             WorkerConfig(max_batch=16, max_wait_ms=200, explain=False, group_id=group(settings)))
    with pytest.raises(ModelBroken, match="fails on a reference image .* CUDA error"):
        asyncio.run(asyncio.wait_for(worker.run(), 120))
    assert dead_letters(worker) == 0
    assert asyncio.run(read_topic(settings, DEADLETTER, idle_s=1, timeout_s=5)) == []
    assert asyncio.run(group_lag(settings)) == len(ids)   # nothing committed: a fixed model gets them all
