"""structlog set-up: pretty key-value lines on a terminal, JSON lines otherwise.

    >>> from lineguard.logging import get_logger
    >>> get_logger("ingest").info("frame_published", frame_id="cam-0-000001", camera_id="cam-0")
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure(level: str | None = None, json: bool | None = None) -> None:
    """Configure structlog once; JSON unless stderr is a TTY (override with LINEGUARD_LOG_JSON=0/1)."""
    global _configured
    level_name = (level or os.environ.get("LINEGUARD_LOG_LEVEL", "INFO")).upper()
    if json is None:
        forced = os.environ.get("LINEGUARD_LOG_JSON")
        json = (forced == "1") if forced in {"0", "1"} else not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # third-party libraries (aiokafka) log through stdlib logging: keep them quiet and on stderr
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    _configured = True


def get_logger(name: str | None = None, **initial):
    if not _configured:
        configure()
    return structlog.get_logger(name, **initial)
