"""The closed loop, on the real broker: a new normal variation raises false alarms; operators label frames on
the labels topic; `lineguard train` builds a candidate, the gate promotes it, the running worker swaps it in
at a batch boundary; fresh frames of the variation stop being flagged while defects stay flagged. Then
poisoned labels (defects labelled good) make a candidate the gate rejects, and the live version stays.
Also: the registry's bundles round-trip, rollback and the nightly no-op."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from dialogue_helpers import PRODUCT, registry_line, run_pipeline, small_model
from storage_helpers import migrated, wait_until
from test_training_learn import striped

from inference.registry import ModelRegistry, RegistryError, state_bytes, state_from_bytes
from ingest.publisher import encode_jpeg
from ingest.simulator import LineSimulator
from lineguard.events import FrameMeta, Label, encode_frame
from lineguard.kafka import make_producer, start_client
from lineguard.topics import FRAMES, LABELS
from training.train import GateConfig, TrainingLocked, train, training_lock


async def _send(settings, frames: list[tuple[str, np.ndarray]] | None = None, labels: list[Label] | None = None):
    producer = await start_client(settings, make_producer(settings))
    try:
        for i, (frame_id, image) in enumerate(frames or []):
            jpeg, width, height = encode_jpeg(image, 90)
            meta = FrameMeta(frame_id=frame_id, line_id="line-1", camera_id="cam-0", product=PRODUCT, seq=i,
                             width=width, height=height, source="simulator")
            value, headers = encode_frame(meta, jpeg)
            await producer.send_and_wait(settings.topic(FRAMES), value, key=b"cam-0", headers=headers)
        for label in labels or []:
            await producer.send_and_wait(settings.topic(LABELS), label.to_bytes(), key=label.frame_id.encode())
    finally:
        await producer.stop()


def _verdicts(store, frame_ids: list[str]) -> list:
    """The stored record of each frame (None when it was not flagged: normal frames are not sampled here)."""
    return [store.get(frame_id) for frame_id in frame_ids]


def _labelled(store, n: int, timeout_s: float = 60) -> None:
    from storage.labels import training_examples

    assert wait_until(lambda: len(training_examples(store)) >= n, timeout_s), "labels did not reach the store"


@pytest.fixture(scope="module")
def loop(stack, tmp_path_factory):
    settings, storage_settings, registry = registry_line(stack, tmp_path_factory.mktemp("training"), "training")
    with run_pipeline(settings, storage_settings, small_model(), registry=registry) as pipeline:
        yield settings, storage_settings, pipeline, registry
    registry.close()


def test_labels_teach_the_live_workers_a_new_normal_variation_and_poison_is_rejected(loop):
    settings, storage_settings, pipeline, registry = loop
    store = pipeline.store
    simulator = LineSimulator(products=(PRODUCT,), seed=11)
    good = [striped(simulator.part(i, PRODUCT, defect_type=None).image) for i in range(40)]
    bad = [striped(simulator.part(200 + i, PRODUCT, defect_type="contamination").image) for i in range(18)]

    # 1. the new supplier's stripes: the references-only model flags them
    first = [(f"a-good-{i:02d}", image) for i, image in enumerate(good[:16])] + \
            [(f"a-bad-{i:02d}", image) for i, image in enumerate(bad[:8])]
    asyncio.run(_send(settings, first))
    pipeline.wait_for_frames(len(first))
    before = _verdicts(store, [f for f, _ in first[:16]])
    false_alarms_before = np.mean([r is not None for r in before])
    assert false_alarms_before >= 0.5, false_alarms_before
    assert all(r.model_version == pipeline.worker.model.version for r in before if r)   # references only

    # 2. operators label the false alarms good and the defects defective, on the labels topic
    flagged_good = [r.frame_id for r in before if r is not None]
    flagged_bad = [r.frame_id for r in _verdicts(store, [f for f, _ in first[16:]]) if r is not None]
    order = [(f, False) for f in flagged_good] + [(f, True) for f in flagged_bad]
    order = [order[i] for i in np.random.default_rng(0).permutation(len(order))]   # labelled as they came
    asyncio.run(_send(settings, labels=[Label(frame_id=f, operator="alice", is_defect=d) for f, d in order]))
    _labelled(store, len(order))

    # 3. train: the candidate passes the gate, is promoted, and the running worker swaps it in
    results = train(settings, storage_settings, model=small_model(), report_dir=settings.state_dir / "reports")
    assert [r.decision for r in results] == ["promoted"], results
    result = results[0]
    live = registry.live(PRODUCT)
    assert live is not None and live.version == result.version == f"{PRODUCT}.v0001"
    assert live.lineage["parent"] is None and set(live.lineage["label_ids"]) | set(
        live.lineage["held_out_ids"]) == {f for f, _ in order}
    report = result.report
    assert report and all(Path(report).with_suffix(suffix).exists() for suffix in (".json", ".md", ".png"))
    expected = f"{pipeline.worker.model.version}/{live.version}"
    # the worker loads the release at once and installs it at its next batch boundary
    assert wait_until(lambda: pipeline.worker.upcoming_version(PRODUCT) == expected, 60), "no release loaded"
    assert pipeline.worker.version_of(PRODUCT) == pipeline.worker.model.version

    # 4. fresh frames of the variation: false alarms fall by >= 70 %, defects stay flagged
    second = [(f"b-good-{i:02d}", image) for i, image in enumerate(good[16:36])] + \
             [(f"b-bad-{i:02d}", image) for i, image in enumerate(bad[8:18])]
    asyncio.run(_send(settings, second))
    pipeline.wait_for_frames(len(first) + len(second))
    after = _verdicts(store, [f for f, _ in second[:20]])
    caught = _verdicts(store, [f for f, _ in second[20:]])
    false_alarms_after = np.mean([r is not None for r in after])
    assert false_alarms_after <= 0.3 * false_alarms_before, (false_alarms_before, false_alarms_after)
    assert np.mean([r is not None for r in caught]) >= 0.9
    assert all(r.model_version == expected for r in after + caught if r)
    assert pipeline.worker.version_of(PRODUCT) == expected

    # 5. poison: the new defects labelled good. The gate rejects the candidate; v0001 stays live
    poison = [Label(frame_id=r.frame_id, operator="mallory", is_defect=False) for r in caught if r]
    asyncio.run(_send(settings, labels=poison))
    _labelled(store, len(order) + len(poison))
    rejected = train(settings, storage_settings, model=small_model(), publish=False)
    assert [r.decision for r in rejected] == ["rejected"], rejected
    assert rejected[0].reasons
    assert registry.live(PRODUCT).version == live.version
    assert registry.get(rejected[0].version).status == "rejected"

    # nightly: with no label after `since`, nothing is done (and no model is built); nor without `since` once
    # every label went into a registered version, rejected or not
    assert train(settings, storage_settings, since=datetime.now(UTC)) == []
    assert train(settings, storage_settings) == []


def test_bundles_round_trip_and_rollback_walks_back(tmp_path):
    from lineguard.artifacts import LocalArtifactStore

    model = small_model()
    state = model.states[PRODUCT]
    back = state_from_bytes(state_bytes(state))
    assert back.calibration == state.calibration and back.semantic_offset == state.semantic_offset
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(back.memory.banks, state.memory.banks,
                                                                    strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(back.references, state.references, strict=True))
    registry = ModelRegistry(migrated(f"sqlite:///{tmp_path}/r.sqlite"), LocalArtifactStore(tmp_path / "artifacts"))
    v1 = registry.register(PRODUCT, state, model.version, parent=None, metrics={}, lineage={})
    v2 = registry.register(PRODUCT, state, model.version, parent=v1.version, metrics={}, lineage={})
    registry.promote(v1.version)
    registry.promote(v2.version)
    assert [v.status for v in registry.versions(PRODUCT)] == ["live", "retired"]
    assert registry.rollback(PRODUCT).version == v1.version
    assert registry.rollback(PRODUCT) is None          # back to the references alone
    with pytest.raises(RegistryError):
        registry.rollback(PRODUCT)
    with pytest.raises(RegistryError):
        registry.get("nope.v0001")
    model.states[PRODUCT] = None
    assert registry.install(model, v2.version).version == v2.version
    assert model.states[PRODUCT].version == v2.version
    registry.close()


def test_two_training_runs_cannot_overlap(tmp_path):
    with training_lock(tmp_path), pytest.raises(TrainingLocked), training_lock(tmp_path):
        pass
    with training_lock(tmp_path):   # released
        pass


def test_the_gate_rejects_a_candidate_that_does_not_gain():
    from training.train import judge

    same = {"held_out": {"recall": 100.0, "false_alarm_rate": 50.0, "balanced_accuracy": 75.0},
            "references": {"recall": float("nan"), "false_alarm_rate": 0.0, "balanced_accuracy": float("nan")},
            "simulated": {"recall": 100.0, "false_alarm_rate": float("nan"), "balanced_accuracy": float("nan")}}
    better = {**same, "held_out": {"recall": 100.0, "false_alarm_rate": 10.0, "balanced_accuracy": 95.0}}
    blind = {**better, "simulated": {"recall": 60.0, "false_alarm_rate": float("nan"),
                                     "balanced_accuracy": float("nan")}}
    config = GateConfig()
    assert judge(same, better, config) == []
    assert "gains" not in " ".join(judge(same, same, config)) and judge(same, same, config)
    assert any("simulated recall" in reason for reason in judge(same, blind, config))
