"""What the scheduler and the worker of one connector share inside one process.

Why this exists. TensorRT-LLM gives the two sides one channel, scheduler -> workers (``build_connector_meta`` ->
``bind_connector_meta``); workers report back only request ids through ``get_finished``. SemBlend's scheduler must
know, *before* it credits a single token, that the donor's KV is in the worker's store and cannot be evicted until
the load ran (a synchronous load has no failure path back to prefill). TensorRT-LLM builds the scheduler on rank 0
only, next to rank 0's worker, in the same process and from the same ``llm_args`` object
(``py_executor_creator``: ``executor.submit(worker_cls, llm_args)`` and ``executor.submit(scheduler_cls,
llm_args)``), so the two sides meet here, keyed by that object. Materializing modes run with one rank only
(``_config.check_materializing``), so rank 0's store is the only store.

Lifecycle::

    worker:    bind_worker(store) | worker_unusable(reason)      # register_kv_caches
    scheduler: pin(req, ns, donor) -> DonorKv | None              # get_num_new_matched_tokens, before crediting
    worker:    report_loaded(req, n) / report_load_failed(req); unpin(req)     # start_load_kv
    worker:    report_captured(ns, donor) / report_evicted(...)   # wait_for_save
    scheduler: take_reports()                                     # build_connector_meta, request_finished
    scheduler: unpin(req)                                         # request_finished (idempotent)

A pin is a lease on the store entry (``KvTensorStore.lease``): while held, the entry is never demoted, dropped or
moved. Thread-safe (one lock); nothing here touches a tensor.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["Reports", "SharedState", "release_shared_state", "shared_state_for"]


@dataclass
class Reports:
    """Worker results since the last :meth:`SharedState.take_reports`."""

    loaded: list[tuple[str, int]] = field(default_factory=list)
    load_failed: list[str] = field(default_factory=list)
    captured: list[tuple[str, str, int]] = field(default_factory=list)  # (namespace key, donor id, tokens)
    evicted: list[tuple[str, str]] = field(default_factory=list)


class SharedState:
    """The rendezvous of one connector's two sides (see the module docstring)."""

    NOT_REGISTERED = "worker_not_registered"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.store: Any = None
        self.unusable_reason: str | None = self.NOT_REGISTERED
        self._pins: dict[str, tuple[contextlib.ExitStack, Any]] = {}
        self._reports = Reports()

    # ------------------------------------------------------------------ worker registration
    def bind_worker(self, store: Any) -> None:
        with self._lock:
            self.store = store
            self.unusable_reason = None

    def worker_unusable(self, reason: str) -> None:
        """The worker cannot materialize (layout, dtype...): every load is declined with ``reason``."""
        with self._lock:
            self.unusable_reason = reason

    # ------------------------------------------------------------------ pins
    def pin(self, req_id: str, ns_key: str, donor_id: str) -> Any | None:
        """Lease the donor's KV for ``req_id`` (one pin per request; a second call returns the held entry).

        Returns the :class:`~semblend_core.kv_tensor_store.DonorKv` or None when the worker is unusable or the
        donor is not resident.
        """
        from semblend_core.kv_tensor_store import DonorKvMissingError

        with self._lock:
            if self.unusable_reason is not None or self.store is None:
                return None
            held = self._pins.get(req_id)
            if held is not None:
                self.unpin(req_id)
            stack = contextlib.ExitStack()
            try:
                donor = stack.enter_context(self.store.lease(ns_key, donor_id, promote=False))
            except DonorKvMissingError:
                return None
            self._pins[req_id] = (stack, donor)
            return donor

    def pinned(self, req_id: str) -> Any | None:
        """The ``DonorKv`` leased for ``req_id`` (valid until :meth:`unpin`), or None."""
        with self._lock:
            held = self._pins.get(req_id)
            return None if held is None else held[1]

    def unpin(self, req_id: str) -> None:
        with self._lock:
            held = self._pins.pop(req_id, None)
        if held is not None:
            held[0].close()

    def num_pins(self) -> int:
        with self._lock:
            return len(self._pins)

    # ------------------------------------------------------------------ worker reports
    def report_loaded(self, req_id: str, num_tokens: int) -> None:
        with self._lock:
            self._reports.loaded.append((req_id, int(num_tokens)))

    def report_load_failed(self, req_id: str) -> None:
        with self._lock:
            self._reports.load_failed.append(req_id)

    def report_captured(self, ns_key: str, donor_id: str, num_tokens: int) -> None:
        with self._lock:
            self._reports.captured.append((ns_key, donor_id, int(num_tokens)))

    def report_evicted(self, keys: list[tuple[str, str]]) -> None:
        with self._lock:
            self._reports.evicted.extend(keys)

    def take_reports(self) -> Reports:
        with self._lock:
            out, self._reports = self._reports, Reports()
            return out

    def resident(self, ns_key: str, donor_id: str) -> bool:
        with self._lock:
            return self.store is not None and bool(self.store.contains(ns_key, donor_id))


# ------------------------------------------------------------------------------------------- per-process registry
# id(llm_args) -> (llm_args, state). The strong reference keeps the id from being reused while the entry lives;
# one small entry per LLM instance built in this process.
_REGISTRY: dict[int, tuple[Any, SharedState]] = {}
_REGISTRY_LOCK = threading.Lock()


def shared_state_for(llm_args: Any) -> SharedState:
    """The :class:`SharedState` of the connector built from ``llm_args`` (created on first use)."""
    with _REGISTRY_LOCK:
        entry = _REGISTRY.get(id(llm_args))
        if entry is None or entry[0] is not llm_args:
            entry = (llm_args, SharedState())
            _REGISTRY[id(llm_args)] = entry
        return entry[1]


def release_shared_state(llm_args: Any) -> None:
    with _REGISTRY_LOCK:
        entry = _REGISTRY.get(id(llm_args))
        if entry is not None and entry[0] is llm_args:
            del _REGISTRY[id(llm_args)]
