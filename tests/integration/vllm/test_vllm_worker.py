"""Worker side on CPU tensors laid out exactly as vLLM's worker views its KV cache allocation.

The paged tensors come from vLLM's own ``create_kv_cache_views`` for a ``FullAttentionSpec`` (logical
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``) in each physical layout, split into K and V the way the
attention backend that uses that layout reads it (CPU backend: LBHNC, token halves; FlashAttention: content halves).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine_vllm
pytest.importorskip("vllm", reason="vllm not installed: run scripts/setup_vllm_env.sh")
torch = pytest.importorskip("torch")

import vllm_harness as H

from semblend.integration.vllm._metadata import LoadSpec, SaveSpec, StepPlan
from semblend.integration.vllm._worker import WorkerSide, split_kv
from semblend_core.kv_tensor_store import KvTensorStore
from semblend_core.rope_correction import rerotate_keys

BS, NUM_BLOCKS, NS = 16, 24, "ns-key"
LAYOUTS = [("LBHNC", "token_halves"), ("LBNHC", "content"), ("LBHNC", "content")]


def make_worker(layout, split, seed=0):
    caches = H.paged_kv_caches(BS, NUM_BLOCKS, layout)
    g = torch.Generator().manual_seed(seed)
    for t in caches.values():  # random contents everywhere: untouched slots must keep them
        t.copy_(torch.randn(t.shape, generator=g))
    store = KvTensorStore(device_bytes=1 << 26, device="cpu")
    worker = WorkerSide(store, H.rope_spec(), head_size=H.HEAD_SIZE, kv_split=split)
    worker.register_kv_caches(caches)
    names = sorted(caches, key=lambda n: int(n.split(".")[2]))
    views = [split_kv(caches[n], H.HEAD_SIZE, split) for n in names]
    return worker, caches, views, store


def donor_kv(num_tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H.NUM_LAYERS, 2, num_tokens, H.NUM_KV_HEADS, H.HEAD_SIZE, generator=g)


def read(views, layer, slots):
    k, v = views[layer]
    blk = torch.tensor([s // BS for s in slots])
    off = torch.tensor([s % BS for s in slots])
    return k[blk, :, off], v[blk, :, off]


def test_split_matches_backend_reading():
    """The two splits address what the backends read: content halves, or the block's first/second token halves."""
    t = torch.arange(2 * 3 * BS * 2 * 4, dtype=torch.float32).reshape(2, 3, BS, 8)  # [B, H, N, 2D], D=4
    k, v = split_kv(t, 4, "content")
    assert torch.equal(k, t[..., :4]) and torch.equal(v, t[..., 4:])
    k, v = split_kv(t, 4, "token_halves")
    rows = t.reshape(2, 3, 2 * BS, 4)  # what the CPU backend does: view, then chunk along the token axis
    assert torch.equal(k, rows[:, :, :BS]) and torch.equal(v, rows[:, :, BS:])
    with pytest.raises(ValueError, match="unrecognised"):
        split_kv(t, 5, "content")


@pytest.mark.parametrize("layout,split", LAYOUTS)
@pytest.mark.parametrize("delta", [-64, 0, 37])
def test_start_load_writes_rerotated_donor_kv_into_the_requests_blocks_only(layout, split, delta):
    worker, caches, views, store = make_worker(layout, split)
    kv = donor_kv(200)
    store.put(NS, "donor", kv, list(range(200)))
    before = {n: t.clone() for n, t in caches.items()}
    donor_start, target_start, n = 64 if delta <= 0 else 16, None, 100
    target_start = donor_start + delta
    first = target_start // BS
    block_ids = tuple([5, 2, 17, 9, 11, 3, 20, 14][: -(-(target_start + n) // BS) - first])
    spec = LoadSpec("r", NS, "donor", donor_start, target_start, n, block_ids, BS)
    worker.start_load(StepPlan(loads=(spec,)))
    worker.wait_for_save(StepPlan(loads=(spec,)))
    assert worker.take_load_errors() == set()
    report = worker.take_report()
    assert report.loaded == (("r", n),) and not report.load_failed

    slots = spec.slots()
    for layer in range(H.NUM_LAYERS):
        k, v = read(views, layer, slots)
        src_k = kv[layer, 0, donor_start:donor_start + n]
        torch.testing.assert_close(k, rerotate_keys(src_k, delta, H.rope_spec()), rtol=1e-6, atol=1e-6)
        assert torch.equal(v, kv[layer, 1, donor_start:donor_start + n])
        if delta == 0:
            assert torch.equal(k, src_k)  # a shift-free load copies bit-exactly
    # Every other slot of every layer is untouched.
    touched = torch.zeros(NUM_BLOCKS * BS, dtype=torch.bool)
    touched[slots] = True
    for name, t in caches.items():
        ref_views = split_kv(before[name], H.HEAD_SIZE, split)
        new_views = split_kv(t, H.HEAD_SIZE, split)
        for ref, new in zip(ref_views, new_views):
            ref_rows = ref.permute(0, 2, 1, 3).reshape(NUM_BLOCKS * BS, H.NUM_KV_HEADS, H.HEAD_SIZE)
            new_rows = new.permute(0, 2, 1, 3).reshape(NUM_BLOCKS * BS, H.NUM_KV_HEADS, H.HEAD_SIZE)
            assert torch.equal(ref_rows[~touched], new_rows[~touched])
            assert not torch.equal(ref_rows[touched], new_rows[touched])


@pytest.mark.parametrize("layout,split", LAYOUTS[:2])
def test_capture_stores_the_prompts_kv_and_reports_it(layout, split):
    worker, _caches, views, store = make_worker(layout, split)
    block_ids = (7, 1, 12)
    spec = SaveSpec("r", NS, "r", 40, block_ids, BS, tuple(range(40)))
    worker.start_load(StepPlan(saves=(spec,)))
    worker.wait_for_save(StepPlan(saves=(spec,)))
    report = worker.take_report()
    (saved,) = report.saved
    assert (saved.donor_id, saved.num_tokens) == ("r", 40)
    assert saved.signature == worker.signature and saved.signature.num_kv_heads == H.NUM_KV_HEADS
    with store.lease(NS, "r") as donor:
        for layer in range(H.NUM_LAYERS):
            k, v = read(views, layer, spec.slots())
            assert torch.equal(donor.kv[layer, 0], k) and torch.equal(donor.kv[layer, 1], v)


def test_failed_load_reports_every_target_block_and_leaves_cache_untouched():
    worker, caches, _views, _store = make_worker("LBHNC", "token_halves")
    before = {n: t.clone() for n, t in caches.items()}
    spec = LoadSpec("r", NS, "missing-donor", 0, 0, 48, (4, 8, 15), BS)
    impossible = LoadSpec("q", NS, None, 0, 0, 16, (2,), BS)
    worker.start_load(StepPlan(loads=(spec, impossible)))
    worker.wait_for_save(StepPlan(loads=(spec, impossible)))
    assert worker.take_load_errors() == {4, 8, 15, 2}
    assert worker.take_load_errors() == set()  # reported once
    report = worker.take_report()
    assert set(report.load_failed) == {"r", "q"} and not report.loaded
    assert all(torch.equal(before[n], t) for n, t in caches.items())


def test_short_donor_fails_instead_of_reading_past_it():
    worker, _caches, _views, store = make_worker("LBNHC", "content")
    store.put(NS, "donor", donor_kv(40), list(range(40)))
    spec = LoadSpec("r", NS, "donor", 0, 0, 48, (1, 2, 3), BS)
    worker.start_load(StepPlan(loads=(spec,)))
    assert worker.take_load_errors() == {1, 2, 3}


def test_evictions_are_reported_after_captures():
    worker, _caches, _views, _ = make_worker("LBHNC", "content")
    one = H.NUM_LAYERS * 2 * 32 * H.NUM_KV_HEADS * H.HEAD_SIZE * 4  # bytes of a 32-token donor
    worker.store = KvTensorStore(device_bytes=one, device="cpu")  # room for exactly one donor
    for i, blocks in enumerate(((1, 2), (3, 4))):
        spec = SaveSpec(f"d{i}", NS, f"d{i}", 32, blocks, BS, tuple(range(i, i + 32)))
        worker.wait_for_save(StepPlan(saves=(spec,)))
    report = worker.take_report()
    assert [s.donor_id for s in report.saved] == ["d0", "d1"]
    assert report.evicted == ((NS, "d0"),)
