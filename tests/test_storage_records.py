"""The recorder (`lineguard store`) against the real broker, with SQLite and a local artifact store.

- records survive a crash of the recorder (nothing committed) and a restart: at-least-once delivery,
  idempotent by frame_id, counts exact, re-delivered verdicts not counted twice;
- labels land with their records; the query API selects by time, line, product, verdict, label;
- an unwritable artifact directory or a full disk stops the recorder with a clear error, and no
  offset is committed past a record that was not saved; after the fix everything is stored.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from datetime import timedelta

import pytest
from storage_helpers import frame_record, heatmap_for, make_verdicts, minute_ago, publish

from lineguard.events import Label
from lineguard.kafka import make_consumer, start_client
from lineguard.topics import FRAMES, HEATMAPS, LABELS, VERDICTS
from storage.artifacts import ArtifactStoreError, StorageError
from storage.labels import training_examples
from storage.records import Recorder, RecordStore, sampled
from storage.settings import load_storage_settings

SAMPLE_RATE = 0.25


def publish_line(settings, verdicts, *, frame_size: int = 64) -> None:
    async def go() -> None:
        await publish(settings, FRAMES, [frame_record(v, frame_size) for v in verdicts])
        await publish(settings, HEATMAPS, [(v.camera_id.encode(), heatmap_for(v).to_bytes(), None) for v in verdicts])
        await publish(settings, VERDICTS, [(v.camera_id.encode(), v.to_bytes(), None) for v in verdicts])

    asyncio.run(go())


def publish_labels(settings, labels: list[Label]) -> None:
    asyncio.run(publish(settings, LABELS, [(label.frame_id.encode(), label.to_bytes(), None) for label in labels]))


def storage_settings_for(settings, tmp_path, **extra):
    values = {"store_group": f"store-{settings.topic_prefix}", "store_db_url": f"sqlite:///{tmp_path}/records.db",
              "store_artifacts": str(tmp_path / "artifacts"), "store_normal_sample_rate": SAMPLE_RATE,
              "store_join_timeout_s": 30.0} | extra
    return load_storage_settings(**values)


def run_recorder(settings, storage_settings, done, *, commit: bool = True, timeout_s: float = 60.0) -> Recorder:
    """Run a Recorder until `done(recorder)` holds (checked every 0.2 s) or timeout; returns it."""
    recorder = Recorder(settings, storage_settings)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(recorder.run(stop=stop, commit=commit))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while loop.time() < deadline and not task.done():
                if await asyncio.to_thread(done, recorder):
                    break
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await task

    try:
        asyncio.run(scenario())
    finally:
        recorder.store.close()
    return recorder


def committed_offsets(settings, group: str) -> dict[tuple[str, int], int | None]:
    async def go():
        consumer = make_consumer(settings, group_id=group)
        await start_client(settings, consumer)
        try:
            from aiokafka import TopicPartition

            out = {}
            for topic in (FRAMES, VERDICTS, HEATMAPS):
                name = settings.topic(topic)
                for partition in sorted(consumer.partitions_for_topic(name) or ()):
                    out[(topic, partition)] = await consumer.committed(TopicPartition(name, partition))
            return out
        finally:
            await consumer.stop()

    return asyncio.run(go())


def test_records_survive_a_crash_and_restart_idempotent(settings, tmp_path):
    verdicts = make_verdicts(40, start=minute_ago(5), defect_rate=0.3, prefix="r")
    flagged = [v for v in verdicts if v.is_anomalous]
    samples = [v for v in verdicts if not v.is_anomalous and sampled(v.frame_id, SAMPLE_RATE)]
    expected = {v.frame_id for v in flagged + samples}
    assert flagged and samples
    labelled = flagged[0]
    early_label = Label(frame_id=labelled.frame_id, operator="ana", is_defect=False, note="glare",
                        labeled_at=labelled.captured_at + timedelta(minutes=1))
    publish_labels(settings, [early_label])     # a label before its record exists
    publish_line(settings, verdicts)
    storage_settings = storage_settings_for(settings, tmp_path)

    # 1. a recorder that saves everything but "crashes" before committing any offset
    first = run_recorder(settings, storage_settings, lambda r: r.store.count_records() == len(expected),
                         commit=False)
    assert first.counters.records == len(expected)
    assert all(offset is None for offset in committed_offsets(settings, storage_settings.store_group).values())

    # 2. a restart replays everything; meanwhile two verdicts are re-delivered and a second label comes
    publish_line(settings, verdicts[:2])
    late_label = Label(frame_id=labelled.frame_id, operator="bo", is_defect=True, defect_type="scratch",
                       mask_png=b"\x89PNG-mask", labeled_at=labelled.captured_at + timedelta(minutes=2))
    publish_labels(settings, [late_label])
    second = run_recorder(settings, storage_settings,
                          lambda r: r.counters.verdicts >= len(verdicts) + 2 and r.counters.labels >= 2
                          and not r.joiner.entries)
    assert second.counters.duplicates == 2

    store = RecordStore.from_settings(settings, storage_settings)
    try:
        assert store.count_records() == len(expected)
        assert {r.frame_id for r in store.query(limit=1000)} == expected
        assert store.counts() == {"frames": len(verdicts), "flagged": len(flagged), "sampled": len(samples)}
        record = store.get(flagged[1].frame_id)
        assert record.kind == "flagged" and record.missing == [] and record.answer == flagged[1].answer
        assert store.artifacts.get(record.image_uri) == frame_record(flagged[1])[1]
        assert store.artifacts.get(record.overlay_uri) == heatmap_for(flagged[1]).overlay_jpeg
        assert record.verdict(store) == flagged[1]
        assert store.get(samples[0].frame_id).kind == "sample"

        # labels: the latest wins, and the training set sees it with its mask and image
        assert store.get(labelled.frame_id).label_status == "defect"
        examples = training_examples(store)
        assert [(e.frame_id, e.operator, e.defect_type) for e in examples] == [(labelled.frame_id, "bo", "scratch")]
        assert store.artifacts.get(examples[0].mask_uri) == b"\x89PNG-mask"

        # the query API
        assert {r.frame_id for r in store.query(verdict="anomalous", limit=1000)} == {v.frame_id for v in flagged}
        assert {r.frame_id for r in store.query(verdict="normal", limit=1000)} == {v.frame_id for v in samples}
        assert [r.frame_id for r in store.query(label_status="defect")] == [labelled.frame_id]
        disc = {v.frame_id for v in flagged + samples if v.product == "disc"}
        assert {r.frame_id for r in store.query(product="disc", limit=1000)} == disc
        assert store.query(line_id="no-such-line") == []
        middle = verdicts[20].captured_at
        window = store.query(since=middle, until=middle + timedelta(seconds=5), limit=1000)
        assert {r.frame_id for r in window} == {v.frame_id for v in flagged + samples
                                                 if middle <= v.captured_at < middle + timedelta(seconds=5)}
    finally:
        store.close()

    # everything committed now: a third run finds nothing to do
    assert all(offset is not None for offset in committed_offsets(settings, storage_settings.store_group).values()
               if offset is not None)
    third = run_recorder(settings, storage_settings, lambda r: False, timeout_s=5)
    assert third.counters.verdicts == 0 and third.counters.records == 0


def _check_failure_then_recover(settings, tmp_path, storage_settings, verdicts, message_part: str, *,
                                recover: bool = True) -> None:
    publish_line(settings, verdicts, frame_size=128)
    with pytest.raises(StorageError) as failure:
        run_recorder(settings, storage_settings, lambda r: False, timeout_s=60)
    assert isinstance(failure.value, ArtifactStoreError)
    text = str(failure.value)
    assert "cannot write artifact" in text and message_part in text and "LINEGUARD_STORE_ARTIFACTS" in text
    # every verdict needs a record and none was saved: no partition may be committed past its first message
    committed = committed_offsets(settings, storage_settings.store_group)
    assert all(offset in (None, 0) for offset in committed.values()), committed

    if not recover:
        return
    fixed = storage_settings.model_copy(update={"store_artifacts": str(tmp_path / "fixed-artifacts")})
    recovered = run_recorder(settings, fixed, lambda r: r.store.count_records() == len(verdicts))
    assert recovered.counters.records == len(verdicts)


def test_unwritable_artifact_directory_gives_clear_error_and_no_commit(settings, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a regular file where the artifact directory should be")
    storage_settings = storage_settings_for(settings, tmp_path, store_artifacts=str(blocker / "artifacts"))
    verdicts = make_verdicts(12, start=minute_ago(5), defect_rate=1.0, prefix="u")
    _check_failure_then_recover(settings, tmp_path, storage_settings, verdicts, "Not a directory")


def test_full_disk_gives_clear_error_and_no_commit(settings, tmp_path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill the disk needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        storage_settings = storage_settings_for(settings, tmp_path, store_artifacts=str(mount_point / "artifacts"))
        verdicts = make_verdicts(12, start=minute_ago(5), defect_rate=1.0, prefix="d")
        _check_failure_then_recover(settings, tmp_path, storage_settings, verdicts, "disk full", recover=False)
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_retention_purges_old_unlabelled_records_and_their_artifacts(tmp_path):
    from datetime import UTC, datetime

    from storage.artifacts import LocalArtifactStore
    from storage.records import PendingRecord, SaveBatch

    store = RecordStore(f"sqlite:///{tmp_path}/r.db", LocalArtifactStore(tmp_path / "a"))
    now = datetime.now(UTC)
    old = make_verdicts(3, start=now - timedelta(days=40), defect_rate=1.0, prefix="old")
    fresh = make_verdicts(2, start=now - timedelta(days=1), defect_rate=1.0, prefix="new")
    normal = make_verdicts(1, start=now - timedelta(days=20), defect_rate=0.0, prefix="norm")
    batch = SaveBatch(records=[PendingRecord(v, frame_record(v)[1], heatmap_for(v), "flagged") for v in old + fresh]
                      + [PendingRecord(normal[0], frame_record(normal[0])[1], None, "sample")],
                      labels=[Label(frame_id=old[0].frame_id, operator="ana", is_defect=True)])
    store.save(batch)
    kept_image = store.get(old[0].frame_id).image_uri
    purged_image = store.get(old[1].frame_id).image_uri
    try:
        removed = store.purge(retention_days=30, normal_retention_days=14, keep_labelled=True, now=now)
        assert removed == 3   # two old unlabelled flagged records and the old normal sample
        assert {r.frame_id for r in store.query(limit=100)} == {old[0].frame_id} | {v.frame_id for v in fresh}
        assert store.artifacts.get(kept_image)
        with pytest.raises(ArtifactStoreError):
            store.artifacts.get(purged_image)
    finally:
        store.close()
