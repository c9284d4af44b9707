"""``SemanticKvPlan.with_sink_recompute``: the attention-sink rule for engines that recompute (vLLM blend mode)."""

from __future__ import annotations

from semblend_core import CacheNamespace
from semblend_core.plan import SINK_TOKENS, SemanticKvPlan, Span

NS = CacheNamespace(model="m")


def plan(spans, ranges=()):
    return SemanticKvPlan(True, "hit", 200, NS, donor_id="d", spans=tuple(spans), recompute_ranges=tuple(ranges))


def test_moved_first_tokens_become_mandatory_and_ranges_stay_merged():
    p = plan([Span(30, 0, 100, "d")], [(0, 4), (100, 200)])  # moved first span: seam heads [0, 4)
    out = p.with_sink_recompute(0, 160)
    assert out.recompute_ranges == ((0, SINK_TOKENS), (100, 200))
    assert out.spans == p.spans and p.recompute_ranges == ((0, 4), (100, 200))  # pure: p unchanged


def test_a_context_exact_first_span_needs_nothing():
    p = plan([Span(0, 0, 100, "d")], [(100, 200)])
    assert p.with_sink_recompute(0, 160) is p


def test_only_what_the_engine_does_not_already_hold_and_only_below_the_end():
    p = plan([Span(50, 20, 100, "d")], [(0, 24), (120, 200)])  # uncovered [0, 20), seam heads [20, 24)
    assert p.with_sink_recompute(SINK_TOKENS, 160) is p          # the engine's exact hit covers the sinks
    assert p.with_sink_recompute(8, 160).recompute_ranges == ((0, 24), (120, 200))
    q = plan([Span(50, 0, 100, "d")], [(100, 200)])
    assert q.with_sink_recompute(8, 160).recompute_ranges == ((8, SINK_TOKENS), (100, 200))
    assert q.with_sink_recompute(0, 10).recompute_ranges == ((0, 10), (100, 200))
