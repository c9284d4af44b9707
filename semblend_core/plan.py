"""``SemanticKvPlan``: what the core hands an adapter. Frozen; adapters never re-run alignment.

Vocabulary
----------
* A **span** ``Span(donor_start, target_start, length)`` says donor tokens ``[donor_start, donor_start+length)``
  equal target tokens ``[target_start, target_start+length)``. Its KV can be moved by ``delta = target_start -
  donor_start`` positions with RoPE re-rotation. Spans never overlap in the target.
* A span is **context-exact** when ``donor_start == target_start == 0``: its KV is bit-for-bit what a cold prefill
  would compute. Every other span start is a **seam**: the reused tokens saw a different context in the donor, so
  the first tokens after each seam and a budget of deviation-selected tokens are recomputed.
* A **fuzzy span** marks a near-identical (not identical) region. It is evidence only: its differing tokens are
  always in ``recompute_positions`` and it is never materialized as exact KV. Fuzzy spans refer to the main donor.
* **Multi-donor plans**: every span names its donor (``Span.donor_id``; ``None`` in a hand-built span means the
  plan's ``donor_id``, see :meth:`SemanticKvPlan.donor_of`). ``donor_id`` is the *main* donor (the one that covers
  the most on its own); further donors fill target regions it leaves uncovered, so their spans come from other KV
  entries, each with its own ``delta``. A span whose donor differs from its left neighbour's is a seam like any other.

Outcomes (telemetry) are decided later: the core reports a planned hit; only an adapter that actually loaded KV
may record ``materialized`` (rule 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from semblend_core.namespace import CacheNamespace


class Outcome:
    """Telemetry outcomes, one per request."""

    EXACT = "exact"                  # the engine's own exact prefix cache covers the prompt; no semantic work
    DISCOVERY_ONLY = "discovery_only"  # a hit was planned but the deployment only records evidence
    MATERIALIZED = "materialized"    # the backend loaded donor KV (reported by the adapter)
    DECLINED = "declined"            # a candidate or request existed but a gate or a check refused it
    COLD = "cold"                    # no candidate donor: normal prefill
    ALL = (EXACT, DISCOVERY_ONLY, MATERIALIZED, DECLINED, COLD)


class Reason:
    """Reasons a plan gives. Stable strings: dashboards and tests key on them."""

    HIT = "hit"
    DISABLED = "disabled"
    EMPTY_PROMPT = "empty_prompt"
    BELOW_MIN_PROMPT_TOKENS = "below_min_prompt_tokens"
    PROMPT_TOO_LONG = "prompt_too_long"
    INVALID_TOKENS = "invalid_tokens"
    INVALID_INPUT = "invalid_input"  # text, namespace or engine_prefix_tokens of the wrong type or value
    EXACT_PREFIX_SUFFICIENT = "exact_prefix_sufficient"
    NO_CANDIDATE = "no_candidate"
    BELOW_MIN_SIMILARITY = "below_min_similarity"
    BELOW_MIN_REUSE_RATIO = "below_min_reuse_ratio"
    NO_GAIN_OVER_EXACT_PREFIX = "no_gain_over_exact_prefix"
    NOT_CONTEXT_EXACT = "not_context_exact"
    INVALID_EMBEDDING = "invalid_embedding"
    NAMESPACE = "namespace"
    ROPE_NOT_SHIFT_INVARIANT = "rope_not_shift_invariant"
    INTERNAL_ERROR = "internal_error"
    DONOR_KV_MISMATCH = "donor_kv_mismatch"  # adapter: the KV entry's tokens differ from the plan's on a span
    MOVED_FIRST_BLOCK = "moved_first_block"  # adapter: the prompt's first tokens would get moved KV (SINK_TOKENS)


@dataclass(frozen=True, order=True)
class Span:
    """Donor tokens ``[donor_start, donor_start+length)`` == target tokens ``[target_start, target_start+length)``.

    ``donor_id`` names the donor the tokens come from (``None``: the plan's main donor). It is the last field, so
    ``Span(d, t, n)`` keeps working and ordering is by ``(donor_start, target_start, length)`` first; the spans of
    one plan never tie on those (they are disjoint in the target), so the donor never decides their order.
    """

    donor_start: int
    target_start: int
    length: int
    donor_id: str | None = None

    @property
    def delta(self) -> int:
        """RoPE position shift to apply to the donor KV: ``target_start - donor_start``."""
        return self.target_start - self.donor_start

    @property
    def target_end(self) -> int:
        return self.target_start + self.length

    @property
    def donor_end(self) -> int:
        return self.donor_start + self.length

    @property
    def context_exact(self) -> bool:
        """True when the span is a shared prefix at position 0: its KV equals a cold prefill's."""
        return self.donor_start == 0 and self.target_start == 0


@dataclass(frozen=True)
class FuzzySpan:
    """A near-identical region: donor ``[donor_start, donor_end)`` ~ target ``[target_start, target_end)``."""

    donor_start: int
    donor_end: int
    target_start: int
    target_end: int
    ratio: float  # rapidfuzz Indel normalized similarity in [0, 1]


@dataclass(frozen=True)
class PlanTimings:
    """Seconds spent per stage of ``SemBlendPipeline.plan``."""

    discovery_s: float = 0.0
    embedding_s: float = 0.0
    alignment_s: float = 0.0
    total_s: float = 0.0
    multi_donor_s: float = 0.0  # part of alignment_s: finding and aligning further donors for uncovered regions


# A prefix-only adapter must leave the prompt's first tokens context-exact (the engine's own, or the donor's at
# delta 0) unless the deployment opts in: they are the model's attention sinks, and moved KV there makes answers
# diverge (SmolLM2 in real vLLM: teacher-forced top-1 0.60 vs cold; 0.955 once the first 16 tokens are exact,
# benchmarks/results/vllm_quality_h200.json and vllm_quality_cpu_reference.json).
SINK_TOKENS = 16


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint half-open ranges covering the non-empty ``ranges``."""
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in ranges if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _ranges_to_positions(ranges: tuple[tuple[int, int], ...]) -> np.ndarray:
    if not ranges:
        out = np.zeros(0, dtype=np.int64)
    else:
        out = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class SemanticKvPlan:
    """Everything an adapter needs to reuse donor KV for one prompt. Immutable.

    ``recompute_ranges`` are half-open target ranges ``(start, stop)`` that must be computed fresh: positions no span
    covers, the first ``seam_recompute_tokens`` of every seam, fuzzy regions, and (always) the last prompt token so
    the engine produces fresh logits. ``layer_recompute[i]`` is the fraction of *reused* tokens to refresh at layer
    ``i`` (bathtub policy) on top of those; empty when the model's layer count is unknown.

    ``donor_id`` / ``donor_len`` / ``similarity``: the main donor and, for a multi-donor plan, the similarity of
    the union (covered target fraction, or the main donor's overlap if higher). ``donor_ids`` lists every donor the
    spans use, in target order of first use.

    One nuance: seam heads are KV that *can* be reused (the tokens match; only their left context differed), so
    :func:`semblend_core.recompute.select_recompute` counts them against an explicit budget and may drop some when
    the budget is tight; uncovered, fuzzy and suffix positions are never dropped. The transformers engine refreshes
    every seam head the plan lists.
    """

    is_hit: bool
    reason: str
    target_len: int
    namespace: CacheNamespace
    donor_id: str | None = None
    donor_len: int = 0
    similarity: float = 0.0
    spans: tuple[Span, ...] = ()
    fuzzy_spans: tuple[FuzzySpan, ...] = ()
    recompute_ranges: tuple[tuple[int, int], ...] = ()
    layer_recompute: tuple[float, ...] = ()
    recompute_budget: float = 0.0
    discovery: str = ""  # "anchors" | "embedding" | "" : which path found the donor
    strict_prefix_boundary: bool = True
    engine_prefix_tokens: int = 0
    timings: PlanTimings = field(default_factory=PlanTimings)
    details: tuple[tuple[str, Any], ...] = ()

    # ------------------------------------------------------------------ derived views
    def donor_of(self, span: Span) -> str | None:
        """The donor whose KV ``span`` reads: its own ``donor_id``, else the plan's main donor."""
        return span.donor_id if span.donor_id is not None else self.donor_id

    @property
    def donor_ids(self) -> tuple[str, ...]:
        """Donors the spans use, in target order of first use (empty without spans)."""
        return tuple(dict.fromkeys(d for d in (self.donor_of(s) for s in self.spans) if d is not None))

    @property
    def multi_donor(self) -> bool:
        return len(self.donor_ids) > 1

    def spans_of(self, donor_id: str) -> tuple[Span, ...]:
        """The spans read from ``donor_id`` (target order)."""
        return tuple(s for s in self.spans if self.donor_of(s) == donor_id)

    @property
    def reused_tokens(self) -> int:
        return sum(s.length for s in self.spans)

    @property
    def reuse_ratio(self) -> float:
        """Fraction of target tokens covered by exact spans (before seam recompute)."""
        return self.reused_tokens / self.target_len if self.target_len else 0.0

    @property
    def position_deltas(self) -> tuple[int, ...]:
        """RoPE shift per span, in ``spans`` order."""
        return tuple(s.delta for s in self.spans)

    @property
    def seams(self) -> tuple[int, ...]:
        """Target positions where a reused span starts without an identical context."""
        return tuple(s.target_start for s in self.spans if not s.context_exact)

    @property
    def recompute_positions(self) -> np.ndarray:
        """Read-only int64 array of target positions to compute fresh (sorted, unique)."""
        return _ranges_to_positions(self.recompute_ranges)

    @property
    def recomputed_fraction(self) -> float:
        return sum(b - a for a, b in self.recompute_ranges) / self.target_len if self.target_len else 0.0

    def prefix_reusable_tokens(self, block_size: int) -> int:
        """Tokens an engine that can only skip a *prefix* may load from the donor, floored to ``block_size``.

        Counts the contiguous run of exact spans from target position 0. With ``strict_prefix_boundary`` it stops
        at the first seam after position 0 (one donor region, one RoPE delta); otherwise it runs across seams while
        coverage is contiguous. Either way it stops where the donor changes: a prefix is loaded from one donor's
        KV entry, the donor of ``spans[0]`` (``donor_of(spans[0])``, not necessarily the main donor). Never
        includes the last prompt token (the engine must compute fresh logits) and never includes a fuzzy region.
        Returns 0 for a miss.
        """
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if not self.is_hit or not self.spans:
            return 0
        covered = 0
        first_donor = self.donor_of(self.spans[0])
        for i, span in enumerate(self.spans):
            if span.target_start != covered:
                break
            if i > 0 and (self.strict_prefix_boundary or self.donor_of(span) != first_donor):
                break
            covered = span.target_end
        covered = min(covered, self.target_len - 1)
        return max(0, (covered // block_size) * block_size)

    def moves_sink_tokens(self, engine_prefix_tokens: int, sink_tokens: int = SINK_TOKENS) -> bool:
        """True when reusing this plan's prefix would put KV from elsewhere in a donor into the prompt's first
        ``sink_tokens`` positions: the first span is not context-exact and the engine's own exact prefix covers
        fewer than ``sink_tokens``. Adapters then decline with ``Reason.MOVED_FIRST_BLOCK`` (see SINK_TOKENS)."""
        return bool(self.spans) and not self.spans[0].context_exact and engine_prefix_tokens < sink_tokens

    def with_sink_recompute(self, engine_prefix_tokens: int, end: int, sink_tokens: int = SINK_TOKENS
                            ) -> SemanticKvPlan:
        """This plan with target ``[max(engine_prefix_tokens, exact_end), min(sink_tokens, end))`` added to its
        mandatory recompute ranges, where ``exact_end`` is the end of a context-exact first span (0 without one).
        For engines that recompute instead of declining (:meth:`moves_sink_tokens`): the first tokens are the
        model's attention sinks, and moved KV there makes answers diverge; recomputed at every layer over a context
        that is itself exact or recomputed, they are a cold prefill's KV. Pure; the plan itself when nothing moves."""
        first = min(self.spans, key=lambda sp: sp.target_start) if self.spans else None
        exact_end = first.target_end if first is not None and first.context_exact else 0
        lo, hi = max(int(engine_prefix_tokens), exact_end), min(int(sink_tokens), int(end))
        if lo >= hi:
            return self
        return dataclasses.replace(self, recompute_ranges=_merge_ranges((*self.recompute_ranges, (lo, hi))))

    def detail(self, key: str, default: Any = None) -> Any:
        for k, v in self.details:
            if k == key:
                return v
        return default

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (for ``semblend plan --json`` and logs)."""
        return {
            "is_hit": self.is_hit,
            "reason": self.reason,
            "donor_id": self.donor_id,
            "donor_ids": list(self.donor_ids),
            "similarity": round(float(self.similarity), 6),
            "reuse_ratio": round(self.reuse_ratio, 6),
            "target_len": self.target_len,
            "donor_len": self.donor_len,
            "discovery": self.discovery,
            "spans": [
                {"donor_id": self.donor_of(s), "donor_start": s.donor_start, "target_start": s.target_start,
                 "length": s.length, "delta": s.delta}
                for s in self.spans
            ],
            "fuzzy_spans": [
                {"donor": [f.donor_start, f.donor_end], "target": [f.target_start, f.target_end],
                 "ratio": round(f.ratio, 4)} for f in self.fuzzy_spans
            ],
            "recompute_ranges": [list(r) for r in self.recompute_ranges],
            "recomputed_fraction": round(self.recomputed_fraction, 6),
            "layer_recompute": list(self.layer_recompute),
            "namespace": self.namespace.key,
            "timings_ms": {k.removesuffix("_s"): round(v * 1e3, 4) for k, v in self.timings.__dict__.items()},
            "details": {k: v for k, v in self.details},
        }


def verify_donor_tokens(span: Span, entry_tokens: Any, target_tokens: Any) -> bool:
    """True when a donor KV entry holds the tokens ``span`` maps: ``entry_tokens[donor_start:donor_end] ==
    target_tokens[target_start:target_end]`` (and both ranges exist).

    Adapters call it for every span just before loading the span's KV (``entry_tokens``: the token ids stored
    with that donor's KV entry; ``target_tokens``: the prompt). Spans are token-equal by construction, so a
    False means the entry under the plan's donor id is not the donor the planner aligned (an id reused by
    another request, a store out of step): the adapter must decline with ``Reason.DONOR_KV_MISMATCH``, never
    load it. Because K/V at position ``p`` depend only on tokens ``<= p``, a context-exact span that passes is
    exactly a cold prefill's KV. Cost: one comparison of ``span.length`` ids. Pure.
    """
    entry = np.asarray(entry_tokens)
    target = np.asarray(target_tokens)
    if span.length <= 0 or span.donor_start < 0 or span.target_start < 0:
        return False
    if span.donor_end > entry.shape[0] or span.target_end > target.shape[0]:
        return False
    return bool(np.array_equal(entry[span.donor_start:span.donor_end], target[span.target_start:span.target_end]))
