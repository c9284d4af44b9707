"""Multi-donor plans through SemBlendEngine on a tiny random-weight Llama (CPU): each span is read from its own
donor's KV entry, re-rotated by its own delta; a donor whose KV is gone drops its spans or declines the plan.

Layer-0 K/V depend only on the token and its absolute position, so after assembly they must equal a cold prefill's
at every reused position: a span read from the wrong donor (or with another span's delta) cannot pass.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import VOCAB, ByteTokenizer, tiny_llama

from semblend.integration.transformers import EngineOptions, SemBlendEngine
from semblend.integration.transformers.blend import assemble_kv
from semblend.integration.transformers.engine import spans_mismatching_donor_tokens
from semblend_core import SemBlendConfig


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=4)


def ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


HEADER, A, B, C = ids(24, 1), ids(80, 2), ids(80, 3), ids(80, 4)
DONOR_1 = HEADER + A + ids(80, 5) + ids(10, 6)     # header + A at their target positions
DONOR_2 = ids(30, 7) + B + ids(40, 8) + ids(10, 9)  # B moves by +74 tokens
DONOR_3 = ids(11, 10) + C + ids(10, 11)             # C moves by +173
TARGET = HEADER + A + B + C + ids(12, 12)


def engine(model, budget=0.0, **cfg):
    config = SemBlendConfig(**{"recompute_budget": budget, "min_prompt_tokens": 16, "chunk_size": 16, **cfg})
    return SemBlendEngine(model, ByteTokenizer(), config, EngineOptions(suffix_tokens=1))


def served(model, **cfg):
    eng = engine(model, **cfg)
    # Cold prefills that donate; the engine names its requests (ids unique to this engine).
    donor_ids = tuple(eng.prefill(donor).request_id for donor in (DONOR_1, DONOR_2, DONOR_3))
    return eng, donor_ids


def rewire_kv_store(eng, keep, replace=None):
    """Give the engine a KV store the pipeline is not attached to (wired some other way, or a store that lost
    entries between planning and loading): the planner still lists every donor, the store holds only ``keep``
    (plus ``replace``: donor id -> other tokens stored under that id)."""
    from semblend_core.kv_tensor_store import KvTensorStore

    old, ns = eng.kv_store, eng.namespace.key
    eng.kv_store = KvTensorStore(host_bytes=1 << 30)
    for d in keep:
        entry = old.get(ns, d)
        eng.kv_store.put(ns, d, entry.kv.clone(), (replace or {}).get(d, entry.token_ids))


def layer0_matches_cold(eng, res, cold):
    k, v = eng.donor_kv(res)
    k_c, v_c = eng.donor_kv(cold)
    torch.testing.assert_close(k[0], k_c[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v[0], v_c[0], atol=1e-5, rtol=1e-4)


def test_three_donors_are_materialized_each_from_its_own_kv(model):
    eng, (d0, d1, d2) = served(model)
    plan = eng.pipeline.plan(TARGET, namespace=eng.namespace)
    assert plan.is_hit and plan.donor_ids == (d0, d1, d2)
    assert sorted({s.delta for s in plan.spans}) == [0, 74, 173]
    res = eng.prefill(TARGET, register=False)
    assert res.outcome == "materialized" and res.plan.donor_ids == (d0, d1, d2)
    cold = eng.cold_prefill(TARGET)
    layer0_matches_cold(eng, res, cold)
    assert eng.stats()["loaded_tokens"] == plan.reused_tokens


def test_single_donor_config_declines_what_multi_donor_reuses(model):
    eng, (d0, d1, d2) = served(model, max_donors_per_plan=1)
    res = eng.prefill(TARGET, register=False)
    assert res.outcome == "declined" and res.reason == "below_min_similarity"


def test_full_recompute_of_a_multi_donor_plan_equals_cold(model):
    eng, (d0, d1, d2) = served(model, budget=1.0, bathtub_preset="flat")
    res = eng.prefill(TARGET, register=False)
    assert res.outcome == "materialized" and res.plan.multi_donor
    torch.testing.assert_close(res.logits, eng.cold_prefill(TARGET).logits, atol=1e-4, rtol=0)


def test_assemble_kv_reads_every_donor_once_and_rejects_a_missing_entry(model):
    eng, (d0, d1, d2) = served(model)
    plan = eng.pipeline.plan(TARGET, namespace=eng.namespace)
    entries = {d: eng.kv_store.get(eng.namespace.key, d).kv for d in plan.donor_ids}
    k, v = assemble_kv(plan, entries, len(TARGET), eng.rope_spec)
    cold_k, cold_v = eng.donor_kv(eng.cold_prefill(TARGET))
    for s in plan.spans:
        sl = slice(s.target_start, s.target_end)
        torch.testing.assert_close(k[0, sl], cold_k[0, sl], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v[0, sl], cold_v[0, sl], atol=1e-6, rtol=0)
    with pytest.raises(KeyError, match=d2):
        assemble_kv(plan, {d: entries[d] for d in plan.donor_ids[:2]}, len(TARGET), eng.rope_spec)
    # A bare tensor for a multi-donor plan would serve one donor's KV for another's spans: refused.
    with pytest.raises(ValueError, match="one KV per donor"):
        eng.prefill_with_plan(TARGET, plan, entries[d0][:, 0], entries[d0][:, 1])
    res = eng.prefill_with_plan(TARGET, plan, {d: (e[:, 0], e[:, 1]) for d, e in entries.items()})
    layer0_matches_cold(eng, res, eng.cold_prefill(TARGET))


def test_evicted_donor_drops_its_spans_when_the_rest_passes_the_gates(model):
    eng, (d0, d1, d2) = served(model, min_similarity=0.3, min_reuse_ratio=0.3)
    rewire_kv_store(eng, keep=(d0, d1))
    res = eng.prefill(TARGET, register=False)
    assert res.outcome == "materialized" and res.plan.donor_ids == (d0, d1)
    assert res.plan.detail("dropped_donors") == [d2]
    assert all(s.target_end <= len(HEADER + A + B) for s in res.plan.spans)
    layer0_matches_cold(eng, res, eng.cold_prefill(TARGET))
    assert eng.stats()["loaded_tokens"] == res.plan.reused_tokens


def test_evicted_donor_declines_when_the_rest_fails_the_gates(model):
    eng, (d0, d1, d2) = served(model)
    rewire_kv_store(eng, keep=(d0,))
    res = eng.prefill(TARGET, register=False)  # header + A alone: 104/276 of the prompt
    assert res.outcome == "declined" and res.reason == "donor_kv_evicted"
    torch.testing.assert_close(res.logits, eng.cold_prefill(TARGET).logits, atol=1e-5, rtol=0)


def test_donor_kv_holding_other_tokens_declines_mismatch(model):
    eng, (d0, d1, d2) = served(model)
    ns = eng.namespace.key
    rewire_kv_store(eng, keep=(d0, d1, d2), replace={d1: ids(len(DONOR_2), 99)})  # same id, another prompt
    plan = eng.pipeline.plan(TARGET, namespace=eng.namespace)
    bad = spans_mismatching_donor_tokens(plan, TARGET, {d: eng.kv_store.get(ns, d).token_ids
                                                        for d in plan.donor_ids})
    assert bad and {plan.donor_of(s) for s in bad} == {d1}
    res = eng.prefill(TARGET, register=False)
    assert res.outcome == "declined" and res.reason == "donor_kv_mismatch"
