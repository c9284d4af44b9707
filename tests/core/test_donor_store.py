import threading

import numpy as np
import pytest

from semblend_core.donor_store import DonorStore
from semblend_core.errors import DuplicateDonorError, StoreFullError
from semblend_core.fingerprint import anchors


def _doc(seed, n=400):
    return np.random.default_rng(seed).integers(1000, 10**6, n)


def _query(tokens):
    h, _ = anchors(tokens, 8, 8)
    return np.unique(h)


def _ids(store, tokens, ns="ns", limit=4):
    return [store.get(c.slot).donor_id for c in store.candidates(_query(tokens), ns, limit)]


def test_finds_the_donor_sharing_content_and_only_in_its_namespace():
    store = DonorStore(100)
    for i in range(20):
        store.register(f"d{i}", _doc(i), "ns")
    store.register("other-ns", _doc(7), "ns2")
    target = np.concatenate([_doc(99, 30), _doc(7)])
    assert _ids(store, target)[0] == "d7"
    assert _ids(store, target, ns="ns2") == ["other-ns"]
    assert _ids(store, target, ns="nope") == []


def test_lru_eviction_and_slot_reuse_never_returns_evicted_donor():
    store = DonorStore(3)
    for i in range(3):
        store.register(f"d{i}", _doc(i), "ns")
    store.touch(store.lookup_id("d0", "ns"))  # d0 becomes most recent; d1 is now the LRU
    store.register("d3", _doc(3), "ns")
    assert store.lookup_id("d1", "ns") is None and store.lookup_id("d0", "ns") is not None
    assert _ids(store, _doc(1)) == []  # d1's index entries are stale; its slot now holds d3
    assert _ids(store, _doc(3)) == ["d3"]
    assert store.stats()["evictions"] == 1 and len(store) == 3
    for i in range(4, 40):  # churn: slots reused many times, index compacts
        store.register(f"d{i}", _doc(i), "ns")
        assert _ids(store, _doc(i))[0] == f"d{i}"
    for i in range(0, 37):
        assert f"d{i}" not in _ids(store, _doc(i))


def test_duplicate_ids():
    store = DonorStore(10)
    store.register("a", _doc(1), "ns")
    store.register("a", _doc(1), "ns")  # same tokens: refresh, not an error
    assert len(store) == 1
    with pytest.raises(DuplicateDonorError):
        store.register("a", _doc(2), "ns")
    assert _ids(store, _doc(1)) == ["a"]  # nothing lost
    store.register("a", _doc(2), "other")  # same id in another namespace is a different donor
    assert len(store) == 2


def test_full_store_with_every_donor_pinned_raises_and_keeps_donors():
    store = DonorStore(2)
    recs = [store.register(f"d{i}", _doc(i), "ns") for i in range(2)]
    for r in recs:
        assert store.pin(r)
    with pytest.raises(StoreFullError):
        store.register("d2", _doc(2), "ns")
    assert len(store) == 2 and _ids(store, _doc(0)) == ["d0"]
    store.unpin(recs[0])
    store.register("d2", _doc(2), "ns")
    assert store.lookup_id("d0", "ns") is None and store.lookup_id("d1", "ns") is not None


def test_embedding_search_is_exact_cosine_within_namespace():
    store = DonorStore(10, embedding_dim=4)
    vecs = np.eye(4, dtype=np.float32)
    for i in range(4):
        store.register(f"d{i}", _doc(i), "ns", embedding=vecs[i])
    store.register("x", _doc(9), "ns2", embedding=vecs[2])
    q = np.array([0.1, 0.2, 0.9, 0.0], dtype=np.float32)
    q /= np.linalg.norm(q)
    found = store.nearest(q, "ns", 2)
    assert [store.get(s).donor_id for s, _ in found] == ["d2", "d1"]
    assert found[0][1] == pytest.approx(float(q[2]), rel=1e-6)


def test_concurrent_register_and_lookup_from_8_threads():
    store = DonorStore(200)
    errors = []

    def worker(t):
        try:
            for i in range(40):
                store.register(f"t{t}-{i}", _doc(t * 1000 + i, 200), "ns")
                got = _ids(store, _doc(t * 1000 + i, 200))
                assert got and got[0] == f"t{t}-{i}", got
        except Exception as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert len(store) == 200


@pytest.mark.parametrize("buckets", [False, True])
def test_keys_shared_by_many_donors_vote_until_max_postings(buckets, monkeypatch):
    # ``buckets``: runs above 64 keys use their bucket table (the path of multi-million-entry runs) instead of a
    # direct binary search.
    from semblend_core import donor_store

    if buckets:
        monkeypatch.setattr(donor_store, "_DIRECT_SEARCH_KEYS", 64)
    rng = np.random.default_rng(5)
    header = rng.integers(1000, 10**6, 300)
    n_donors = 40
    store = DonorStore(1000, max_postings=n_donors // 2)
    bodies = [rng.integers(1000, 10**6, 400) for _ in range(n_donors)]
    for i, b in enumerate(bodies):
        store.register(f"d{i}", np.concatenate([header, b]), "ns")
    assert all((r.buckets is not None) == (buckets and r.keys.shape[0] > 64) for r in store._indexes["ns"].runs)
    # Header keys have n_donors postings > max_postings: skipped, so only the body decides.
    assert _ids(store, np.concatenate([header, bodies[7]]))[0] == "d7"
    # A header-only prompt: the header's interior keys are skipped; only keys next to its end, which a donor's
    # sketch picks depending on what follows the header, have few enough postings to vote.
    assert all(c.votes <= 3 for c in store.candidates(_query(header), "ns", 100))
    loose = DonorStore(1000, max_postings=10 * n_donors)
    for i, b in enumerate(bodies[:30]):
        loose.register(f"d{i}", np.concatenate([header, b]), "ns")
    got = loose.candidates(_query(header), "ns", 100)
    assert len(got) == 30 and min(c.votes for c in got) >= 10  # ~300/16 interior header keys vote for everyone
    assert _ids(loose, np.concatenate([header, bodies[3][:200]]))[0] == "d3"


def test_bucket_table_and_binary_search_find_the_same_postings(monkeypatch):
    from semblend_core import donor_store

    rng = np.random.default_rng(9)
    shared = [rng.integers(1000, 10**6, 300) for _ in range(5)]
    docs = [np.concatenate([shared[i % 5], _doc(100 + i, 300 + 37 * i)]) for i in range(60)]
    stores = {}
    for threshold in (1 << 17, 16):
        monkeypatch.setattr(donor_store, "_DIRECT_SEARCH_KEYS", threshold)
        store = DonorStore(50, max_postings=8)  # 60 donors into 50 slots: stale entries too
        for i, d in enumerate(docs):
            store.register(f"d{i}", d, "ns")
        stores[threshold] = store
    assert any(r.buckets is not None for r in stores[16]._indexes["ns"].runs)
    for i in range(0, 60, 3):
        q = _query(np.concatenate([docs[i][:150], _doc(999, 50), docs[(i + 7) % 60][200:]]))
        a = stores[1 << 17].candidates(q, "ns", 10)
        b = stores[16].candidates(q, "ns", 10)
        assert [(c.slot, c.votes) for c in a] == [(c.slot, c.votes) for c in b]
        assert a  # the query shares content with live donors
