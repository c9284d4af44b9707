"""Donor departures, reported to listeners outside the owning store's lock.

The planner's ``DonorStore`` and the ``KvTensorStore`` each tell the other when a donor leaves (the pipeline's one
donor lifetime, ``SemBlendPipeline.attach_kv_store``). Both record a departure while holding their own lock and
report it after releasing it, so a listener may call back into either store without deadlock.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

EvictionListener = Callable[[str, str, np.ndarray], None]  # (namespace_key, donor_id, token_ids)


class Departures:
    """Listeners plus the departures not yet reported to them. Thread-safe."""

    def __init__(self, owner: str) -> None:
        self._owner = owner  # names the store in log messages
        self._lock = threading.Lock()
        self._listeners: list[EvictionListener] = []
        self._pending: list[tuple[str, str, np.ndarray]] = []

    def add_listener(self, listener: EvictionListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def record(self, namespace_key: str, donor_id: str, token_ids: np.ndarray) -> None:
        """Note a departure (callable under the owner's lock); reported by the next :meth:`flush`."""
        with self._lock:
            self._pending.append((namespace_key, donor_id, token_ids))

    def flush(self) -> None:
        """Hand pending departures to every listener, in departure order. Call without holding the owner's lock.
        A listener's exception is logged, never raised: the store's own state is already consistent."""
        with self._lock:
            if not self._pending:
                return
            gone, self._pending = self._pending, []
            listeners = list(self._listeners)
        for ns_key, donor_id, token_ids in gone:
            for listener in listeners:
                try:
                    listener(ns_key, donor_id, token_ids)
                except Exception:
                    logger.warning("%s: eviction listener failed for %s", self._owner, donor_id, exc_info=True)


def reports_departures(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a store method, then report what it removed (``self._departures``) outside the store's lock."""
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:
            self._departures.flush()
    return wrapper
