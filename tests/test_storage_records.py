"""The recorder (`lineguard store`) against the real broker, with SQLite and a local artifact store.

- records survive a crash of the recorder (nothing committed) and a restart: at-least-once delivery,
  idempotent by frame_id, counts exact, re-delivered verdicts not counted twice;
- labels land with their records; the query API selects by time, line, product, verdict, label;
- an unwritable artifact directory or a full disk stops the recorder with a clear error, and no
  offset is committed past a record that was not saved; after the fix everything is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timedelta

import httpx
import pytest
from storage_helpers import (
    frame_record,
    group_offsets,
    heatmap_for,
    make_verdicts,
    migrated,
    minute_ago,
    publish,
    wait_until,
)

from lineguard.events import Label
from lineguard.kafka import make_producer, start_client
from lineguard.stack import free_port
from lineguard.topics import FRAMES, HEATMAPS, LABELS, VERDICTS
from storage.artifacts import ArtifactStoreError, StorageError
from storage.labels import training_examples
from storage.recorder import Recorder
from storage.records import RecordStore, sampled
from storage.settings import load_storage_settings

SAMPLE_RATE = 0.25


def line_items(verdicts, *, frame_size: int = 64) -> list[tuple[str, list]]:
    """The messages of these frames in the order a line produces them: frames, heatmaps, verdicts."""
    return [(FRAMES, [frame_record(v, frame_size) for v in verdicts]),
            (HEATMAPS, [(v.camera_id.encode(), heatmap_for(v).to_bytes(), None) for v in verdicts]),
            (VERDICTS, [(v.camera_id.encode(), v.to_bytes(), None) for v in verdicts])]


def publish_line(settings, verdicts, *, frame_size: int = 64) -> dict[str, tuple[int, int]]:
    """Publish frames, heatmaps and verdicts; returns {frame_id: (partition, offset) of its verdict}."""
    async def go() -> dict[str, tuple[int, int]]:
        for topic, items in line_items(verdicts, frame_size=frame_size):
            sent = await publish(settings, topic, items)
        return {v.frame_id: (m.partition, m.offset) for v, m in zip(verdicts, sent, strict=True)}

    return asyncio.run(go())


def publish_labels(settings, labels: list[Label]) -> None:
    asyncio.run(publish(settings, LABELS, [(label.frame_id.encode(), label.to_bytes(), None) for label in labels]))


def storage_settings_for(settings, tmp_path, **extra):
    values = {"store_group": f"store-{settings.topic_prefix}", "store_db_url": f"sqlite:///{tmp_path}/records.db",
              "store_artifacts": str(tmp_path / "artifacts"), "store_normal_sample_rate": SAMPLE_RATE,
              "store_join_timeout_s": 30.0} | extra
    migrated(values["store_db_url"])      # as `lineguard db upgrade` leaves it: the recorder only checks the revision
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
    offsets = group_offsets(settings, group, (FRAMES, VERDICTS, HEATMAPS))
    return {tp: committed for tp, (committed, _) in offsets.items()}


def stored_frame_ids(db_path) -> set[str]:
    """The records a recorder process has durably saved (read straight from its SQLite file)."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as conn:
        try:
            return {row[0] for row in conn.execute("SELECT frame_id FROM records")}
        except sqlite3.OperationalError:   # the recorder has not created its tables yet
            return set()


def verdict_uncommitted(offsets: dict, at: tuple[int, int]) -> bool:
    partition, offset = at
    committed, _ = offsets[(VERDICTS, partition)]
    return offset >= (committed or 0)


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]


class LineStreamer(threading.Thread):
    """Publishes frames, heatmaps and verdicts in small chunks, in line order, as a running line does."""

    def __init__(self, settings, verdicts, chunk: int = 4, pause_s: float = 0.1):
        super().__init__(daemon=True)
        self.settings, self.verdicts, self.chunk, self.pause_s = settings, verdicts, chunk, pause_s
        self.sent: dict[str, tuple[int, int]] = {}       # frame_id -> (partition, offset) of its verdict
        self.error: BaseException | None = None

    def run(self) -> None:
        async def go() -> None:
            producer = await start_client(self.settings, make_producer(self.settings))
            try:
                for i in range(0, len(self.verdicts), self.chunk):
                    chunk = self.verdicts[i:i + self.chunk]
                    for topic, items in line_items(chunk):
                        sent = await publish(self.settings, topic, items, producer=producer)
                    # a new dict each time: the test reads `sent` from another thread
                    self.sent = self.sent | {v.frame_id: (m.partition, m.offset)
                                             for v, m in zip(chunk, sent, strict=True)}
                    await asyncio.sleep(self.pause_s)
            finally:
                await producer.stop()

        try:
            asyncio.run(go())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_records_survive_a_crash_and_restart_idempotent(settings, tmp_path, cli_env):
    """`lineguard store` SIGKILLed mid-stream with saved-but-uncommitted records; a restart completes the job."""
    verdicts = make_verdicts(100, start=minute_ago(5), defect_rate=0.3, prefix="r")
    part1, part2 = verdicts[:40], verdicts[40:]
    flagged = [v for v in verdicts if v.is_anomalous]
    samples = [v for v in verdicts if not v.is_anomalous and sampled(v.frame_id, SAMPLE_RATE)]
    expected = {v.frame_id for v in flagged + samples}
    expected1 = expected & {v.frame_id for v in part1}
    assert flagged and samples and expected1 and expected - expected1
    labelled = flagged[0]
    early_label = Label(frame_id=labelled.frame_id, operator="ana", is_defect=False, note="glare",
                        labeled_at=labelled.captured_at + timedelta(minutes=1))
    storage_settings = storage_settings_for(settings, tmp_path)
    group, db_path = storage_settings.store_group, tmp_path / "records.db"
    tracked = (FRAMES, VERDICTS, HEATMAPS, LABELS)

    # 1. the real recorder process: part 1 (plus a label before its record, and two verdicts re-delivered
    #    under new offsets) is stored and committed; it is then SIGKILLed in the middle of part 2
    env = cli_env | {"LINEGUARD_TOPIC_PREFIX": settings.topic_prefix, "LINEGUARD_STATE_DIR": str(tmp_path / "state"),
                     "LINEGUARD_STORE_GROUP": group, "LINEGUARD_STORE_DB_URL": storage_settings.store_db_url,
                     "LINEGUARD_STORE_ARTIFACTS": storage_settings.store_artifacts,
                     "LINEGUARD_STORE_NORMAL_SAMPLE_RATE": str(SAMPLE_RATE), "LINEGUARD_STORE_JOIN_TIMEOUT_S": "30"}
    log_path = tmp_path / "store.log"
    http_port = free_port()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "deploy", "store", "--http-port", str(http_port)],
                                   env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    streamer = LineStreamer(settings, part2)
    try:
        publish_labels(settings, [early_label])
        publish_line(settings, part1)
        publish_line(settings, part1[:2])    # re-delivered: same frame_ids, new offsets

        def part1_committed() -> bool:
            offsets = group_offsets(settings, group, tracked)
            return all(committed == end for committed, end in offsets.values() if end > 0)

        assert wait_until(part1_committed, timeout_s=60), log_path.read_text()[-3000:]
        assert stored_frame_ids(db_path) == expected1
        health = httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["records"] >= len(expected1) and health.json()["labels"] == 1

        streamer.start()
        # Freeze the recorder after each save of part 2; SIGKILL it once a saved record's verdict is not
        # committed yet (so the restart must re-deliver a stored record) while records are still missing.
        seen, crashed = len(expected1), None
        deadline = time.monotonic() + 60
        while crashed is None and time.monotonic() < deadline and process.poll() is None:
            if len(stored_frame_ids(db_path)) <= seen:
                time.sleep(0.02)
                continue
            os.kill(process.pid, signal.SIGSTOP)
            assert wait_until(lambda: process_state(process.pid) == "T", timeout_s=5, interval_s=0.01)
            time.sleep(0.2)    # a commit request already on its way reaches the broker before we look
            saved = stored_frame_ids(db_path)
            assert wait_until(lambda saved=saved: saved - expected1 <= set(streamer.sent), timeout_s=10,
                              interval_s=0.05)
            offsets = group_offsets(settings, group, tracked)
            if len(saved) < len(expected) and any(verdict_uncommitted(offsets, streamer.sent[f])
                                                  for f in saved - expected1):
                os.kill(process.pid, signal.SIGKILL)
                crashed = offsets
            else:
                seen = len(saved)
                os.kill(process.pid, signal.SIGCONT)
        assert crashed is not None, "could not catch the recorder with a stored but uncommitted record"
        assert process.wait(10) == -signal.SIGKILL
        streamer.join(60)
        assert not streamer.is_alive() and streamer.error is None, streamer.error
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)

    survived = stored_frame_ids(db_path)
    assert expected1 < survived < expected               # part 1 and some of part 2 survived the crash
    after_crash = group_offsets(settings, group, tracked)
    committed_at_crash = {tp: committed for tp, (committed, _) in crashed.items()}
    assert {tp: committed for tp, (committed, _) in after_crash.items()} == committed_at_crash  # nothing since
    sent = streamer.sent
    replayed_verdicts = sum(end - (committed or 0) for (topic, _), (committed, end) in after_crash.items()
                            if topic == VERDICTS)
    replayed_records = {f for f in expected - expected1 if verdict_uncommitted(after_crash, sent[f])}
    assert expected - survived <= replayed_records      # what was not saved will be re-delivered ...
    assert replayed_records & survived                   # ... and so will a record already saved

    # 2. the restart re-delivers exactly what was not committed; a label comes for a stored record
    late_label = Label(frame_id=labelled.frame_id, operator="bo", is_defect=True, defect_type="scratch",
                       mask_png=b"\x89PNG-mask", labeled_at=labelled.captured_at + timedelta(minutes=2))
    publish_labels(settings, [late_label])
    second = run_recorder(settings, storage_settings,
                          lambda r: r.counters.verdicts >= replayed_verdicts and r.counters.labels >= 1
                          and r.counters.records >= len(replayed_records) and not r.joiner.entries)
    assert second.counters.verdicts == replayed_verdicts
    assert second.counters.records == len(replayed_records)   # stored ones stored again, over themselves
    assert second.counters.labels == 1 and second.counters.bad == 0

    # every partition's committed offset is its end offset: the broker has the commits, nothing is left
    final = group_offsets(settings, group, tracked)
    assert {tp: committed for tp, (committed, end) in final.items() if end > 0} == \
        {tp: end for tp, (committed, end) in final.items() if end > 0}
    assert all(committed in (None, 0) for committed, end in final.values() if end == 0)

    store = RecordStore.from_settings(settings, storage_settings)
    try:
        assert store.count_records() == len(expected)
        assert {r.frame_id for r in store.query(limit=1000)} == expected
        # exact counts: replayed verdicts and the two re-deliveries are counted once
        assert store.counts() == {"frames": len(verdicts), "flagged": len(flagged), "sampled": len(samples)}
        assert all(r.missing == [] for r in store.query(limit=1000))
        resaved = store.get(sorted(replayed_records & survived)[0])
        original = next(v for v in verdicts if v.frame_id == resaved.frame_id)
        assert store.artifacts.get(resaved.image_uri) == frame_record(original)[1]
        assert resaved.verdict(store) == original
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

    # 3. a third run, once it holds every partition, re-delivers nothing: it sees only three new frames
    fresh = make_verdicts(3, start=minute_ago(1), defect_rate=1.0, prefix="fresh")
    third = Recorder(settings, storage_settings)
    partitions = len(final)

    async def third_run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(third.run(stop=stop))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        try:
            while len(third.consumer.assignment() if third.consumer else ()) < partitions:
                assert loop.time() < deadline and not task.done(), "the restarted recorder got no assignment"
                await asyncio.sleep(0.1)
            for topic, items in line_items(fresh):
                await publish(settings, topic, items)
            while third.counters.records < len(fresh) or third.joiner.entries:
                assert loop.time() < deadline and not task.done(), vars(third.counters)
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await task

    try:
        asyncio.run(third_run())
        assert (third.counters.verdicts, third.counters.frames, third.counters.labels) == (3, 3, 0)
        assert third.counters.duplicates == 0 and third.store.count_records() == len(expected) + len(fresh)
    finally:
        third.store.close()


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


def test_retention_purges_old_unlabelled_records_and_their_artifacts(tmp_path, records_url):
    from datetime import UTC, datetime

    from storage.artifacts import LocalArtifactStore
    from storage.records import PendingRecord, SaveBatch

    store = RecordStore(migrated(records_url), LocalArtifactStore(tmp_path / "a"))
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


def test_a_verdict_resent_under_a_new_offset_counts_once_across_a_restart(tmp_path, records_url):
    """An inference worker that crashed after publishing re-publishes the same frame's verdict at a new
    offset; a recorder restarted in between (its memory of recent frame_ids gone) still counts it once."""
    from storage.artifacts import open_artifact_store
    from storage.records import Counted, SaveBatch

    url = migrated(records_url)
    verdicts = make_verdicts(6, start=minute_ago(5), defect_rate=0.5, prefix="resent")
    first = RecordStore(url, open_artifact_store(str(tmp_path / "artifacts")))
    first.save(SaveBatch(counted=[Counted("lineguard.verdicts", 0, i, v) for i, v in enumerate(verdicts)]))
    before = first.counts()
    assert before["frames"] == 6 and before["flagged"] == sum(v.is_anomalous for v in verdicts)
    first.close()

    restarted = RecordStore(url, open_artifact_store(str(tmp_path / "artifacts")))
    resent = [Counted("lineguard.verdicts", 0, 10 + i, v) for i, v in enumerate(verdicts[:3])]
    fresh = make_verdicts(2, start=minute_ago(1), prefix="fresh")
    restarted.save(SaveBatch(counted=resent + [Counted("lineguard.verdicts", 0, 20 + i, v)
                                               for i, v in enumerate(fresh)]))
    after = restarted.counts()
    assert after["frames"] == 6 + 2, "re-sent verdicts were counted again"
    assert after["flagged"] == before["flagged"] + sum(v.is_anomalous for v in fresh)
    # the memory of counted frames is purged with the records' retention, not kept for ever
    restarted.purge(retention_days=0, normal_retention_days=0, now=minute_ago(-60 * 24 * 2))
    restarted.save(SaveBatch(counted=[Counted("lineguard.verdicts", 0, 30, verdicts[0])]))
    assert restarted.counts()["frames"] == 9
    restarted.close()
