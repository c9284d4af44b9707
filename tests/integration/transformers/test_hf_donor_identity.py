"""Donor identity and lifetime through the real engine (tiny random-weight Llama, CPU).

The independent review's scenario: two engines share one pipeline and both name their requests ``req-0``,
``req-1``...; after an LRU eviction one engine served another's prompt from the wrong donor's KV (outcome
``materialized``, logits off by 0.26). Now ids are engine-unique, engines sharing a pipeline share its KV store,
and before any KV is loaded its tokens are checked against the plan on every span.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import VOCAB, ByteTokenizer, tiny_llama

from semblend.integration.transformers import EngineOptions, SemBlendEngine
from semblend.integration.transformers import engine as engine_mod
from semblend_core import SemBlendConfig
from semblend_core.kv_tensor_store import KvTensorStore
from semblend_core.pipeline import SemBlendPipeline

N = 96


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=4)


CFG = SemBlendConfig(min_prompt_tokens=16, chunk_size=16, recompute_budget=0.0, max_donors=2)


def rand_ids(seed, n=N):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engines(model, **options):
    pipe = SemBlendPipeline(CFG)
    a = SemBlendEngine(model, ByteTokenizer(), CFG, EngineOptions(suffix_tokens=1, **options), pipeline=pipe)
    b = SemBlendEngine(model, ByteTokenizer(), CFG, EngineOptions(suffix_tokens=1, **options), pipeline=pipe)
    return a, b


def test_two_engines_sharing_a_pipeline_never_collide_and_share_donors(model):
    a, b = engines(model)
    assert a.kv_store is b.kv_store is a.pipeline.kv_store
    xs = [a.prefill(rand_ids(i)) for i in range(3)]  # the planner holds two: req-0 is evicted, KV included
    y = b.prefill(rand_ids(10))
    ids = [r.request_id for r in xs] + [y.request_id]
    assert len(set(ids)) == 4 and xs[0].request_id.endswith("req-0") and y.request_id.endswith("req-0")
    assert set(a.pipeline.store.keys()) == set(a.kv_store.keys())  # one lifetime: same donors on both sides
    res = a.prefill(rand_ids(10), register=False)  # engine a asks what engine b's donor holds
    assert res.outcome == "materialized" and res.donor_id == y.request_id
    torch.testing.assert_close(res.logits, y.logits, atol=1e-4, rtol=0)


def review_scenario(model):
    """The wiring before the fix: each engine its own KV store the planner knows nothing about, and request ids
    ``req-0, req-1...`` in both. Returns engine a, the prompt, and its cold logits."""
    a, b = engines(model)
    for eng in (a, b):
        eng._id_prefix = ""
        eng.kv_store = KvTensorStore(host_bytes=1 << 30)
    for i in range(3):
        a.prefill(rand_ids(i))  # a: req-0..2; the planner (2 slots) evicts a's req-0, a's KV store keeps it
    y = rand_ids(10)
    assert b.prefill(y).request_id == "req-0"  # b's req-0 (other tokens) enters the planner
    return a, y, b.cold_prefill(y).logits


def test_review_scenario_wrong_donors_kv_is_declined(model):
    a, y, cold = review_scenario(model)
    res = a.prefill(y, register=False)
    assert res.plan.is_hit and res.plan.donor_id == "req-0"  # the planner points at b's req-0...
    assert res.outcome == "declined" and res.reason == "donor_kv_mismatch"  # ...a's req-0 KV is another prompt's
    torch.testing.assert_close(res.logits, cold, atol=1e-5, rtol=0)
    assert a.stats()["reasons"].get("donor_kv_mismatch") == 1
    assert not a.kv_store.contains(a.namespace.key, "req-0")  # the stale entry is dropped


def test_without_the_token_check_the_review_scenario_serves_wrong_kv(model, monkeypatch):
    # What the check prevents: the same scenario with the check disabled materializes the wrong donor's KV.
    monkeypatch.setattr(engine_mod, "verify_donor_tokens", lambda *args: True)
    a, y, cold = review_scenario(model)
    res = a.prefill(y, register=False)
    assert res.outcome == "materialized"
    assert float((res.logits - cold).abs().max()) > 1e-2


def test_kv_eviction_retires_donors_through_the_engine(model):
    per_donor = 4 * 2 * N * 2 * 16 * 4  # [layers, k/v, tokens, kv_heads, head_dim] float32
    cfg = SemBlendConfig(min_prompt_tokens=16, chunk_size=16, recompute_budget=0.0)  # 10K planner slots
    eng = SemBlendEngine(model, ByteTokenizer(), cfg, EngineOptions(suffix_tokens=1, kv_capacity_bytes=2 * per_donor,
                                                                    kv_tier="host"))
    donors = [eng.prefill(rand_ids(20 + i)) for i in range(3)]
    assert len(eng.kv_store) == 2 and len(eng.pipeline.store) == 2  # the KV store dropped the first: so did the planner
    again = eng.prefill(rand_ids(20), register=False)
    assert again.outcome == "cold" and again.reason == "no_candidate"  # not declined for a dead donor
    hit = eng.prefill(rand_ids(22), register=False)
    assert hit.outcome == "materialized" and hit.donor_id == donors[2].request_id
