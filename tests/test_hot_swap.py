"""Hot swap under load, on the real broker: frames keep flowing while a version is promoted and then rolled
back. Every frame gets exactly one verdict, and versions change only between the model's batches."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from dialogue_helpers import PRODUCT, registry_line, run_pipeline, small_model
from helpers import read_topic

from ingest.publisher import as_published, encode_jpeg
from ingest.simulator import LineSimulator
from lineguard.events import FrameMeta, Verdict, encode_frame
from lineguard.kafka import make_producer, start_client
from lineguard.topics import FRAMES, VERDICTS
from training.train import release

FRAMES_SENT = 120
RATE = 20.0   # frames/s offered: about 6 s of line, two releases during it


class _Batches:
    """The model, noting each call's size and the product's state version when the call starts and ends."""

    def __init__(self, inner):
        self.inner, self.calls, self.lock = inner, [], threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, frames):
        before = getattr(self.inner.states[PRODUCT], "version", None)
        try:
            return self.inner.score(frames)
        finally:
            with self.lock:
                self.calls.append((len(frames), before, getattr(self.inner.states[PRODUCT], "version", None)))


async def _line(settings, images) -> None:
    producer = await start_client(settings, make_producer(settings))
    try:
        started = time.monotonic()
        for i, image in enumerate(images):
            await asyncio.sleep(max(0.0, started + i / RATE - time.monotonic()))
            jpeg, width, height = encode_jpeg(image, 90)
            meta = FrameMeta(frame_id=f"swap-{i:04d}", line_id="line-1", camera_id="cam-0", product=PRODUCT, seq=i,
                             width=width, height=height, source="simulator")
            value, headers = encode_frame(meta, jpeg)
            await producer.send(settings.topic(FRAMES), value, key=b"cam-0", headers=headers)
        await producer.flush()
    finally:
        await producer.stop()


def test_promote_and_rollback_under_load_lose_nothing_and_swap_between_batches(stack, tmp_path):
    settings, storage_settings, registry = registry_line(stack, tmp_path, "swap")
    inner = small_model()
    simulator = LineSimulator(products=(PRODUCT,), seed=5)
    # two versions: the model's own references (A) and more of them (B)
    more = [as_published(image, 90) for image in LineSimulator(seed=77).normal_references(PRODUCT, 3)]
    a = registry.register(PRODUCT, inner.states[PRODUCT], inner.version, parent=None, metrics={}, lineage={})
    b = registry.register(PRODUCT, inner.state_from_references(PRODUCT, more), inner.version, parent=a.version,
                          metrics={}, lineage={})
    registry.promote(a.version)
    model = _Batches(inner)
    images = [simulator.part(i, PRODUCT).image for i in range(FRAMES_SENT)]
    label = {version: f"{inner.version}/{version}" for version in (a.version, b.version)}
    try:
        # one model call at a time, so the calls' order is the frames' fetch order
        with run_pipeline(settings, storage_settings, model, registry=registry, model_threads=1) as pipeline:
            worker = pipeline.worker
            release(settings, PRODUCT, a.version)
            assert _until(lambda: worker.upcoming_version(PRODUCT) == label[a.version]), "release A not loaded"
            line = threading.Thread(target=lambda: asyncio.run(_line(settings, images)))
            line.start()
            time.sleep(1.5)
            registry.promote(b.version)
            release(settings, PRODUCT, b.version)                        # promote B mid-stream
            assert _until(lambda: worker.version_of(PRODUCT) == label[b.version]), "B never went live"
            time.sleep(1.0)
            assert registry.rollback(PRODUCT).version == a.version        # and roll back to A mid-stream
            release(settings, PRODUCT, a.version)
            assert _until(lambda: worker.version_of(PRODUCT) == label[a.version]), "the rollback never went live"
            line.join(60)
            assert not line.is_alive()
            records = asyncio.run(read_topic(settings, VERDICTS, expect=FRAMES_SENT, idle_s=3, timeout_s=120))
            assert pipeline.error is None
    finally:
        registry.close()

    verdicts = [Verdict.from_bytes(r.value) for r in records]
    ids = [v.frame_id for v in verdicts]
    assert len(ids) == len(set(ids)) == FRAMES_SENT, "every frame gets exactly one verdict"
    in_order = [v.model_version for v in sorted(verdicts, key=lambda v: v.frame_id)]
    segments = [version for i, version in enumerate(in_order) if i == 0 or version != in_order[i - 1]]
    assert segments == [label[a.version], label[b.version], label[a.version]], segments
    # versions change only between batches: no call saw its product's state change, and the frames of one
    # call (fetch order: one camera, one partition) all carry one version
    assert all(before == after for _, before, after in model.calls), model.calls
    sizes = [size for size, _, _ in model.calls]
    assert sum(sizes) == FRAMES_SENT
    start = 0
    for size, before, _ in model.calls:
        assert set(in_order[start:start + size]) == {label[before]}, (start, size, before)
        start += size


def _until(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(autouse=True)
def _no_leftover_threads():
    yield
    assert not [t for t in threading.enumerate() if t.name == "pipeline" and t.is_alive()]
