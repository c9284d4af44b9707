"""Multi-donor plans: spans from several donors fill what the best donor leaves uncovered (RAG prompts).

Token ids are synthetic "passages" (random runs); real text is in ``benchmarks/rag.py``.
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from semblend_core import ConfigError, Reason, SemBlendConfig, SemBlendPipeline, Span
from semblend_core.pipeline import recompute_ranges


def passage(i, n=120):
    return np.random.default_rng(1000 + i).integers(1000, 50000, n)


HEADER = np.random.default_rng(7).integers(50000, 60000, 40)


def question(seed, n=14):
    return np.random.default_rng(10**6 + seed).integers(60000, 70000, n)


def request(passages, seed):
    return np.concatenate([HEADER] + [passage(i) for i in passages] + [question(seed)])


def pipe(**kw):
    return SemBlendPipeline(SemBlendConfig(**{"min_prompt_tokens": 8, **kw}))


def check_invariants(p, plan, target):
    """Every invariant a multi-donor plan must keep (the property tests' oracle)."""
    m = len(target)
    assert plan.target_len == m
    if not plan.is_hit:
        assert plan.spans == () and plan.donor_ids == () and plan.recompute_ranges == ()
        return
    cover = np.zeros(m, dtype=int)
    for s in plan.spans:
        donor = p.store.lookup_id(plan.donor_of(s), plan.namespace.key)
        assert donor is not None, "every span's donor is registered"
        assert s.donor_id is not None, "pipeline spans name their donor"
        assert 0 <= s.donor_start and s.donor_end <= donor.tokens.shape[0], "span inside its own donor"
        assert 0 <= s.target_start and s.target_end <= m and s.length > 0
        assert np.array_equal(donor.tokens[s.donor_start:s.donor_end], target[s.target_start:s.target_end])
        cover[s.target_start:s.target_end] += 1
    assert cover.max(initial=0) <= 1, "spans never overlap in the target"
    assert 0.0 <= plan.reuse_ratio <= 1.0
    assert list(plan.spans) == sorted(plan.spans, key=lambda s: s.target_start)
    assert len(plan.donor_ids) <= p.config.max_donors_per_plan
    assert len(set(plan.donor_ids)) == len(plan.donor_ids)
    if plan.spans:
        assert plan.donor_ids[0] == plan.donor_of(plan.spans[0])
        assert plan.donor_id in plan.donor_ids  # the main donor always contributes
    rec = set(plan.recompute_positions.tolist())
    assert set(np.flatnonzero(cover == 0).tolist()) <= rec, "every uncovered position is recomputed"
    assert m - 1 in rec
    seam = p.config.seam_recompute_tokens
    for s in plan.spans:
        if not s.context_exact:
            assert s.target_start in plan.seams
            assert set(range(s.target_start, min(s.target_start + seam, s.target_end))) <= rec
    assert plan.recompute_ranges == recompute_ranges(plan.spans, m, seam)


def test_passages_from_three_donors_make_one_plan():
    p = pipe()
    p.register_donor("r0", request([0, 1, 9], 0))
    p.register_donor("r1", request([8, 2, 3], 1))
    p.register_donor("r2", request([4, 5, 6], 2))
    target = request([2, 0, 4, 1], 3)
    plan = p.plan(target)
    assert plan.is_hit and plan.multi_donor
    check_invariants(p, plan, target)
    assert plan.donor_id == "r0"  # header + passages 0 and 1: the most on its own
    assert set(plan.donor_ids) == {"r0", "r1", "r2"}
    assert plan.donor_ids == tuple(dict.fromkeys(plan.donor_of(s) for s in plan.spans))
    # Every passage is reused, each from the donor that has it; only the question is left.
    per = {d: sum(s.length for s in plan.spans_of(d)) for d in plan.donor_ids}
    assert per == {"r0": 40 + 240, "r1": 120, "r2": 120}
    assert plan.reuse_ratio == pytest.approx(520 / len(target))
    assert plan.similarity == pytest.approx(plan.reuse_ratio)  # union coverage beats r0's own overlap
    assert plan.detail("donor_lens") == {"r0": 414, "r1": 414, "r2": 414}
    assert plan.timings.multi_donor_s > 0
    d = plan.to_dict()
    assert d["donor_ids"] == list(plan.donor_ids)
    assert [s["donor_id"] for s in d["spans"]] == [plan.donor_of(s) for s in plan.spans]


def test_gates_apply_to_the_union_and_one_donor_is_todays_behaviour():
    donors = {"r0": request([0, 1, 9, 10], 0), "r1": request([8, 2, 3, 11], 1)}
    target = request([0, 1, 2, 3], 5)  # r0: header + 0 + 1; r1: 2 + 3 -> neither alone reaches 0.6
    single, multi = pipe(max_donors_per_plan=1), pipe()
    for p in (single, multi):
        for k, v in donors.items():
            p.register_donor(k, v)
    s_plan, m_plan = single.plan(target), multi.plan(target)
    assert not s_plan.is_hit and s_plan.reason == Reason.BELOW_MIN_SIMILARITY
    assert s_plan.donor_ids == ()
    assert m_plan.is_hit and m_plan.donor_ids == ("r0", "r1")
    check_invariants(multi, m_plan, target)
    # With the main donor alone good enough, both pipelines agree on its spans.
    single2, multi2 = pipe(max_donors_per_plan=1, min_similarity=0.3), pipe(min_similarity=0.3)
    for p in (single2, multi2):
        for k, v in donors.items():
            p.register_donor(k, v)
    a, b = single2.plan(target), multi2.plan(target)
    assert a.is_hit and a.donor_ids == ("r0",) and b.donor_ids == ("r0", "r1")
    assert set(a.spans) <= set(b.spans)
    assert a.timings.multi_donor_s == 0.0


def test_small_gaps_next_to_a_good_main_donor_are_not_worth_a_second_query():
    # The main donor passes every gate; the prompt adds a block that another donor holds. Below 4% of the prompt
    # the block is left to recompute (hot path: no second index query), above it a second donor fills it.
    for block, expect in ((20, ("r0",)), (60, ("r0", "r1"))):
        p = pipe()
        body = [HEADER] + [passage(i) for i in range(7)]
        p.register_donor("r0", np.concatenate(body + [question(0)]))
        extra = np.random.default_rng(5).integers(70000, 80000, block)
        p.register_donor("r1", np.concatenate([passage(30), extra, question(1)]))
        target = np.concatenate(body + [extra, question(2)])
        plan = p.plan(target)
        assert plan.is_hit and plan.donor_ids == expect, block
        check_invariants(p, plan, target)


def test_max_donors_per_plan_bounds_the_donors():
    p = pipe(max_donors_per_plan=2)
    for i in range(4):
        p.register_donor(f"r{i}", request([2 * i, 2 * i + 1, 40 + i], i))
    target = request([0, 1, 2, 3, 4, 5], 9)
    plan = p.plan(target)
    check_invariants(p, plan, target)
    assert len(plan.donor_ids) <= 2


def test_prefix_view_stops_where_the_donor_changes():
    # r1 holds the header + passage 0, r0 passage 1 right after the same header -> contiguous coverage from 0 by two
    # donors; a prefix-only engine must load only the first donor's run, even without the strict boundary.
    for strict in (True, False):
        p = pipe(strict_prefix_boundary=strict, min_similarity=0.0, min_reuse_ratio=0.0)
        p.register_donor("r0", np.concatenate([HEADER, passage(0), passage(7), question(0)]))
        p.register_donor("r1", np.concatenate([passage(5), passage(1), question(1)]))
        target = np.concatenate([HEADER, passage(0), passage(1), question(2)])
        plan = p.plan(target)
        assert plan.is_hit and plan.donor_ids == ("r0", "r1")
        assert plan.spans[0].target_start == 0 and plan.spans[1].target_start == plan.spans[0].target_end
        assert plan.prefix_reusable_tokens(1) == plan.spans[0].target_end == 160
    # Same donor across a seam: the non-strict view still runs on.
    plain = dataclasses.replace(plan, spans=tuple(dataclasses.replace(s, donor_id=None) for s in plan.spans),
                                strict_prefix_boundary=False)
    assert plain.prefix_reusable_tokens(1) == 280


def test_drop_donors_rechecks_the_gates():
    p = pipe()
    p.register_donor("r0", request([0, 1, 9, 10], 0))
    p.register_donor("r1", request([8, 2, 3, 11], 1))
    p.register_donor("r2", request([4, 5, 6, 12], 2))
    target = request([0, 1, 2, 4], 3)
    plan = p.plan(target)
    assert plan.donor_ids == ("r0", "r1", "r2")
    assert p.drop_donors(plan, ["other"]) is plan
    less = p.drop_donors(plan, ["r2"])
    assert less.is_hit and less.donor_ids == ("r0", "r1")
    check_invariants(p, less, target)
    assert less.reused_tokens == plan.reused_tokens - 120
    assert less.detail("dropped_donors") == ["r2"]
    gone = p.drop_donors(plan, ["r1", "r2"])  # r0 alone covers 280/534 < min_similarity 0.6
    assert not gone.is_hit and gone.reason == Reason.BELOW_MIN_SIMILARITY
    main_gone = p.drop_donors(plan, ["r0"])  # 240/534
    assert not main_gone.is_hit and main_gone.reason == Reason.BELOW_MIN_SIMILARITY
    lenient = SemBlendPipeline(SemBlendConfig(min_prompt_tokens=8, min_similarity=0.1, min_reuse_ratio=0.1))
    promoted = lenient.drop_donors(plan, ["r0"])
    assert promoted.is_hit and promoted.donor_id == "r1" and promoted.donor_ids == ("r1", "r2")
    assert promoted.donor_len == 534
    assert not p.drop_donors(plan, ["r0", "r1", "r2"]).is_hit


def test_config_key():
    assert SemBlendConfig().max_donors_per_plan == 4
    assert SemBlendConfig.from_env({"SEMBLEND_MAX_DONORS_PER_PLAN": "2"}).max_donors_per_plan == 2
    for bad in (0, -1, 65, True, 2.0, "3"):
        with pytest.raises(ConfigError, match="max_donors_per_plan"):
            SemBlendConfig(max_donors_per_plan=bad)
    with pytest.raises(ConfigError, match="max_donors_per_plan"):
        SemBlendConfig.from_env({"SEMBLEND_MAX_DONORS_PER_PLAN": "many"})


def test_span_donor_field_keeps_positional_construction_and_ordering():
    assert Span(1, 2, 3) == Span(1, 2, 3, None) and Span(1, 2, 3).donor_id is None
    assert Span(1, 2, 3, "a") != Span(1, 2, 3, "b")
    spans = [Span(5, 50, 10, "b"), Span(0, 0, 10), Span(9, 20, 10, "a")]
    assert sorted(spans) == [Span(0, 0, 10), Span(5, 50, 10, "b"), Span(9, 20, 10, "a")]  # donor_start first


@st.composite
def rag_case(draw):
    pool = draw(st.integers(6, 14))
    n_donors = draw(st.integers(1, 8))
    donors = [draw(st.lists(st.integers(0, pool - 1), min_size=1, max_size=5, unique=True)) for _ in range(n_donors)]
    target = draw(st.lists(st.integers(0, pool - 1), min_size=1, max_size=6, unique=True))
    repeat = draw(st.booleans())  # a passage used twice in the target
    if repeat:
        target = target + target[:1]
    max_donors = draw(st.integers(1, 5))
    strict = draw(st.booleans())
    lens = draw(st.lists(st.integers(20, 90), min_size=pool, max_size=pool))
    return donors, target, max_donors, strict, lens


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rag_case())
def test_multi_donor_plan_invariants(case):
    donors, target_ids, max_donors, strict, lens = case
    p = pipe(max_donors_per_plan=max_donors, strict_prefix_boundary=strict, min_similarity=0.0,
             min_reuse_ratio=0.0)

    def build(ids, seed):
        return np.concatenate([HEADER[: 10 + seed % 20]] + [passage(i, lens[i]) for i in ids] + [question(seed, 6)])

    for j, ids in enumerate(donors):
        p.register_donor(f"r{j}", build(ids, j))
    target = build(target_ids, 99)
    plan = p.plan(target)
    event(f"donors used: {len(plan.donor_ids)}")
    check_invariants(p, plan, target)
    n = plan.prefix_reusable_tokens(1)
    if n:
        first = plan.donor_of(plan.spans[0])
        run = [s for s in plan.spans if s.target_start < n]
        assert all(plan.donor_of(s) == first for s in run)  # one donor's KV per prefix load
        assert sum(s.length for s in run) >= n and plan.spans[0].target_start == 0
    for drop in plan.donor_ids:
        less = p.drop_donors(plan, [drop])
        if less.is_hit:
            check_invariants(p, less, target)
            assert drop not in less.donor_ids
