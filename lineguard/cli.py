"""Plumbing shared by the rooms' commands; no commands live here.

Each room owns its commands (`ingest/cli.py`, `inference/cli.py`, ... each with `register(app, bench)`), and
`deploy/app.py` assembles them into the `lineguard` command. This module imports no room: the rooms hand it
their user-fixable exception classes with `add_user_errors`.

Errors that a user can fix (a bad setting, a missing path, an unreachable broker) print one
line, `error: ...`, and exit non-zero; they never dump a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import signal
from collections.abc import Callable

import typer

EXIT_ERROR = 1
EXIT_CONFIG = 2

# Functions that import and return a room's user-fixable exception classes; they run only when a command fails,
# so `--help` imports none of the rooms' modules.
_USER_ERROR_LOADERS: list[Callable[[], tuple[type[BaseException], ...]]] = []


def add_user_errors(load: Callable[[], tuple[type[BaseException], ...]]) -> None:
    """Have `cli_command` print the exceptions `load()` returns as one `error: ...` line (exit 1)."""
    if load not in _USER_ERROR_LOADERS:
        _USER_ERROR_LOADERS.append(load)


def _user_errors() -> tuple[type[BaseException], ...]:
    from lineguard.kafka import KafkaUnavailable

    found: list[type[BaseException]] = [KafkaUnavailable]
    for load in _USER_ERROR_LOADERS:
        found.extend(load())
    return tuple(found)


def cli_command(func):
    """Turn the errors a user can act on into one line on stderr and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from lineguard.settings import ConfigError

        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_CONFIG) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except Exception as exc:
            if isinstance(exc, _user_errors()):
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(EXIT_ERROR) from None
            raise

    return wrapper


def cli_settings(**overrides):
    """Configure logging and load the settings; options left as None do not override the environment."""
    from lineguard.logging import configure
    from lineguard.settings import load_settings

    configure()
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM and SIGHUP (a closed terminal) stop a long-running command the same clean way Ctrl-C does.
    A second one while it cleans up is ignored, so the clean-up finishes."""

    def handler(signum, frame):
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {stop_signal: signal.signal(stop_signal, handler) for stop_signal in STOP_SIGNALS}
    try:
        yield
    finally:
        for stop_signal, action in previous.items():
            signal.signal(stop_signal, action)
