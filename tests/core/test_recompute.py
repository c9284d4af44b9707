"""Recompute selection: classes, priorities, budget semantics, deviation scores, per-layer budget."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semblend_core.namespace import CacheNamespace
from semblend_core.plan import Reason, SemanticKvPlan, Span
from semblend_core.recompute import CLASSES, deviation_scores, layer_budget, select_recompute


def make_plan(target_len, spans, recompute_ranges=(), budget=0.15, layer_recompute=()):
    return SemanticKvPlan(
        is_hit=bool(spans), reason=Reason.HIT if spans else Reason.NO_CANDIDATE, target_len=target_len,
        namespace=CacheNamespace.default(), spans=tuple(spans), recompute_ranges=tuple(recompute_ranges),
        recompute_budget=budget, layer_recompute=tuple(layer_recompute),
    )


def test_no_spans_recomputes_everything():
    sel = select_recompute(make_plan(10, []), budget=0.0)
    np.testing.assert_array_equal(sel.positions, np.arange(10))
    assert sel.breakdown["uncovered"] == 10
    assert sel.breakdown["total"] == 10
    assert sel.positions.dtype == np.int64
    assert not sel.positions.flags.writeable


def test_empty_prompt():
    positions, breakdown = select_recompute(make_plan(0, []), budget=0.5)
    assert positions.size == 0 and breakdown["total"] == 0


def test_classes_and_budget_fill_order():
    # [0,40) context-exact prefix, [40,50) uncovered, [50,100) a seam span shifted by +10.
    plan = make_plan(100, [Span(0, 0, 40), Span(40, 50, 50)])
    dev = np.zeros(100)
    dev[[10, 20, 70, 99]] = [5.0, 4.0, 3.0, 9.0]  # 99 is the suffix: already fresh, must not use budget
    sel = select_recompute(plan, budget=0.06, deviation=dev, seam_tokens=4)
    b = sel.breakdown
    assert b["uncovered"] == 10 and b["suffix"] == 1
    assert b["budget_tokens"] == 6
    assert b["seam"] == 4  # seam heads come first
    assert b["deviation"] == 2  # the remaining budget goes to the two highest-deviation reused tokens
    expected = set(range(40, 50)) | {99} | {50, 51, 52, 53} | {10, 20}
    assert set(sel.positions.tolist()) == expected
    assert list(sel.positions) == sorted(expected)
    assert sum(b[c] for c in CLASSES) == b["total"] == len(sel)


def test_mandatory_kept_over_budget():
    plan = make_plan(20, [Span(0, 0, 5)])  # 15 uncovered tokens, budget 0
    sel = select_recompute(plan, budget=0.0, deviation=np.ones(20), seam_tokens=4)
    assert sel.breakdown["uncovered"] == 15
    assert sel.breakdown["seam"] == 0 and sel.breakdown["deviation"] == 0
    assert set(sel.positions.tolist()) == set(range(5, 20))


def test_seam_round_robin_under_tight_budget():
    # Three seam spans; a budget of 3 extra tokens refreshes offset 0 of each seam, not 3 tokens of the first.
    plan = make_plan(100, [Span(0, 10, 30), Span(0, 40, 30), Span(0, 70, 30)])
    sel = select_recompute(plan, budget=0.03, seam_tokens=4)
    assert sel.breakdown["seam"] == 3
    assert set(sel.positions.tolist()) == set(range(10)) | {10, 40, 70} | {99}


def test_context_exact_span_is_not_a_seam():
    plan = make_plan(50, [Span(0, 0, 50)])
    sel = select_recompute(plan, budget=0.5, seam_tokens=8)
    assert sel.breakdown["seam"] == 0
    assert sel.positions.tolist() == [49]


def test_seam_heads_default_to_planner_ranges():
    # The planner marked 2 seam tokens and a fuzzy region [30,33) inside the seam span; suffix 59.
    plan = make_plan(60, [Span(0, 0, 20), Span(0, 20, 40)], recompute_ranges=((20, 22), (30, 33), (59, 60)))
    sel = select_recompute(plan, budget=1.0)
    assert set(sel.positions.tolist()) == {20, 21, 30, 31, 32, 59}
    assert sel.breakdown["seam"] == 5 and sel.breakdown["suffix"] == 1
    # A planner range in a context-exact span is kept as mandatory "planned".
    plan2 = make_plan(60, [Span(0, 0, 60)], recompute_ranges=((5, 7), (59, 60)))
    sel2 = select_recompute(plan2, budget=0.0)
    assert sel2.breakdown["planned"] == 2 and set(sel2.positions.tolist()) == {5, 6, 59}


def test_budget_none_uses_plan_budget():
    plan = make_plan(100, [Span(0, 0, 100)], budget=0.1)
    dev = np.arange(100, dtype=np.float64)
    sel = select_recompute(plan, deviation=dev)
    assert sel.breakdown["budget_tokens"] == 10
    # Highest scores are at the end; 99 is the suffix, so the next ten are 89..98.
    assert set(sel.positions.tolist()) == set(range(89, 100))


def test_deviation_multi_layer_uses_max_and_nan_last():
    plan = make_plan(10, [Span(0, 0, 10)])
    dev = np.zeros((2, 10))
    dev[0, 3] = 1.0
    dev[1, 6] = 2.0
    dev[0, 1] = np.nan
    sel = select_recompute(plan, budget=0.2, deviation=dev)
    assert set(sel.positions.tolist()) == {3, 6, 9}


def test_deviation_ties_go_to_lower_position():
    plan = make_plan(10, [Span(0, 0, 10)])
    sel = select_recompute(plan, budget=0.2, deviation=np.ones(10))
    assert sel.positions.tolist() == [0, 1, 9]


def test_suffix_tokens_configurable():
    plan = make_plan(30, [Span(0, 0, 30)])
    sel = select_recompute(plan, budget=0.0, suffix_tokens=5)
    assert sel.positions.tolist() == list(range(25, 30))
    assert sel.breakdown["suffix"] == 5


@pytest.mark.parametrize("kw", [{"budget": 1.5}, {"budget": -0.1}, {"budget": float("nan")},
                                {"suffix_tokens": -1}, {"seam_tokens": -2}, {"deviation": np.zeros(7)}])
def test_invalid_arguments(kw):
    with pytest.raises(ValueError):
        select_recompute(make_plan(10, [Span(0, 0, 10)]), **{"budget": 0.1, **kw})


@settings(max_examples=60, deadline=None)
@given(
    target_len=st.integers(1, 200),
    cuts=st.lists(st.integers(0, 200), min_size=0, max_size=8),
    budget=st.floats(0.0, 1.0),
    seam_tokens=st.integers(0, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_invariants(target_len, cuts, budget, seam_tokens, seed):
    # Random non-overlapping spans from sorted cut points; every other gap is left uncovered.
    pts = sorted({min(c, target_len) for c in cuts} | {0, target_len})
    spans = []
    for i, (a, b) in enumerate(itertools.pairwise(pts)):
        if b > a and i % 2 == 0:
            spans.append(Span(donor_start=a if i == 0 else a + 3, target_start=a, length=b - a))
    plan = make_plan(target_len, spans)
    rng = np.random.default_rng(seed)
    sel = select_recompute(plan, budget=budget, deviation=rng.random(target_len), seam_tokens=seam_tokens)
    pos = sel.positions
    covered = np.zeros(target_len, dtype=bool)
    for s in spans:
        covered[s.target_start:s.target_end] = True
    assert np.all(np.diff(pos) > 0) and (pos.size == 0 or (pos[0] >= 0 and pos[-1] < target_len))
    assert target_len - 1 in pos
    assert set(np.flatnonzero(~covered).tolist()) <= set(pos.tolist())
    b = sel.breakdown
    assert b["seam"] + b["deviation"] <= b["budget_tokens"] == int(np.floor(budget * target_len + 1e-9))
    assert sum(b[c] for c in CLASSES) == pos.size
    # With deviation scores present, the budget is used fully unless every reused token is already fresh.
    reusable_left = int(covered.sum()) - int(np.isin(pos, np.flatnonzero(covered)).sum())
    assert b["seam"] + b["deviation"] == b["budget_tokens"] or reusable_left == 0


def test_deviation_scores_numpy():
    rng = np.random.default_rng(0)
    fk = rng.standard_normal((5, 2, 4)).astype(np.float32)
    rk = fk.copy()
    rk[2] += 1.0  # 8 elements off by 1 -> norm sqrt(8)
    s = deviation_scores(fk, rk)
    assert s.shape == (5,) and s.dtype == np.float32
    np.testing.assert_allclose(s, [0, 0, np.sqrt(8), 0, 0], atol=1e-6)
    fv = np.zeros((5, 8), np.float32)
    rv = fv.copy()
    rv[4, 0] = 3.0
    s2 = deviation_scores(fk, rk, fv, rv)
    np.testing.assert_allclose(s2, [0, 0, np.sqrt(8), 0, 3.0], atol=1e-6)


def test_deviation_scores_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    fk = torch.randn(7, 3, 8, generator=g, dtype=torch.bfloat16)
    rk = torch.randn(7, 3, 8, generator=g, dtype=torch.bfloat16)
    s = deviation_scores(fk, rk)
    assert isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.shape == (7,)
    np.testing.assert_allclose(s.numpy(), deviation_scores(fk.float().numpy(), rk.float().numpy()), rtol=1e-5)
    # Torch scores feed select_recompute directly.
    sel = select_recompute(make_plan(7, [Span(0, 0, 7)]), budget=2 / 7, deviation=s)
    scores = s.numpy()[:6]  # position 6 is the suffix
    expected = set(np.lexsort((np.arange(6), -scores))[:2].tolist()) | {6}
    assert set(sel.positions.tolist()) == expected


def test_deviation_scores_errors():
    with pytest.raises(ValueError):
        deviation_scores(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError):
        deviation_scores(np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((3, 4)), None)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError):
        deviation_scores(torch.zeros(3, 4), np.zeros((3, 4)))


def test_layer_budget():
    lr = (0.5, 0.1, 0.1, 0.4)
    assert layer_budget(lr, 0) == 0.5 and layer_budget(lr, 3) == 0.4
    assert layer_budget((), 12, default=0.15) == 0.15
    with pytest.raises(IndexError):
        layer_budget(lr, 4)
    with pytest.raises(IndexError):
        layer_budget(lr, -1)
    with pytest.raises(TypeError):
        layer_budget(lr, 1.0)
