"""Labels: operators' judgements of frames, stored with their record; what the nightly training reads.

A `Label` event (frame_id, operator, is_defect, defect_type, optional mask PNG, note) arrives on the
labels topic; the recorder stores it in the `labels` table (idempotent by frame_id + operator +
labeled_at), its mask in the artifact store, and sets the record's `label_status` to the latest
label's verdict: `defect` or `good` (`unlabeled` until then). A label may arrive before its record;
the record picks up the status when it is stored.

    >>> from storage.records import RecordStore
    >>> store = RecordStore.from_settings(settings, storage_settings)
    >>> for example in training_examples(store, since=last_night):
    ...     image = store.artifacts.get(example.image_uri)
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import Connection, select, update

from lineguard.events import Label
from storage.artifacts import ArtifactStore, artifact_key
from storage.schema import as_utc, labels, naive_utc, records

LABEL_STATUSES = ("unlabeled", "defect", "good")


def mask_key(label: Label) -> str:
    stamp = as_utc(label.labeled_at).strftime("%Y%m%dT%H%M%S%fZ")
    return artifact_key("labels", label.frame_id, f"{label.operator}-{stamp}-mask.png")


def store_masks(artifacts: ArtifactStore, events: Iterable[Label]) -> dict[int, str]:
    """Write each label's mask PNG first (outside the SQL transaction); {id(label): uri}."""
    return {id(label): artifacts.put(mask_key(label), label.mask_png) for label in events if label.mask_png}


def save_labels(conn: Connection, events: list[Label], mask_uris: dict[int, str], now: datetime) -> int:
    """Insert labels not stored yet and refresh the label status of their records; returns how many were new."""
    new = 0
    for label in events:
        key = (label.frame_id, label.operator, naive_utc(label.labeled_at))
        exists = conn.execute(select(labels.c.id).where(labels.c.frame_id == key[0], labels.c.operator == key[1],
                                                        labels.c.labeled_at == key[2])).first()
        if exists:
            continue
        conn.execute(labels.insert().values(frame_id=label.frame_id, operator=label.operator,
                                            is_defect=label.is_defect, defect_type=label.defect_type,
                                            mask_uri=mask_uris.get(id(label)), note=label.note,
                                            labeled_at=key[2], stored_at=naive_utc(now)))
        new += 1
    frame_ids = {label.frame_id for label in events}
    statuses = latest_status(conn, frame_ids)
    for frame_id, status in statuses.items():
        conn.execute(update(records).where(records.c.frame_id == frame_id).values(label_status=status))
    return new


def latest_status(conn: Connection, frame_ids: Iterable[str]) -> dict[str, str]:
    """{frame_id: "defect" | "good"} from each frame's latest label; frames without a label are absent."""
    ids = list(set(frame_ids))
    if not ids:
        return {}
    rows = conn.execute(select(labels.c.frame_id, labels.c.is_defect)
                        .where(labels.c.frame_id.in_(ids))
                        .order_by(labels.c.labeled_at, labels.c.id)).all()
    return {row.frame_id: ("defect" if row.is_defect else "good") for row in rows}


def latest_defect_types(conn: Connection, frame_ids: Iterable[str]) -> dict[str, str | None]:
    """{frame_id: defect_type of its latest label} for labelled frames (None when that label said good)."""
    ids = list(set(frame_ids))
    if not ids:
        return {}
    rows = conn.execute(select(labels.c.frame_id, labels.c.is_defect, labels.c.defect_type)
                        .where(labels.c.frame_id.in_(ids))
                        .order_by(labels.c.labeled_at, labels.c.id)).all()
    return {row.frame_id: (row.defect_type if row.is_defect else None) for row in rows}


class TrainingExample(BaseModel):
    """One labelled frame for training: the latest label of a stored record, with its artifacts."""

    frame_id: str
    product: str
    line_id: str
    camera_id: str
    captured_at: datetime
    is_defect: bool
    defect_type: str | None
    operator: str
    labeled_at: datetime
    note: str
    image_uri: str | None
    mask_uri: str | None
    heatmap_uri: str | None
    model_score: float
    model_said_anomalous: bool


def training_examples(store, *, since: datetime | None = None, product: str | None = None) -> list[TrainingExample]:
    """Latest label per frame (labelled at or after `since`), joined with its record; oldest first."""
    query = (select(labels, records.c.product, records.c.line_id, records.c.camera_id, records.c.captured_at,
                    records.c.image_uri, records.c.heatmap_uri, records.c.score, records.c.is_anomalous)
             .join(records, records.c.frame_id == labels.c.frame_id)
             .order_by(labels.c.labeled_at, labels.c.id))
    if since is not None:
        query = query.where(labels.c.labeled_at >= naive_utc(since))
    if product is not None:
        query = query.where(records.c.product == product)
    latest: dict[str, TrainingExample] = {}
    with store.engine.connect() as conn:
        for row in conn.execute(query):
            latest[row.frame_id] = TrainingExample(
                frame_id=row.frame_id, product=row.product, line_id=row.line_id, camera_id=row.camera_id,
                captured_at=as_utc(row.captured_at), is_defect=row.is_defect, defect_type=row.defect_type,
                operator=row.operator, labeled_at=as_utc(row.labeled_at), note=row.note, image_uri=row.image_uri,
                mask_uri=row.mask_uri, heatmap_uri=row.heatmap_uri, model_score=row.score,
                model_said_anomalous=row.is_anomalous)
    return sorted(latest.values(), key=lambda example: example.labeled_at)
