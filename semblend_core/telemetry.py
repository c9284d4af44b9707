"""Telemetry: counters per outcome and reason, plan latency quantiles, optional Prometheus export.

Accounting rule (README, "Outcomes"): the core counts a *planned* hit as evidence only. ``materialized`` and the
loaded-token total are recorded only when an adapter reports KV the backend actually loaded (rule 2).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

import numpy as np

from semblend_core.plan import Outcome


class Telemetry:
    """Thread-safe counters. ``snapshot()`` returns plain dicts (JSON-able)."""

    def __init__(self, latency_window: int = 4096) -> None:
        self._lock = threading.Lock()
        self.outcomes: Counter[str] = Counter({o: 0 for o in Outcome.ALL})
        self.reasons: Counter[str] = Counter()
        self.planned_hits = 0
        self.loaded_tokens = 0
        self.prompt_tokens = 0
        self._latency = deque(maxlen=latency_window)
        self._listeners: list[Any] = []

    def add_listener(self, listener: Any) -> None:
        """``listener(outcome, reason, loaded_tokens)`` is called after every record (e.g. a Prometheus exporter)."""
        with self._lock:
            self._listeners.append(listener)

    def record_plan(self, is_hit: bool, latency_s: float, prompt_tokens: int) -> None:
        with self._lock:
            self.planned_hits += int(is_hit)
            self.prompt_tokens += prompt_tokens
            self._latency.append(latency_s)

    def record(self, outcome: str, reason: str, loaded_tokens: int = 0) -> None:
        if outcome not in Outcome.ALL:
            raise ValueError(f"unknown outcome {outcome!r}; allowed: {', '.join(Outcome.ALL)}")
        with self._lock:
            self.outcomes[outcome] += 1
            self.reasons[reason] += 1
            self.loaded_tokens += int(loaded_tokens)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(outcome, reason, loaded_tokens)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = np.fromiter(self._latency, dtype=np.float64) if self._latency else None
            return {
                "outcomes": dict(self.outcomes),
                "reasons": dict(self.reasons),
                "planned_hits": self.planned_hits,
                "loaded_tokens": self.loaded_tokens,
                "prompt_tokens": self.prompt_tokens,
                "plan_latency_ms": {} if lat is None else {
                    "p50": float(np.percentile(lat, 50) * 1e3),
                    "p99": float(np.percentile(lat, 99) * 1e3),
                    "count": int(lat.shape[0]),
                },
            }


class PrometheusExporter:
    """Mirrors a ``Telemetry`` into prometheus_client counters (extra ``metrics``).

    Metrics: ``semblend_requests_total{outcome,reason}`` and ``semblend_loaded_tokens_total``. Pass a
    ``registry`` to keep them out of the global default registry (tests, several pipelines per process).
    """

    def __init__(self, telemetry: Telemetry, registry: Any = None, prefix: str = "semblend") -> None:
        from semblend_core._compat import require

        prom = require("prometheus_client", extra="metrics")
        kwargs = {"registry": registry} if registry is not None else {}
        self.requests = prom.Counter(f"{prefix}_requests", "Requests by SemBlend outcome and reason",
                                     ["outcome", "reason"], **kwargs)
        self.loaded = prom.Counter(f"{prefix}_loaded_tokens", "Prompt tokens served from donor KV", **kwargs)
        telemetry.add_listener(self._on_record)

    def _on_record(self, outcome: str, reason: str, loaded_tokens: int) -> None:
        self.requests.labels(outcome=outcome, reason=reason).inc()
        if loaded_tokens:
            self.loaded.inc(loaded_tokens)
