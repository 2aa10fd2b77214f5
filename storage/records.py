"""Inspection records: the query API that the dialogue service and training read (`RecordStore`).

The recorder that writes them from the stream (`lineguard store`) is storage/recorder.py.

Query API (the dialogue service uses it):

    >>> store = RecordStore.from_settings(settings, storage_settings)
    >>> store.query(since=..., until=..., line_id="line-1", product="disc", verdict="anomalous",
    ...             label_status="unlabeled", limit=50)
    [InspectionRecord(frame_id=..., image_uri=..., answer=..., label_status="unlabeled"), ...]
    >>> store.artifacts.get(record.image_uri)   # the JPEG bytes
    >>> store.count(line_id="line-2", since=midnight, verdict="anomalous")   # the same filters, no limit
    >>> store.similar(record.frame_id, k=5)     # nearest defect descriptors (cosine), with the look-alikes' labels
    [SimilarRecord(record=InspectionRecord(...), similarity=0.97, defect_type="scratch"), ...]
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np
from pydantic import BaseModel
from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError

from lineguard.db import engine, private_sqlite, redact_url, require_current
from lineguard.events import Heatmap, Label, Verdict
from lineguard.logging import get_logger
from lineguard.settings import Settings
from storage.artifacts import ArtifactStore, ArtifactStoreError, StorageError, artifact_key, open_artifact_store
from storage.labels import latest_defect_types, latest_status, save_labels, store_masks
from storage.schema import as_utc, count_progress, counted_frames, frame_counts, naive_utc, records
from storage.settings import StorageSettings, sqlite_path
from storage.vectors import VECTOR_INDEX_MIN_RECORDS, DescriptorIndex, PgVectorIndex
from storage.vectors import available as vectors_available

log = get_logger(__name__)

RECENT_VERDICTS = 100_000
COMMIT_INTERVAL_S = 1.0
RETENTION_INTERVAL_S = 3600.0


class RecordStoreError(StorageError):
    """The SQL database refused a write (disk full, locked, unreachable...)."""


def sampled(frame_id: str, rate: float) -> bool:
    """Deterministic sample of normal frames: the same frame_id always gets the same answer."""
    if rate <= 0:
        return False
    digest = hashlib.blake2b(frame_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


class InspectionRecord(BaseModel):
    """One stored frame, as the query API returns it."""

    frame_id: str
    line_id: str
    camera_id: str
    product: str
    captured_at: datetime
    kind: Literal["flagged", "sample"]
    is_anomalous: bool
    score: float
    threshold: float
    confidence: float
    model_version: str
    answer: str | None
    positions: list[str]
    image_uri: str | None
    heatmap_uri: str | None
    overlay_uri: str | None
    missing: list[str]
    label_status: Literal["unlabeled", "defect", "good"]
    stored_at: datetime

    def verdict(self, store: RecordStore) -> Verdict:
        with store.engine.connect() as conn:
            raw = conn.execute(select(records.c.verdict_json).where(records.c.frame_id == self.frame_id)).scalar_one()
        return Verdict.model_validate_json(raw)


@dataclass
class PendingRecord:
    """A record ready to save: the verdict, and whatever parts arrived."""

    verdict: Verdict
    jpeg: bytes | None
    heatmap: Heatmap | None
    kind: Literal["flagged", "sample"]


@dataclass(frozen=True)
class Counted:
    """One verdict message for `frame_counts`; verdict None only advances the progress (a duplicate)."""

    topic: str
    partition: int
    offset: int
    verdict: Verdict | None
    sample: bool = False


@dataclass
class SaveBatch:
    """What one loop iteration saves in one transaction."""

    records: list[PendingRecord] = field(default_factory=list)
    counted: list[Counted] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.records or self.counted or self.labels)


class RecordStore:
    """Records, counts and labels in SQL; images in an artifact store."""

    def __init__(self, url: str, artifacts: ArtifactStore, vector_index_min: int | None = VECTOR_INDEX_MIN_RECORDS):
        self.url = url
        self.artifacts = artifacts
        self.vector_index_min = vector_index_min   # similar() uses a vector index from this many records
        self._vector_index: DescriptorIndex | PgVectorIndex | None = None
        self._vector_index_failed = False
        self._records_counted: tuple[float, int] = (-1e9, 0)
        path = sqlite_path(url)
        self._vector_path = path
        if url.startswith(("postgresql", "postgres")):
            try:
                import psycopg  # noqa: F401
            except ImportError:
                try:
                    import psycopg2  # noqa: F401
                except ImportError:
                    raise RecordStoreError(
                        f"{redact_url(url)} needs a PostgreSQL driver: pip install 'lineguard[postgres]' "
                        "(psycopg) and use a postgresql+psycopg:// URL") from None
        try:
            require_current(url)      # the migrations own the schema (lineguard db upgrade); never created here
        except SQLAlchemyError as exc:
            raise RecordStoreError(f"cannot open the records database {redact_url(url)}: {_first_line(exc)}") from exc
        if path is not None:
            private_sqlite(url, create=False)
        self.engine = engine(url)

    @classmethod
    def from_settings(cls, settings: Settings, storage_settings: StorageSettings) -> RecordStore:
        return cls(storage_settings.db_url(settings), open_artifact_store(storage_settings.artifacts(settings)))

    def close(self) -> None:
        if self._vector_index is not None:
            self._vector_index.close()
        self.engine.dispose()

    def _index(self) -> DescriptorIndex | PgVectorIndex | None:
        """The vector index, once the store holds `vector_index_min` records (counted once a minute): sqlite-vec
        beside SQLite, pgvector inside PostgreSQL (storage/vectors.py); None: brute force."""
        if self.vector_index_min is None or self._vector_index_failed:
            return None
        postgres = self.engine.dialect.name == "postgresql"
        if not postgres and (self._vector_path is None or not vectors_available()):
            return None
        if self._vector_index is None:
            at, count = self._records_counted
            if time.monotonic() - at > 60:
                count = self.count_records()
                self._records_counted = (time.monotonic(), count)
            if count < self.vector_index_min:
                return None
            if postgres:
                try:
                    self._vector_index = PgVectorIndex(self.engine)
                except SQLAlchemyError as exc:
                    self._vector_index_failed = True
                    log.warning("vector_index_unavailable", reason=_first_line(exc),
                                fallback="brute force (install pgvector and allow CREATE EXTENSION vector)")
                    return None
                log.info("vector_index_opened", kind="pgvector", records=count)
            else:
                self._vector_index = DescriptorIndex.beside(self._vector_path)
                log.info("vector_index_opened", kind="sqlite-vec", path=str(self._vector_index.path), records=count)
        return self._vector_index

    # -- writes --------------------------------------------------------------------------------
    def save(self, batch: SaveBatch, now: datetime | None = None) -> None:
        """Artifacts first, then one transaction; raises StorageError and saves nothing on failure."""
        now = now or datetime.now(UTC)
        uris = [self._put_artifacts(record) for record in batch.records]
        mask_uris = store_masks(self.artifacts, batch.labels)
        try:
            with self.engine.begin() as conn:
                self._count(conn, batch.counted)
                self._upsert_records(conn, batch.records, uris, now)
                if batch.labels:
                    save_labels(conn, batch.labels, mask_uris, now)
        except SQLAlchemyError as exc:
            raise RecordStoreError(f"cannot save {len(batch.records)} record(s) in {redact_url(self.url)}: "
                                   f"{_first_line(exc)}") from exc

    def _put_artifacts(self, record: PendingRecord) -> dict[str, str | None]:
        verdict = record.verdict
        day = as_utc(verdict.captured_at).strftime("%Y-%m-%d")
        def key(name: str) -> str:
            return artifact_key(verdict.product, day, verdict.frame_id, name)

        heatmap = record.heatmap
        return {
            "image_uri": self.artifacts.put(key("image.jpg"), record.jpeg) if record.jpeg else None,
            "heatmap_uri": self.artifacts.put(key("heatmap.png"), heatmap.map_png) if heatmap else None,
            "overlay_uri": (self.artifacts.put(key("overlay.jpg"), heatmap.overlay_jpeg)
                            if heatmap and heatmap.overlay_jpeg else None),
        }

    def _count(self, conn, counted: list[Counted]) -> None:
        if not counted:
            return
        progress: dict[tuple[str, int], int] = {}
        for topic, partition in {(c.topic, c.partition) for c in counted}:
            row = conn.execute(select(count_progress.c.counted_through).where(
                count_progress.c.topic == topic, count_progress.c.kafka_partition == partition)).first()
            progress[(topic, partition)] = row[0] if row else -1
        seen = dict(progress)
        increments: dict[tuple, list[int]] = {}
        fresh = [c for c in counted if c.offset > progress[(c.topic, c.partition)] and c.verdict is not None]
        already = self._counted_before(conn, {c.verdict.frame_id for c in fresh})
        new_frames: dict[str, str] = {}
        for item in counted:
            topic, partition, offset, verdict = item.topic, item.partition, item.offset, item.verdict
            if offset <= progress[(topic, partition)]:
                continue   # counted before a restart: this is a replay
            seen[(topic, partition)] = max(seen[(topic, partition)], offset)
            if verdict is None or verdict.frame_id in already or verdict.frame_id in new_frames:
                continue   # the same frame's verdict again, under another offset
            new_frames[verdict.frame_id] = as_utc(verdict.captured_at).strftime("%Y-%m-%d")
            key = (as_utc(verdict.captured_at).strftime("%Y-%m-%d"), verdict.line_id, verdict.camera_id,
                   verdict.product)
            totals = increments.setdefault(key, [0, 0, 0])
            totals[0] += 1
            totals[1] += verdict.is_anomalous
            totals[2] += item.sample
        if new_frames:
            conn.execute(counted_frames.insert(), [{"frame_id": f, "day": d} for f, d in new_frames.items()])
        for (day, line_id, camera_id, product), (frames, flagged, sample) in increments.items():
            where = (frame_counts.c.day == day, frame_counts.c.line_id == line_id,
                     frame_counts.c.camera_id == camera_id, frame_counts.c.product == product)
            changed = conn.execute(update(frame_counts).where(*where).values(
                frames=frame_counts.c.frames + frames, flagged=frame_counts.c.flagged + flagged,
                sampled=frame_counts.c.sampled + sample)).rowcount
            if not changed:
                conn.execute(frame_counts.insert().values(day=day, line_id=line_id, camera_id=camera_id,
                                                          product=product, frames=frames, flagged=flagged,
                                                          sampled=sample))
        for (topic, partition), offset in seen.items():
            if offset == progress[(topic, partition)]:
                continue
            if progress[(topic, partition)] < 0:
                conn.execute(count_progress.insert().values(topic=topic, kafka_partition=partition,
                                                            counted_through=offset))
            else:
                conn.execute(update(count_progress).where(count_progress.c.topic == topic,
                                                          count_progress.c.kafka_partition == partition)
                             .values(counted_through=offset))

    @staticmethod
    def _counted_before(conn, frame_ids: set[str]) -> set[str]:
        found: set[str] = set()
        ids = sorted(frame_ids)
        for start in range(0, len(ids), 500):  # SQLite binds at most 999 parameters per statement
            chunk = ids[start:start + 500]
            found.update(conn.execute(select(counted_frames.c.frame_id)
                                      .where(counted_frames.c.frame_id.in_(chunk))).scalars())
        return found

    def _upsert_records(self, conn, pending: list[PendingRecord], uris: list[dict], now: datetime) -> None:
        if not pending:
            return
        frame_ids = [record.verdict.frame_id for record in pending]
        existing = set(conn.execute(select(records.c.frame_id).where(records.c.frame_id.in_(frame_ids))).scalars())
        statuses = latest_status(conn, frame_ids)
        for record, artifact_uris in zip(pending, uris, strict=True):
            verdict = record.verdict
            missing = [name for name, present in (("frame", record.jpeg), ("heatmap", record.heatmap)) if not present]
            values = {
                "line_id": verdict.line_id, "camera_id": verdict.camera_id, "product": verdict.product,
                "captured_at": naive_utc(verdict.captured_at), "kind": record.kind,
                "is_anomalous": verdict.is_anomalous, "score": verdict.score, "threshold": verdict.threshold,
                "confidence": verdict.confidence, "model_version": verdict.model_version, "answer": verdict.answer,
                "positions": json.dumps(list(verdict.positions)), "verdict_json": verdict.model_dump_json(),
                "missing": ",".join(missing), "stored_at": naive_utc(now), "descriptor": verdict.descriptor,
                **artifact_uris,
            }
            if verdict.frame_id in existing:
                # a replay: keep artifacts already stored when this delivery lacks them
                values = {k: v for k, v in values.items()
                          if v is not None or not (k.endswith("_uri") or k == "descriptor")}
                conn.execute(update(records).where(records.c.frame_id == verdict.frame_id).values(**values))
            else:
                conn.execute(records.insert().values(frame_id=verdict.frame_id,
                                                     label_status=statuses.get(verdict.frame_id, "unlabeled"),
                                                     **values))
                existing.add(verdict.frame_id)

    def purge(self, *, retention_days: float, normal_retention_days: float, keep_labelled: bool = True,
              now: datetime | None = None) -> int:
        """Delete records (and their artifacts) older than the retention; returns how many."""
        now = now or datetime.now(UTC)
        removed = 0
        for kind, days in (("flagged", retention_days), ("sample", normal_retention_days)):
            cutoff = naive_utc(now - timedelta(days=days))
            where = [records.c.kind == kind, records.c.captured_at < cutoff]
            if keep_labelled:
                where.append(records.c.label_status == "unlabeled")
            with self.engine.begin() as conn:
                rows = conn.execute(select(records.c.frame_id, records.c.image_uri, records.c.heatmap_uri,
                                           records.c.overlay_uri).where(*where)).all()
                if rows:
                    conn.execute(records.delete().where(records.c.frame_id.in_([r.frame_id for r in rows])))
            for row in rows:
                for uri in (row.image_uri, row.heatmap_uri, row.overlay_uri):
                    if uri:
                        try:
                            self.artifacts.delete(uri)
                        except ArtifactStoreError as exc:   # e.g. written under another artifact root
                            log.warning("artifact_not_purged", uri=uri, error=str(exc))
            removed += len(rows)
        with self.engine.begin() as conn:  # the frame_ids behind counts older than any record kept
            day = (now - timedelta(days=max(retention_days, normal_retention_days))).strftime("%Y-%m-%d")
            conn.execute(counted_frames.delete().where(counted_frames.c.day < day))
        if removed:
            log.info("records_purged", removed=removed, retention_days=retention_days,
                     normal_retention_days=normal_retention_days)
        return removed

    # -- queries (the dialogue service's API) -------------------------------------------------
    def query(self, *, since: datetime | None = None, until: datetime | None = None, line_id: str | None = None,
              product: str | None = None, camera_id: str | None = None,
              verdict: Literal["anomalous", "normal"] | None = None,
              label_status: Literal["unlabeled", "defect", "good"] | None = None,
              limit: int = 100, offset: int = 0, newest_first: bool = True) -> list[InspectionRecord]:
        """Records by capture time range [since, until), line, product, camera, verdict and label status;
        `offset` skips that many (pages)."""
        query = _filtered(select(records), since=since, until=until, line_id=line_id, product=product,
                          camera_id=camera_id, verdict=verdict, label_status=label_status)
        order = records.c.captured_at.desc() if newest_first else records.c.captured_at
        query = query.order_by(order, records.c.frame_id).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def count(self, *, since: datetime | None = None, until: datetime | None = None, line_id: str | None = None,
              product: str | None = None, camera_id: str | None = None,
              verdict: Literal["anomalous", "normal"] | None = None,
              label_status: Literal["unlabeled", "defect", "good"] | None = None) -> int:
        """How many records `query` would return with these filters and no limit."""
        query = _filtered(select(func.count()).select_from(records), since=since, until=until, line_id=line_id,
                          product=product, camera_id=camera_id, verdict=verdict, label_status=label_status)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def lines(self) -> list[str]:
        """Every line id seen in the counts or the records."""
        with self.engine.connect() as conn:
            found = set(conn.execute(select(frame_counts.c.line_id).distinct()).scalars())
            found |= set(conn.execute(select(records.c.line_id).distinct()).scalars())
        return sorted(found)

    def products(self) -> list[str]:
        """Products with stored records, the most recently captured first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(records.c.product, func.max(records.c.captured_at).label("last"))
                                .group_by(records.c.product).order_by(func.max(records.c.captured_at).desc()))
            return [row.product for row in rows]

    def get(self, frame_id: str) -> InspectionRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(records).where(records.c.frame_id == frame_id)).first()
        return _record(row) if row else None

    def similar(self, frame_id: str, k: int = 5, *, same_product: bool = True,
                flagged_only: bool = True) -> list[SimilarRecord]:
        """The k stored records whose defect descriptor is nearest (cosine) to this frame's, best first.

        Brute force in numpy over every stored descriptor (of the same product by default): about 50 ms per
        100k records. From `vector_index_min` records on, it asks a vector index instead: sqlite-vec for
        SQLite, pgvector for PostgreSQL (storage/vectors.py; flagged records only). Raises KeyError for an
        unknown frame; returns [] when this frame has no descriptor.
        """
        with self.engine.connect() as conn:
            row = conn.execute(select(records.c.descriptor, records.c.product)
                               .where(records.c.frame_id == frame_id)).first()
            if row is None:
                raise KeyError(frame_id)
            if not row.descriptor:
                return []
        index = self._index() if flagged_only else None
        if index is not None:
            return self._similar_indexed(index, frame_id, row, k, same_product)
        with self.engine.connect() as conn:
            query = select(records.c.frame_id, records.c.descriptor).where(
                records.c.descriptor.is_not(None), records.c.frame_id != frame_id)
            if same_product:
                query = query.where(records.c.product == row.product)
            if flagged_only:
                query = query.where(records.c.kind == "flagged")
            candidates = conn.execute(query).all()
        target = _unit(np.frombuffer(row.descriptor, dtype="<f2"))
        candidates = [c for c in candidates if len(c.descriptor) == target.size * 2]
        if not candidates:
            return []
        matrix = np.stack([np.frombuffer(c.descriptor, dtype="<f2") for c in candidates]).astype(np.float32)
        matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        similarity = matrix @ target                                      # (N,)
        best = np.argsort(-similarity, kind="stable")[:k]
        return self._similar_records([(candidates[i].frame_id, float(similarity[i])) for i in best])

    def _similar_indexed(self, index: DescriptorIndex | PgVectorIndex, frame_id: str, row, k: int,
                         same_product: bool) -> list[SimilarRecord]:
        index.sync(self.engine)
        target = np.frombuffer(row.descriptor, dtype="<f2").astype(np.float32)
        hits = index.nearest(target, row.product if same_product else None, k + 1)
        with self.engine.connect() as conn:
            present = {r.frame_id for r in conn.execute(select(records.c.frame_id).where(
                records.c.frame_id.in_([hit_id for _, hit_id, _ in hits])))}
        index.forget([rowid for rowid, hit_id, _ in hits if hit_id not in present])
        ranked = [(hit_id, similarity) for _, hit_id, similarity in hits if hit_id != frame_id and hit_id in present]
        return self._similar_records(ranked[:k])

    def _similar_records(self, ranked: list[tuple[str, float]]) -> list[SimilarRecord]:
        ids = [frame_id for frame_id, _ in ranked]
        with self.engine.connect() as conn:
            found = {r.frame_id: _record(r) for r in conn.execute(select(records).where(records.c.frame_id.in_(ids)))}
            types = latest_defect_types(conn, ids)
        return [SimilarRecord(record=found[frame_id], similarity=round(similarity, 4), defect_type=types.get(frame_id))
                for frame_id, similarity in ranked if frame_id in found]

    def count_records(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(records)).scalar_one()

    def counts(self, *, line_id: str | None = None, product: str | None = None, first_day: str | None = None,
               last_day: str | None = None) -> dict[str, int]:
        """Every verdict counted: {"frames", "flagged", "sampled"}, optionally for one line / product and for
        the capture days (UTC, "YYYY-MM-DD") from `first_day` to `last_day` inclusive."""
        query = select(func.coalesce(func.sum(frame_counts.c.frames), 0),
                       func.coalesce(func.sum(frame_counts.c.flagged), 0),
                       func.coalesce(func.sum(frame_counts.c.sampled), 0))
        if line_id is not None:
            query = query.where(frame_counts.c.line_id == line_id)
        if product is not None:
            query = query.where(frame_counts.c.product == product)
        if first_day is not None:
            query = query.where(frame_counts.c.day >= first_day)
        if last_day is not None:
            query = query.where(frame_counts.c.day <= last_day)
        with self.engine.connect() as conn:
            frames, flagged, sample = conn.execute(query).one()
        return {"frames": int(frames), "flagged": int(flagged), "sampled": int(sample)}


def _filtered(query, *, since, until, line_id, product, camera_id, verdict, label_status):
    """`query` with the filters of `RecordStore.query` (None = no filter)."""
    if since is not None:
        query = query.where(records.c.captured_at >= naive_utc(since))
    if until is not None:
        query = query.where(records.c.captured_at < naive_utc(until))
    for column, value in ((records.c.line_id, line_id), (records.c.product, product),
                          (records.c.camera_id, camera_id), (records.c.label_status, label_status)):
        if value is not None:
            query = query.where(column == value)
    if verdict is not None:
        query = query.where(records.c.is_anomalous == (verdict == "anomalous"))
    return query


class SimilarRecord(BaseModel):
    """One result of `RecordStore.similar`: a stored record, its cosine similarity, its latest label's type."""

    record: InspectionRecord
    similarity: float
    defect_type: str | None


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = vector.astype(np.float32)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def _record(row) -> InspectionRecord:
    data = dict(row._mapping)
    data.pop("verdict_json", None)
    data.pop("descriptor", None)
    data["positions"] = json.loads(data["positions"])
    data["missing"] = [part for part in data["missing"].split(",") if part]
    data["captured_at"] = as_utc(data["captured_at"])
    data["stored_at"] = as_utc(data["stored_at"])
    return InspectionRecord(**data)


def _first_line(exc: Exception) -> str:
    return str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]
