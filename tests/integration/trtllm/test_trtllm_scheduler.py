"""Scheduler side driven the way TensorRT-LLM's executor drives a connector, with stand-in requests.

A stand-in is used because TensorRT-LLM cannot run (or even be imported) on these machines; ``LlmRequest``,
``RequestData`` and ``SchedulerOutput`` are built from the signature table pinned in ``trtllm_standins``.
``trtllm_standins.Executor.run`` follows the executor's order for one request: ``KVCacheManager.addSequence`` ->
``get_num_new_matched_tokens(request, own_hit)`` -> ``update_state_after_alloc`` -> ``build_connector_meta`` (the
request in ``new_requests``, ``computed_position`` without the connector's tokens) -> the worker's
``bind_connector_meta`` / ``start_load_kv`` -> the forward (emulated: it writes the prompt's true KV for the tokens
it computes) -> ``wait_for_save`` -> ``request_finished``. Both connector classes are the ones TensorRT-LLM builds,
from one ``llm_args``, sharing one pool.

The "true KV" of a token is a function of its whole prefix (like causal attention's), so KV that is correct for a
prompt differs from KV that is correct for another prompt with the same token at the same position.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import trtllm_standins as S

from semblend.integration.trtllm import connector
from semblend.integration.trtllm._scheduler import DeclineReason
from semblend_core import ConfigError

L, H, T, D, NB = 2, 2, 16, 8, 64


def toks(seed, n):
    return [int(x) for x in np.random.default_rng(seed).integers(10, 50_000, n)]


A, DOC, Q = toks(1, 64), toks(2, 192), toks(3, 64)


def true_kv(tokens) -> torch.Tensor:
    """``[L, 2, n, H, D]``: token ``t``'s KV depends on ``tokens[:t + 1]`` (a causal model's does)."""
    out = torch.empty(L, 2, len(tokens), H, D)
    h = hashlib.sha256()
    for t, tok in enumerate(tokens):
        h.update(int(tok).to_bytes(8, "little"))
        g = torch.Generator().manual_seed(int.from_bytes(h.digest()[:7], "little"))
        out[:, :, t] = torch.randn(L, 2, H, D, generator=g)
    return out


def hf_config():
    return SimpleNamespace(model_type="llama", num_attention_heads=H, num_key_value_heads=H, head_dim=D,
                           hidden_size=H * D, num_hidden_layers=L, rope_theta=10000.0, max_position_embeddings=4096)


def executor(monkeypatch, mode="prefix", *, pool=None, **args):
    return S.Executor(monkeypatch, hf_config(), true_kv, num_blocks=NB, tokens_per_block=T, mode=mode, pool=pool,
                      **args)


def pool_tokens(pool, ids, n, layer, which):
    return S.read_tokens(pool, "HND", ids, 0, n, layer, which, H, T, D)


# ---------------------------------------------------------------------------------------------- discovery_only
def test_discovery_only_is_the_default_and_never_alters_scheduling(monkeypatch):
    monkeypatch.delenv("TLLM_SEMBLEND_CONFIG", raising=False)
    args = S.llm_args(tokens_per_block=T, hf_config=hf_config())
    sched, worker = connector.SemBlendKvConnectorScheduler(args), connector.SemBlendKvConnectorWorker(args)
    assert sched.adapter.mode == "discovery_only" and sched.pipeline.config.discovery_only
    pool = S.make_pool(NB, L, H, T, D)
    before = pool.clone()
    worker.register_kv_caches(pool)
    donor = S.LlmRequest(1, A + DOC)
    assert sched.get_num_new_matched_tokens(donor, 0) == (0, False)
    meta = sched.build_connector_meta(S.SchedulerOutput(new_requests=[S.RequestData(1, A + DOC, [0], 0, 256)]))
    assert not meta
    worker.bind_connector_meta(meta)
    worker.start_load_kv(None)
    worker.wait_for_save(None)
    donor.context_current_position = 256
    assert sched.request_finished(donor, [0]) is False
    assert len(sched.pipeline.store) == 1  # finished prompts become (token-only) donors
    target = S.LlmRequest(2, DOC + Q)
    assert sched.get_num_new_matched_tokens(target, 0) == (0, False)
    assert sched.side._requests["2"].plan.is_hit  # the hit is evidence, recorded, never loaded
    sched.request_finished(target, [])
    assert torch.equal(pool, before)
    assert sched.pipeline.stats()["outcomes"]["discovery_only"] == 1
    assert sched.side.num_tracked_requests() == 0


# ---------------------------------------------------------------------------------------------- prefix mode
def test_context_exact_hit_is_credited_and_loaded_into_the_requests_blocks(monkeypatch):
    ex = executor(monkeypatch)
    assert ex.run(S.LlmRequest(1, DOC + A))[0] == 0  # donor: nothing to reuse yet; captured at its last step
    assert len(ex.sched.pipeline.store) == 1
    target = S.LlmRequest(2, DOC + Q)
    n, ids = ex.admit(target)
    assert n == 192  # the shared document prefix, block-aligned
    meta = ex.step(target, ids, 0, n)
    (load,) = meta.loads
    assert (load.target_start, load.num_tokens, load.delta, load.block_ids) == (0, 192, 0, tuple(ids[:12]))
    want = true_kv(DOC + Q)
    for layer in range(L):
        for which in range(2):
            # loaded tokens hold exactly what this prompt's prefill computes, the rest was computed by the forward
            assert torch.equal(pool_tokens(ex.pool, ids, 256, layer, which), want[layer, which])
    ex.sched.request_finished(target, ids)
    stats = ex.stats()
    assert stats["outcomes"]["materialized"] == 1 and stats["loaded_tokens"] == 192
    assert ex.sched.side.num_tracked_requests() == 0


def test_shifted_hit_is_declined_before_any_token_is_credited(monkeypatch):
    """Approximate (shifted) KV would be stored in TensorRT-LLM's reusable pool as an exact hit: never loaded."""
    ex = executor(monkeypatch)
    ex.run(S.LlmRequest(1, A + DOC))
    target = S.LlmRequest(2, DOC + Q)  # DOC moves from position 64 to 0
    n, ids, meta = ex.run(target)
    assert n == 0 and not meta.loads
    assert ex.stats()["reasons"].get(DeclineReason.APPROXIMATE_KV_NOT_ISOLABLE) == 1
    assert ex.stats()["outcomes"]["materialized"] == 0
    # and the target's blocks hold its own prefill, nothing of the donor
    assert torch.equal(pool_tokens(ex.pool, ids, 256, 0, 0), true_kv(DOC + Q)[0, 0])


def test_engine_hit_and_partial_blocks(monkeypatch):
    ex = executor(monkeypatch)
    ex.run(S.LlmRequest(1, DOC + A))
    assert ex.sched.get_num_new_matched_tokens(S.LlmRequest(2, DOC + Q), 8) == (0, False)  # half-computed block
    assert ex.sched.side._requests["2"].decision.reason == DeclineReason.ENGINE_PARTIAL_BLOCK
    n, _ = ex.admit(S.LlmRequest(3, DOC + Q), own_hit=96)
    assert n == 96  # only what TensorRT-LLM's own reuse does not cover
    ex.sched.request_finished(S.LlmRequest(3, DOC + Q), [])
    ex.sched.request_finished(S.LlmRequest(2, DOC + Q), [])
    assert ex.sched.side.num_tracked_requests() == 0


def test_evicted_donor_is_declined_and_retired(monkeypatch):
    ex = executor(monkeypatch)
    ex.run(S.LlmRequest(1, DOC + A))
    store = ex.worker.side.store
    (key,) = store.keys()
    store.evict(*key)
    ex.worker.side._report_evictions()
    ns = ex.sched.namespace.key
    assert ex.sched.pipeline.store.lookup_id("trtllm-1", ns) is not None
    n, _, meta = ex.run(S.LlmRequest(2, DOC + Q))
    assert n == 0 and not meta.loads
    assert ex.sched.pipeline.store.lookup_id("trtllm-1", ns) is None  # the planner forgot the evicted donor


def test_credited_donor_is_leased_until_loaded(monkeypatch):
    """Between crediting and the load, the donor's KV cannot be evicted (the load has no way back to prefill)."""
    ex = executor(monkeypatch)
    ex.run(S.LlmRequest(1, DOC + A))
    target = S.LlmRequest(2, DOC + Q)
    n, ids = ex.admit(target)
    assert n == 192 and ex.sched.side.shared.num_pins() == 1
    store = ex.worker.side.store
    (key,) = store.keys()
    store.evict(*key)  # hidden from new lookups, freed only when the lease is released
    ex.step(target, ids, 0, n)
    assert torch.equal(pool_tokens(ex.pool, ids, 192, 1, 0), true_kv(DOC + Q)[1, 0, :192])
    assert ex.sched.side.shared.num_pins() == 0
    ex.sched.request_finished(target, ids)


def test_aborted_before_scheduling_releases_everything(monkeypatch):
    ex = executor(monkeypatch)
    ex.run(S.LlmRequest(1, DOC + A))
    target = S.LlmRequest(2, DOC + Q)
    assert ex.admit(target)[0] == 192
    ex.sched.request_finished(target, [])
    assert ex.sched.side.num_tracked_requests() == 0
    assert ex.stats()["reasons"].get(DeclineReason.NOT_SCHEDULED) == 1


def test_unusable_worker_declines_every_load(monkeypatch):
    bad = torch.zeros(NB, L, 2, H * T * D * 2)  # not this model's geometry
    ex = executor(monkeypatch, pool=bad)
    assert ex.sched.side.shared.unusable_reason.startswith("kv_layout_unsupported")
    ex.sched.pipeline.register_donor("x", DOC + A, namespace=ex.sched.namespace)
    assert ex.sched.get_num_new_matched_tokens(S.LlmRequest(2, DOC + Q), 0) == (0, False)
    assert ex.sched.side._requests["2"].decision.reason == DeclineReason.WORKER_UNAVAILABLE


@pytest.mark.parametrize("attr", ["cache_salt", "cache_salt_id"])
def test_cache_salt_partitions_donors(monkeypatch, attr):
    ex = executor(monkeypatch)
    salt_a, salt_b = ("a", "b") if attr == "cache_salt" else (11, 12)
    ex.run(S.LlmRequest(1, DOC + A, **{attr: salt_a}))
    assert ex.run(S.LlmRequest(2, DOC + Q, **{attr: salt_b}))[0] == 0  # another salt: never this donor
    assert ex.stats()["outcomes"]["cold"] >= 1
    assert ex.run(S.LlmRequest(3, DOC + Q))[0] == 0  # no salt is its own partition too
    assert ex.run(S.LlmRequest(4, DOC + Q, **{attr: salt_a}))[0] == 192


def test_a_request_without_a_readable_salt_is_never_loaded(monkeypatch):
    ex = executor(monkeypatch)
    ex.run(S.LlmRequest(1, DOC + A))
    assert ex.run(S.LlmRequest(2, DOC + Q, salt_bound=False))[0] == 0
    assert ex.stats()["reasons"].get(DeclineReason.CACHE_SALT_UNKNOWN) == 1


def test_lora_task_partitions_donors(monkeypatch):
    ex = executor(monkeypatch)
    ex.run(S.LlmRequest(1, DOC + A, lora_task_id=5))
    assert ex.run(S.LlmRequest(2, DOC + Q, lora_task_id=6))[0] == 0
    assert ex.run(S.LlmRequest(3, DOC + Q, lora_task_id=5))[0] == 192


def test_chunked_prefill_captures_at_the_last_chunk(monkeypatch):
    ex = executor(monkeypatch)
    req = S.LlmRequest(1, DOC + A)
    _n, ids = ex.admit(req)
    first = S.RequestData(1, req.get_tokens(0), ids, 0, 128)
    assert not ex.sched.build_connector_meta(S.SchedulerOutput(new_requests=[first])).saves
    rest = S.RequestData(1, [], [], 128, 128)
    (save,) = ex.sched.build_connector_meta(S.SchedulerOutput(cached_requests=[rest])).saves
    assert (save.num_tokens, save.block_ids) == (256, tuple(ids))
    ex.sched.request_finished(req, ids)


def test_planning_errors_are_a_normal_prefill(monkeypatch):
    ex = executor(monkeypatch)

    class Broken(S.LlmRequest):
        def get_tokens(self, beam):
            raise RuntimeError("boom")

    assert ex.sched.get_num_new_matched_tokens(Broken(9, DOC), 0) == (0, False)


# ---------------------------------------------------------------------------------------------- start-up checks
@pytest.mark.parametrize("args,match", [
    ({"enable_block_reuse": False}, "enable_block_reuse"),
    ({"host_cache_size": 1 << 30}, "host_cache_size"),
    ({"tensor_parallel_size": 2}, "tensor_parallel_size"),
    ({"attn_backend": "FLASH_MLA"}, "attn_backend"),
])
def test_materializing_mode_refuses_to_start_where_it_cannot_keep_the_rules(monkeypatch, args, match):
    monkeypatch.setenv("TLLM_SEMBLEND_CONFIG", '{"mode": "prefix"}')
    for cls in (connector.SemBlendKvConnectorScheduler, connector.SemBlendKvConnectorWorker):
        with pytest.raises(ConfigError, match=match):
            cls(S.llm_args(hf_config=hf_config(), **args))
    monkeypatch.setenv("TLLM_SEMBLEND_CONFIG", '{"mode": "discovery_only"}')
    connector.SemBlendKvConnectorScheduler(S.llm_args(hf_config=hf_config(), **args))  # discovery runs anywhere
