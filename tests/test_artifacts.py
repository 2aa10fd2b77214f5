"""Artifact keys and stores (lineguard/artifacts.py): one key per frame id, reads and deletes inside the store,
and the S3 store against a real S3 server (SeaweedFS, the `s3_server` fixture).

Issue 25: ids that differ only in ':', '_' and '@' (all valid) were folded into one key, and keys were cut at
120 characters, so different frames were served one image."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from storage_helpers import frame_jpeg, make_verdicts, migrated

from lineguard.artifacts import (
    KEY_PART_MAX,
    ArtifactStoreError,
    LocalArtifactStore,
    S3ArtifactStore,
    artifact_key,
    key_part,
    key_parts,
    open_artifact_store,
)
from lineguard.events import ID_MAX_LENGTH, Label, Verdict

THREE_IDS = ["cam-1:000042", "cam-1_000042", "cam-1@000042"]        # one key each (all were "cam-1_000042")
LONG_IDS = ["f" * 120 + "-0000001", "f" * 120 + "-0000002"]           # 128 characters; the same first 120
LONG_ODD_IDS = ["a:" * 64, "a@" * 64, "a+" * 64]                      # 128 characters, encoded past KEY_PART_MAX


@pytest.fixture(params=["local", "s3"])
def artifact_store(request, tmp_path):
    """Each test runs on a local directory and on a prefix of the real S3 server."""
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    return open_artifact_store(request.getfixturevalue("s3_location"))


def _verdict(frame_id: str, captured_at: datetime) -> Verdict:
    """A valid verdict (checked against ID_PATTERN) of this frame id."""
    base = make_verdicts(1, start=captured_at, defect_rate=1.0)[0]
    return Verdict.model_validate({**base.model_dump(), "frame_id": frame_id})


# --- keys ------------------------------------------------------------------------------------------

def test_keys_are_one_per_id_and_read_back():
    ids = THREE_IDS + LONG_IDS + ["a.b", "a-b", "a%3Ab", "a~b", "x+y", "x y"]
    keys = [key_part(i) for i in ids]
    assert len(set(keys)) == len(ids)
    assert key_parts(artifact_key("disc", "2026-11-22", *ids)) == ["disc", "2026-11-22", *ids]
    assert all(len(key_part(i)) == ID_MAX_LENGTH for i in LONG_IDS)       # never cut
    assert key_part("plain-id_0.jpg") == "plain-id_0.jpg"                 # nothing to escape: unchanged
    assert key_part(".hidden").startswith("%2E") and key_part("..") == "%2E."


def test_a_part_longer_than_a_file_name_keeps_a_hash_of_the_whole_id():
    keys = [key_part(i) for i in LONG_ODD_IDS]
    assert len(set(keys)) == 3 and all(len(k) <= KEY_PART_MAX for k in keys)
    assert all("~" in k for k in keys) and key_part("a~b") == "a%7Eb"  # '~' marks the hashed form only
    assert key_part(LONG_ODD_IDS[0]) == keys[0]                           # stable: the same id, the same key


def test_stores_refuse_keys_not_made_by_artifact_key(tmp_path):
    store = LocalArtifactStore(tmp_path / "a")
    for key in ["../outside.jpg", "disc/../../x", "disc/cam:1/image.jpg", "disc//image.jpg", "", "disc/.x",
                "a/%zz"]:
        with pytest.raises(ArtifactStoreError, match="artifact_key"):
            store.put(key, b"x")
    assert not (tmp_path / "outside.jpg").exists() and not (tmp_path / "x").exists()


# --- two ids, two images, through the recorder's save, on both stores --------------------------------

def test_distinct_ids_get_distinct_images(artifact_store, tmp_path):
    from storage.records import PendingRecord, RecordStore, SaveBatch

    url = migrated(f"sqlite:///{tmp_path / 'records.sqlite'}")
    store = RecordStore(url, artifact_store)
    ids = THREE_IDS + LONG_IDS + LONG_ODD_IDS
    now = datetime.now(UTC)
    images = {frame_id: frame_jpeg(seed) for seed, frame_id in enumerate(ids)}
    try:
        store.save(SaveBatch(records=[PendingRecord(_verdict(i, now), images[i], None, "flagged") for i in ids],
                             labels=[Label(frame_id=i, operator=op, is_defect=True, mask_png=f"{i}/{op}".encode())
                                     for i in THREE_IDS for op in ("ana:1", "ana_1")]))
        records = {frame_id: store.get(frame_id) for frame_id in ids}
        assert len({r.image_uri for r in records.values()}) == len(ids)
        for frame_id, record in records.items():
            assert store.artifacts.get(record.image_uri) == images[frame_id], frame_id
        masks = [store.artifacts.get(uri) for uri in artifact_store.list("labels")]
        assert sorted(masks) == sorted(f"{i}/{op}".encode() for i in THREE_IDS for op in ("ana:1", "ana_1"))

        removed = store.purge(retention_days=0, normal_retention_days=0, keep_labelled=False,
                              now=now + timedelta(days=1))
        assert removed == len(ids)
        for record in records.values():
            with pytest.raises(ArtifactStoreError):
                store.artifacts.get(record.image_uri)
    finally:
        store.close()


# --- write, read, list, delete -------------------------------------------------------------------------

def test_write_read_list_delete(artifact_store):
    keys = [artifact_key("disc", "2026-11-22", frame_id, "image.jpg") for frame_id in THREE_IDS]
    keys += [artifact_key("disc", "2026-11-22", "cam-10", "image.jpg"), artifact_key("tile", "x.png")]
    uris = [artifact_store.put(key, key.encode()) for key in keys]
    assert uris == [artifact_store.uri_of(key) for key in keys]
    assert [artifact_store.get(uri) for uri in uris] == [key.encode() for key in keys]

    assert artifact_store.list() == sorted(uris)
    assert artifact_store.list("disc") == sorted(uris[:4])
    assert artifact_store.list(artifact_key("disc", "2026-11-22", "cam-1:000042")) == [uris[0]]
    assert artifact_store.list(artifact_key("tile", "x.png")) == [uris[4]]           # one artifact
    assert artifact_store.list(artifact_key("disc", "2026-11-22", "cam-1")) == []   # whole parts: not cam-10
    assert artifact_store.list("nothing") == []

    artifact_store.put(keys[0], b"replaced")                                         # a replay overwrites
    assert artifact_store.get(uris[0]) == b"replaced"
    artifact_store.delete(uris[0])
    artifact_store.delete(uris[0])                                                   # already gone: no error
    with pytest.raises(ArtifactStoreError):
        artifact_store.get(uris[0])
    assert artifact_store.list() == sorted(uris[1:])


# --- reads and deletes stay inside the store ----------------------------------------------------------

def test_local_reads_and_deletes_stay_inside_the_root(tmp_path):
    root = tmp_path / "artifacts"
    store = LocalArtifactStore(root)
    inside = store.put(artifact_key("disc", "image.jpg"), b"inside")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not an artifact")
    (root / "disc" / "link.jpg").symlink_to(secret)                    # a symlink out of the root
    (root / "out").symlink_to(tmp_path, target_is_directory=True)      # a symlinked directory out of the root

    outside = [secret.as_uri(), str(secret), f"{root.as_uri()}/../secret.txt", f"{root}/disc/../../secret.txt",
               (root / "disc" / "link.jpg").as_uri(), (root / "out" / "secret.txt").as_uri(), root.as_uri(),
               "file://elsewhere/etc/hostname", "s3://bucket/secret.txt", "disc/image.jpg"]
    for uri in outside:
        with pytest.raises(ArtifactStoreError):
            store.get(uri)
        with pytest.raises(ArtifactStoreError):
            store.delete(uri)
    assert secret.read_bytes() == b"not an artifact"
    with pytest.raises(ArtifactStoreError, match="outside"):
        store.put(artifact_key("out", "secret.txt"), b"overwritten")   # nor a write through the symlink
    assert secret.read_bytes() == b"not an artifact"
    assert store.get(inside) == b"inside"

    # a URI an earlier version stored (its key folded ':' into '_') stays readable
    legacy = root / "disc" / "2026-11-22" / "cam-1_000042" / "image.jpg"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"old")
    assert store.get(legacy.as_uri()) == b"old" and store.get(str(legacy)) == b"old"


def test_s3_reads_and_deletes_stay_inside_the_bucket_and_prefix(s3_server, s3_location):
    from s3_helpers import OTHER_BUCKET

    store = open_artifact_store(s3_location)
    assert isinstance(store, S3ArtifactStore)
    prefix = store.prefix
    neighbour = open_artifact_store(s3_server.location(f"{prefix}x"))           # "t3x" is not under "t3"
    elsewhere = open_artifact_store(s3_server.location(prefix, bucket=OTHER_BUCKET))
    theirs = [neighbour.put("image.jpg", b"neighbour"), elsewhere.put("image.jpg", b"other bucket")]
    client = s3_server.client()
    client.put_object(Bucket=store.bucket, Key="top.jpg", Body=b"above the prefix")
    mine = store.put(artifact_key("disc", "image.jpg"), b"mine")

    outside = [*theirs, f"s3://{store.bucket}/top.jpg", f"s3://{store.bucket}/{prefix}/../top.jpg",
               f"s3://{store.bucket}/{prefix}/disc/../../top.jpg", f"s3://{store.bucket}/{prefix}",
               f"{mine}?versionId=1", mine.replace("s3://", "file://"), f"/{prefix}/disc/image.jpg"]
    for uri in outside:
        with pytest.raises(ArtifactStoreError, match="outside"):
            store.get(uri)
        with pytest.raises(ArtifactStoreError, match="outside"):
            store.delete(uri)
    assert neighbour.get(theirs[0]) == b"neighbour" and elsewhere.get(theirs[1]) == b"other bucket"
    assert client.get_object(Bucket=store.bucket, Key="top.jpg")["Body"].read() == b"above the prefix"
    assert store.get(mine) == b"mine" and store.list() == [mine]

    # a URI an earlier version stored (its key folded ':' into '_') stays readable
    client.put_object(Bucket=store.bucket, Key=f"{prefix}/disc/2026-11-22/cam-1_000042/image.jpg", Body=b"old")
    assert store.get(f"s3://{store.bucket}/{prefix}/disc/2026-11-22/cam-1_000042/image.jpg") == b"old"


def test_s3_store_with_wrong_credentials_says_so(s3_location, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    store = open_artifact_store(s3_location)
    with pytest.raises(ArtifactStoreError, match="cannot write artifact s3://"):
        store.put(artifact_key("disc", "image.jpg"), b"x")


def test_s3_location_without_a_bucket_is_refused():
    with pytest.raises(ArtifactStoreError, match="needs a bucket"):
        S3ArtifactStore("s3:///prefix")


def test_the_weed_binary_is_installed():
    """The S3 tests skip only without `weed`; the dev dependencies install it, so it must be here."""
    from s3_helpers import weed_binary

    binary = weed_binary()
    assert binary is not None and os.access(binary, os.X_OK), Path(binary or "weed")
