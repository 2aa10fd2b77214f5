"""SQL tables of the inspection records (SQLAlchemy Core): SQLite by default, PostgreSQL via URL.

| table | key | what |
|---|---|---|
| `records` | frame_id | one flagged frame (or a sampled normal one): verdict, answer, artifact URIs, label status |
| `labels` | id; unique (frame_id, operator, labeled_at) | operators' Label events; what the nightly training reads |
| `frame_counts` | (day, line_id, camera_id, product) | every verdict counted: frames, flagged, sampled |
| `count_progress` | (topic, kafka_partition) | last verdict offset in `frame_counts` (exact counts on replay) |
| `counted_frames` | frame_id | frames in `frame_counts`: a verdict re-sent under a new offset counts once |
| `conversation_turns` | id | the dialogue service's questions and answers per frame (survive a restart) |

These Table objects are what the code queries with; the database itself is created and changed only by the
migrations in lineguard/migrations (`lineguard db upgrade`; see lineguard/db.py). A change of schema is a new
migration there and the same change here; tests/test_migrations.py checks that the two agree.

Times are stored as naive UTC datetimes; `as_utc` turns them back into aware ones.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

records = Table(
    "records", metadata,
    Column("frame_id", String(200), primary_key=True),
    Column("line_id", String(100), nullable=False, index=True),
    Column("camera_id", String(100), nullable=False),
    Column("product", String(100), nullable=False, index=True),
    Column("captured_at", DateTime, nullable=False, index=True),
    Column("kind", String(16), nullable=False),            # "flagged" | "sample"
    Column("is_anomalous", Boolean, nullable=False),
    Column("score", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("confidence", Float, nullable=False),
    Column("model_version", String(100), nullable=False),
    Column("answer", Text),
    Column("positions", String(200), nullable=False),     # JSON list of 3x3 position words
    Column("verdict_json", Text, nullable=False),
    Column("image_uri", Text),
    Column("heatmap_uri", Text),
    Column("overlay_uri", Text),
    Column("missing", String(100), nullable=False),       # "frame,heatmap" when the join timed out
    Column("label_status", String(16), nullable=False, index=True),  # unlabeled | defect | good
    Column("stored_at", DateTime, nullable=False, index=True),
    Column("descriptor", LargeBinary),                    # float16 defect descriptor (Verdict.descriptor)
)

labels = Table(
    "labels", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("frame_id", String(200), nullable=False, index=True),
    Column("operator", String(100), nullable=False),
    Column("is_defect", Boolean, nullable=False),
    Column("defect_type", String(100)),
    Column("mask_uri", Text),
    Column("note", Text, nullable=False),
    Column("labeled_at", DateTime, nullable=False, index=True),
    Column("stored_at", DateTime, nullable=False),
    UniqueConstraint("frame_id", "operator", "labeled_at", name="uq_label_event"),
)

frame_counts = Table(
    "frame_counts", metadata,
    Column("day", String(10), primary_key=True),
    Column("line_id", String(100), primary_key=True),
    Column("camera_id", String(100), primary_key=True),
    Column("product", String(100), primary_key=True),
    Column("frames", BigInteger, nullable=False),
    Column("flagged", BigInteger, nullable=False),
    Column("sampled", BigInteger, nullable=False),
)

count_progress = Table(
    "count_progress", metadata,
    Column("topic", String(255), primary_key=True),
    Column("kafka_partition", Integer, primary_key=True),
    Column("counted_through", BigInteger, nullable=False),
)

counted_frames = Table(
    "counted_frames", metadata,
    Column("frame_id", String(200), primary_key=True),
    Column("day", String(10), nullable=False, index=True),   # purged with the retention of flagged records
)


conversation_turns = Table(
    "conversation_turns", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("frame_id", String(200), nullable=False, index=True),
    Column("turn", Integer, nullable=False),
    Column("operator", String(100), nullable=False),
    Column("question", Text, nullable=False),
    Column("answer", Text, nullable=False),
    Column("intent", String(32), nullable=False),
    Column("sources", Text, nullable=False),              # JSON list of {kind, ref, detail}
    Column("latency_ms", Float, nullable=False),
    Column("asked_at", DateTime, nullable=False),
    UniqueConstraint("frame_id", "turn", name="uq_conversation_turn"),
)

def naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


def as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
