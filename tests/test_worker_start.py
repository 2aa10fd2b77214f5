"""A worker's start-up: calibrated product states and the threading choice come from their caches, so a new
worker serves within seconds instead of calibrating every product again; and the fetch stage keeps nothing it
gathered before a rebalance (tests/test_worker.py covers the rebalance between worker processes)."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiokafka.structs import TopicPartition

from inference.references import ReferenceStore
from inference.worker import TUNING_CACHE, FrameInput, InferenceWorker, WorkerConfig, _Rebalance
from ingest.publisher import as_published
from ingest.simulator import LineSimulator
from lineguard.offsets import OffsetTracker
from lineguard.settings import load_settings


@pytest.fixture(scope="module")
def lite0():
    from inference.scorer import build_scorer

    return build_scorer(device="cpu", text=False)


@pytest.fixture
def shop(tmp_path):
    """Settings of a state dir whose shared artifact store holds 2 references of one product."""
    settings = load_settings(state_dir=tmp_path / "state")
    simulator = LineSimulator(seed=5)
    images = simulator.normal_references("disc", 2)
    ReferenceStore.from_settings(settings).add_images(
        "disc", [(f"disc-{i}.png", as_published(image, 90)) for i, image in enumerate(images)])
    return settings, simulator


def test_a_second_worker_loads_the_calibrated_state_and_scores_alike(lite0, shop, tmp_path):
    settings, simulator = shop
    lite0.states.clear()
    first = InferenceWorker(settings, lite0, WorkerConfig(model_threads=1))
    assert first.load_references() == ["disc"] and first.states_from_cache == []   # calibrated, then stored
    frame = FrameInput(simulator.part(1).image, "disc")
    calibrated = lite0.states["disc"]
    expected = lite0.score([frame])[0]

    # another machine: its own state dir (cache), the same shared artifact store
    elsewhere = settings.model_copy(update={"state_dir": tmp_path / "elsewhere",
                                            "store_artifacts": settings.artifacts_location()})
    lite0.states.clear()
    second = InferenceWorker(elsewhere, lite0, WorkerConfig(model_threads=1))
    assert second.load_references() == ["disc"] and second.states_from_cache == ["disc"]
    loaded = lite0.states["disc"]
    assert loaded is not calibrated
    assert loaded.calibration == calibrated.calibration
    got = lite0.score([frame])[0]
    assert got.is_anomalous == expected.is_anomalous
    assert got.score == pytest.approx(expected.score, rel=1e-5)

    # the old path on request; and new references are never served an old state
    lite0.states.clear()
    old_path = InferenceWorker(elsewhere, lite0, WorkerConfig(model_threads=1, start_cache=False))
    assert old_path.load_references() == ["disc"] and old_path.states_from_cache == []
    ReferenceStore.from_settings(settings).add_images("disc", [("disc-new.png", as_published(
        simulator.normal_references("disc", 3)[2], 90))])
    lite0.states.clear()
    changed = InferenceWorker(elsewhere, lite0, WorkerConfig(model_threads=1))
    assert changed.load_references() == ["disc"] and changed.states_from_cache == []
    assert len(lite0.states["disc"].references) == 3


def test_the_threading_choice_is_measured_once_per_machine_and_model(lite0, shop):
    settings, _ = shop
    lite0.states.clear()
    worker = InferenceWorker(settings, lite0, WorkerConfig(model_threads=0, max_batch=2))
    worker.load_references()
    if worker.cores < 2:
        pytest.skip("one core: nothing to choose")
    measured = worker.tune_threads()
    path = settings.state_dir / TUNING_CACHE
    cache = json.loads(path.read_text())
    assert list(cache.values()) == [list(measured)]
    assert worker.tune_threads() == measured
    # what the next start reads is the cache, not a new measure: a choice written there is what it returns
    path.write_text(json.dumps({key: [1, 1] for key in cache}))
    assert InferenceWorker(settings, lite0, WorkerConfig(model_threads=0, max_batch=2)).tune_threads() == (1, 1)


def test_a_reassigned_partition_starts_a_fresh_commit_point(lite0, shop):
    """Completions seen under an earlier ownership never move the commit point of a later one."""
    settings, _ = shop
    worker = InferenceWorker(settings, lite0, WorkerConfig(model_threads=1))
    tp = TopicPartition("frames", 3)
    worker.tracker.add(tp, [100, 101, 102])          # gathered before a revoke, tracked after it
    for offset in (100, 101, 102):
        worker.tracker.done(tp, offset)
    asyncio.run(_Rebalance(worker).on_partitions_assigned({tp}))   # the partition comes back to this worker
    worker.tracker.add(tp, [40, 41])                   # fetched again from the group's commit (40)
    worker.tracker.done(tp, 40)
    worker.tracker.done(tp, 41)
    assert worker.tracker.committable() == {tp: 42}   # not 103: 42..99 were never scored here


def test_tracker_without_reset_would_commit_past_unscored_frames():
    """The hazard the reset removes (documents why on_partitions_assigned forgets)."""
    tracker = OffsetTracker()
    tp = TopicPartition("frames", 3)
    tracker.add(tp, [100])
    tracker.done(tp, 100)
    tracker.add(tp, [40])
    tracker.done(tp, 40)
    assert tracker.committable() == {tp: 101}
