"""The records database's schema version: Alembic migrations (lineguard/migrations) own every table.

The records database (records, labels, counts, conversations, the model registry's index) is created and
changed by versioned migrations alone. `lineguard db upgrade` (or the embedded stack, before any service
starts) applies them; a service only checks, at start-up, that the database is at this build's revision:

    >>> upgrade("sqlite:///.lineguard/records.sqlite")     # idempotent; safe when two run at once
    ['0001_baseline', '0002_records_descriptor']
    >>> current("sqlite:///.lineguard/records.sqlite") == head()
    True
    >>> require_current(engine)        # raises SchemaBehind: one line saying what to run

Two upgrades at once on the same database take turns: SQLite's `BEGIN IMMEDIATE` write lock, PostgreSQL's
`pg_advisory_xact_lock`, around one transaction that holds every migration (both have transactional DDL).
A database made before the migrations (tables, no `alembic_version`) is adopted: the baseline creates only the
tables it lacks and the later revisions add only what is missing.

The SQLite files are private: the database (and so its -wal and -shm, which SQLite creates with the
database's mode) is made 0600 before SQLite first opens it, in a folder made 0700.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

from lineguard.settings import ConfigError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_PG_LOCK_KEY = 0x6C696E6567           # "lineg": the advisory lock two upgrades of one database take turns on
SQLITE_PREFIX = "sqlite:///"


class SchemaBehind(ConfigError):
    """The records database is not at the revision this build needs; the message says what to run."""


def sqlite_file(url: str) -> Path | None:
    """The file of a `sqlite:///` URL (None: another database, or SQLite in memory)."""
    if not url.startswith(SQLITE_PREFIX):
        return None
    path = url.removeprefix(SQLITE_PREFIX).split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def private_dir(path: Path, *, existing_too: bool = False) -> Path:
    """mkdir -p `path`; the folder it creates (and, with `existing_too`, one that exists) becomes 0700."""
    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    if created or existing_too:
        os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> None:
    """Create `path` 0600 if it is missing (umask aside); one that exists is made 0600."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)


def private_sqlite(url: str, *, create: bool = True) -> None:
    """Make the SQLite database of `url` private: its folder 0700 (when made here), the database and any -wal,
    -shm 0600. `create=False` leaves a missing database missing (a service must not create one)."""
    path = sqlite_file(url)
    if path is None:
        return
    if not create and not path.exists():
        return
    private_dir(path.parent)
    private_file(path)
    for suffix in ("-wal", "-shm"):
        sidecar = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(sidecar, 0o600)


def _config(connection=None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@functools.cache
def head() -> str:
    """The revision this build's code needs."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def _engine(url: str):
    """The migrations' engine: a longer lock wait, the WAL mode set by `upgrade` itself."""
    return engine(url, timeout_s=60.0, pragmas=False)


def engine(url: str, *, timeout_s: float = 30.0, pragmas: bool = True):
    """The one engine set-up of the records database, for every service that opens it (the records, the model
    registry, the migrations). SQLite: usable from the services' worker threads, a lock wait of `timeout_s`,
    and (`pragmas`) WAL, so that readers never block the recorder, with synchronous=FULL, so that a committed
    record survives a power cut. PostgreSQL: connections checked before use (pool_pre_ping)."""
    from sqlalchemy import create_engine, event

    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    made = create_engine(url, connect_args={"check_same_thread": False, "timeout": timeout_s})
    if pragmas:
        event.listen(made, "connect", _sqlite_pragmas)
    return made


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    _wal(dbapi_connection)
    dbapi_connection.execute("PRAGMA synchronous=FULL")


def _revision(connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def current(url_or_engine) -> str | None:
    """The revision the database is at (None: never migrated, or no database yet)."""
    if isinstance(url_or_engine, str):
        path = sqlite_file(url_or_engine)
        if path is not None and not path.exists():
            return None
        engine = _engine(url_or_engine)
        try:
            with engine.connect() as conn:
                return _revision(conn)
        finally:
            engine.dispose()
    with url_or_engine.connect() as conn:
        return _revision(conn)


def _wal(dbapi_connection, patience_s: float = 60.0) -> None:
    """PRAGMA journal_mode=WAL, retried: while another upgrade holds the write lock, SQLite answers the mode
    change with 'database is locked' at once (its busy handler does not wait for it)."""
    import time

    deadline = time.monotonic() + patience_s
    delay = 0.01
    while True:
        try:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:     # the driver's OperationalError (sqlite3 or pysqlite3)
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def upgrade(url: str, revision: str = "head") -> list[str]:
    """Apply the migrations up to `revision`; returns the revisions applied (empty when already there)."""
    from alembic import command
    from sqlalchemy import event, text

    private_sqlite(url)
    engine = _engine(url)
    sqlite = engine.dialect.name == "sqlite"
    if sqlite:
        @event.listens_for(engine, "connect")
        def _driver_autocommit(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None       # the transaction is ours: BEGIN IMMEDIATE below
            _wal(dbapi_connection)

        @event.listens_for(engine, "begin")
        def _write_lock(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")       # a second upgrade waits here (busy timeout)
    applied: list[str] = []
    try:
        with engine.begin() as conn:
            if not sqlite and engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            before = _revision(conn)
            config = _config(conn)
            command.upgrade(config, revision)
            after = _revision(conn)
        if after != before:
            from alembic.script import ScriptDirectory

            script = ScriptDirectory.from_config(config)
            applied = [s.revision for s in reversed(list(script.iterate_revisions(after, before)))]
    finally:
        engine.dispose()
    private_sqlite(url)
    return applied


def require_current(url_or_engine) -> str:
    """Raise SchemaBehind (one line: what to run) unless the database is at `head()`; returns the revision."""
    url = url_or_engine if isinstance(url_or_engine, str) else url_or_engine.url.render_as_string(hide_password=True)
    found = current(url_or_engine)
    needed = head()
    if found != needed:
        where = redact_url(url)
        at = f"at revision {found}" if found else "not initialised (no schema revision)"
        option = f" --db-url '{where}'" if "***" not in where and not _default_hint(url) else ""
        raise SchemaBehind(f"records database {where} is {at}, this build needs {needed}: "
                           f"run `lineguard db upgrade{option}`")
    return found


def _default_hint(url: str) -> bool:
    """True when the URL is the one `lineguard db upgrade` picks by default (nothing to add to the hint)."""
    try:
        from lineguard.settings import load_settings

        return load_settings().records_db_url() == url
    except ConfigError:
        return False


def redact_url(url: str) -> str:
    """`url` with its user and password replaced by ***."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
