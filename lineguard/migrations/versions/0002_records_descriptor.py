"""records.descriptor (the float16 defect descriptor similar-parts search compares), an index on
records.stored_at (the vector index reads records by it), and on PostgreSQL the pgvector index's two fixed
bookkeeping tables. Each is added only where missing: a database of an older build may have some already.

The per-length vector tables (`descriptor_vectors_<n>`, and sqlite-vec's own file) stay created by the index
when it first sees a descriptor of that length: they depend on the data and on the pgvector extension.

Revision ID: 0002_records_descriptor
Revises: 0001_baseline
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_records_descriptor"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "descriptor" not in {column["name"] for column in inspector.get_columns("records")}:
        op.add_column("records", sa.Column("descriptor", sa.LargeBinary))
    if "ix_records_stored_at" not in {index["name"] for index in inspector.get_indexes("records")}:
        op.create_index("ix_records_stored_at", "records", ["stored_at"])
    if op.get_bind().dialect.name != "postgresql":
        return
    tables = set(inspector.get_table_names())
    if "descriptor_sync" not in tables:
        op.create_table("descriptor_sync",
                        sa.Column("id", sa.Integer, sa.CheckConstraint("id = 1"), primary_key=True,
                                  autoincrement=False),
                        sa.Column("stored_until", sa.DateTime, nullable=False))
    if "descriptor_dims" not in tables:
        op.create_table("descriptor_dims", sa.Column("dim", sa.Integer, primary_key=True, autoincrement=False))
