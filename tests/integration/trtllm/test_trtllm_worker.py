"""Worker side on CPU tensors laid out exactly as TensorRT-LLM's ``register_kv_caches`` receives its pool.

The pool is ``[num_blocks, num_layers, 2, num_kv_heads * tokens_per_block * head_dim]`` (``allocatePools``) and every
check reads it back with TensorRT-LLM's own addressing formula (``trtllm_standins.read_token``), not with the
adapter's views. The expected KV comes from ``semblend_core.rope_correction.rerotate_keys`` (the torch reference of
re-rotation), computed from the donor store independently of the kernel the worker runs.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import trtllm_standins as S

from semblend.integration.trtllm import connector
from semblend.integration.trtllm._layout import PoolGeometry, pool_view
from semblend.integration.trtllm._shared import SharedState
from semblend.integration.trtllm._worker import KvLoadError, WorkerSide
from semblend.integration.vllm._metadata import LoadSpec, SaveSpec, StepPlan
from semblend_core.kv_layout import KvLayoutError
from semblend_core.kv_tensor_store import KvTensorStore
from semblend_core.rope_correction import RopeSpec, rerotate_keys

L, H, T, D, NB, NS = 3, 2, 8, 16, 20, "ns-key"


def rope_spec() -> RopeSpec:
    inv = 1.0 / (10000.0 ** (np.arange(0, D, 2, dtype=np.float64) / D))
    return RopeSpec(head_dim=D, rotary_dim=D, inv_freq=inv)


def hf_config():
    """A Llama-style transformers config (read by attribute, like ``transformers.PretrainedConfig``)."""
    from types import SimpleNamespace

    return SimpleNamespace(model_type="llama", num_attention_heads=H, num_key_value_heads=H, head_dim=D,
                           hidden_size=H * D, num_hidden_layers=L, rope_theta=10000.0, max_position_embeddings=4096)


def connector_worker(monkeypatch, order, pool):
    """The class TensorRT-LLM instantiates, built from a stand-in ``llm_args`` in ``prefix`` mode."""
    monkeypatch.setenv("TLLM_SEMBLEND_CONFIG", '{"mode": "prefix", "donor_kv_gpu_bytes": 16777216}')
    args = S.llm_args(tokens_per_block=T, attn_backend="TRTLLM" if order == "HND" else "VANILLA",
                      hf_config=hf_config())
    cw = connector.SemBlendKvConnectorWorker(args)
    cw.register_kv_caches(pool)
    return cw


def make(order="HND", dtype=torch.float32, seed=0):
    pool = S.make_pool(NB, L, H, T, D, dtype=dtype, seed=seed)
    shared = SharedState()
    store = KvTensorStore(device_bytes=1 << 24, device="cpu")
    worker = WorkerSide(shared, PoolGeometry(L, H, T, D, order), rope_spec(), store=store)
    worker.register_kv_caches(pool)
    return worker, pool, shared, store


def donor_kv(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, 2, n, H, D, generator=g).to(dtype)


def blocks_for(start, n, ids=(5, 2, 17, 9, 11, 3, 14, 0, 7)):
    first, last = start // T, -(-(start + n) // T)
    return tuple(ids[: last - first])


def test_pool_view_addresses_the_trtllm_formula():
    """Writing through the adapter's view lands where KVBlockArray::getKVLocalIdx (HND) / get_buffers NHD says."""
    for order in ("HND", "NHD"):
        pool = torch.zeros(4, L, 2, H * T * D)
        view = pool_view(pool, PoolGeometry(L, H, T, D, order))
        k, v = view.kv(1)
        if order == "HND":
            k[2, 1, 3] = 7.0  # view [blocks, heads, tokens, head_dim]: head 1, token 3
        else:
            k[2, 3, 1] = 7.0  # view [blocks, tokens, heads, head_dim]: token 3, head 1
        v[2, ...] = 0
        got = S.read_token(pool, order, 2, 1, 0, 3, H, T, D)
        assert torch.all(got[1] == 7.0) and torch.all(got[0] == 0)
        assert pool.count_nonzero() == D


def test_pool_view_declines_what_it_does_not_address():
    geom = PoolGeometry(L, H, T, D)
    with pytest.raises(KvLayoutError, match="rank 4"):
        pool_view(torch.zeros(4, L, 2, H, T * D), geom)
    with pytest.raises(KvLayoutError, match="layers"):
        pool_view(torch.zeros(4, L + 1, 2, H * T * D), geom)
    with pytest.raises(KvLayoutError, match="K/V factor"):
        pool_view(torch.zeros(4, L, 1, H * T * D), geom)
    with pytest.raises(KvLayoutError, match="elements per block"):
        pool_view(torch.zeros(4, L, 2, H * T * D * 2), geom)
    with pytest.raises(KvLayoutError, match="dtype"):
        pool_view(torch.zeros(4, L, 2, H * T * D, dtype=torch.int8), geom)


def test_unsupported_pool_leaves_the_worker_unusable_not_broken():
    shared = SharedState()
    worker = WorkerSide(shared, PoolGeometry(L, H, T, D), rope_spec(), store=KvTensorStore(1 << 20, device="cpu"))
    worker.register_kv_caches(torch.zeros(4, L, 2, H * T * D + 1))
    assert shared.unusable_reason.startswith("kv_layout_unsupported")
    assert shared.pin("r", NS, "d") is None


@pytest.mark.parametrize("order", ["HND", "NHD"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("donor_start,target_start,n", [(0, 0, 40), (24, 8, 33), (8, 40, 1), (3, 16, 17)])
def test_start_load_kv_writes_rerotated_donor_kv_into_the_requests_blocks_only(monkeypatch, order, dtype,
                                                                                donor_start, target_start, n):
    pool = S.make_pool(NB, L, H, T, D, dtype=dtype)
    cw = connector_worker(monkeypatch, order, pool)
    shared, store = cw.side.shared, cw.side.store
    assert cw.side.rope is not None and cw.side.geometry.block_order == order
    kv = donor_kv(96, dtype=dtype)
    store.put(NS, "donor", kv, list(range(96)))
    before = pool.clone()
    ids = blocks_for(target_start, n)
    spec = LoadSpec("r", NS, "donor", donor_start, target_start, n, ids, T)
    shared.pin("r", NS, "donor")

    # As TensorRT-LLM drives it: bind the metadata, then start_load_kv(stream) before the forward.
    cw.bind_connector_meta(StepPlan(loads=(spec,)))
    cw.start_load_kv(None)

    delta = target_start - donor_start
    for layer in range(L):
        got_k = S.read_tokens(pool, order, ids, target_start, n, layer, 0, H, T, D)
        got_v = S.read_tokens(pool, order, ids, target_start, n, layer, 1, H, T, D)
        src_k = kv[layer, 0, donor_start: donor_start + n]
        want_k = src_k if delta == 0 else rerotate_keys(src_k.float(), delta, rope_spec()).to(dtype)
        if delta == 0:
            assert torch.equal(got_k, want_k)  # a copy is bit-exact
        else:
            ref = rerotate_keys(src_k.float(), delta, rope_spec())
            torch.testing.assert_close(got_k.float(), ref, rtol=0, atol=2 * (want_k.float() - ref).abs().max().item()
                                       + 1e-5)
        assert torch.equal(got_v, kv[layer, 1, donor_start: donor_start + n])
    # Every other element of the pool is untouched: other blocks, and the unloaded slots of the loaded blocks.
    touched = torch.zeros_like(pool, dtype=torch.bool)
    for layer in range(L):
        for which in range(2):
            for t in range(target_start, target_start + n):
                blk = ids[t // T - target_start // T]
                for h in range(H):
                    for c in range(D):
                        idx = (h * T * D + (t % T) * D + c) if order == "HND" else ((t % T) * H * D + h * D + c)
                        touched[blk, layer, which, idx] = True
    assert torch.equal(pool[~touched], before[~touched])
    assert shared.take_reports().loaded == [("r", n)]
    assert shared.num_pins() == 0  # the scheduler's lease is released once the load ran


def test_a_plan_left_bound_is_not_executed_twice():
    """If a step binds no new metadata, the previous plan's blocks may belong to another request by now."""
    worker, pool, shared, store = make()
    store.put(NS, "donor", donor_kv(32), list(range(32)))
    plan = StepPlan(loads=(LoadSpec("r", NS, "donor", 0, 0, T, (3,), T),))
    worker.start_load_kv(plan)
    pool[3].zero_()  # block 3 now holds another request's KV
    worker.start_load_kv(plan)
    assert pool[3].count_nonzero() == 0
    assert shared.take_reports().loaded == [("r", T)]


def test_a_credited_load_that_cannot_run_fails_the_step():
    """Tokens were credited, TensorRT-LLM will not compute them: the worker must not leave stale KV in place."""
    worker, pool, shared, _store = make()
    spec = LoadSpec("r", NS, "gone", 0, 0, 16, (1, 2), T)
    before = pool.clone()
    with pytest.raises(KvLoadError, match="credited load"):
        worker.start_load_kv(StepPlan(loads=(spec,)))
    assert torch.equal(pool, before)
    assert shared.take_reports().load_failed == ["r"]


@pytest.mark.parametrize("order", ["HND", "NHD"])
def test_wait_for_save_captures_a_prompt_and_a_load_round_trips(order):
    worker, pool, shared, store = make(order)
    n, ids = 29, (4, 12, 6, 19)
    kv = donor_kv(n, seed=3)
    S.write_request_kv(pool, order, ids, kv, H, T, D)
    worker.wait_for_save(StepPlan(saves=(SaveSpec("r", NS, "trtllm-r", n, ids, T, tuple(range(n))),)))
    assert shared.take_reports().captured == [(NS, "trtllm-r", n)]
    with store.lease(NS, "trtllm-r") as entry:
        assert torch.equal(entry.kv, kv)
    # Load the captured donor into another request's blocks (context-exact: delta 0) -> identical KV.
    dst = (0, 1, 2, 3)
    worker.start_load_kv(StepPlan(loads=(LoadSpec("t", NS, "trtllm-r", 0, 0, 24, dst[:3], T),)))
    for layer in range(L):
        for which in range(2):
            assert torch.equal(S.read_tokens(pool, order, dst, 0, 24, layer, which, H, T, D), kv[layer, which, :24])


def test_evictions_are_reported():
    worker, _pool, shared, _ = make()
    small = KvTensorStore(device_bytes=L * 2 * 20 * H * D * 4, device="cpu")  # room for one 20-token donor
    worker.store = small
    for i in range(2):
        worker.wait_for_save(StepPlan(saves=(SaveSpec(f"r{i}", NS, f"d{i}", 20, (i * 3, i * 3 + 1, i * 3 + 2), T,
                                                      tuple(range(i, 20 + i))),)))
    assert shared.take_reports().evicted == [(NS, "d0")]
