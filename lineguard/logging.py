"""structlog set-up: pretty key-value lines on a terminal, JSON lines otherwise, for our events and for
what third-party libraries log through the standard `logging` module alike.

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
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # third-party libraries (aiokafka) log through stdlib logging: keep them quiet, on stderr, and rendered
    # like our own events (JSON lines when not on a terminal)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "lineguard", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.lineguard = True
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.stdlib.add_log_level, timestamper],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    _configured = True


def get_logger(name: str | None = None, **initial):
    if not _configured:
        configure()
    return structlog.get_logger(name, **initial)
