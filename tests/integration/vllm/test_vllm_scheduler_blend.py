"""Blend mode of SemBlendConnectorV1 against vLLM's real Scheduler on CPU (connector loaded by module path).

The worker side's blended prefill needs a real model (the e2e suite runs it with SmolLM2); here the harness's
stand-in executor (``vllm_harness.Engine._stand_in_blends``) fills each ``BlendSpec`` the way a correct executor
must: span KV from the worker's real donor KV store, re-rotated; every other position computed by the stand-in
model. Its K/V are context-free, so a correct BlendSpec (spans, donors, shifts, slots, local prefix) yields exactly
a cold prefill's KV, which the tests check block by block in the paged cache.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine_vllm
pytest.importorskip("vllm", reason="vllm not installed: run scripts/setup_vllm_env.sh")
pytest.importorskip("torch")

import json

import torch
import vllm_harness as H
from test_vllm_scheduler import assert_no_leaks, blocks_under_exact_hashes, local_hit, spy_evictions

from semblend.integration.vllm._scheduler import DeclineReason
from semblend_core.plan import SINK_TOKENS

BS = 16
A, D, Q, I = H.tokens(1, 64), H.tokens(2, 576), H.tokens(3, 16), H.tokens(4, 32)  # system, document, question,
X, D1, Y, D2 = H.tokens(21, 64), H.tokens(22, 320), H.tokens(23, 64), H.tokens(24, 160)  # instruction


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return H.write_model_dir(tmp_path_factory.mktemp("tiny_qwen2"))


def blend_engine(model_dir, num_blocks=256, extra=None, **kw):
    cfg = H.make_vllm_config(model_dir, mode="blend", extra={"min_donor_tokens": 32, **(extra or {})}, **kw)
    return H.Engine(cfg, num_blocks=num_blocks)


def with_donors(eng, *prompts):
    for i, tokens in enumerate(prompts):
        eng.add(H.make_request(tokens, req_id=f"donor{i}"))
        eng.run_until_done()
    assert eng.connector.scheduler_side.resident_donors() == len(prompts)
    return eng


def assert_cold_kv(eng, tokens, positions, blocks):
    for layer in range(H.NUM_LAYERS):
        k, v = eng.model.read(layer, positions, blocks)
        cold_k, cold_v = eng.model.expected(layer, [tokens[p] for p in positions], positions)
        torch.testing.assert_close(k, cold_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, cold_v, rtol=0, atol=0)


def test_instruction_before_document_is_credited_over_90_percent(model_dir):
    """The layout prefix mode reuses nothing of (0 tokens: the document does not start at token 0)."""
    eng = with_donors(blend_engine(model_dir), A + D)
    evicted = spy_evictions(eng)
    target = I + D + Q                                          # 624 tokens; the document at 32 (donor: at 64)
    eng.add(H.make_request(target, req_id="target", max_tokens=20))
    r = eng.step()
    assert evicted == []  # salted when offered: vLLM cached the credited blocks under salted hashes
    new = r.output.scheduled_new_reqs[0]
    assert new.num_computed_tokens == 608 and 608 / len(target) > 0.9
    assert r.output.num_scheduled_tokens["target"] == len(target) - 608
    assert r.loads == () and not r.load_errors
    (b,) = eng.blends_seen
    assert (b.req_id, b.num_tokens, b.local_tokens, b.check_layer, b.selection) == ("target", 608, 0, 1, None)
    assert b.token_ids.tolist() == list(target[:608]) and not b.token_ids.flags.writeable and list(b.block_ids) == new.block_ids[0][:38]
    assert [(sp.donor_id, sp.donor_start, sp.target_start, sp.length) for sp in b.plan.spans] == [
        ("donor0", 64, 32, 576)]
    assert b.plan.recompute_ranges[0] == (0, 36)                # the instruction + the seam head: mandatory
    assert_cold_kv(eng, target, range(608), new.block_ids[0])
    results = eng.run_until_done()
    side = eng.connector.scheduler_side
    stats = side.pipeline.stats()
    assert stats["outcomes"]["materialized"] == 1 and stats["loaded_tokens"] == 608 - 36
    # Approximate KV: never an exact prefix-cache hit, never a donor.
    assert local_hit(eng, target) == 0 and local_hit(eng, I + D) == 0
    assert blocks_under_exact_hashes(eng, "target", list(eng.requests["target"].all_token_ids)) == []
    assert not any(s.req_id == "target" for r in results for s in r.saves)
    assert side.resident_donors() == 1 and len(side.pipeline.store) == 1
    assert_no_leaks(eng)


def test_blend_fills_spans_from_several_donors(model_dir):
    eng = with_donors(blend_engine(model_dir), X + D1, Y + D2)
    target = I + D1 + D2 + Q                                    # two passages of two earlier requests
    eng.add(H.make_request(target, req_id="target"))
    r = eng.step()
    new = r.output.scheduled_new_reqs[0]
    assert new.num_computed_tokens == 512
    (b,) = eng.blends_seen
    assert b.plan.donor_ids == ("donor0", "donor1")
    assert_cold_kv(eng, target, range(512), new.block_ids[0])
    eng.run_until_done()
    assert eng.connector.semblend_stats()["outcomes"]["materialized"] == 1
    assert_no_leaks(eng)


def test_an_evicted_donor_is_dropped_and_the_rest_still_blends(model_dir):
    eng = with_donors(blend_engine(model_dir), X + D1, Y + D2)
    side = eng.connector.scheduler_side
    from semblend.integration.vllm._metadata import WorkerReport

    eng.worker.worker_side.store.evict(side.base_namespace.key, "donor1")
    side.update_connector_output(WorkerReport(evicted=((side.base_namespace.key, "donor1"),)))
    # The planner no longer offers donor1 (retired); the plan uses donor0 only, up to its passage's end.
    target = I + D1 + D2 + Q
    eng.add(H.make_request(target, req_id="target"))
    r = eng.step()
    assert r.output.scheduled_new_reqs[0].num_computed_tokens == 352
    (b,) = eng.blends_seen
    assert b.plan.donor_ids == ("donor0",)
    assert_cold_kv(eng, target, range(352), r.output.scheduled_new_reqs[0].block_ids[0])
    eng.run_until_done()
    assert_no_leaks(eng)


def test_donor_gone_while_planned_declines_before_credit(model_dir):
    eng = with_donors(blend_engine(model_dir), A + D)
    side = eng.connector.scheduler_side
    req = H.make_request(I + D + Q, req_id="target")
    assert eng.connector.get_num_new_matched_tokens(req, 0) == (608, False)
    side._resident.clear()                                      # the workers' report of the eviction arrived
    assert eng.connector.get_num_new_matched_tokens(req, 0) == (0, False)  # the waiting request re-checks
    eng.add(req)
    r = eng.step()
    assert r.output.scheduled_new_reqs[0].num_computed_tokens == 0 and eng.blends_seen == []
    eng.run_until_done()
    assert side.pipeline.stats()["reasons"].get(DeclineReason.DONOR_KV_EVICTED) == 1
    assert_no_leaks(eng)


def test_vllms_own_hit_is_the_fixed_prefix(model_dir):
    """A local exact hit is never re-blended: the BlendSpec starts after it, those blocks stay shareable."""
    eng = with_donors(blend_engine(model_dir), A + D)
    eng.add(H.make_request(I + H.tokens(30, 100), req_id="warm"))  # caches the instruction's two blocks
    eng.run_until_done()
    target = I + D + Q
    before = [eng.model.read(layer, range(32), eng.block_ids["warm"]) for layer in range(H.NUM_LAYERS)]
    eng.add(H.make_request(target, req_id="target"))
    r = eng.step()
    new = r.output.scheduled_new_reqs[0]
    assert new.num_computed_tokens == 608
    (b,) = eng.blends_seen
    assert b.local_tokens == 32 and b.num_blended == 576 and b.credited_block_ids() == tuple(new.block_ids[0][2:38])
    assert list(new.block_ids[0][:2]) == eng.block_ids["warm"][:2]   # shared with the warm request
    after = [eng.model.read(layer, range(32), new.block_ids[0]) for layer in range(H.NUM_LAYERS)]
    for (k0, v0), (k1, v1) in zip(before, after):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)      # untouched
    assert_cold_kv(eng, target, range(608), new.block_ids[0])
    eng.run_until_done()
    assert blocks_under_exact_hashes(eng, "target", target) == [0, 1]  # only vLLM's own blocks stay exact
    assert eng.connector.semblend_stats()["loaded_tokens"] == 576 - 4  # the seam head at 32 is recomputed
    assert_no_leaks(eng)


def test_failed_blend_is_recomputed_by_vllm(model_dir):
    eng = with_donors(blend_engine(model_dir), A + D)
    target = I + D + Q
    eng.add(H.make_request(target, req_id="target"))
    r = eng.step(fail_loads=True)
    (b,) = eng.blends_seen
    assert r.load_errors == set(b.credited_block_ids())
    results = eng.run_until_done()
    recomputed = sum(x.output.num_scheduled_tokens.get("target", 0) for x in results)
    assert recomputed >= 608
    assert_cold_kv(eng, target, range(len(target)), eng.block_ids["target"])
    stats = eng.connector.semblend_stats()
    assert stats["outcomes"]["materialized"] == 0 and stats["reasons"].get(DeclineReason.LOAD_FAILED) == 1
    assert_no_leaks(eng)


def test_the_first_tokens_are_recomputed_when_moved(model_dir):
    """Document first, at another position than in the donor: the moved-first-block rule of prefix mode would
    decline it; blend credits it and makes the sink positions mandatory recompute."""
    eng = with_donors(blend_engine(model_dir), A + D)
    target = D + Q
    eng.add(H.make_request(target, req_id="target"))
    r = eng.step()
    assert r.output.scheduled_new_reqs[0].num_computed_tokens == 576
    (b,) = eng.blends_seen
    assert b.plan.recompute_ranges[0] == (0, SINK_TOKENS)
    assert_cold_kv(eng, target, range(576), r.output.scheduled_new_reqs[0].block_ids[0])
    eng.run_until_done()
    assert eng.connector.semblend_stats()["loaded_tokens"] == 576 - SINK_TOKENS
    assert_no_leaks(eng)


def test_preempted_blend_keeps_one_plan_and_records_one_outcome(model_dir):
    eng = blend_engine(model_dir, num_blocks=40)
    doc = D[:192]
    with_donors(eng, A + doc)
    side = eng.connector.scheduler_side
    calls = []
    plan = side.pipeline.plan
    side.pipeline.plan = lambda tokens, **kw: calls.append(tuple(int(t) for t in tokens)) or plan(tokens, **kw)
    eng.add(H.make_request(H.tokens(7, 240), req_id="other", max_tokens=120))
    eng.add(H.make_request(I + doc + Q, req_id="target", max_tokens=120))
    results = eng.run_until_done(max_steps=600)
    assert "target" in set().union(*(r.output.preempted_req_ids or set() for r in results))
    assert calls.count(tuple(I + doc + Q)) == 1                 # planned once
    # Admitted again, the target finds its own blocks under the salted hashes only it carries and resumes on
    # them (as vLLM resumes any preempted request from its cached blocks): one blend, no second one.
    admitted = [n.num_computed_tokens for r in results for n in r.output.scheduled_new_reqs if n.req_id == "target"]
    assert len(admitted) == 2 and admitted[0] == 224 and admitted[1] >= 224
    assert [b.req_id for b in eng.blends_seen] == ["target"]
    stats = eng.connector.semblend_stats()
    assert sum(stats["outcomes"].values()) == 3 and stats["outcomes"]["materialized"] == 1
    assert_cold_kv(eng, I + doc + Q, range(224), eng.block_ids["target"])
    # ... and nobody else can: no exact hit on its prompt, none of its blocks under an exact hash.
    assert local_hit(eng, I + doc + Q) == 0
    assert blocks_under_exact_hashes(eng, "target", list(eng.requests["target"].all_token_ids)) == []
    assert_no_leaks(eng)


def test_a_model_the_executor_cannot_compute_is_declined_and_captures_nothing(model_dir, tmp_path):
    config = dict(H.TINY_QWEN2)
    config["clip_qkv"] = 8.0                                   # an OLMo knob: not Qwen2's math
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    eng = blend_engine(str(tmp_path / "m"))
    eng.add(H.make_request(A + D, req_id="donor"))
    results = eng.run_until_done()
    assert not any(r.saves for r in results)                    # no KV captured for a mode that cannot use it
    req = H.make_request(I + D + Q, req_id="target")
    assert eng.connector.get_num_new_matched_tokens(req, 0) == (0, False)
    eng.add(req)
    eng.run_until_done()
    reasons = eng.connector.semblend_stats()["reasons"]
    assert reasons.get("unsupported_config:clip_qkv=8.0") == 1  # the hit was planned, then declined
    assert eng.blends_seen == []
    assert_no_leaks(eng)


def test_tensor_parallel_is_declined_clearly(model_dir):
    """vLLM's parallel config says TP=2 (set after construction: this CPU box cannot build a 2-GPU world)."""
    cfg = H.make_vllm_config(model_dir, mode="blend", extra={"min_donor_tokens": 32})
    cfg.parallel_config.tensor_parallel_size = 2
    sched = H.make_scheduler(cfg)
    side = sched.connector.scheduler_side
    assert side.blend_unavailable == DeclineReason.BLEND_TENSOR_PARALLEL and side.num_workers == 2
    side.pipeline.register_donor("donor", A + D, namespace=side.base_namespace)
    req = H.make_request(I + D + Q, req_id="target")
    assert sched.connector.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.connector.request_finished(req, [])
    assert sched.connector.semblend_stats()["reasons"].get(DeclineReason.BLEND_TENSOR_PARALLEL) == 1


def test_blend_start_up_checks(model_dir):
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    cfg = H.make_vllm_config(model_dir, mode="blend", extra={"check_layers": [2]})  # the model has 2 layers
    with pytest.raises(ValueError, match=r"check_layers=\[2\] is not allowed for this model: allowed: one layer "
                                         r"in \[0, 1\]"):
        H.make_scheduler(cfg)
    with pytest.raises(ValueError, match=r"check_layers=\[2\] is not allowed for this model"):  # both roles
        KVConnectorFactory.create_connector(cfg, KVConnectorRole.WORKER, H.kv_cache_config(BS, 64))
    worker = KVConnectorFactory.create_connector(
        H.make_vllm_config(model_dir, mode="blend", extra={"recompute_ratio": 0.3, "check_layers": 0}),
        KVConnectorRole.WORKER, H.kv_cache_config(BS, 64))
    assert worker.adapter.check_layer == 0 and worker.core_config.recompute_budget == 0.3
    with pytest.raises(ValueError, match=r"check_layers=\[0, 16, 32\] is not allowed"):
        H.make_scheduler(H.make_vllm_config(model_dir, mode="blend", extra={"check_layers": [0, 16, 32]}))
    with pytest.raises(ValueError, match="mode 'blend' needs kv_load_failure_policy='recompute'"):
        H.make_scheduler(H.make_vllm_config(model_dir, mode="blend", kv_load_failure_policy="fail"))


def test_blend_counts_reach_prometheus(model_dir):
    import functools

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    eng = with_donors(blend_engine(model_dir), A + D)
    eng.add(H.make_request(I + D + Q, req_id="target"))
    results = eng.run_until_done()
    windows = [o.scheduler_stats.kv_connector_stats for r in results for o in r.engine_outputs.values()
               if o.scheduler_stats is not None and o.scheduler_stats.kv_connector_stats]
    registry = CollectorRegistry()
    types = {t: functools.partial(t, registry=registry) for t in (Gauge, Counter, Histogram)}
    prom = type(eng.connector).build_prom_metrics(eng.vllm_config, types, ["model_name", "engine"],
                                                  {0: ["tiny", "0"]})
    for w in windows:
        prom.observe(w, 0)
    text = generate_latest(registry).decode()
    assert 'vllm:semblend_blend_reused_tokens_total{engine="0",model_name="tiny"} 572.0' in text
    assert 'vllm:semblend_blend_recomputed_tokens_total{engine="0",model_name="tiny"} 36.0' in text
    assert 'vllm:semblend_loaded_tokens_total' in text
