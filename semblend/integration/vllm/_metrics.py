"""Connector metrics: outcome counters and timings, shipped through vLLM's connector stats hooks.

vLLM collects ``get_kv_connector_stats()`` from the scheduler and the workers every step, aggregates them in the
front-end process and hands the dict to the connector's ``build_prom_metrics`` object there, so counters reach the
API server's ``/metrics`` without a second Prometheus registry in the engine process. This module is the engine-free
half: a window of observations that serialises to a plain dict, merges with another, and reduces to a summary.

Dict schema (``ConnectorStats.to_dict``)::

    {"outcomes": {"materialized|declined|...:reason": count}, "credited_tokens": int, "loaded_tokens": int,
     "would_credit_tokens": int, "would_credit": [int], "plan_s": [float], "load_s": [float], "save_s": [float],
     "blend_reused_tokens": int, "blend_recomputed_tokens": int, "blend_hits": [[reused, recomputed]]}

Keys added later default to empty, so a payload from an older release still parses.

``would_credit``: in ``discovery_only`` mode, per planned request, the tokens ``prefix`` mode would have credited
(before donor residency, which discovery never has): what enabling ``prefix`` could save.

``blend_*``: in ``blend`` mode, per materialized hit, the tokens whose donor KV the executor kept (``reused``) and
those it computed fresh (``recomputed``: uncovered, sink, seam and selected tokens, averaged over layers), as the
workers reported them; ``loaded_tokens`` counts the reused ones (rule 2), ``credited_tokens`` both.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

_MAX_SAMPLES = 4096  # per window; older samples are dropped (a window is one logging interval)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


class ConnectorStats:
    """Observations since the last :meth:`take`. Not thread-safe (each side records on its own thread)."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        data = data or {}
        self.outcomes: Counter[str] = Counter(data.get("outcomes", {}))
        self.credited_tokens = int(data.get("credited_tokens", 0))
        self.loaded_tokens = int(data.get("loaded_tokens", 0))
        self.would_credit_tokens = int(data.get("would_credit_tokens", 0))
        self.would_credit_samples: list[int] = list(data.get("would_credit", ()))
        self.plan_s: list[float] = list(data.get("plan_s", ()))
        self.load_s: list[float] = list(data.get("load_s", ()))
        self.save_s: list[float] = list(data.get("save_s", ()))
        self.blend_reused_tokens = int(data.get("blend_reused_tokens", 0))
        self.blend_recomputed_tokens = int(data.get("blend_recomputed_tokens", 0))
        self.blend_hits: list[tuple[int, int]] = [(int(a), int(b)) for a, b in data.get("blend_hits", ())]

    # recording
    def outcome(self, outcome: str, reason: str, loaded_tokens: int = 0) -> None:
        self.outcomes[f"{outcome}:{reason}"] += 1

    def credited(self, tokens: int) -> None:
        self.credited_tokens += int(tokens)

    def loaded(self, tokens: int) -> None:
        self.loaded_tokens += int(tokens)

    def would_credit(self, tokens: int) -> None:
        self.would_credit_tokens += int(tokens)
        if len(self.would_credit_samples) < _MAX_SAMPLES:
            self.would_credit_samples.append(int(tokens))

    def blended(self, reused: int, recomputed: int) -> None:
        """One materialized blend hit: tokens reused from donors vs computed fresh."""
        self.blend_reused_tokens += int(reused)
        self.blend_recomputed_tokens += int(recomputed)
        if len(self.blend_hits) < _MAX_SAMPLES:
            self.blend_hits.append((int(reused), int(recomputed)))

    def _sample(self, values: list[float], seconds: float) -> None:
        if len(values) < _MAX_SAMPLES:
            values.append(float(seconds))

    def plan_time(self, seconds: float) -> None:
        self._sample(self.plan_s, seconds)

    def load_time(self, seconds: float) -> None:
        self._sample(self.load_s, seconds)

    def save_time(self, seconds: float) -> None:
        self._sample(self.save_s, seconds)

    # window
    def is_empty(self) -> bool:
        return not (self.outcomes or self.credited_tokens or self.loaded_tokens or self.plan_s or self.load_s
                    or self.save_s or self.would_credit_samples or self.blend_hits)

    def to_dict(self) -> dict[str, Any]:
        return {"outcomes": dict(self.outcomes), "credited_tokens": self.credited_tokens,
                "loaded_tokens": self.loaded_tokens, "would_credit_tokens": self.would_credit_tokens,
                "would_credit": list(self.would_credit_samples), "plan_s": list(self.plan_s), "load_s": list(self.load_s),
                "save_s": list(self.save_s), "blend_reused_tokens": self.blend_reused_tokens,
                "blend_recomputed_tokens": self.blend_recomputed_tokens,
                "blend_hits": [list(h) for h in self.blend_hits]}

    def take(self) -> dict[str, Any] | None:
        """The window as a dict, and a fresh window; ``None`` when nothing was observed."""
        if self.is_empty():
            return None
        out = self.to_dict()
        self.__init__()  # type: ignore[misc]
        return out

    def merge(self, other: ConnectorStats) -> ConnectorStats:
        merged = ConnectorStats(self.to_dict())
        merged.outcomes.update(other.outcomes)
        merged.credited_tokens += other.credited_tokens
        merged.loaded_tokens += other.loaded_tokens
        merged.would_credit_tokens += other.would_credit_tokens
        merged.would_credit_samples.extend(
            other.would_credit_samples[: max(0, _MAX_SAMPLES - len(merged.would_credit_samples))])
        merged.blend_reused_tokens += other.blend_reused_tokens
        merged.blend_recomputed_tokens += other.blend_recomputed_tokens
        merged.blend_hits.extend(other.blend_hits[: max(0, _MAX_SAMPLES - len(merged.blend_hits))])
        for mine, theirs in ((merged.plan_s, other.plan_s), (merged.load_s, other.load_s),
                             (merged.save_s, other.save_s)):
            mine.extend(theirs[: max(0, _MAX_SAMPLES - len(mine))])
        return merged

    def reduce(self) -> dict[str, int | float]:
        """Summary for vLLM's periodic log line."""
        out: dict[str, int | float] = {}
        by_outcome: Counter[str] = Counter()
        for key, n in self.outcomes.items():
            by_outcome[key.split(":", 1)[0]] += n
        for outcome, n in sorted(by_outcome.items()):
            out[f"semblend_{outcome}"] = n
        out["semblend_loaded_tokens"] = self.loaded_tokens
        if self.would_credit_samples:
            out["semblend_would_credit_tokens"] = self.would_credit_tokens
        if self.blend_hits:
            out["semblend_blend_reused_tokens"] = self.blend_reused_tokens
            out["semblend_blend_recomputed_tokens"] = self.blend_recomputed_tokens
        if self.plan_s:
            out["semblend_plan_p50_ms"] = round(_percentile(self.plan_s, 0.5) * 1e3, 3)
            out["semblend_plan_p99_ms"] = round(_percentile(self.plan_s, 0.99) * 1e3, 3)
        if self.load_s:
            out["semblend_load_p50_ms"] = round(_percentile(self.load_s, 0.5) * 1e3, 3)
        return out
