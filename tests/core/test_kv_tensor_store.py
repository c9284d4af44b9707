"""Donor KV tensor store: capacity and LRU order, demotion, leases, namespace isolation, concurrency.

On CPU the "device" tier is exercised with ``device="cpu"`` (tiering logic is device-agnostic); the CUDA-only parts
(pinned memory, side-stream promotion) run under ``@pytest.mark.gpu``.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from semblend_core.errors import DuplicateDonorError, StoreFullError
from semblend_core.kv_tensor_store import DEVICE, HOST, DonorKvMissingError, KvTensorStore

LAYERS, TOKENS, HEADS, DIM = 2, 8, 2, 4
ENTRY_BYTES = LAYERS * 2 * TOKENS * HEADS * DIM * 4  # float32: 1 KiB


def kv(fill: float, tokens: int = TOKENS):
    return torch.full((LAYERS, 2, tokens, HEADS, DIM), float(fill))


def toks(n: int = TOKENS, base: int = 0):
    return np.arange(base, base + n)


def test_put_get_roundtrip_and_layer_views():
    store = KvTensorStore(host_bytes=10 * ENTRY_BYTES)
    pairs = [(torch.randn(TOKENS, HEADS, DIM), torch.randn(TOKENS, HEADS, DIM)) for _ in range(LAYERS)]
    assert store.put("ns", "d", pairs, toks()) == HOST
    got = store.get("ns", "d")
    assert got.num_layers == LAYERS and got.num_tokens == TOKENS and got.tier == HOST
    for i, (k, v) in enumerate(pairs):
        gk, gv = got.layer(i)
        torch.testing.assert_close(gk, k, rtol=0, atol=0)
        torch.testing.assert_close(gv, v, rtol=0, atol=0)
    np.testing.assert_array_equal(got.token_ids, toks())
    assert not got.token_ids.flags.writeable
    assert store.get("ns", "missing") is None
    s = store.stats()
    assert (s.hits, s.misses, s.host_bytes, s.host_entries) == (1, 1, ENTRY_BYTES, 1)


def test_host_lru_order_and_capacity():
    store = KvTensorStore(host_bytes=3 * ENTRY_BYTES)
    for i in range(3):
        store.put("ns", f"d{i}", kv(i), toks())
    store.get("ns", "d0")  # d0 becomes most recent; d1 is now the LRU
    store.put("ns", "d3", kv(3), toks())
    assert sorted(store.keys()) == [("ns", "d0"), ("ns", "d2"), ("ns", "d3")]
    store.put("ns", "d4", kv(4), toks())
    assert sorted(k for _, k in store.keys()) == ["d0", "d3", "d4"]
    s = store.stats()
    assert s.evictions == 2 and s.host_bytes == 3 * ENTRY_BYTES <= s.host_capacity


def test_demotion_device_to_host_then_drop():
    store = KvTensorStore(device_bytes=2 * ENTRY_BYTES, host_bytes=2 * ENTRY_BYTES, device="cpu")
    assert store.device == torch.device("cpu")
    for i in range(2):
        assert store.put("ns", f"d{i}", kv(i), toks()) == DEVICE
    assert store.put("ns", "d2", kv(2), toks()) == DEVICE
    assert store.tier_of("ns", "d0") == HOST  # LRU of the device tier was demoted, not dropped
    store.put("ns", "d3", kv(3), toks())
    store.put("ns", "d4", kv(4), toks())  # host (d0, d1) full: d0 dropped when d2 is demoted
    assert store.tier_of("ns", "d0") is None
    assert [store.tier_of("ns", f"d{i}") for i in range(1, 5)] == [HOST, HOST, DEVICE, DEVICE]
    # Demoted data is intact.
    torch.testing.assert_close(store.get("ns", "d1").kv, kv(1), rtol=0, atol=0)
    s = store.stats()
    assert s.demotions == 3 and s.evictions == 1
    assert s.device_bytes == 2 * ENTRY_BYTES and s.host_bytes == 2 * ENTRY_BYTES


def test_lease_promotes_host_entry():
    store = KvTensorStore(device_bytes=1 * ENTRY_BYTES, host_bytes=2 * ENTRY_BYTES, device="cpu")
    store.put("ns", "a", kv(1), toks())
    store.put("ns", "b", kv(2), toks())  # demotes a
    assert store.tier_of("ns", "a") == HOST
    with store.lease("ns", "a") as entry:
        entry.wait()
        assert entry.tier == DEVICE
        torch.testing.assert_close(entry.kv, kv(1), rtol=0, atol=0)
    assert store.tier_of("ns", "a") == DEVICE and store.tier_of("ns", "b") == HOST
    assert store.stats().promotions == 1
    with store.lease("ns", "b", promote=False) as entry:
        assert entry.tier == HOST


def test_lease_prevents_eviction_and_demotion():
    store = KvTensorStore(device_bytes=1 * ENTRY_BYTES, host_bytes=1 * ENTRY_BYTES, device="cpu")
    store.put("ns", "a", kv(1), toks())
    with store.lease("ns", "a") as entry:
        # Device tier holds only the leased entry: the new one goes to host.
        assert store.put("ns", "b", kv(2), toks()) == HOST
        # Both tiers now hold only a leased entry and an LRU host entry; b can be dropped for c.
        assert store.put("ns", "c", kv(3), toks()) == HOST
        assert store.tier_of("ns", "b") is None and store.tier_of("ns", "a") == DEVICE
        with store.lease("ns", "c", promote=False), pytest.raises(StoreFullError):
            store.put("ns", "d", kv(4), toks())
        assert store.stats().leased_entries == 1
        torch.testing.assert_close(entry.kv, kv(1), rtol=0, atol=0)
    assert store.stats().leased_entries == 0
    assert store.put("ns", "d", kv(4), toks()) == DEVICE  # a is free to demote now
    assert store.tier_of("ns", "a") == HOST


def test_explicit_evict_of_leased_entry_is_deferred():
    store = KvTensorStore(host_bytes=4 * ENTRY_BYTES)
    store.put("ns", "a", kv(7), toks())
    with store.lease("ns", "a") as entry:
        assert store.evict("ns", "a")
        assert not store.contains("ns", "a")
        with pytest.raises(DonorKvMissingError), store.lease("ns", "a"):
            pass
        assert store.stats().host_bytes == ENTRY_BYTES  # memory still held by the lease
        torch.testing.assert_close(entry.kv, kv(7), rtol=0, atol=0)
    assert store.stats().host_bytes == 0
    assert not store.evict("ns", "a")


def test_namespace_isolation():
    store = KvTensorStore(host_bytes=4 * ENTRY_BYTES)
    store.put("ns1", "d", kv(1), toks())
    store.put("ns2", "d", kv(2), toks(base=100))  # same donor id, other namespace, other tokens: no conflict
    assert store.get("ns1", "d").kv[0, 0, 0, 0, 0].item() == 1.0
    assert store.get("ns2", "d").kv[0, 0, 0, 0, 0].item() == 2.0
    assert not store.contains("ns3", "d")
    assert store.evict_namespace("ns1") == 1
    assert store.contains("ns2", "d") and not store.contains("ns1", "d")
    assert store.keys("ns2") == [("ns2", "d")]


def test_put_same_tokens_refreshes_and_different_tokens_raise():
    store = KvTensorStore(host_bytes=2 * ENTRY_BYTES)
    store.put("ns", "a", kv(1), toks())
    store.put("ns", "b", kv(2), toks())
    assert store.put("ns", "a", kv(9), toks()) == HOST  # refresh: a is now most recent, data unchanged
    assert store.get("ns", "a").kv[0, 0, 0, 0, 0].item() == 1.0
    store.put("ns", "c", kv(3), toks())
    assert not store.contains("ns", "b") and store.contains("ns", "a")
    with pytest.raises(DuplicateDonorError):
        store.put("ns", "a", kv(1), toks(base=5))


def test_put_validation_and_oversize():
    store = KvTensorStore(host_bytes=ENTRY_BYTES)
    with pytest.raises(ValueError, match="token_ids"):
        store.put("ns", "a", kv(1), toks(TOKENS + 1))
    with pytest.raises(ValueError):
        store.put("ns", "a", torch.zeros(2, 3, 4), toks())
    with pytest.raises(ValueError):
        store.put("ns", "a", [(torch.zeros(TOKENS, 2, 4), torch.zeros(TOKENS, 2, 5))], toks())
    with pytest.raises(StoreFullError):
        store.put("ns", "big", kv(1, tokens=2 * TOKENS), toks(2 * TOKENS))
    with pytest.raises(ValueError):
        KvTensorStore(host_bytes=-1)
    assert len(store) == 0 and store.stats().host_bytes == 0


def test_no_device_tier_without_cuda_or_device():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the device tier defaults to cuda")
    store = KvTensorStore(device_bytes=1 << 20, host_bytes=2 * ENTRY_BYTES)
    assert store.device is None and store.stats().device_capacity == 0
    assert store.put("ns", "a", kv(1), toks()) == HOST


def test_concurrent_put_lease_from_8_threads():
    store = KvTensorStore(device_bytes=6 * ENTRY_BYTES, host_bytes=10 * ENTRY_BYTES, device="cpu")
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        try:
            barrier.wait()
            for step in range(150):
                donor = f"d{rng.randrange(24)}"
                value = float(int(donor[1:]))  # each donor's KV is filled with its number
                op = rng.random()
                if op < 0.4:
                    try:
                        store.put("ns", donor, kv(value), toks(base=int(value)))
                    except StoreFullError:
                        pass  # allowed when every candidate happens to be leased
                elif op < 0.9:
                    try:
                        with store.lease("ns", donor, promote=rng.random() < 0.5) as entry:
                            # While leased, the tensors must stay intact whatever other threads do.
                            for _ in range(3):
                                assert float(entry.kv.min()) == value == float(entry.kv.max())
                            assert int(entry.token_ids[0]) == int(value)
                    except DonorKvMissingError:
                        pass
                else:
                    store.evict("ns", donor)
                s = store.stats()
                assert s.device_bytes <= s.device_capacity and s.host_bytes <= s.host_capacity
        except BaseException as exc:  # noqa: BLE001 -- surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    s = store.stats()
    assert s.leased_entries == 0
    assert s.device_bytes == s.device_entries * ENTRY_BYTES and s.host_bytes == s.host_entries * ENTRY_BYTES
    assert s.device_entries + s.host_entries == len(store)
    for ns, donor in store.keys():
        assert float(store.get(ns, donor).kv.max()) == float(int(donor[1:]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_async_promotion_and_pinned_demotion():
    store = KvTensorStore(device_bytes=ENTRY_BYTES * 256, host_bytes=ENTRY_BYTES * 512)
    assert store.device.type == "cuda"
    big = torch.randn(LAYERS, 2, TOKENS * 128, HEADS, DIM)  # 128 entries' worth
    assert store.put("ns", "a", big, toks(TOKENS * 128), tier=HOST) == HOST
    assert store.get("ns", "a").kv.is_pinned()
    with store.lease("ns", "a") as entry:
        assert entry.tier == DEVICE and entry.ready_event is not None
        entry.wait()
        torch.testing.assert_close(entry.kv.cpu(), big, rtol=0, atol=0)
    # Fill the device tier so that "a" is demoted back to pinned host memory.
    store.put("ns", "b", big.cuda(), toks(TOKENS * 128))
    store.put("ns", "c", big.cuda() + 1, toks(TOKENS * 128))
    assert store.tier_of("ns", "a") == HOST
    demoted = store.get("ns", "a").kv
    assert demoted.is_pinned()
    torch.testing.assert_close(demoted, big, rtol=0, atol=0)
