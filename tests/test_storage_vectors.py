"""Similar parts in a large store: the vector index (sqlite-vec beside SQLite, pgvector in a real PostgreSQL)
answers as brute force does, follows new records and forgets deleted ones."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import delete, insert
from storage_helpers import migrated

from storage.artifacts import LocalArtifactStore
from storage.records import RecordStore
from storage.schema import records

DIM = 64


def _rows(start: int, n: int, rng: np.random.Generator, centres: np.ndarray) -> list[dict]:
    """Flagged records near one of a few defect kinds, in two products; every 5th a normal sample."""
    now = datetime(2026, 12, 1, tzinfo=UTC)
    rows = []
    for i in range(start, start + n):
        flagged = i % 5 != 0
        vector = centres[i % len(centres)] + 0.35 * rng.standard_normal(DIM)
        rows.append({
            "frame_id": f"f{i:06d}", "line_id": "line-1", "camera_id": "cam-0", "product": ("disc", "tile")[i % 2],
            "captured_at": now + timedelta(seconds=i), "kind": "flagged" if flagged else "sample",
            "is_anomalous": flagged, "score": 0.5, "threshold": 0.3, "confidence": 0.9, "model_version": "m",
            "answer": None, "positions": json.dumps(["center"]), "verdict_json": "{}", "missing": "",
            "label_status": "unlabeled", "stored_at": now,
            "descriptor": vector.astype("<f2").tobytes() if flagged else None})
    return rows


@pytest.fixture
def stores(records_url, tmp_path):
    url = migrated(records_url)
    indexed = RecordStore(url, LocalArtifactStore(tmp_path / "artifacts"), vector_index_min=1000)
    brute = RecordStore(url, LocalArtifactStore(tmp_path / "artifacts"), vector_index_min=None)
    yield indexed, brute, tmp_path
    indexed.close()
    brute.close()


def _insert(store: RecordStore, rows: list[dict]) -> None:
    with store.engine.begin() as conn:
        conn.execute(insert(records), rows)


def _answer(store, frame_id, **kwargs):
    return [(m.record.frame_id, m.similarity) for m in store.similar(frame_id, **kwargs)]


def test_below_the_threshold_no_index_is_built(stores):
    indexed, _, tmp_path = stores
    rng = np.random.default_rng(0)
    _insert(indexed, _rows(0, 200, rng, rng.standard_normal((6, DIM))))
    assert indexed.similar("f000001", k=3)
    assert not (tmp_path / "records.vectors.sqlite").exists()
    assert indexed._vector_index is None


def test_the_index_answers_as_brute_force_does(stores):
    indexed, brute, tmp_path = stores
    postgres = indexed.engine.dialect.name == "postgresql"
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((8, DIM))
    _insert(indexed, _rows(0, 3000, rng, centres))
    for frame_id in ("f000001", "f000002", "f001234", "f002999"):
        for same_product in (True, False):
            fast = _answer(indexed, frame_id, k=10, same_product=same_product)
            slow = _answer(brute, frame_id, k=10, same_product=same_product)
            assert len(fast) == 10 and frame_id not in [f for f, _ in fast]
            if postgres:
                # HNSW is approximate: nearly all of the true ten, the best one first, true similarities
                assert fast[0] == (slow[0][0], pytest.approx(slow[0][1], abs=2e-4)), (frame_id, same_product)
                assert len({f for f, _ in fast} & {f for f, _ in slow}) >= 9, (frame_id, same_product)
                exact = dict(slow) | dict(_answer(brute, frame_id, k=3000, same_product=same_product))
                np.testing.assert_allclose([s for _, s in fast], [exact[f] for f, _ in fast], atol=2e-4)
            else:
                assert [f for f, _ in fast] == [f for f, _ in slow], (frame_id, same_product)
                np.testing.assert_allclose([s for _, s in fast], [s for _, s in slow], atol=2e-4)
    assert (tmp_path / "records.vectors.sqlite").exists() != postgres
    assert type(indexed._vector_index).__name__ == ("PgVectorIndex" if postgres else "DescriptorIndex")
    assert len(indexed._vector_index) == 2400          # flagged records only

    # a record stored after the index was built is found at the next search
    with indexed.engine.connect() as conn:
        descriptor = conn.execute(records.select().where(records.c.frame_id == "f001234")).first().descriptor
    twin = _rows(5001, 1, rng, centres)[0] | {"descriptor": descriptor, "product": "disc"}
    _insert(indexed, [twin])
    assert _answer(indexed, "f001234", k=1)[0] == ("f005001", pytest.approx(1.0, abs=1e-4))

    # a record removed by retention disappears from the answers (and from the index)
    with indexed.engine.begin() as conn:
        conn.execute(delete(records).where(records.c.frame_id == "f005001"))
    assert "f005001" not in [f for f, _ in _answer(indexed, "f001234", k=5)]
    assert len(indexed._vector_index) == 2400
