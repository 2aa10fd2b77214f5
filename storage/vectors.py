"""Nearest-descriptor search for large record stores: sqlite-vec beside SQLite, pgvector inside PostgreSQL.

`RecordStore.similar` compares a flagged part's defect descriptor with every stored one, brute force in
numpy, up to `VECTOR_INDEX_MIN_RECORDS` records (about 50 ms per 100k). Above that it asks an index with the
same three calls (`sync`, `nearest`, `forget`):

- **SQLite** (`DescriptorIndex`): a `vec0` virtual table of sqlite-vec (cosine distance, partitioned by
  product), one table per descriptor length, in its own file `<records>.vectors.sqlite`;
- **PostgreSQL** (`PgVectorIndex`): tables of pgvector `vector(n)` columns with an HNSW index
  (`vector_cosine_ops`) in the records database itself, one per descriptor length; their rows reference
  `records` with `ON DELETE CASCADE`, so retention removes them with the records.

Why a file of its own: the Python here (and many distributions' builds) cannot load SQLite extensions
through the standard `sqlite3` module, so the index is opened with `pysqlite3` (the same DB-API with a
bundled SQLite that can), and the records database keeps its driver. The index follows the records table:
each query first reads the flagged records stored since the last one (by SQLite rowid) and adds their
descriptors, so the recorder needs no change and a fresh index fills itself. Records deleted by retention
are dropped from the index when a search meets them.

    >>> index = DescriptorIndex.beside(Path(".lineguard/records.sqlite"))
    >>> index.sync(engine)                            # new flagged records -> the index
    >>> index.nearest(vector, product="disc", k=5)    # [(rowid, frame_id, cosine similarity), ...] best first
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import literal_column, select, text

from lineguard.db import private_file

from .schema import records

VECTOR_INDEX_MIN_RECORDS = 100_000
SYNC_CHUNK = 5_000
_ROWID = literal_column("records.rowid")


def available() -> bool:
    """Whether sqlite-vec and an extension-loading SQLite driver are installed."""
    try:
        import pysqlite3  # noqa: F401
        import sqlite_vec  # noqa: F401
    except ImportError:
        return False
    return True


class DescriptorIndex:
    def __init__(self, path: Path):
        import pysqlite3.dbapi2 as sqlite
        import sqlite_vec

        self.path = Path(path)
        self.lock = threading.Lock()
        private_file(self.path)     # 0600 like the records database (SQLite gives its -wal/-shm the same mode)
        self.db = sqlite.connect(str(self.path), check_same_thread=False, timeout=30)
        self.db.enable_load_extension(True)
        sqlite_vec.load(self.db)
        self.db.enable_load_extension(False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS synced (id INTEGER PRIMARY KEY CHECK (id = 1), last_rowid INTEGER)")
        self.db.execute("CREATE TABLE IF NOT EXISTS dims (dim INTEGER PRIMARY KEY)")
        self.db.commit()
        self.dims = {row[0] for row in self.db.execute("SELECT dim FROM dims")}   # descriptor lengths indexed

    @classmethod
    def beside(cls, records_path: Path) -> DescriptorIndex:
        return cls(Path(records_path).with_suffix(".vectors.sqlite"))

    def close(self) -> None:
        self.db.close()

    def __len__(self) -> int:
        with self.lock:
            return sum(self.db.execute(f"SELECT count(*) FROM descriptors_{dim}").fetchone()[0]
                       for dim in self.dims)

    def _table(self, dim: int) -> str:
        if dim not in self.dims:
            self.db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS descriptors_{dim} USING vec0("
                            f"embedding float[{dim}] distance_metric=cosine, product text partition key, "
                            "+frame_id text)")
            self.db.execute("INSERT OR IGNORE INTO dims (dim) VALUES (?)", (dim,))
            self.dims.add(dim)
        return f"descriptors_{dim}"

    def sync(self, engine) -> int:
        """Add the descriptors of flagged records stored since the last sync; returns how many."""
        added = 0
        with self.lock:
            row = self.db.execute("SELECT last_rowid FROM synced WHERE id = 1").fetchone()
            last = row[0] if row else 0
            while True:
                query = (select(_ROWID, records.c.frame_id, records.c.product, records.c.descriptor)
                         .where(last < _ROWID, records.c.kind == "flagged", records.c.descriptor.is_not(None))
                         .order_by(_ROWID).limit(SYNC_CHUNK))
                with engine.connect() as conn:
                    rows = conn.execute(query).all()
                if not rows:
                    break
                for rowid, frame_id, product, descriptor in rows:
                    vector = np.frombuffer(descriptor, dtype="<f2").astype(np.float32)
                    if vector.size and np.isfinite(vector).all() and np.any(vector):
                        self.db.execute(f"INSERT OR REPLACE INTO {self._table(vector.size)} "
                                        "(rowid, embedding, product, frame_id) VALUES (?, ?, ?, ?)",
                                        (rowid, vector.tobytes(), product, frame_id))
                        added += 1
                last = rows[-1][0]
                self.db.execute("INSERT OR REPLACE INTO synced (id, last_rowid) VALUES (1, ?)", (last,))
                self.db.commit()
        return added

    def nearest(self, vector: np.ndarray, product: str | None, k: int) -> list[tuple[int, str, float]]:
        """The k indexed descriptors nearest to `vector` (cosine), best first: (rowid, frame_id, similarity)."""
        vector = np.asarray(vector, np.float32)
        with self.lock:
            if vector.size not in self.dims:
                return []
            where = "embedding MATCH ? AND k = ?" + (" AND product = ?" if product is not None else "")
            params = (vector.tobytes(), int(k)) + ((product,) if product is not None else ())
            rows = self.db.execute(f"SELECT rowid, frame_id, distance FROM descriptors_{vector.size} "
                                   f"WHERE {where} ORDER BY distance", params).fetchall()
        return [(rowid, frame_id, 1.0 - float(distance)) for rowid, frame_id, distance in rows]

    def forget(self, rowids: list[int]) -> None:
        """Drop entries whose records are gone (retention)."""
        if not rowids:
            return
        with self.lock:
            for dim in self.dims:
                self.db.executemany(f"DELETE FROM descriptors_{dim} WHERE rowid = ?", [(r,) for r in rowids])
            self.db.commit()


# --- PostgreSQL: pgvector ------------------------------------------------------------------------------

PG_SYNC_SLACK = timedelta(minutes=5)     # records stored this long before the last sync are looked at again
PG_EF_SEARCH_MIN = 100                   # HNSW candidates per search (pgvector's default is 40)


def _vector_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in np.asarray(vector, np.float32)) + "]"


class PgVectorIndex:
    """Descriptors in pgvector tables of the records database (see the module docstring).

    `sync` reads the flagged records stored since its last watermark (less `PG_SYNC_SLACK`, for transactions
    that committed late) that no table holds yet; several processes may sync at once. Raises
    `sqlalchemy.exc.SQLAlchemyError` when the extension cannot be created (not installed, or no privilege).
    """

    def __init__(self, engine):
        self.engine = engine
        self.lock = threading.Lock()
        with engine.begin() as conn:
            # descriptor_sync, descriptor_dims and ix_records_stored_at come with the migrations (0002)
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
        self.dims = self._known_dims()

    def _known_dims(self) -> set[int]:
        with self.engine.connect() as conn:
            return {row[0] for row in conn.execute(text("SELECT dim FROM descriptor_dims"))}

    def close(self) -> None:
        """The engine is the record store's; nothing of its own to close."""

    def __len__(self) -> int:
        with self.engine.connect() as conn:
            return sum(conn.execute(text(f"SELECT count(*) FROM descriptor_vectors_{dim}")).scalar_one()
                       for dim in self._known_dims())

    def _table(self, conn, dim: int) -> str:
        name = f"descriptor_vectors_{dim}"
        if dim not in self.dims:
            conn.execute(text(f"CREATE TABLE IF NOT EXISTS {name} ("
                              "frame_id varchar(200) PRIMARY KEY REFERENCES records (frame_id) ON DELETE CASCADE, "
                              f"product varchar(100) NOT NULL, embedding vector({dim}) NOT NULL)"))
            conn.execute(text(f"CREATE INDEX IF NOT EXISTS {name}_hnsw ON {name} "
                              "USING hnsw (embedding vector_cosine_ops)"))
            conn.execute(text("INSERT INTO descriptor_dims (dim) VALUES (:dim) ON CONFLICT DO NOTHING"), {"dim": dim})
            self.dims.add(dim)
        return name

    def sync(self, engine=None) -> int:
        """Add the descriptors of flagged records stored since the last sync; returns how many."""
        added = 0
        with self.lock, self.engine.begin() as conn:
            self.dims |= {row[0] for row in conn.execute(text("SELECT dim FROM descriptor_dims"))}
            until = conn.execute(text("SELECT stored_until FROM descriptor_sync WHERE id = 1")).scalar()
            query = (select(records.c.frame_id, records.c.product, records.c.descriptor, records.c.stored_at)
                     .where(records.c.kind == "flagged", records.c.descriptor.is_not(None)))
            if until is not None:
                query = query.where(records.c.stored_at >= until - PG_SYNC_SLACK)
            for dim in sorted(self.dims):
                query = query.where(text(f"NOT EXISTS (SELECT 1 FROM descriptor_vectors_{dim} d "
                                         "WHERE d.frame_id = records.frame_id)"))
            newest = until
            for frame_id, product, descriptor, stored_at in conn.execute(query).all():
                newest = stored_at if newest is None else max(newest, stored_at)
                vector = np.frombuffer(descriptor, dtype="<f2").astype(np.float32)
                if not (vector.size and np.isfinite(vector).all() and np.any(vector)):
                    continue
                conn.execute(text(f"INSERT INTO {self._table(conn, vector.size)} (frame_id, product, embedding) "
                                  "VALUES (:frame_id, :product, CAST(:embedding AS vector)) ON CONFLICT DO NOTHING"),
                             {"frame_id": frame_id, "product": product, "embedding": _vector_literal(vector)})
                added += 1
            if newest is not None and newest != until:
                conn.execute(text("INSERT INTO descriptor_sync (id, stored_until) VALUES (1, :t) "
                                  "ON CONFLICT (id) DO UPDATE SET stored_until = excluded.stored_until"), {"t": newest})
        return added

    def nearest(self, vector: np.ndarray, product: str | None, k: int) -> list[tuple[str, str, float]]:
        """The k indexed descriptors nearest to `vector` (cosine), best first: (frame_id, frame_id, similarity)."""
        vector = np.asarray(vector, np.float32)
        if vector.size not in self.dims:
            return []
        where = "WHERE product = :product " if product is not None else ""
        with self.engine.begin() as conn:
            # HNSW filters by product after the graph search: ask for enough candidates to keep k of them
            conn.execute(text(f"SET LOCAL hnsw.ef_search = {max(PG_EF_SEARCH_MIN, 8 * int(k))}"))
            rows = conn.execute(text(f"SELECT frame_id, embedding <=> CAST(:v AS vector) AS distance "
                                     f"FROM descriptor_vectors_{vector.size} {where}"
                                     "ORDER BY embedding <=> CAST(:v AS vector) LIMIT :k"),
                                {"v": _vector_literal(vector), "product": product, "k": int(k)}).all()
        return [(frame_id, frame_id, 1.0 - float(distance)) for frame_id, distance in rows]

    def forget(self, keys: list[str]) -> None:
        """Nothing to do: rows of deleted records go with them (ON DELETE CASCADE)."""
