"""References in the shared artifact store: two machines with their own state dirs see the same products, each
keeps a cache that serves when the shared store cannot be reached."""

from __future__ import annotations

import numpy as np

from inference.model.tiles import NO_TILES, Tiling
from inference.references import ReferenceStore
from lineguard.artifacts import LocalArtifactStore


def _images(n: int, seed: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(f"good-{seed}-{i}.png", rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for i in range(n)]


def test_two_machines_share_references_and_keep_a_cache(tmp_path):
    shared = tmp_path / "shared"
    here = ReferenceStore(tmp_path / "a", LocalArtifactStore(shared))
    there = ReferenceStore(tmp_path / "b", LocalArtifactStore(shared))
    first = _images(2, 0)
    here.add_images("disc", first)
    here.set_tiling("disc", Tiling.parse("2x2"))

    assert there.products() == ["disc"]
    loaded = there.load("disc")
    assert len(loaded) == 2 and all(np.array_equal(a, b) for a, (_, b) in zip(loaded, first, strict=True))
    assert there.tiling("disc") == Tiling.parse("2x2")
    assert len(list((tmp_path / "b" / "references" / "disc").glob("*.png"))) == 2     # cached

    here.add_images("disc", _images(1, 1))                 # a later `refs add` reaches the other machine
    assert len(there.load("disc")) == 3

    shared.rename(tmp_path / "unreachable")                 # the shared store is gone: the cache serves
    assert there.products() == ["disc"] and len(there.load("disc")) == 3
    assert there.tiling("disc") == Tiling.parse("2x2")
    (tmp_path / "unreachable").rename(shared)

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
