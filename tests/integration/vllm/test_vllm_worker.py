"""Worker side on CPU tensors laid out exactly as vLLM's worker views its KV cache allocation.

The paged tensors come from vLLM's own ``create_kv_cache_views`` for a ``FullAttentionSpec`` (logical
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``) in each physical layout. Where K and V sit inside them is
the attention backend's business: a stand-in backend (``vllm_harness.StandInBackend``: vLLM's CPU ``vec`` layout
with K transposed per block, or the GPU backends' content halves) writes and reads them, the worker reads the layout
by probing that writer (``_layout.probe_block_layout``), and every check reads back through the backend, never
through the worker's own view.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine_vllm
pytest.importorskip("vllm", reason="vllm not installed: run scripts/setup_vllm_env.sh")
torch = pytest.importorskip("torch")

import vllm_harness as H

from semblend.integration.vllm._layout import BlockLayout, LayoutProbeError, probe_block_layout
from semblend.integration.vllm._metadata import LoadSpec, SaveSpec, StepPlan
from semblend.integration.vllm._worker import WorkerSide
from semblend_core.kv_tensor_store import KvTensorStore
from semblend_core.rope_correction import rerotate_keys

BS, NUM_BLOCKS, NS = 16, 24, "ns-key"
LAYOUTS = H.BACKENDS


def probe(caches, backend):
    first = caches[sorted(caches)[0]]
    return probe_block_layout(first, backend.write, num_kv_heads=H.NUM_KV_HEADS, head_size=H.HEAD_SIZE,
                              kernel_block_size=BS, block_axis=0, source=f"probe:{backend.kind}")


def make_worker(layout, kind, seed=0, *, probed=None):
    caches = H.paged_kv_caches(BS, NUM_BLOCKS, layout)
    g = torch.Generator().manual_seed(seed)
    for t in caches.values():  # random contents everywhere: untouched slots must keep them
        t.copy_(torch.randn(t.shape, generator=g))
    backend = H.StandInBackend(kind)
    store = KvTensorStore(device_bytes=1 << 26, device="cpu")
    worker = WorkerSide(store, H.rope_spec(), head_size=H.HEAD_SIZE)
    worker.register_kv_caches(caches, probed if probed is not None else probe(caches, backend))
    names = sorted(caches, key=lambda n: int(n.split(".")[2]))
    return worker, caches, [caches[n] for n in names], backend, store


def donor_kv(num_tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H.NUM_LAYERS, 2, num_tokens, H.NUM_KV_HEADS, H.HEAD_SIZE, generator=g)


@pytest.mark.parametrize("layout,kind", LAYOUTS)
def test_probe_reads_where_the_backend_puts_every_element(layout, kind):
    caches = H.paged_kv_caches(BS, NUM_BLOCKS, layout)
    backend = H.StandInBackend(kind)
    lay = probe(caches, backend)
    cache = caches[sorted(caches)[0]]
    slots = torch.tensor([0, 5, 17, 31, 200, NUM_BLOCKS * BS - 1])
    key = torch.randn(len(slots), H.NUM_KV_HEADS, H.HEAD_SIZE)
    value = torch.randn(len(slots), H.NUM_KV_HEADS, H.HEAD_SIZE)
    backend.write(key, value, cache, slots)
    storage = cache.as_strided((cache.numel(),), (1,))
    assert torch.equal(storage[lay.element_index(slots, "k")], key)
    assert torch.equal(storage[lay.element_index(slots, "v")], value)
    # Only the GPU-style content split is an ordinary strided layout the fused kernel can address.
    assert (lay.strided() is not None) == (kind == "content")


def test_probe_refuses_what_it_cannot_read_exactly():
    caches = H.paged_kv_caches(BS, NUM_BLOCKS, "LBHNC")
    backend = H.StandInBackend("content")
    first = caches[sorted(caches)[0]]

    def drops_a_token(key, value, cache, slots):
        backend.write(key[1:], value[1:], cache, slots[1:])

    with pytest.raises(LayoutProbeError, match="wrote"):
        probe_block_layout(first, drops_a_token, num_kv_heads=H.NUM_KV_HEADS, head_size=H.HEAD_SIZE,
                           kernel_block_size=BS, block_axis=0, source="x")
    with pytest.raises(LayoutProbeError, match="dtype"):
        probe_block_layout(first.to(torch.int8), backend.write, num_kv_heads=H.NUM_KV_HEADS,
                           head_size=H.HEAD_SIZE, kernel_block_size=BS, block_axis=0, source="x")


def test_a_worker_without_a_layout_loads_and_captures_nothing():
    caches = H.paged_kv_caches(BS, NUM_BLOCKS, "LBHNC")
    before = {n: t.clone() for n, t in caches.items()}
    store = KvTensorStore(device_bytes=1 << 26, device="cpu")
    store.put(NS, "donor", donor_kv(64), list(range(64)))
    worker = WorkerSide(store, H.rope_spec(), head_size=H.HEAD_SIZE)
    worker.register_kv_caches(caches, None, "no cache-write op")
    load = LoadSpec("r", NS, "donor", 0, 0, 32, (3, 4), BS)
    save = SaveSpec("s", NS, "s", 32, (5, 6), BS, tuple(range(32)))
    worker.start_load(StepPlan(loads=(load,), saves=(save,)))
    worker.wait_for_save(StepPlan(loads=(load,), saves=(save,)))
    assert worker.take_load_errors() == {3, 4}
    report = worker.take_report()
    assert report.load_failed == ("r",) and report.save_failed == ((NS, "s"),) and not report.saved
    assert all(torch.equal(before[n], t) for n, t in caches.items())


@pytest.mark.parametrize("layout,kind", LAYOUTS)
@pytest.mark.parametrize("delta", [-64, 0, 37])
def test_start_load_writes_rerotated_donor_kv_into_the_requests_blocks_only(layout, kind, delta):
    worker, caches, layers, backend, store = make_worker(layout, kind)
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
        k, v = backend.read(layers[layer], slots)
        src_k = kv[layer, 0, donor_start:donor_start + n]
        torch.testing.assert_close(k, rerotate_keys(src_k, delta, H.rope_spec()), rtol=1e-6, atol=1e-6)
        assert torch.equal(v, kv[layer, 1, donor_start:donor_start + n])
        if delta == 0:
            assert torch.equal(k, src_k)  # a shift-free load copies bit-exactly
    # Every other slot of every layer is untouched.
    touched = torch.zeros(NUM_BLOCKS * BS, dtype=torch.bool)
    touched[slots] = True
    every = list(range(NUM_BLOCKS * BS))
    for name, t in caches.items():
        for ref_rows, new_rows in zip(backend.read(before[name], every), backend.read(t, every)):
            assert torch.equal(ref_rows[~touched], new_rows[~touched])
            assert not torch.equal(ref_rows[touched], new_rows[touched])


def test_flipping_the_k_v_layout_is_caught():
    """The checks above read through the backend: a worker that addresses K and V wrongly (here: the probed
    layout with K and V exchanged, as the old token-halves guess did for the CPU backend) must fail them."""
    caches = H.paged_kv_caches(BS, NUM_BLOCKS, "LBHNC")
    backend = H.StandInBackend("cpu_vec")
    good = probe(caches, backend)
    flipped = BlockLayout(good.block_size, good.num_kv_heads, good.head_size, good.stride_block,
                          good.v_offsets, good.k_offsets, "flipped")
    worker, _caches, layers, backend, store = make_worker("LBHNC", "cpu_vec", probed=flipped)
    kv = donor_kv(64)
    store.put(NS, "donor", kv, list(range(64)))
    spec = LoadSpec("r", NS, "donor", 16, 0, 32, (3, 4), BS)
    worker.start_load(StepPlan(loads=(spec,)))
    k, _v = backend.read(layers[0], spec.slots())
    assert not torch.allclose(k, rerotate_keys(kv[0, 0, 16:48], -16, H.rope_spec()), atol=1e-3)


@pytest.mark.parametrize("layout,kind", LAYOUTS)
def test_capture_stores_the_prompts_kv_and_reports_it(layout, kind):
    worker, _caches, layers, backend, store = make_worker(layout, kind)
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
            k, v = backend.read(layers[layer], spec.slots())
            assert torch.equal(donor.kv[layer, 0], k) and torch.equal(donor.kv[layer, 1], v)


def test_failed_load_reports_every_target_block_and_leaves_cache_untouched():
    worker, caches, _layers, _backend, _store = make_worker("LBHNC", "cpu_vec")
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
    worker, _caches, _layers, _backend, store = make_worker("LBNHC", "content")
    store.put(NS, "donor", donor_kv(40), list(range(40)))
    spec = LoadSpec("r", NS, "donor", 0, 0, 48, (1, 2, 3), BS)
    worker.start_load(StepPlan(loads=(spec,)))
    assert worker.take_load_errors() == {1, 2, 3}


def test_evictions_are_reported_after_captures():
    worker, _caches, _layers, _backend, _ = make_worker("LBHNC", "content")
    one = H.NUM_LAYERS * 2 * 32 * H.NUM_KV_HEADS * H.HEAD_SIZE * 4  # bytes of a 32-token donor
    worker.store = KvTensorStore(device_bytes=one, device="cpu")  # room for exactly one donor
    for i, blocks in enumerate(((1, 2), (3, 4))):
        spec = SaveSpec(f"d{i}", NS, f"d{i}", 32, blocks, BS, tuple(range(i, i + 32)))
        worker.wait_for_save(StepPlan(saves=(spec,)))
    report = worker.take_report()
    assert [s.donor_id for s in report.saved] == ["d0", "d1"]
    assert report.evicted == ((NS, "d0"),)


def test_register_kv_caches_warms_the_fused_kernel_without_touching_the_cache(monkeypatch):
    """The first shifted hit after start-up paid the Triton JIT (0.3-0.7 s) inside a request: registration now runs
    every kernel path (shifted load, copy load, capture) on scratch tensors of the cache's dtype, strides and layer
    count, for donor lengths and token counts on both sides of Triton's multiple-of-16 specialization (warming 4
    tokens of one layer still left the JIT inside the first request on the H200)."""
    import semblend_core.triton_kernels as tk

    calls = []
    real = tk.rerotate_scatter

    def recording(src, dst, src_slots, dst_slots, delta, rope, **kw):
        calls.append((int(delta), str(dst.dtype), dst.device.type, dst.num_layers, src_slots.numel()))
        return real(src, dst, src_slots, dst_slots, delta, rope, **kw)

    monkeypatch.setattr(tk, "rerotate_scatter", recording)
    caches = H.paged_kv_caches(BS, NUM_BLOCKS, "LBNHC")
    before = {n: t.clone() for n, t in caches.items()}
    worker = WorkerSide(KvTensorStore(device_bytes=1 << 20, device="cpu"), H.rope_spec(), head_size=H.HEAD_SIZE)
    worker.register_kv_caches(caches, probe(caches, H.StandInBackend("content")))
    assert {c[0] for c in calls} == {0, 1} and len(calls) == 2 * (2 * 2 + 1)
    assert all(c[1] == "torch.float32" and c[2] == "cpu" and c[3] == len(caches) for c in calls)
    # per donor length: shifted and copy loads of 16 and 15 tokens, then one capture of the whole donor
    captures = {c[4] for c in calls[4::5]}
    loads = {c[4] for i, c in enumerate(calls) if i % 5 != 4}
    assert {n % 16 == 0 for n in loads} == {True, False}  # tokens moved by a load
    assert {n % 16 == 0 for n in captures} == {True, False}  # captured donor lengths
    assert all(torch.equal(before[n], t) for n, t in caches.items())


def test_donor_store_device_tier_is_sized_from_what_vllm_left(monkeypatch):
    """The store lives outside vLLM's memory budget: its device tier never takes more than what is free on the
    device once vLLM allocated its KV cache (minus a reserve); before, it was the configured size regardless."""
    import semblend.integration.vllm._worker as W

    assert W.device_tier_bytes(8 << 30, None) == 8 << 30
    assert W.device_tier_bytes(8 << 30, 3 << 30) == 2 << 30
    assert W.device_tier_bytes(1 << 30, 64 << 30) == 1 << 30
    assert W.device_tier_bytes(8 << 30, 1 << 29) == 0
    monkeypatch.setattr(W, "free_device_bytes", lambda device: (1 << 30) + (3 << 20))
    worker = WorkerSide(None, H.rope_spec(), head_size=H.HEAD_SIZE, device_bytes=2 << 30)
    caches = H.paged_kv_caches(BS, NUM_BLOCKS, "LBHNC")
    worker.register_kv_caches(caches, probe(caches, H.StandInBackend("cpu_vec")))
    assert worker.store.stats().device_capacity == 3 << 20
