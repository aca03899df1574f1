"""Structured logging with structlog: readable on a terminal, one JSON object per line otherwise.

Every stored, forwarded or failed instance is one event with its IDs, so a log shipper can answer "where did
this image go" without parsing prose.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def setup(level: str = "info", json: bool | None = None, stream: Any = None) -> None:
    """Configure structlog once per process (JSON lines unless ``stream`` is a TTY)."""
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    # pynetdicom logs every PDU at INFO through the stdlib; keep only its warnings and errors.
    logging.basicConfig(level=logging.WARNING, stream=stream, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level.lower() != "debug" else logging.DEBUG)
    # A pixel decoder that cannot read an image logs a traceback per plugin; our own event says why it failed.
    logging.getLogger("pydicom.pixels").setLevel(logging.CRITICAL if level.lower() != "debug" else logging.DEBUG)


def get(name: str = "dicom-node") -> Any:
    """A bound structlog logger."""
    return structlog.get_logger(name)
