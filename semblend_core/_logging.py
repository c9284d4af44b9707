"""Library logging helpers: never configure handlers, never print."""

from __future__ import annotations

import logging
import threading

_seen: set[tuple[str, str]] = set()
_seen_lock = threading.Lock()


def warning_once(logger: logging.Logger, msg: str, *args: object) -> None:
    """Log ``msg % args`` at WARNING the first time this (logger, msg) pair is seen; for hot paths."""
    key = (logger.name, msg)
    with _seen_lock:
        if key in _seen:
            return
        _seen.add(key)
    logger.warning(msg, *args)
