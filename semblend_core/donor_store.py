"""Donor store: the requests whose KV may be reused, indexed for sub-millisecond discovery.

Lifecycle: ``register(donor_id, tokens, namespace, embedding)`` -> ``candidates(tokens, namespace)`` /
``nearest(embedding, namespace)`` -> ``get(slot)`` -> (``pin``/``unpin`` around an in-flight load) -> LRU eviction
or ``remove``. Every donor that leaves (either way) is reported to the eviction listeners
(``add_eviction_listener``), after the store's lock is released: ``SemBlendPipeline.attach_kv_store`` uses them so
that the donor's KV leaves with it (one donor lifetime for planner and KV store).

* Capacity ``max_donors`` across all namespaces, LRU order; a donor in use (pinned) is never evicted. Slots are
  reused after eviction; every slot carries a generation number and index entries remember the generation they
  were written under, so a reused slot never inherits its previous occupant's votes.
* Namespaces partition everything: each has its own anchor index and candidates never cross namespaces.
* Anchor index (per namespace): each donor contributes the ``bottom_k`` smallest of its winnowed k-gram hashes.
  Entries live in a log-structured set of sorted numpy runs (small recent runs merged into larger ones), so a
  query is a few ``searchsorted`` calls plus one ``bincount`` regardless of store size, and memory is ~12 bytes per
  entry (no per-entry Python objects).
* Embeddings (optional) live in one float32 matrix; ``nearest`` is exact cosine (matrix-vector product) or an
  ANN index (usearch, ``ann_backend="usearch"``) for 100K+ donors.

Thread safety: one lock guards all state; ``candidates`` and ``nearest`` hold it only for index reads. Returned
``DonorRecord`` objects are immutable (read-only arrays), so alignment runs outside the lock.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from semblend_core.alignment import DonorHashes
from semblend_core.errors import DuplicateDonorError, StoreFullError
from semblend_core.fingerprint import anchors, bottom_k

logger = logging.getLogger(__name__)

# Called as listener(namespace_key, donor_id, tokens) for every donor that leaves the store.
EvictionListener = Callable[[str, str, np.ndarray], None]

_GEN_BITS = 24
_GEN_MASK = (1 << _GEN_BITS) - 1


@dataclass(frozen=True)
class DonorRecord:
    """One registered donor. ``tokens`` is a read-only int64 array."""

    donor_id: str
    namespace_key: str
    tokens: np.ndarray
    text: str | None
    slot: int
    generation: int
    sketch_size: int
    hashes: DonorHashes  # precomputed for alignment (sorted k-gram hashes)
    has_embedding: bool


@dataclass(frozen=True)
class Candidate:
    slot: int
    votes: int
    score: float  # estimated shared k-grams: votes / sketch_size * donor k-grams


class _Run:
    """One sorted run: keys (uint64, ascending), packed values, and a bitmap over the keys' top bits.

    The bitmap (~16 bits per key) answers "is this hash possibly in the run?" with one gather, so each binary
    search only sees queries that very likely match: a miss costs a gather per run, a hit ~one search per match.
    """

    __slots__ = ("keys", "vals", "bits", "shift")

    def __init__(self, keys: np.ndarray, vals: np.ndarray) -> None:
        self.keys, self.vals = keys, vals
        log2 = 12
        while (1 << log2) < keys.shape[0] * 16 and log2 < 31:
            log2 += 1
        self.shift = np.uint64(64 - log2)
        self.bits = np.zeros(1 << (log2 - 6), dtype=np.uint64)
        idx = keys >> self.shift
        np.bitwise_or.at(self.bits, (idx >> np.uint64(6)).astype(np.int64), np.uint64(1) << (idx & np.uint64(63)))

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    def maybe_contains(self, query: np.ndarray) -> np.ndarray:
        idx = query >> self.shift
        words = self.bits[(idx >> np.uint64(6)).astype(np.int64)]
        return ((words >> (idx & np.uint64(63))) & np.uint64(1)).astype(bool)


def _merged(a: _Run, b: _Run, keep_a: np.ndarray | None = None) -> _Run:
    keys = np.concatenate([a.keys, b.keys])
    vals = np.concatenate([a.vals, b.vals])
    order = np.argsort(keys, kind="stable")  # linear-time on two concatenated sorted runs (timsort)
    return _Run(keys[order], vals[order])


class _AnchorIndex:
    """Inverted index uint64 hash -> packed ``slot << 24 | generation``, as size-tiered sorted runs.

    Runs are kept largest first; after each insert the two smallest merge while the smaller is at least a quarter
    of the larger, so there are O(log N) runs and each entry is re-merged O(log N) times (registration stays fast
    as the store grows). Each run carries a bitmap filter (see ``_Run``).
    """

    def __init__(self) -> None:
        self.runs: list[_Run] = []
        self.stale = 0
        self.live = 0

    def add(self, keys: np.ndarray, slot: int, generation: int) -> None:
        vals = np.full(keys.shape[0], (slot << _GEN_BITS) | (generation & _GEN_MASK), dtype=np.int64)
        self.runs.append(_Run(keys, vals))  # keys come sorted from bottom_k
        self.live += keys.shape[0]
        while len(self.runs) >= 2 and self.runs[-1].size * 4 >= self.runs[-2].size:
            small, big = self.runs.pop(), self.runs.pop()
            self.runs.append(_merged(big, small))

    def compact(self, slot_generation: np.ndarray) -> None:
        """Drop entries whose slot has been reused or freed (one run remains)."""
        if self.runs:
            keys = np.concatenate([r.keys for r in self.runs])
            vals = np.concatenate([r.vals for r in self.runs])
            ok = _valid(vals, slot_generation)
            keys, vals = keys[ok], vals[ok]
            order = np.argsort(keys, kind="stable")
            self.runs = [_Run(keys[order], vals[order])] if keys.shape[0] else []
        self.stale = 0
        self.live = sum(r.size for r in self.runs)

    def lookup(self, query: np.ndarray, max_postings: int) -> np.ndarray:
        """Packed values of every entry whose key is in ``query`` (sorted unique), skipping over-common keys."""
        out = []
        for run in self.runs:
            q = query[run.maybe_contains(query)]
            if q.size == 0:
                continue
            keys = run.keys
            lo = np.searchsorted(keys, q, side="left")
            found = keys[np.minimum(lo, keys.shape[0] - 1)] == q
            if not found.any():
                continue
            q, lo = q[found], lo[found]
            counts = np.searchsorted(keys, q, side="right") - lo
            keep = counts <= max_postings
            lo, counts = lo[keep], counts[keep]
            total = int(counts.sum())
            if total == 0:
                continue
            idx = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total)
            out.append(run.vals[idx])
        if not out:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(out) if len(out) > 1 else out[0]


def _reports_departures(method: Callable) -> Callable:
    """Run a ``DonorStore`` method, then report the donors it evicted to the listeners (outside the lock)."""
    @functools.wraps(method)
    def wrapper(self: DonorStore, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            if self._gone:
                self._report()
    return wrapper


def _valid(packed: np.ndarray, slot_generation: np.ndarray) -> np.ndarray:
    slots = packed >> _GEN_BITS
    return slot_generation[slots] == (packed & _GEN_MASK)


class DonorStore:
    """Capacity-bounded, namespace-partitioned, thread-safe donor registry with an anchor index."""

    def __init__(self, max_donors: int, *, shingle_tokens: int = 8, winnow_window: int = 8,
                 sketch_size: int = 256, max_postings: int = 4096, embedding_dim: int | None = None,
                 ann_backend: str = "exact") -> None:
        self.max_donors = max_donors
        self.k = shingle_tokens
        self.w = winnow_window
        self.sketch_size = sketch_size
        self.max_postings = max_postings
        self._lock = threading.RLock()
        self._records: list[DonorRecord | None] = []
        self._slot_generation = np.zeros(0, dtype=np.int64)  # generation of the current occupant; -1 when free
        self._gen_counter = np.zeros(0, dtype=np.int64)  # last generation handed out per slot (only grows)
        self._free: list[int] = []
        self._lru: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._pins: dict[int, int] = {}
        self._indexes: dict[str, _AnchorIndex] = {}
        self._ns_ids: dict[str, int] = {}
        self._slot_ns = np.zeros(0, dtype=np.int32)
        self._slot_sketch = np.zeros(0, dtype=np.int32)  # index entries per slot (for vote normalisation)
        self._slot_len = np.zeros(0, dtype=np.int64)  # donor length per slot
        self._embedding_dim = embedding_dim
        self._emb = np.zeros((0, embedding_dim or 0), dtype=np.float32)
        self._emb_ok = np.zeros(0, dtype=bool)
        self._ann = None
        if ann_backend != "exact":
            from semblend_core.ann_index import create_ann_index  # optional extra

            self._ann = create_ann_index(ann_backend, embedding_dim or 0)
        self.evictions = 0
        self._listeners: list[EvictionListener] = []
        self._gone: list[tuple[str, str, np.ndarray]] = []  # departures not yet reported to the listeners
        self._doomed: set[int] = set()  # slots removed while pinned: freed on their last unpin

    # ----------------------------------------------------------------- lifetime
    def add_eviction_listener(self, listener: EvictionListener) -> None:
        """Call ``listener(namespace_key, donor_id, tokens)`` for every donor that leaves the store (LRU eviction
        or ``remove``), outside the store's lock, in departure order. A listener's exception is logged, not
        raised: the store's own state is already consistent."""
        with self._lock:
            self._listeners.append(listener)

    def _report(self) -> None:
        """Hand pending departures to the listeners. Call without holding the lock."""
        with self._lock:
            gone, self._gone = self._gone, []
            listeners = list(self._listeners)
        for ns_key, donor_id, tokens in gone:
            for listener in listeners:
                try:
                    listener(ns_key, donor_id, tokens)
                except Exception:  # noqa: BLE001 - a listener must not break registration
                    logger.warning("donor store: eviction listener failed for %s", donor_id, exc_info=True)

    def keys(self, namespace_key: str | None = None) -> list[tuple[str, str]]:
        """Registered ``(namespace_key, donor_id)`` pairs, least recently used first, optionally of one namespace."""
        with self._lock:
            return [key for key in self._lru if namespace_key is None or key[0] == namespace_key]

    # ----------------------------------------------------------------- registration
    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)

    @_reports_departures
    def register(self, donor_id: str, tokens: np.ndarray, namespace_key: str, text: str | None = None,
                 embedding: np.ndarray | None = None) -> DonorRecord:
        """Add a donor (tokens validated by the caller). Re-registering identical tokens refreshes its LRU position;
        different tokens under the same id raise ``DuplicateDonorError``. Evicts the least recently used unpinned
        donor when full (reported to the eviction listeners); raises ``StoreFullError`` if every donor is pinned."""
        key = (namespace_key, donor_id)
        h, pos = anchors(tokens, self.k, self.w)  # computed outside the lock: the expensive part
        sketch = bottom_k(h, self.sketch_size)
        hashes = DonorHashes.from_anchors(h, pos)
        frozen = np.array(tokens, dtype=np.int64, copy=True)
        frozen.setflags(write=False)
        with self._lock:
            if key in self._lru:
                old = self._records[self._lru[key]]
                assert old is not None
                if old.tokens.shape == frozen.shape and np.array_equal(old.tokens, frozen):
                    self._lru.move_to_end(key)
                    return old
                raise DuplicateDonorError(
                    f"donor id {donor_id!r} is already registered in this namespace with different tokens; "
                    "use a new id or remove() the old donor first"
                )
            if len(self._lru) >= self.max_donors:
                self._evict_one()
            slot = self._alloc_slot()
            generation = (int(self._gen_counter[slot]) + 1) & _GEN_MASK
            self._gen_counter[slot] = generation
            self._slot_generation[slot] = generation
            ns_id = self._ns_ids.setdefault(namespace_key, len(self._ns_ids))
            self._slot_ns[slot] = ns_id
            self._slot_sketch[slot] = sketch.shape[0]
            self._slot_len[slot] = frozen.shape[0]
            has_emb = False
            if embedding is not None and self._embedding_dim:
                self._emb[slot] = embedding
                self._emb_ok[slot] = has_emb = True
                if self._ann is not None:
                    self._ann.add(slot, embedding)
            else:
                self._emb_ok[slot] = False
            rec = DonorRecord(donor_id, namespace_key, frozen, text, slot, generation, int(sketch.shape[0]),
                              hashes, has_emb)
            self._records[slot] = rec
            self._lru[key] = slot
            self._indexes.setdefault(namespace_key, _AnchorIndex()).add(sketch, slot, generation)
            return rec

    def _alloc_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = len(self._records)
        self._records.append(None)
        grow = max(16, slot)  # amortised growth of the per-slot arrays
        if slot >= self._slot_generation.shape[0]:
            self._slot_generation = np.concatenate([self._slot_generation, np.full(grow, -1, dtype=np.int64)])
            self._gen_counter = np.concatenate([self._gen_counter, np.zeros(grow, dtype=np.int64)])
            self._slot_ns = np.concatenate([self._slot_ns, np.full(grow, -1, dtype=np.int32)])
            self._slot_sketch = np.concatenate([self._slot_sketch, np.zeros(grow, dtype=np.int32)])
            self._slot_len = np.concatenate([self._slot_len, np.zeros(grow, dtype=np.int64)])
            self._emb_ok = np.concatenate([self._emb_ok, np.zeros(grow, dtype=bool)])
            if self._embedding_dim:
                self._emb = np.concatenate([self._emb, np.zeros((grow, self._embedding_dim), np.float32)])
        return slot

    def _evict_one(self) -> None:
        for key, slot in self._lru.items():
            if self._pins.get(slot, 0) == 0:
                self._remove_slot(key, slot)
                self.evictions += 1
                return
        raise StoreFullError(f"donor store is full ({self.max_donors} donors) and every donor is pinned by an "
                             "in-flight load; raise max_donors or release leases")

    def _remove_slot(self, key: tuple[str, str], slot: int) -> None:
        del self._lru[key]
        rec = self._records[slot]
        self._records[slot] = None
        self._slot_generation[slot] = -1
        self._emb_ok[slot] = False
        if self._ann is not None:
            self._ann.remove(slot)
        if self._pins.get(slot, 0):
            self._doomed.add(slot)  # an in-flight load still counts on it: the slot is reused after its last unpin
        else:
            self._free.append(slot)
        if rec is not None:
            self._gone.append((rec.namespace_key, rec.donor_id, rec.tokens))
            index = self._indexes.get(rec.namespace_key)
            if index is not None:
                index.stale += rec.sketch_size
                index.live -= rec.sketch_size
                if index.stale > max(4096, index.live):
                    index.compact(self._slot_generation)

    @_reports_departures
    def remove(self, donor_id: str, namespace_key: str, *, tokens: np.ndarray | None = None,
               force: bool = False) -> bool:
        """Forget a donor (reported to the eviction listeners); False when it is not registered.

        ``tokens``: remove it only if it holds exactly these tokens (a caller retiring *one* donor must not take
        another that reused its id). A pinned donor raises ``StoreFullError`` unless ``force``: then it leaves
        every lookup now and its slot is reused after the last ``unpin`` (for when its KV is already gone).
        """
        with self._lock:
            slot = self._lru.get((namespace_key, donor_id))
            if slot is None:
                return False
            if tokens is not None:
                rec = self._records[slot]
                if rec is None or not np.array_equal(rec.tokens, np.asarray(tokens)):
                    return False
            if self._pins.get(slot, 0) and not force:
                raise StoreFullError(f"donor {donor_id!r} is pinned by an in-flight load")
            self._remove_slot((namespace_key, donor_id), slot)
            return True

    # ----------------------------------------------------------------- lookup
    def candidates(self, query_hashes: np.ndarray, namespace_key: str, limit: int) -> list[Candidate]:
        """Top ``limit`` donors of ``namespace_key`` sharing sketch hashes with ``query_hashes`` (sorted unique)."""
        with self._lock:
            index = self._indexes.get(namespace_key)
            if index is None or query_hashes.size == 0:
                return []
            packed = index.lookup(query_hashes, self.max_postings)
            if packed.size == 0:
                return []
            packed = packed[_valid(packed, self._slot_generation)]
            if packed.size == 0:
                return []
            slots = packed >> _GEN_BITS
            votes = np.bincount(slots)
            hit_slots = np.flatnonzero(votes)
            # Rank by estimated shared k-grams, not raw votes: a long donor samples its content more sparsely.
            sizes = self._slot_sketch[hit_slots].astype(np.float64)
            lens = self._slot_len[hit_slots].astype(np.float64)
            v = votes[hit_slots].astype(np.float64)
            score = v / np.maximum(sizes, 1.0) * np.maximum(lens - self.k + 1, 1.0)
            order = np.argsort(-score, kind="stable")[:limit]
            return [Candidate(int(hit_slots[i]), int(v[i]), float(score[i])) for i in order]

    def nearest(self, embedding: np.ndarray, namespace_key: str, limit: int) -> list[tuple[int, float]]:
        """(slot, cosine) of the ``limit`` most similar donors with embeddings in ``namespace_key``."""
        with self._lock:
            ns_id = self._ns_ids.get(namespace_key)
            if ns_id is None or not self._embedding_dim:
                return []
            if self._ann is not None:
                found = self._ann.search(embedding, limit * 4)
                out = [(s, c) for s, c in found if self._emb_ok[s] and self._slot_ns[s] == ns_id]
                return out[:limit]
            n = len(self._records)
            mask = self._emb_ok[:n] & (self._slot_ns[:n] == ns_id)
            if not mask.any():
                return []
            rows = np.flatnonzero(mask)
            scores = self._emb[rows] @ embedding.astype(np.float32)
            k = min(limit, rows.shape[0])
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top])]
            return [(int(rows[i]), float(scores[i])) for i in top]

    def get(self, slot: int) -> DonorRecord | None:
        with self._lock:
            return self._records[slot] if 0 <= slot < len(self._records) else None

    def touch(self, record: DonorRecord) -> None:
        with self._lock:
            key = (record.namespace_key, record.donor_id)
            if self._lru.get(key) == record.slot:
                self._lru.move_to_end(key)

    def lookup_id(self, donor_id: str, namespace_key: str) -> DonorRecord | None:
        with self._lock:
            slot = self._lru.get((namespace_key, donor_id))
            return None if slot is None else self._records[slot]

    # ----------------------------------------------------------------- pins (in-flight loads)
    def pin(self, record: DonorRecord) -> bool:
        """Keep ``record`` resident until ``unpin``; False if it was evicted meanwhile."""
        with self._lock:
            if self._records[record.slot] is not record:
                return False
            self._pins[record.slot] = self._pins.get(record.slot, 0) + 1
            return True

    def unpin(self, record: DonorRecord) -> None:
        with self._lock:
            count = self._pins.get(record.slot, 0)
            if count <= 1:
                self._pins.pop(record.slot, None)
                if record.slot in self._doomed:
                    self._doomed.discard(record.slot)
                    self._free.append(record.slot)
            else:
                self._pins[record.slot] = count - 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "donors": len(self._lru),
                "capacity": self.max_donors,
                "namespaces": len(self._indexes),
                "index_entries": sum(ix.live for ix in self._indexes.values()),
                "evictions": self.evictions,
                "pinned": sum(1 for c in self._pins.values() if c),
            }
