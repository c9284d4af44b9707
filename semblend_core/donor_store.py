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
* Anchor index (per namespace): each donor contributes its *sketch*: the distinct k-gram hashes winnowed with
  window ``sketch_window`` (default ``4 * winnow_window`` = 32; ``fingerprint.winnow_levels``), about one entry
  per 16 tokens at any donor length. A prompt queries its own sketch, so every donor sharing a run of ``sketch_window + k - 1`` tokens (39)
  with it gets a vote, whether the donor has 100 tokens or ``max_prompt_tokens`` (a fixed-size sample could not
  promise that: it thins out on long donors). Entries live in a log-structured set of sorted numpy runs (small
  recent runs merged into larger ones), each with a bucket table over the keys' top bits, so a query is a few
  gathers per run plus a sort of the postings regardless of store size; ~28 bytes per entry, ~1.7 bytes per donor
  token (no per-entry Python objects).
* Embeddings (optional) live in one float32 matrix; ``nearest`` is exact cosine (matrix-vector product) or an
  ANN index (usearch, ``ann_backend="usearch"``) for 100K+ donors.

Thread safety: one lock guards all state; ``candidates`` and ``nearest`` hold it only for index reads. Returned
``DonorRecord`` objects are immutable (read-only arrays), so alignment runs outside the lock.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from semblend_core._departures import Departures, EvictionListener, reports_departures
from semblend_core.alignment import DonorHashes
from semblend_core.errors import DuplicateDonorError, StoreFullError
from semblend_core.fingerprint import kgram_hashes, sketch_hashes, winnow_levels

logger = logging.getLogger(__name__)

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


# The sketch's window, in anchor windows: 4 x 8 = 32 k-grams by default (~1 index entry per 16 donor tokens; every
# shared run of 39 tokens votes). Larger means a smaller index and prompt query but longer guaranteed runs.
_SKETCH_WINDOWS_PER_ANCHOR_WINDOW = 4
_DIRECT_SEARCH_KEYS = 1 << 17  # runs this small are binary-searched directly (measured faster below ~100K keys)


class _Run:
    """One immutable sorted run: distinct keys, their postings (CSR), and a bucket table over the keys' top bits.

    ``keys`` (uint64, ascending, distinct); postings of ``keys[i]`` are ``vals[starts[i]:starts[i + 1]]`` (packed
    ``slot << 24 | generation``; ``starts`` is None when every key has exactly one posting, ``vals[i]``).
    ``buckets[b]`` is the number of keys whose top ``log2(len(buckets) - 1)`` bits
    are below ``b``, with about one bucket per key: a query reads its bucket bounds (one cache line), and only the
    few keys inside a non-empty bucket, instead of binary-searching a multi-million-entry array. A key shared by
    many donors costs one bucket probe however many postings it has (its count is ``starts[i+1] - starts[i]``).
    Memory ~28 bytes per entry: key 8 + posting 8 + start 4 + bucket 4-8.
    """

    __slots__ = ("keys", "starts", "vals", "buckets", "shift")

    def __init__(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """``keys`` sorted ascending (repeats allowed), ``vals`` aligned with them."""
        n = keys.shape[0]
        first = np.empty(n, dtype=bool)
        if n:
            first[0] = True
            np.not_equal(keys[1:], keys[:-1], out=first[1:])
        begin = np.flatnonzero(first)
        self.keys = keys[begin]
        self.vals = vals
        if begin.shape[0] == n:  # every key has one posting (the common case): vals[i] belongs to keys[i]
            self.starts = None
        else:
            self.starts = np.empty(begin.shape[0] + 1, dtype=np.int32 if n < 2**31 else np.int64)
            self.starts[:-1] = begin
            self.starts[-1] = n
        u = self.keys.shape[0]
        if u <= _DIRECT_SEARCH_KEYS:
            self.buckets, self.shift = None, np.uint64(0)
            return
        log2 = max(1, (u - 1).bit_length())  # 2^log2 >= u buckets: load <= 1
        self.shift = np.uint64(64 - log2)
        counts = np.bincount((self.keys >> self.shift).astype(np.int64), minlength=1 << log2)
        self.buckets = np.zeros((1 << log2) + 1, dtype=np.int32 if u < 2**31 else np.int64)
        np.cumsum(counts, out=self.buckets[1:])

    @property
    def size(self) -> int:
        return int(self.vals.shape[0])

    def expanded_keys(self) -> np.ndarray:
        return self.keys if self.starts is None else np.repeat(self.keys, np.diff(self.starts))

    def find(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query indices, key indices) of the queries present in the run; ``query`` sorted, distinct."""
        keys = self.keys
        if keys.shape[0] == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        if self.buckets is None:
            lo = np.searchsorted(keys, query)
            lo = np.minimum(lo, keys.shape[0] - 1)
            qi = np.flatnonzero(keys[lo] == query)
            return qi, lo[qi]
        b = (query >> self.shift).astype(np.intp)
        lo = self.buckets[b]
        cnt = self.buckets[b + 1] - lo
        qi = np.flatnonzero(cnt)
        if qi.size == 0:
            return qi, qi
        lo, cnt = lo[qi].astype(np.int64), cnt[qi]
        if int(cnt.max()) == 1:
            hit = keys[lo] == query[qi]
            return qi[hit], lo[hit]
        total = int(cnt.sum())  # ~1.6 keys per non-empty bucket: expand them all and compare
        first = np.cumsum(cnt) - cnt
        owner = np.repeat(np.arange(qi.shape[0]), cnt)
        ki = lo[owner] + (np.arange(total) - first[owner])
        hit = keys[ki] == query[qi[owner]]
        return qi[owner[hit]], ki[hit]


def _merged(a: _Run, b: _Run) -> _Run:
    keys = np.concatenate([a.expanded_keys(), b.expanded_keys()])
    vals = np.concatenate([a.vals, b.vals])
    order = np.argsort(keys, kind="stable")  # linear-time on two concatenated sorted runs (timsort)
    return _Run(keys[order], vals[order])


class _AnchorIndex:
    """Inverted index uint64 sketch hash -> packed ``slot << 24 | generation``, as size-tiered sorted runs.

    Runs are kept largest first; after each insert the two smallest merge while the smaller is at least a quarter
    of the larger, so there are O(log N) runs and each entry is re-merged O(log N) times (registration stays fast
    as the store grows). Each run carries a bucket table (see ``_Run``).
    """

    def __init__(self) -> None:
        self.runs: list[_Run] = []
        self.stale = 0
        self.live = 0

    def add(self, keys: np.ndarray, slot: int, generation: int) -> None:
        vals = np.full(keys.shape[0], (slot << _GEN_BITS) | (generation & _GEN_MASK), dtype=np.int64)
        self.runs.append(_Run(keys, vals))  # keys come sorted and distinct from sketch_hashes
        self.live += keys.shape[0]
        while len(self.runs) >= 2 and self.runs[-1].size * 4 >= self.runs[-2].size:
            small, big = self.runs.pop(), self.runs.pop()
            self.runs.append(_merged(big, small))

    def compact(self, slot_generation: np.ndarray) -> None:
        """Drop entries whose slot has been reused or freed (one run remains)."""
        if self.runs:
            keys = np.concatenate([r.expanded_keys() for r in self.runs])
            vals = np.concatenate([r.vals for r in self.runs])
            ok = _valid(vals, slot_generation)
            keys, vals = keys[ok], vals[ok]
            order = np.argsort(keys, kind="stable")
            self.runs = [_Run(keys[order], vals[order])] if keys.shape[0] else []
        self.stale = 0
        self.live = sum(r.size for r in self.runs)

    def nbytes(self) -> int:
        return sum(r.keys.nbytes + r.vals.nbytes + sum(a.nbytes for a in (r.starts, r.buckets) if a is not None)
                   for r in self.runs)

    def lookup(self, query: np.ndarray, max_postings: int) -> np.ndarray:
        """Packed values of every entry whose key is in ``query`` (sorted distinct), skipping keys with more than
        ``max_postings`` postings over all runs (a template shared by most donors carries no signal)."""
        found = []
        spread = False  # some key has several postings (then totals over runs decide what is skipped)
        for run in self.runs:
            qi, ki = run.find(query)
            if ki.size == 0:
                continue
            if run.starts is None:
                found.append((run, qi, ki, None))
            else:
                lo = run.starts[ki].astype(np.int64)
                found.append((run, qi, lo, run.starts[ki + 1] - lo))
                spread = True
        if not found:
            return np.zeros(0, dtype=np.int64)
        if not spread and len(found) <= max_postings:
            out = [run.vals[ki] for run, _, ki, _ in found]
            return np.concatenate(out) if len(out) > 1 else out[0]
        totals = np.zeros(query.shape[0], dtype=np.int64)
        for _, qi, _, counts in found:
            totals[qi] += 1 if counts is None else counts  # qi is distinct within one run
        common = totals > max_postings
        out = []
        for run, qi, lo, counts in found:
            keep = ~common[qi]
            if counts is None:
                out.append(run.vals[lo[keep]])
                continue
            lo, counts = lo[keep], counts[keep]
            total = int(counts.sum())
            if total:
                out.append(run.vals[np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total)])
        if not out:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(out) if len(out) > 1 else out[0]


def _valid(packed: np.ndarray, slot_generation: np.ndarray) -> np.ndarray:
    slots = packed >> _GEN_BITS
    return slot_generation[slots] == (packed & _GEN_MASK)


class DonorStore:
    """Capacity-bounded, namespace-partitioned, thread-safe donor registry with an anchor index."""

    def __init__(self, max_donors: int, *, shingle_tokens: int = 8, winnow_window: int = 8,
                 sketch_window: int | None = None, max_postings: int = 4096, embedding_dim: int | None = None,
                 ann_backend: str = "exact") -> None:
        self.max_donors = max_donors
        self.k = shingle_tokens
        self.w = winnow_window
        if sketch_window is None:
            sketch_window = _SKETCH_WINDOWS_PER_ANCHOR_WINDOW * winnow_window
        if sketch_window < winnow_window:
            raise ValueError(f"sketch_window={sketch_window} must be >= winnow_window={winnow_window}")
        self.sketch_window = sketch_window
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
        self._departures = Departures("donor store")  # reported to the listeners outside the lock
        self._doomed: set[int] = set()  # slots removed while pinned: freed on their last unpin

    # ----------------------------------------------------------------- lifetime
    def add_eviction_listener(self, listener: EvictionListener) -> None:
        """Call ``listener(namespace_key, donor_id, tokens)`` for every donor that leaves the store (LRU eviction
        or ``remove``), outside the store's lock, in departure order. A listener's exception is logged, not
        raised: the store's own state is already consistent."""
        self._departures.add_listener(listener)

    def keys(self, namespace_key: str | None = None) -> list[tuple[str, str]]:
        """Registered ``(namespace_key, donor_id)`` pairs, least recently used first, optionally of one namespace."""
        with self._lock:
            return [key for key in self._lru if namespace_key is None or key[0] == namespace_key]

    # ----------------------------------------------------------------- registration
    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)

    @reports_departures
    def register(self, donor_id: str, tokens: np.ndarray, namespace_key: str, text: str | None = None,
                 embedding: np.ndarray | None = None) -> DonorRecord:
        """Add a donor (tokens validated by the caller). Re-registering identical tokens refreshes its LRU position;
        different tokens under the same id raise ``DuplicateDonorError``. Evicts the least recently used unpinned
        donor when full (reported to the eviction listeners); raises ``StoreFullError`` if every donor is pinned."""
        key = (namespace_key, donor_id)
        kh = kgram_hashes(tokens, self.k)  # computed outside the lock: the expensive part
        pos, sketch_pos = winnow_levels(kh, self.w, self.sketch_window)
        sketch = sketch_hashes(kh, sketch_pos)
        hashes = DonorHashes.from_anchors(kh[pos], pos)
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
            self._departures.record(rec.namespace_key, rec.donor_id, rec.tokens)
            index = self._indexes.get(rec.namespace_key)
            if index is not None:
                index.stale += rec.sketch_size
                index.live -= rec.sketch_size
                if index.stale > max(4096, index.live):
                    index.compact(self._slot_generation)

    @reports_departures
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
        """Top ``limit`` donors of ``namespace_key`` sharing sketch hashes with ``query_hashes`` (sorted unique
        uint64), best estimated shared k-grams first. The query is normally the prompt's sketch
        (``TargetAnchors.query_hashes``); any superset of it (e.g. all its anchors) finds the same donors."""
        with self._lock:
            index = self._indexes.get(namespace_key)
            if index is None or query_hashes.size == 0 or limit <= 0:
                return []
            packed = index.lookup(query_hashes, self.max_postings)
            if packed.size == 0:
                return []
            packed = packed[_valid(packed, self._slot_generation)]
            if packed.size == 0:
                return []
            slots = packed >> _GEN_BITS
            if slots.shape[0] * 8 < self._slot_len.shape[0]:  # few postings: sort them rather than count all slots
                slots = np.sort(slots)
                first = np.empty(slots.shape[0], dtype=bool)
                first[0] = True
                np.not_equal(slots[1:], slots[:-1], out=first[1:])
                begin = np.flatnonzero(first)
                hit_slots = slots[begin]
                v = np.diff(np.append(begin, slots.shape[0])).astype(np.float64)
            else:
                votes = np.bincount(slots)
                hit_slots = np.flatnonzero(votes)
                v = votes[hit_slots].astype(np.float64)
            # Rank by estimated shared k-grams, not raw votes: a long donor's sketch has more entries.
            sizes = self._slot_sketch[hit_slots].astype(np.float64)
            lens = self._slot_len[hit_slots].astype(np.float64)
            score = v / np.maximum(sizes, 1.0) * np.maximum(lens - self.k + 1, 1.0)
            if score.shape[0] > 4 * limit:  # same order as a full stable sort (ties: lower slot first), cheaper
                kth = np.partition(score, score.shape[0] - limit)[score.shape[0] - limit]
                top = np.flatnonzero(score >= kth)
                order = top[np.argsort(-score[top], kind="stable")][:limit]
            else:
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
                "index_bytes": sum(ix.nbytes() for ix in self._indexes.values()),
                "evictions": self.evictions,
                "pinned": sum(1 for c in self._pins.values() if c),
            }
