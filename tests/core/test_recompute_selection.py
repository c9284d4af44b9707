"""Depth-scheduled selection (``select_depths``, ``SelectionStrategy``) and the probe's attention mass."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semblend_core.recompute import SelectionStrategy, select_depths


def offsets(n, starts):
    """Offset of each position inside its span; spans start at ``starts`` (sorted) and run to the next start."""
    out = np.zeros(n, dtype=np.int64)
    bounds = list(starts) + [n]
    for a, b in itertools.pairwise(bounds):
        out[a:b] = np.arange(b - a)
    return out


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), layers=st.integers(1, 40), budget=st.floats(0, 1), seed=st.integers(0, 2**16),
       depth=st.sampled_from([1.0, 0.5, 0.25, 0.1]), heads=st.integers(0, 3))
def test_budget_respected_candidates_only_deterministic(n, layers, budget, seed, depth, heads):
    rng = np.random.default_rng(seed)
    cand = rng.random(n) < 0.8
    scores = rng.random(n)
    scores[rng.random(n) < 0.1] = np.nan
    off = offsets(n, sorted({0, *rng.integers(0, n, 3).tolist()}))
    d = select_depths(cand, budget, layers, scores=scores, span_offset=off, chunk_heads=heads, depth=depth)
    assert d.dtype == np.int64 and d.shape == (n,)
    assert not d[~cand].any()  # only candidates are selected
    assert d.sum() <= np.floor(budget * cand.sum() * layers + 1e-9)  # the token-layer budget holds
    assert d.max(initial=0) <= layers
    # The same inputs give the same selection.
    np.testing.assert_array_equal(d, select_depths(cand, budget, layers, scores=scores, span_offset=off,
                                                   chunk_heads=heads, depth=depth))
    # Chunk heads are taken before any ranked token.
    sel = d > 0
    head = cand & (off < heads)
    if sel.any() and (cand & ~head & sel).any():
        assert sel[head].all()


def test_full_budget_selects_every_candidate_at_every_layer():
    cand = np.array([False, True, True, False, True])
    d = select_depths(cand, 1.0, 7, scores=np.zeros(5))
    np.testing.assert_array_equal(d, [0, 7, 7, 0, 7])


def test_ranking_highest_first_ties_low_position_nan_last():
    cand = np.ones(6, dtype=bool)
    scores = np.array([1.0, np.nan, 3.0, 3.0, 0.5, 2.0])
    # 6 candidates x 10 layers, budget 0.5 -> 30 token-layers -> 3 tokens at full depth.
    d = select_depths(cand, 0.5, 10, scores=scores)
    assert set(np.flatnonzero(d)) == {2, 3, 5}
    d = select_depths(cand, 5 / 6, 10, scores=scores)
    assert set(np.flatnonzero(d)) == {0, 2, 3, 4, 5}  # NaN ranks last


def test_depth_trades_tokens_for_layers():
    cand = np.ones(100, dtype=bool)
    deep = select_depths(cand, 0.1, 20, scores=-np.arange(100.0))
    half = select_depths(cand, 0.1, 20, scores=-np.arange(100.0), depth=0.5)
    assert (deep > 0).sum() == 10 and set(deep[deep > 0]) == {20}
    assert (half > 0).sum() == 20 and set(half[half > 0]) == {10}
    assert deep.sum() == half.sum() == 200


def test_position_order_is_round_robin_over_spans():
    off = offsets(30, [0, 10, 20])
    d = select_depths(np.ones(30, dtype=bool), 0.1, 4, span_offset=off)  # 12 token-layers -> 3 tokens
    assert set(np.flatnonzero(d)) == {0, 10, 20}


def test_zero_budget_and_no_candidates_select_nothing():
    assert not select_depths(np.ones(10, dtype=bool), 0.0, 5, scores=np.ones(10)).any()
    assert not select_depths(np.zeros(10, dtype=bool), 1.0, 5, scores=np.ones(10)).any()


@pytest.mark.parametrize("kwargs", [{"budget": 1.5}, {"budget": -0.1}, {"budget": float("nan")},
                                    {"num_layers": 0}, {"depth": 0.0}, {"depth": 1.5}])
def test_bad_arguments_raise(kwargs):
    args = {"candidates": np.ones(4, dtype=bool), "budget": 0.5, "num_layers": 4, "scores": np.ones(4)}
    args.update(kwargs)
    with pytest.raises(ValueError):
        select_depths(**args)
    with pytest.raises(ValueError):
        select_depths(np.ones(4, dtype=bool), 0.5, 4)  # neither scores nor offsets


@pytest.mark.parametrize("kwargs", [{"name": "deviation"}, {"probe_layers": 0}, {"query_tokens": 0},
                                    {"depth": 0.0}, {"chunk_heads": -1}, {"probe_layers": True}])
def test_strategy_validation_names_allowed_values(kwargs):
    with pytest.raises(ValueError):
        SelectionStrategy(**kwargs)
    assert SelectionStrategy("position", probe_layers=0).name == "position"


def test_suffix_attention_mass_matches_reference():
    torch = pytest.importorskip("torch")
    from semblend_core.recompute import suffix_attention_mass

    g = torch.Generator().manual_seed(0)
    n, heads, kv_heads, dim, m = 20, 4, 2, 8, 3
    q = torch.randn(m, heads, dim, generator=g)
    k = torch.randn(n, kv_heads, dim, generator=g)
    qpos = torch.tensor([12, 15, 19])
    mass = suffix_attention_mass(q, k, qpos, 0.3)
    ref = torch.zeros(n)
    for i in range(m):
        for h in range(heads):
            logits = (k[: qpos[i] + 1, h // 2] @ q[i, h]) * 0.3
            ref[: qpos[i] + 1] += torch.softmax(logits, 0)
    torch.testing.assert_close(mass, ref, atol=1e-5, rtol=1e-5)
    assert float(mass.sum()) == pytest.approx(m * heads, rel=1e-5)
    assert float(mass[16:].sum()) == pytest.approx(float(ref[16:].sum()))  # causal: only the later queries see them


def test_full_budget_is_every_layer_at_any_depth():
    d = select_depths(np.ones(8, dtype=bool), 1.0, 12, scores=np.zeros(8), depth=0.25)
    assert set(d) == {12}
