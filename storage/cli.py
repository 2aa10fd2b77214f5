"""Typer commands of the storage room; `register` adds them to the app deploy/app.py assembles.

Only typer is imported at module level, so `lineguard --help` stays fast; each command imports
its modules when it runs. Errors a user can act on (a full disk, an unreachable Grafana, a missing
npm) print one `error: ...` line and exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from datetime import UTC, datetime, timedelta

import typer


def _storage_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from storage.artifacts import StorageError

        try:
            return func(*args, **kwargs)
        except StorageError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _settings():
    from lineguard.logging import configure
    from lineguard.settings import load_settings
    from storage.settings import load_storage_settings

    configure()
    return load_settings(), load_storage_settings()


def _run_until_signal(service) -> None:
    """Run `service(stop)` in a fresh loop; Ctrl-C, SIGTERM and SIGHUP set `stop`, so it shuts down in order."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, stop.set)
        await service(stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


STATS_HTTP_PORT = 9103
STORE_HTTP_PORT = 9104
HTTP_HOST_HELP = "Address of /healthz (0.0.0.0: every interface, for a pod's probes)."


def _http(host: str, port: int) -> tuple[str, int] | None:
    return None if port < 0 else (host, port)


@_storage_errors
def stats_command(
    seconds: float = typer.Option(None, help="Stop after this many seconds (default: until Ctrl-C)."),
    http_port: int = typer.Option(STATS_HTTP_PORT, help="Port of /healthz (-1 = off)."),
    http_host: str = typer.Option("127.0.0.1", help=HTTP_HOST_HELP),
) -> None:
    """Aggregate verdicts into 10 s / 1 min defect statistics in InfluxDB (a faust app)."""
    from storage.stats import run_stats

    settings, storage_settings = _settings()
    _run_until_signal(lambda stop: run_stats(settings, storage_settings, seconds=seconds, stop=stop,
                                             http=_http(http_host, http_port)))


@_storage_errors
def store_command(
    seconds: float = typer.Option(None, help="Stop after this many seconds (default: until Ctrl-C)."),
    http_port: int = typer.Option(STORE_HTTP_PORT, help="Port of /healthz (-1 = off)."),
    http_host: str = typer.Option("127.0.0.1", help=HTTP_HOST_HELP),
) -> None:
    """Keep flagged frames (image, heatmap, overlay, verdict, answer) and labels; count normal frames."""
    from storage.recorder import run_recorder

    settings, storage_settings = _settings()
    _run_until_signal(lambda stop: run_recorder(settings, storage_settings, seconds=seconds, stop=stop,
                                                http=_http(http_host, http_port)))


def _since(value: str | None) -> datetime | None:
    """ISO time, or a duration back from now: 30m, 2h, 7d."""
    if value is None:
        return None
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(**{units[value[-1]]: float(value[:-1])})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"expected an ISO time or a duration like 30m, 2h, 7d; got {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@_storage_errors
def records_command(
    since: str = typer.Option(None, help="From this capture time (ISO) or this long ago (30m, 2h, 7d)."),
    until: str = typer.Option(None, help="Up to this capture time (ISO) or this long ago."),
    line: str = typer.Option(None, help="Production line id."),
    product: str = typer.Option(None, help="Product."),
    verdict: str = typer.Option(None, help="anomalous or normal."),
    label_status: str = typer.Option(None, help="unlabeled, defect or good."),
    limit: int = typer.Option(20, min=1, help="At most this many, newest first."),
) -> None:
    """Query the inspection records (one JSON object per line)."""
    from storage.records import RecordStore

    if verdict not in (None, "anomalous", "normal"):
        raise typer.BadParameter("--verdict must be anomalous or normal")
    if label_status not in (None, "unlabeled", "defect", "good"):
        raise typer.BadParameter("--label-status must be unlabeled, defect or good")
    settings, storage_settings = _settings()
    store = RecordStore.from_settings(settings, storage_settings)
    try:
        for record in store.query(since=_since(since), until=_since(until), line_id=line, product=product,
                                  verdict=verdict, label_status=label_status, limit=limit):
            typer.echo(record.model_dump_json())
    finally:
        store.close()


DB_URL_HELP = "The records database (default: LINEGUARD_STORE_DB_URL, else <state_dir>/records.sqlite)."


def _db_url(db_url: str | None) -> str:
    from lineguard.cli import cli_settings

    return db_url or cli_settings().records_db_url()


def db_upgrade_command(db_url: str = typer.Option(None, "--db-url", help=DB_URL_HELP)) -> None:
    """Create or bring the records database up to this build's schema (the migrations; safe to run twice)."""
    from lineguard.db import head, redact_url, upgrade

    url = _db_url(db_url)
    applied = _database_errors(upgrade, url)
    typer.echo(f"{redact_url(url)}: {'applied ' + ', '.join(applied) if applied else 'already'} at {head()}")


def db_current_command(db_url: str = typer.Option(None, "--db-url", help=DB_URL_HELP)) -> None:
    """Print the records database's schema revision (`none`: never migrated) and whether it is this build's."""
    from lineguard.db import current, head

    found = _database_errors(current, _db_url(db_url))
    typer.echo(f"{found or 'none'}{' (head)' if found == head() else f' (this build needs {head()})'}")


def _database_errors(func, url: str):
    """Run `func(url)`; a database that cannot be reached or changed (or its folder made) exits 1 with one line."""
    from sqlalchemy.exc import SQLAlchemyError

    from lineguard.db import redact_url

    try:
        return func(url)
    except (SQLAlchemyError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]
        typer.echo(f"error: records database {redact_url(url)}: {reason}", err=True)
        raise typer.Exit(1) from None


def _user_errors() -> tuple[type[BaseException], ...]:
    from storage.artifacts import StorageError

    return (StorageError,)


def register(app: typer.Typer) -> None:
    """Add the storage room's commands to the `lineguard` app: stats, store, records, db upgrade/current."""
    from lineguard.cli import add_user_errors, cli_command

    add_user_errors(_user_errors)
    app.command("stats")(cli_command(stats_command))
    app.command("store")(cli_command(store_command))
    app.command("records")(cli_command(records_command))
    db = typer.Typer(help="The records database's schema: migrations (upgrade) and the revision (current).",
                     no_args_is_help=True)
    db.command("upgrade")(cli_command(db_upgrade_command))
    db.command("current")(cli_command(db_current_command))
    app.add_typer(db, name="db")
