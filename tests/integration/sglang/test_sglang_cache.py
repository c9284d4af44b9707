"""``SemBlendRadixCache`` on real SGLang CPU pools, driven by SGLang's own match / lock / release functions.

Every test ends with the same checks: no slot is free twice, the pool invariant holds, nothing is left pending, the
tree holds no slot of a request that was served donor KV past its exact match, and once the tree is emptied the free
set is exactly the initial one. The forward pass is not run here (``sglang_harness.prefill`` writes per-token K/V);
test_sglang_e2e.py runs the real engine.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sglang", reason="sglang not installed: run scripts/setup_sglang_env.sh (make test does)")
pytestmark = pytest.mark.engine_sglang

import torch  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams  # noqa: E402
from sglang.srt.mem_cache.common import release_kv_cache  # noqa: E402
from sglang.srt.managers.schedule_batch import FINISH_ABORT  # noqa: E402

from semblend.integration.sglang._cache import SemBlendRadixCache  # noqa: E402
from semblend.integration.sglang._config import SglangAdapterConfig  # noqa: E402
from semblend.integration.sglang._load import DeclineReason  # noqa: E402
from semblend_core import CacheNamespace, SemBlendConfig, SemBlendPipeline  # noqa: E402
from semblend_core.kv_tensor_store import KvTensorStore  # noqa: E402
from semblend_core.rope_correction import rerotate_keys, rope_spec_from_config  # noqa: E402
import sglang_harness as h  # noqa: E402

ROPE = rope_spec_from_config({"model_type": "llama", "rope_theta": 10000.0, "head_dim": h.HEAD_DIM,
                              "num_attention_heads": h.HEADS, "hidden_size": h.HEADS * h.HEAD_DIM})
INSTR, DOC, Q1, Q2 = h.random_tokens(30, 1), h.random_tokens(120, 2), h.random_tokens(20, 3), h.random_tokens(20, 4)


def make_tree(pools: h.Pools, *, host_bytes: int = 0, mode: str = "prefix", rope=ROPE,
              load_moved_prefix: bool = True) -> SemBlendRadixCache:
    # Most cases move a donor's document to the target's start (the slot bookkeeping under test is the same for
    # any load), so they opt in to moved prefixes; the default is tested on its own.
    cfg = SemBlendConfig(min_prompt_tokens=16, chunk_size=16)
    adapter = SglangAdapterConfig(mode=mode, host_tier_bytes=host_bytes, min_donor_tokens=16,
                                  load_moved_prefix=load_moved_prefix)
    store = KvTensorStore(device_bytes=0, host_bytes=host_bytes) if host_bytes else None
    return SemBlendRadixCache(pools.params(), pipeline=SemBlendPipeline(cfg), adapter=adapter,
                              namespace=CacheNamespace(model="test"), rope=rope, host_store=store)


@pytest.fixture(scope="module", autouse=True)
def _server_args():
    h.publish_server_args()


@pytest.fixture
def pools():
    return h.Pools()


def served(tree, key: str) -> int:
    return sum(n for k, n in tree.counters.items() if k.startswith(key))


def row_kv(pools: h.Pools, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.stack([pools.kv.k_buffer[i][row] for i in range(h.LAYERS)])
    v = torch.stack([pools.kv.v_buffer[i][row] for i in range(h.LAYERS)])
    return k, v  # [LAYERS, len(row), HEADS, HEAD_DIM]


def check_clean(pools: h.Pools, tree, *, approximate_rows=()) -> None:
    pools.assert_no_duplicates()
    pools.assert_conserved(tree)
    assert tree.pending_requests() == []
    held = h.tree_slots(tree)
    for row, exact in approximate_rows:
        assert not held & set(row[exact:].tolist()), "the tree holds slots of approximate KV"
    tree.evict(EvictParams(num_tokens=pools.size))
    assert pools.free_set() == pools.initial_free and pools.free_list().numel() == pools.size


# ------------------------------------------------------------------------------------------------ hits
def test_shifted_hit_from_pool_rerotates_and_stays_out_of_the_tree(pools):
    tree = make_tree(pools)
    donor = h.run_request(pools, tree, INSTR + DOC + Q1)
    donor_path = tree.path_device_indices(tree.match_prefix(_last_match(tree, INSTR + DOC + Q1)).last_device_node)
    dk, dv = row_kv(pools, donor_path[30:150])
    free_before = pools.allocator.available_size()

    target = h.new_req(DOC + Q2)
    target.init_next_round_input(tree)
    assert target.prefix_len == 120 and target.kv.cache_protected_len == 0 and target.skip_radix_cache_insert
    assert pools.allocator.available_size() == free_before - 120
    pools.assert_conserved(tree)
    row = h.admit(pools, tree, target)
    assert not set(row[:120].tolist()) & set(donor_path.tolist()), "donor slots must be copied, not shared"
    k, v = row_kv(pools, row[:120])
    assert torch.equal(v, dv)
    want = torch.stack([rerotate_keys(dk[i], -30, ROPE) for i in range(h.LAYERS)])
    torch.testing.assert_close(k, want, rtol=0, atol=1e-6)
    h.prefill(pools, target, row)
    h.finish(tree, target)
    assert served(tree, "materialized:pool") == 1
    assert DOC + Q2 not in [p[: len(DOC + Q2)] for p in h.tree_keys(tree)], "approximate KV went into the tree"
    assert tree.pipeline.store.lookup_id(donor.rid, tree.namespace.key) is not None  # registered at finish
    check_clean(pools, tree, approximate_rows=[(row, 0)])


def run_plain(pools, tree, tokens):
    """A request served without SemBlend (its prompt goes into the tree as SGLang computed it)."""
    adapter, tree.adapter = tree.adapter, SglangAdapterConfig(mode="discovery_only", min_donor_tokens=16)
    try:
        return h.run_request(pools, tree, tokens)
    finally:
        tree.adapter = adapter


def _last_match(tree, tokens):
    from array import array

    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    return MatchPrefixParams(key=RadixKey(array("q", tokens)))


def test_document_first_hit_from_host_tier_after_eviction_is_bit_exact(pools):
    tree = make_tree(pools, host_bytes=1 << 24)
    donor = h.run_request(pools, tree, DOC + Q1)
    donor_path = tree.path_device_indices(tree.match_prefix(_last_match(tree, DOC + Q1)).last_device_node)
    dk, dv = row_kv(pools, donor_path[:120])
    dk, dv = dk.clone(), dv.clone()
    tree.evict(EvictParams(num_tokens=pools.size))  # the donor's nodes are gone; the host tier still has its KV
    assert tree.match_prefix(_last_match(tree, DOC)).device_prefix_len == 0
    assert tree.host_store.contains(tree.namespace.key, donor.rid)

    target = h.new_req(DOC + Q2)
    target.init_next_round_input(tree)
    assert target.prefix_len == 120
    row = h.admit(pools, tree, target)
    k, v = row_kv(pools, row[:120])
    assert torch.equal(k, dk) and torch.equal(v, dv)  # delta 0: a bit-exact copy
    h.prefill(pools, target, row)
    h.finish(tree, target)
    assert served(tree, "materialized:host") == 1
    check_clean(pools, tree, approximate_rows=[(row, 0)])


def test_exact_match_first_semantic_part_only_beyond_it(pools):
    tree = make_tree(pools)
    h.run_request(pools, tree, INSTR + DOC + Q1)
    run_plain(pools, tree, DOC[:40] + h.random_tokens(60, 9))  # the tree now matches DOC[:40] exactly
    target = h.new_req(DOC + Q2)
    target.init_next_round_input(tree)
    assert target.kv.cache_protected_len == 40 and target.prefix_len == 120
    tree_part = tree.path_device_indices(target.last_node)[:40]
    row = h.admit(pools, tree, target)
    assert torch.equal(row[:40], tree_part)  # SGLang's own KV for the exact part
    h.prefill(pools, target, row)
    h.finish(tree, target)
    check_clean(pools, tree, approximate_rows=[(row, 40)])


# ------------------------------------------------------------------------------------------------ declines
def test_miss_allocates_nothing(pools):
    tree = make_tree(pools)
    h.run_request(pools, tree, INSTR + DOC + Q1)
    free = pools.allocator.available_size()
    req = h.new_req(h.random_tokens(150, 11))
    req.init_next_round_input(tree)
    assert req.prefix_len == 0 and not req.skip_radix_cache_insert
    assert pools.allocator.available_size() == free and tree.pending_requests() == []
    row = h.admit(pools, tree, req)
    h.prefill(pools, req, row)
    h.finish(tree, req)
    check_clean(pools, tree)


def test_shift_declined_without_exact_rope_before_allocating(pools):
    tree = make_tree(pools, rope=None)
    h.run_request(pools, tree, INSTR + DOC + Q1)
    free = pools.allocator.available_size()
    req = h.new_req(DOC + Q2)
    req.init_next_round_input(tree)
    assert req.prefix_len == 0 and pools.allocator.available_size() == free
    assert served(tree, f"declined:{DeclineReason.ROPE_NOT_SHIFT_INVARIANT}") == 1
    h.finish(tree, _admitted(pools, tree, req))
    check_clean(pools, tree)


def _admitted(pools, tree, req):
    row = h.admit(pools, tree, req)
    h.prefill(pools, req, row)
    return req


def test_discovery_only_never_changes_the_match(pools):
    tree = make_tree(pools, mode="discovery_only")
    h.run_request(pools, tree, INSTR + DOC + Q1)
    req = h.new_req(DOC + Q2)
    req.init_next_round_input(tree)
    assert req.prefix_len == 0 and served(tree, "discovery_only") == 1
    h.finish(tree, _admitted(pools, tree, req))
    check_clean(pools, tree)


def test_donor_evicted_without_host_tier_is_declined(pools):
    tree = make_tree(pools)
    h.run_request(pools, tree, INSTR + DOC + Q1)
    tree.evict(EvictParams(num_tokens=pools.size))
    free = pools.allocator.available_size()
    req = h.new_req(DOC + Q2)
    req.init_next_round_input(tree)
    assert req.prefix_len == 0 and pools.allocator.available_size() == free
    assert served(tree, f"declined:{DeclineReason.DONOR_KV_EVICTED}") == 1
    h.finish(tree, _admitted(pools, tree, req))
    check_clean(pools, tree)


# ------------------------------------------------------------------------------------------------ lifecycle
def test_abort_before_admission_frees_the_donor_slots_once(pools):
    tree = make_tree(pools)
    h.run_request(pools, tree, INSTR + DOC + Q1)
    free = pools.allocator.available_size()
    req = h.new_req(DOC + Q2)
    req.init_next_round_input(tree)
    assert pools.allocator.available_size() == free - 120
    h.abort_waiting(tree, req)
    h.abort_waiting(tree, req)  # a second release must not free again
    assert pools.allocator.available_size() == free
    assert served(tree, f"declined:{DeclineReason.ABORTED_BEFORE_ADMISSION}") == 1
    check_clean(pools, tree)


def test_abort_after_admission_frees_through_the_row(pools):
    tree = make_tree(pools)
    h.run_request(pools, tree, INSTR + DOC + Q1)
    req = h.new_req(DOC + Q2)
    req.init_next_round_input(tree)
    row = h.admit(pools, tree, req)
    h.prefill(pools, req, row)
    req.finished_reason = FINISH_ABORT()
    release_kv_cache(req, tree, checkpoint=True)  # SGLang frees [cache_protected_len, end) of the row
    h.abort_waiting(tree, req)  # the tree's abort hook: nothing of ours is left to free
    check_clean(pools, tree, approximate_rows=[(row, 0)])


def test_reset_while_waiting_frees_held_slots(pools):
    tree = make_tree(pools)
    h.run_request(pools, tree, INSTR + DOC + Q1)
    req = h.new_req(DOC + Q2)
    req.init_next_round_input(tree)
    held = set(tree._pending[req.rid].slots.tolist())
    tree.reset()
    assert tree.pending_requests() == [] and held <= pools.free_set()
    pools.assert_no_duplicates()
    pools.req_to_token_pool.clear()
    pools.allocator.clear()  # Scheduler.flush_cache clears the pools after the tree
    check_clean(pools, tree)


def test_repeated_match_returns_the_same_load(pools):
    tree = make_tree(pools)
    h.run_request(pools, tree, INSTR + DOC + Q1)
    req = h.new_req(DOC + Q2)
    req.init_next_round_input(tree)
    slots = tree._pending[req.rid].slots.clone()
    free = pools.allocator.available_size()
    for _ in range(3):
        req.init_next_round_input(tree)
        assert req.prefix_len == 120
    assert pools.allocator.available_size() == free and torch.equal(tree._pending[req.rid].slots, slots)
    row = h.admit(pools, tree, req)
    assert torch.equal(row[:120], slots)
    h.prefill(pools, req, row)
    h.finish(tree, req)
    assert served(tree, "materialized") == 1
    check_clean(pools, tree, approximate_rows=[(row, 0)])


def test_exact_hit_growing_between_matches_replaces_the_load(pools):
    tree = make_tree(pools)
    h.run_request(pools, tree, INSTR + DOC + Q1)
    req = h.new_req(DOC + Q2)
    req.init_next_round_input(tree)
    first = set(tree._pending[req.rid].slots.tolist())
    run_plain(pools, tree, DOC[:64] + h.random_tokens(40, 12))  # the tree now matches 64 tokens exactly
    free_after_other = pools.allocator.available_size()
    req.init_next_round_input(tree)
    assert req.kv.cache_protected_len == 64 and req.prefix_len == 120
    assert len(tree._pending[req.rid].slots) == 56
    assert pools.allocator.available_size() == free_after_other + 120 - 56  # the first load's slots came back
    assert served(tree, f"declined:{DeclineReason.REMATCHED}") == 1
    row = h.admit(pools, tree, req)
    h.prefill(pools, req, row)
    h.finish(tree, req)
    assert not first & h.tree_slots(tree)
    check_clean(pools, tree, approximate_rows=[(row, 64)])


def test_exact_hit_growing_to_cover_the_prefix_drops_the_load(pools):
    tree = make_tree(pools)
    h.run_request(pools, tree, INSTR + DOC + Q1)
    req = h.new_req(DOC + Q2)
    req.init_next_round_input(tree)
    run_plain(pools, tree, DOC + h.random_tokens(30, 13))  # exact now covers the whole document
    req.init_next_round_input(tree)
    assert req.prefix_len == 120 and req.kv.cache_protected_len == 120
    assert tree.pending_requests() == [] and not req.skip_radix_cache_insert
    row = h.admit(pools, tree, req)
    h.prefill(pools, req, row)
    h.finish(tree, req)
    check_clean(pools, tree)


def test_eviction_pressure_evicts_others_never_the_donor_or_the_match(pools):
    small = h.Pools(size=400)
    tree = make_tree(small)
    h.run_request(small, tree, INSTR + DOC + Q1)             # 170 slots in the tree (donor)
    h.run_request(small, tree, h.random_tokens(150, 21))    # 150 more: 80 free
    req = h.new_req(DOC + Q2)
    req.init_next_round_input(tree)                          # needs 120: evicts the unrelated prompt
    assert req.prefix_len == 120 and tree._pending[req.rid].source == "pool"
    row = h.admit(small, tree, req)
    h.prefill(small, req, row)
    h.finish(tree, req)
    check_clean(small, tree, approximate_rows=[(row, 0)])


def test_no_room_even_after_eviction_declines_with_nothing_allocated(pools):
    small = h.Pools(size=300)
    tree = make_tree(small)
    h.run_request(small, tree, INSTR + DOC + Q1)   # 170 in the tree (the donor: locked during the load)
    hog = h.new_req(h.random_tokens(100, 22))       # a running request holds 100 more: 30 free
    hog.init_next_round_input(tree)
    row_hog = h.admit(small, tree, hog)
    free = small.allocator.available_size()
    req = h.new_req(DOC + Q2)
    req.init_next_round_input(tree)
    assert req.prefix_len == 0 and small.allocator.available_size() == free
    assert served(tree, f"declined:{DeclineReason.NO_FREE_SLOTS}") == 1
    # Declined before touching anything: not even the donor's unneeded tail was evicted.
    assert tree.match_prefix(_last_match(tree, INSTR + DOC + Q1)).device_prefix_len == 170
    h.prefill(small, hog, row_hog)
    h.finish(tree, hog)
    check_clean(small, tree)
