"""Selection strategies in the blended prefill (tiny random Llama, CPU, seconds): budget, mandatory rows, probe
cost, determinism, and full budget == cold. Their effect on answers is measured on real models by
``benchmarks/quality_frontier.py``."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import VOCAB, ByteTokenizer, tiny_llama

from semblend.integration.transformers import EngineOptions, SemBlendEngine
from semblend_core import CacheNamespace, SemanticKvPlan, SemBlendConfig, Span
from semblend_core.recompute import SelectionStrategy

LAYERS = 4


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=LAYERS)


def rand_ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def case(model):
    """Donor = A + body + tail, target = B + body + tail (body moved by +13): donor KV, cold target prefill."""
    a, b, body, tail = rand_ids(20, 10), rand_ids(33, 11), rand_ids(160, 12), rand_ids(6, 13)
    donor, target = a + body + tail, b + body + tail
    eng = SemBlendEngine(model, ByteTokenizer(), SemBlendConfig())
    k, v = eng.donor_kv(eng.cold_prefill(donor))
    return target, Span(20, 33, len(body) + len(tail)), k, v, eng.cold_prefill(target)


def plan_for(target, span, budget, seam=4):
    n = len(target)
    return SemanticKvPlan(True, "hit", n, CacheNamespace.default(), donor_id="d", donor_len=20 + span.length,
                          spans=(span,), recompute_ranges=((0, span.target_start + seam),), recompute_budget=budget)


def run(model, case, budget, selection, suffix_tokens=8):
    target, span, k, v, cold = case
    eng = SemBlendEngine(model, ByteTokenizer(), SemBlendConfig(),
                         EngineOptions(selection=selection, suffix_tokens=suffix_tokens))
    return eng.prefill_with_plan(target, plan_for(target, span, budget), k, v), cold


@pytest.mark.parametrize("selection", [SelectionStrategy("query"), SelectionStrategy("query", probe_layers=4),
                                       SelectionStrategy("position", probe_layers=0),
                                       SelectionStrategy("query", depth=0.5)])
def test_full_budget_equals_cold(model, case, selection):
    res, cold = run(model, case, 1.0, selection)
    torch.testing.assert_close(res.logits, cold.logits, atol=1e-4, rtol=0)
    if selection.depth == 1.0:
        assert all(c == res.stats.prefix_len for c in res.stats.active_per_layer)


@pytest.mark.parametrize("selection", [SelectionStrategy("query"), SelectionStrategy("position", probe_layers=0),
                                       SelectionStrategy("query", chunk_heads=2, depth=0.5)])
@pytest.mark.parametrize("budget", [0.0, 0.02, 0.1, 0.3])
def test_budget_and_mandatory_rows_hold(model, case, selection, budget):
    target, span, _, _, _ = case
    res, _ = run(model, case, budget, selection)
    st = res.stats
    mandatory = span.target_start + 4  # uncovered head + seam heads, inside the reused prefix
    assert st.mandatory == mandatory
    assert all(c >= mandatory for c in st.active_per_layer)  # mandatory rows are fresh at every layer
    candidates = st.prefix_len - mandatory
    extra = sum(st.active_per_layer) - mandatory * LAYERS
    assert extra <= math.floor(budget * candidates * LAYERS + 1e-9)  # the token-layer budget holds
    assert list(st.active_per_layer) == sorted(st.active_per_layer, reverse=True)  # nested active sets
    n = len(target)
    probe = selection.probe_layers * (mandatory + n - st.prefix_len) if selection.name == "query" and budget else 0
    assert st.probe_token_layers == probe  # the probe's rows are counted as recompute
    suffix = n - st.prefix_len
    assert res.recomputed_fraction == pytest.approx((st.token_layers + suffix * LAYERS) / (n * LAYERS))


def test_selection_is_deterministic_and_budget_helps(model, case):
    sel = SelectionStrategy("query")
    r1, cold = run(model, case, 0.3, sel)
    r2, _ = run(model, case, 0.3, sel)
    assert r1.stats == r2.stats
    torch.testing.assert_close(r1.logits, r2.logits, atol=0, rtol=0)
    r0, _ = run(model, case, 0.0, sel)

    def kl(logits):
        p, q = torch.log_softmax(cold.logits, -1), torch.log_softmax(logits, -1)
        return float((p.exp() * (p - q)).sum())

    assert kl(r0.logits) > 1e-5
    assert kl(r1.logits) < kl(r0.logits)
