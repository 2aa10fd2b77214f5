"""References in the shared artifact store: two machines with their own state dirs see the same products, each
keeps a cache that serves when the shared store cannot be reached. The same scenario runs on a shared directory
and on a real S3 server (SeaweedFS, the `s3_server` fixture)."""

from __future__ import annotations

import numpy as np
from s3_helpers import REGION, free_port

from inference.model.tiles import NO_TILES, Tiling
from inference.references import ReferenceStore
from lineguard.artifacts import LocalArtifactStore, open_artifact_store


def _images(n: int, seed: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(f"good-{seed}-{i}.png", rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for i in range(n)]


def test_two_machines_share_references_and_keep_a_cache(tmp_path):
    shared = tmp_path / "shared"

    def unreachable_then_back(check) -> None:
        shared.rename(tmp_path / "unreachable")             # the shared store is gone: the cache serves
        check(there)
        (tmp_path / "unreachable").rename(shared)

    here = ReferenceStore(tmp_path / "a", LocalArtifactStore(shared))
    there = ReferenceStore(tmp_path / "b", LocalArtifactStore(shared))
    _share_references(here, there, unreachable_then_back)


def test_two_workers_share_references_through_s3(tmp_path, s3_location, monkeypatch):
    def unreachable(check) -> None:
        """`there` restarted while S3 cannot be reached (nothing listens at its endpoint): the cache serves."""
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")        # refused at once, not after boto3's retries
        dead = s3_location.split("?")[0] + f"?endpoint_url=http://127.0.0.1:{free_port()}&region={REGION}"
        check(ReferenceStore(tmp_path / "b", open_artifact_store(dead)))
        monkeypatch.delenv("AWS_MAX_ATTEMPTS")

    here = ReferenceStore(tmp_path / "a", open_artifact_store(s3_location))
    there = ReferenceStore(tmp_path / "b", open_artifact_store(s3_location))
    _share_references(here, there, unreachable)
    left = [here.shared.uri_of(key) for key in ("references/disc/manifest.json", "references/index.json")]
    assert open_artifact_store(s3_location).list("references") == left      # images and config removed, in S3


def _share_references(here: ReferenceStore, there: ReferenceStore, cut_off) -> None:
    """`here` runs `refs add`; `there` (another machine, its own state dir) serves what it wrote.
    `cut_off(check)` runs check(store) on `there`'s state dir while the shared store cannot be reached."""
    first = _images(2, 0)
    here.add_images("disc", first)
    here.set_tiling("disc", Tiling.parse("2x2"))

    assert there.products() == ["disc"]
    loaded = there.load("disc")
    assert len(loaded) == 2 and all(np.array_equal(a, b) for a, (_, b) in zip(loaded, first, strict=True))
    assert there.tiling("disc") == Tiling.parse("2x2")
    assert len(list((there.root / "disc").glob("*.png"))) == 2          # cached

    here.add_images("disc", _images(1, 1))                 # a later `refs add` reaches the other machine
    assert len(there.load("disc")) == 3

    def check(cached: ReferenceStore) -> None:
        assert cached.products() == ["disc"] and len(cached.load("disc")) == 3
        assert cached.tiling("disc") == Tiling.parse("2x2")

    cut_off(check)

    here.set_tiling("disc", NO_TILES)
    assert there.tiling("disc") == NO_TILES
    assert here.remove("disc") == 3
    assert there.products() == [] and there.manifest("disc") == [] and there.load("disc") == []


def test_without_a_shared_store_the_state_dir_is_the_store(tmp_path):
    local = ReferenceStore(tmp_path)
    local.add_images("tile", _images(2, 2))
    assert local.products() == ["tile"] and len(local.load("tile")) == 2
    # a machine given a shared store still serves references written before it had one
    upgraded = ReferenceStore(tmp_path, LocalArtifactStore(tmp_path / "shared"))
    assert upgraded.products() == ["tile"] and len(upgraded.load("tile")) == 2
