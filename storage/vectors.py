"""Nearest-descriptor search for large record stores: a sqlite-vec index beside the SQLite records database.

`RecordStore.similar` compares a flagged part's defect descriptor with every stored one, brute force in
numpy, up to `VECTOR_INDEX_MIN_RECORDS` records (about 50 ms per 100k). Above that it asks this index: a
`vec0` virtual table of sqlite-vec (cosine distance, partitioned by product), one table per descriptor
length, in its own file `<records>.vectors.sqlite`.

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
from pathlib import Path

import numpy as np
from sqlalchemy import literal_column, select

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
