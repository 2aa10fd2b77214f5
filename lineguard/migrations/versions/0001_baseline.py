"""The records database as it first shipped: records, labels, counts, conversation turns, model versions.

A database made before the migrations existed (its tables made by `metadata.create_all`, no `alembic_version`)
is adopted: only the tables it lacks are created, so nothing in it is touched.

Revision ID: 0001_baseline
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def _records() -> None:
    op.create_table(
        "records",
        sa.Column("frame_id", sa.String(200), primary_key=True),
        sa.Column("line_id", sa.String(100), nullable=False),
        sa.Column("camera_id", sa.String(100), nullable=False),
        sa.Column("product", sa.String(100), nullable=False),
        sa.Column("captured_at", sa.DateTime, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("is_anomalous", sa.Boolean, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("model_version", sa.String(100), nullable=False),
        sa.Column("answer", sa.Text),
        sa.Column("positions", sa.String(200), nullable=False),
        sa.Column("verdict_json", sa.Text, nullable=False),
        sa.Column("image_uri", sa.Text),
        sa.Column("heatmap_uri", sa.Text),
        sa.Column("overlay_uri", sa.Text),
        sa.Column("missing", sa.String(100), nullable=False),
        sa.Column("label_status", sa.String(16), nullable=False),
        sa.Column("stored_at", sa.DateTime, nullable=False),
    )
    for column in ("line_id", "product", "captured_at", "label_status"):
        op.create_index(f"ix_records_{column}", "records", [column])


def _labels() -> None:
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("frame_id", sa.String(200), nullable=False),
        sa.Column("operator", sa.String(100), nullable=False),
        sa.Column("is_defect", sa.Boolean, nullable=False),
        sa.Column("defect_type", sa.String(100)),
        sa.Column("mask_uri", sa.Text),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("labeled_at", sa.DateTime, nullable=False),
        sa.Column("stored_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("frame_id", "operator", "labeled_at", name="uq_label_event"),
    )
    op.create_index("ix_labels_frame_id", "labels", ["frame_id"])
    op.create_index("ix_labels_labeled_at", "labels", ["labeled_at"])


def _frame_counts() -> None:
    op.create_table(
        "frame_counts",
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("line_id", sa.String(100), primary_key=True),
        sa.Column("camera_id", sa.String(100), primary_key=True),
        sa.Column("product", sa.String(100), primary_key=True),
        sa.Column("frames", sa.BigInteger, nullable=False),
        sa.Column("flagged", sa.BigInteger, nullable=False),
        sa.Column("sampled", sa.BigInteger, nullable=False),
    )


def _count_progress() -> None:
    op.create_table(
        "count_progress",
        sa.Column("topic", sa.String(255), primary_key=True),
        sa.Column("kafka_partition", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("counted_through", sa.BigInteger, nullable=False),
    )


def _counted_frames() -> None:
    op.create_table(
        "counted_frames",
        sa.Column("frame_id", sa.String(200), primary_key=True),
        sa.Column("day", sa.String(10), nullable=False),
    )
    op.create_index("ix_counted_frames_day", "counted_frames", ["day"])


def _conversation_turns() -> None:
    op.create_table(
        "conversation_turns",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("frame_id", sa.String(200), nullable=False),
        sa.Column("turn", sa.Integer, nullable=False),
        sa.Column("operator", sa.String(100), nullable=False),
        sa.Column("question", sa.Text, nullable=False),
        sa.Column("answer", sa.Text, nullable=False),
        sa.Column("intent", sa.String(32), nullable=False),
        sa.Column("sources", sa.Text, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("asked_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("frame_id", "turn", name="uq_conversation_turn"),
    )
    op.create_index("ix_conversation_turns_frame_id", "conversation_turns", ["frame_id"])


def _model_versions() -> None:
    op.create_table(
        "model_versions",
        sa.Column("version", sa.String(160), primary_key=True),
        sa.Column("product", sa.String(128), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("parent", sa.String(160)),
        sa.Column("model_code", sa.String(200), nullable=False),
        sa.Column("bundle_uri", sa.Text, nullable=False),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Column("lineage", sa.Text, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("promoted_at", sa.DateTime),
        sa.Column("rolled_back_at", sa.DateTime),
    )
    op.create_index("ix_model_versions_product", "model_versions", ["product"])


TABLES = {"records": _records, "labels": _labels, "frame_counts": _frame_counts, "count_progress": _count_progress,
          "counted_frames": _counted_frames, "conversation_turns": _conversation_turns,
          "model_versions": _model_versions}


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    for name, create in TABLES.items():
        if name not in existing:
            create()
