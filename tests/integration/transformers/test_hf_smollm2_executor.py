"""The shared executor with ``logits=False`` (the way an engine that computes the suffix itself calls it) on real
SmolLM2-135M-Instruct weights: ``reuse_len == n``, part of the prompt uncovered, K/V of every layer compared with
the model's own cold prefill.

The donor is the same prompt's prefix, prefilled on its own: its KV is what a cold prefill of the whole prompt
computes for those rows, so every correct blended run must reproduce the cold KV within float32 rounding.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from semblend.integration.transformers.blend import TransformersModelView, model_support
from semblend.integration.transformers.engine import cache_layers_kv
from semblend_core.blended_prefill import BlendStats, assemble_kv, run_blended_prefill
from semblend_core.model_support import compare_self_check
from semblend_core.namespace import CacheNamespace
from semblend_core.plan import Reason, SemanticKvPlan, Span

pytestmark = pytest.mark.slow

TEXT = (
    "Summarize the following abstract in two sentences. Large language models spend most of the time to first "
    "token recomputing key and value tensors for passages they have already seen in other requests. We study "
    "how much of that work can be reused when the passage appears at a different position, after a different "
    "instruction, or next to other retrieved passages. Re-rotating the cached keys to their new positions and "
    "recomputing a small, well-chosen set of tokens recovers the quality of a full prefill at a fraction of its "
    "cost. Experiments on scientific summarization and retrieval-augmented question answering show that the "
    "first-token latency falls by an order of magnitude while greedy outputs agree with the full computation."
)


@pytest.fixture(scope="module")
def case(smollm2):
    """``(model, view, spec, ids [n], k, v)``: the prompt and its cold KV ``[L, n, H, D]``."""
    model, tok = smollm2
    ok, reason, spec = model_support(model)
    assert ok, reason
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"])
    assert ids.shape[0] > 120
    k, v = cold_kv(model, ids)
    return model, TransformersModelView(model), spec, ids, k, v


def cold_kv(model, ids):
    with torch.no_grad():
        out = model(ids[None], use_cache=True)
    layers = cache_layers_kv(out.past_key_values)
    return (torch.stack([lk[0].transpose(0, 1) for lk, _ in layers]),
            torch.stack([lv[0].transpose(0, 1) for _, lv in layers]))


def plan_of(spans, n, budget=0.0, num_layers=0):
    return SemanticKvPlan(True, Reason.HIT, n, CacheNamespace(), donor_id="prefix", donor_len=n, spans=tuple(spans),
                          recompute_budget=budget, layer_recompute=(budget,) * num_layers if budget else ())


def assert_every_layer_equals_cold(k, v, k_ref, v_ref, rows=slice(None)):
    for layer in range(k.shape[0]):
        for what, got, ref in (("k", k, k_ref), ("v", v, v_ref)):
            reason, err = compare_self_check(ref[layer, rows].numpy(), got[layer, rows].numpy(), torch.float32,
                                             what=f"layer{layer}_{what}")
            assert not reason, (reason, err)


def donor_prefix(model, ids, p):
    """The donor: the prompt's first ``p`` tokens prefilled on their own, as a ``KvTensorStore`` entry
    ``[L, 2, p, H, D]``."""
    k, v = cold_kv(model, ids[:p])
    return torch.stack((k, v), dim=1)


@pytest.mark.parametrize("layout", ["exact_prefix", "exact_prefix_and_seamed_span_checked"])
def test_logits_false_fills_the_uncovered_rows_with_the_cold_kv(case, layout):
    model, view, spec, ids, k_ref, v_ref = case
    n, num_layers = ids.shape[0], k_ref.shape[0]
    assert num_layers == view.num_layers
    p = n - 40  # the donor holds [0, p); [p, n) is uncovered (vLLM would compute it, here the executor does)
    if layout == "exact_prefix":
        plan, kwargs = plan_of((Span(0, 0, p),), n), dict(check_layer=None)
        fresh_rows = n - p
    else:  # a gap [40, 60) between an exact span and a seamed one, deviation check with a budget
        plan = plan_of((Span(0, 0, 40), Span(60, 60, p - 60)), n, budget=0.15, num_layers=num_layers)
        kwargs = dict(check_layer=1)
        fresh_rows = 20 + n - p
    k, v = assemble_kv(plan, donor_prefix(model, ids, p), n, spec, total_len=n)
    assert not k[:, p:].any() and not v[:, p:].any()
    with torch.no_grad():
        stats, logits = run_blended_prefill(view, ids, k, v, plan, reuse_len=n, logits=False, **kwargs)
    assert logits is None
    assert_every_layer_equals_cold(k, v, k_ref, v_ref)
    assert stats.mandatory == fresh_rows and stats.prefix_len == n and stats.fixed_prefix == 0
    if layout == "exact_prefix":
        assert stats == BlendStats(n, (fresh_rows,) * num_layers, False, fresh_rows)
    else:
        assert stats.checked and stats.active_per_layer[:2] == (n, n)
        assert fresh_rows < stats.active_per_layer[2] < n


def test_fixed_prefix_rows_stay_bitwise_and_are_not_counted(case):
    model, view, spec, ids, k_ref, v_ref = case
    n, num_layers = ids.shape[0], k_ref.shape[0]
    f, p = 32, n - 40  # [0, f): the engine's own exact hit; no span there
    plan = plan_of((Span(f, f, p - f),), n)
    k, v = assemble_kv(plan, donor_prefix(model, ids, p), n, spec, total_len=n)
    k[:, :f], v[:, :f] = k_ref[:, :f], v_ref[:, :f]
    k_fixed, v_fixed = k[:, :f].clone(), v[:, :f].clone()
    with torch.no_grad():
        stats, logits = run_blended_prefill(view, ids, k, v, plan, reuse_len=n, logits=False, fixed_prefix=f)
    assert logits is None
    assert torch.equal(k[:, :f], k_fixed) and torch.equal(v[:, :f], v_fixed)
    assert stats == BlendStats(n, (n - p,) * num_layers, False, n - p, 0, f)
    assert_every_layer_equals_cold(k, v, k_ref, v_ref)


def test_nothing_to_compute_returns_at_once(case):
    _, view, _, ids, k_ref, v_ref = case
    n = ids.shape[0]
    k, v = k_ref.clone(), v_ref.clone()
    stats, logits = run_blended_prefill(view, ids, k, v, plan_of((Span(0, 0, n),), n), reuse_len=n, logits=False,
                                        fixed_prefix=16)
    assert logits is None and stats.token_layers == 0 and stats.active_per_layer == (0,) * view.num_layers
    assert stats.fixed_prefix == 16
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
