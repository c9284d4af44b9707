"""Donor KV tensors in two tiers: device memory (GPU) and pinned host memory, byte-bounded, LRU, lease-safe.

The planning store (``donor_store``) keeps tokens and fingerprints; this one keeps the donors' actual K/V so an
adapter can materialize them. Lifecycle::

    store = KvTensorStore(device_bytes=8 << 30, host_bytes=32 << 30)       # once per worker
    store.put(ns.key, donor_id, kv, token_ids)                              # after a request's prefill
    with store.lease(ns.key, plan.donor_id) as donor:                       # per blended request
        donor.wait()                # current CUDA stream waits for an in-flight host->device copy; no host sync
        k, v = donor.layer(i)       # [num_tokens, num_kv_heads, head_dim] each
        ...                         # re-rotate / scatter into the engine's paged cache
    # leaving the block releases the lease

Rules:

* Keys are ``(namespace key, donor_id)``; different namespaces never see each other's entries (rule 4).
* Each tier has a byte capacity. Putting into a full device tier **demotes** its least recently used entries to the
  host tier (a device->host copy); a full host tier **drops** its least recently used entries. A capacity of 0
  disables a tier; with no CUDA and no ``device`` argument there is no device tier.
* **Leases** pin an entry: while its refcount is above 0 it is never demoted, dropped, or moved, so an in-flight
  materialization cannot lose its tensors. Capacity eviction skips leased entries; an explicit :meth:`evict` of a
  leased entry hides it from new lookups at once and frees it when the last lease is released. When every
  candidate is leased, :meth:`put` raises :class:`~semblend_core.errors.StoreFullError`.
* Leasing an entry that sits on the host promotes it to the device tier when room can be made: the copy runs on a
  side CUDA stream from pinned memory and records an event; :meth:`DonorKv.wait` makes the consumer's stream wait on
  it. The source stays referenced until the event has completed.
* Every entry that leaves the store (dropped for room, or :meth:`evict`) is reported to the eviction listeners
  (:meth:`add_eviction_listener`) after the lock is released; demotion to the host is not a departure.
  ``SemBlendPipeline.attach_kv_store`` uses this so the planner forgets a donor whose KV is gone.
* Thread-safe: one lock guards the index; copies that move an entry between tiers run under it (``put`` and
  demotion are management calls, not per-token hot paths).

Needs torch (the ``gpu`` extra); runs on CPU only, where pinned memory and streams are simply not used.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from semblend_core._compat import require
from semblend_core._departures import Departures, EvictionListener, reports_departures
from semblend_core._logging import warning_once
from semblend_core.errors import DuplicateDonorError, SemBlendError, StoreFullError

torch = require("torch", extra="gpu")

logger = logging.getLogger(__name__)

DEVICE = "device"
HOST = "host"
TIERS = (DEVICE, HOST)

__all__ = ["DEVICE", "HOST", "DonorKv", "DonorKvMissingError", "KvTensorStore", "StoreStats"]


class DonorKvMissingError(SemBlendError, KeyError):
    """The ``(namespace key, donor_id)`` has no KV in the store (never put, evicted, or another namespace)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "donor KV missing"


@dataclass(frozen=True)
class DonorKv:
    """One donor's KV as seen by a consumer (a snapshot; the store may move the entry once no lease holds it).

    ``kv``: ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` (index 0 = K, 1 = V) on the tier's device.
    ``token_ids``: read-only int64 ``[num_tokens]``. ``ready_event``: a ``torch.cuda.Event`` when an async copy
    produced ``kv``, else None.
    """

    ns_key: str
    donor_id: str
    kv: Any
    token_ids: np.ndarray
    tier: str
    ready_event: Any = None

    @property
    def num_layers(self) -> int:
        return int(self.kv.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.kv.shape[2])

    @property
    def device(self):
        return self.kv.device

    def layer(self, index: int) -> tuple[Any, Any]:
        """``(k, v)`` of one layer, each ``[num_tokens, num_kv_heads, head_dim]`` (views, no copy)."""
        return self.kv[index, 0], self.kv[index, 1]

    def wait(self, stream: Any = None) -> None:
        """Make ``stream`` (default: the current CUDA stream of ``kv``'s device) wait for the copy. No host sync."""
        if self.ready_event is not None:
            if stream is None:
                stream = torch.cuda.current_stream(self.kv.device)
            stream.wait_event(self.ready_event)

    def synchronize(self) -> None:
        """Block the calling thread until ``kv`` is written (for host-side readers)."""
        if self.ready_event is not None:
            self.ready_event.synchronize()


@dataclass(frozen=True)
class StoreStats:
    """A consistent snapshot of the store's counters (bytes are the tensors' ``nbytes``)."""

    device_bytes: int
    host_bytes: int
    device_capacity: int
    host_capacity: int
    device_entries: int
    host_entries: int
    leased_entries: int
    hits: int
    misses: int
    evictions: int
    demotions: int
    promotions: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class _Entry:
    __slots__ = ("donor_id", "doomed", "keepalive", "kv", "leases", "nbytes", "ns_key", "ready", "tier",
                 "token_ids")

    def __init__(self, ns_key: str, donor_id: str, kv: Any, token_ids: np.ndarray, tier: str) -> None:
        self.ns_key = ns_key
        self.donor_id = donor_id
        self.kv = kv
        self.token_ids = token_ids
        self.nbytes = int(kv.numel() * kv.element_size())
        self.tier = tier
        self.leases = 0
        self.doomed = False  # explicitly evicted while leased: free on last release
        self.ready = None  # CUDA event of the copy that produced kv
        self.keepalive = None  # source of an in-flight async copy

    def snapshot(self) -> DonorKv:
        return DonorKv(self.ns_key, self.donor_id, self.kv, self.token_ids, self.tier, self.ready)


def _stack_kv(kv: Any, num_tokens: int) -> Any:
    """Normalize to one ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` tensor (stacked input kept as is)."""
    if isinstance(kv, torch.Tensor):
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise ValueError(f"kv tensor must be [num_layers, 2, num_tokens, num_kv_heads, head_dim], "
                             f"got {tuple(kv.shape)}")
        stacked = kv
    elif isinstance(kv, Sequence) and kv:
        shapes = set()
        for i, pair in enumerate(kv):
            if not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValueError(f"kv[{i}] must be a (k, v) pair")
            k, v = pair
            if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
                raise TypeError(f"kv[{i}] must hold torch tensors")
            if k.shape != v.shape or k.dim() != 3:
                raise ValueError(f"kv[{i}]: k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                                 "[num_tokens, num_kv_heads, head_dim]")
            shapes.add((tuple(k.shape), k.dtype, k.device))
        if len(shapes) != 1:
            raise ValueError(f"every layer's k/v must share shape, dtype and device, got {sorted(map(str, shapes))}")
        stacked = torch.stack([torch.stack((k, v)) for k, v in kv])
    else:
        raise TypeError("kv must be a stacked tensor or a non-empty sequence of (k, v) pairs")
    if stacked.shape[2] != num_tokens:
        raise ValueError(f"kv holds {stacked.shape[2]} tokens but token_ids has {num_tokens}")
    return stacked


class KvTensorStore:
    """Two-tier, byte-bounded, LRU store of donor KV tensors. See the module docstring for the rules.

    Args:
        device_bytes: capacity of the device tier (0 disables it).
        host_bytes: capacity of the host tier (0 disables it).
        device: device of the fast tier; default ``cuda`` when available, else no device tier. Tests may pass
            ``"cpu"`` to exercise tiering without a GPU.
        pin_memory: pin host-tier tensors (default: when CUDA is available), so host->device copies are async.
    """

    def __init__(self, device_bytes: int = 0, host_bytes: int = 0, *, device: Any = None,
                 pin_memory: bool | None = None) -> None:
        for name, value in (("device_bytes", device_bytes), ("host_bytes", host_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"KvTensorStore.{name} must be a non-negative integer, got {value!r}")
        if device is None and device_bytes and torch.cuda.is_available():
            device = "cuda"
        self._device = torch.device(device) if device is not None and device_bytes else None
        if self._device is not None and self._device.type == "cuda" and self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._capacity = {DEVICE: device_bytes if self._device is not None else 0, HOST: host_bytes}
        self._pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._lock = threading.RLock()
        self._index: dict[tuple[str, str], _Entry] = {}
        self._lru: dict[str, OrderedDict[tuple[str, str], _Entry]] = {t: OrderedDict() for t in TIERS}
        self._used = {t: 0 for t in TIERS}
        self._inflight: list[_Entry] = []
        self._side_stream = None
        self._counters = {"hits": 0, "misses": 0, "evictions": 0, "demotions": 0, "promotions": 0}
        self._departures = Departures("kv store")  # reported to the listeners outside the lock

    def add_eviction_listener(self, listener: EvictionListener) -> None:
        """Call ``listener(ns_key, donor_id, token_ids)`` for every entry that leaves the store (dropped to make
        room, or evicted), outside the store's lock. A listener's exception is logged, never raised."""
        self._departures.add_listener(listener)

    # ------------------------------------------------------------------ public API
    @property
    def device(self):
        """Device of the fast tier, or None when there is none."""
        return self._device

    @reports_departures
    def put(self, ns_key: str, donor_id: str, kv: Any, token_ids: Any, *, tier: str | None = None) -> str:
        """Store one donor's KV; return the tier it landed in (``"device"`` or ``"host"``).

        ``kv``: ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` tensor (kept without a copy when it already
        sits on the target tier's device: do not write to it afterwards) or a list of per-layer ``(k, v)`` pairs,
        each ``[num_tokens, num_kv_heads, head_dim]``. ``token_ids``: ``num_tokens`` integers. ``tier`` forces a
        tier (``"host"`` skips the device tier). Re-putting the same tokens only refreshes recency and returns the
        entry's tier; different tokens under a resident id raise :class:`DuplicateDonorError`. Raises
        :class:`StoreFullError` when no tier can make room (entry larger than the tier, or all else leased).
        """
        if not isinstance(ns_key, str) or not isinstance(donor_id, str):
            raise TypeError("ns_key and donor_id must be strings")
        if tier is not None and tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS} or None, got {tier!r}")
        tokens = np.array(token_ids, dtype=np.int64, copy=True).reshape(-1)
        tokens.setflags(write=False)
        stacked = _stack_kv(kv, int(tokens.shape[0]))
        key = (ns_key, donor_id)
        with self._lock:
            self._reap()
            old = self._index.get(key)
            if old is not None:
                if np.array_equal(old.token_ids, tokens):
                    self._lru[old.tier].move_to_end(key)
                    return old.tier
                raise DuplicateDonorError(f"donor {donor_id!r} already holds KV for different tokens in namespace "
                                          f"{ns_key[:12]}...; evict it first")
            nbytes = int(stacked.numel() * stacked.element_size())
            order = [t for t in TIERS if self._capacity[t] > 0 and (tier is None or t == tier)]
            for t in order:
                if self._make_room(t, nbytes):
                    entry = _Entry(ns_key, donor_id, self._to_tier(stacked, t), tokens, t)
                    self._insert(entry)
                    logger.debug("kv store: put %s/%s (%d bytes) in %s", ns_key[:8], donor_id, nbytes, t)
                    return t
            raise StoreFullError(
                f"no room for donor {donor_id!r} ({nbytes} bytes): capacities {self._capacity}, used {self._used}, "
                f"{sum(1 for e in self._index.values() if e.leases)} leased entries")

    def contains(self, ns_key: str, donor_id: str) -> bool:
        """True if the donor's KV is resident (any tier). Counts nothing, touches nothing."""
        with self._lock:
            return (ns_key, donor_id) in self._index

    def get(self, ns_key: str, donor_id: str) -> DonorKv | None:
        """Snapshot of the entry (counts a hit or a miss, refreshes recency), or None.

        Without a lease the store may demote or drop the entry at any later call; the returned tensors stay valid
        while referenced, but their memory is then no longer counted. Use :meth:`lease` to materialize.
        """
        with self._lock:
            entry = self._index.get((ns_key, donor_id))
            if entry is None:
                self._counters["misses"] += 1
                return None
            self._counters["hits"] += 1
            self._lru[entry.tier].move_to_end((ns_key, donor_id))
            return entry.snapshot()

    @contextlib.contextmanager
    def lease(self, ns_key: str, donor_id: str, *, promote: bool = True) -> Iterator[DonorKv]:
        """Pin the entry for the ``with`` block and yield its :class:`DonorKv`.

        With ``promote`` and a device tier, a host-tier entry is first copied to the device asynchronously (call
        :meth:`DonorKv.wait` before reading it on the device); when the device tier cannot make room the entry is
        served from the host. Raises :class:`DonorKvMissingError` when absent. Leases nest and may be held by
        several threads at once.
        """
        key = (ns_key, donor_id)
        with self._lock:
            self._reap()
            entry = self._index.get(key)
            if entry is None:
                self._counters["misses"] += 1
                raise DonorKvMissingError(f"no KV for donor {donor_id!r} in namespace {ns_key[:12]}...")
            self._counters["hits"] += 1
            entry.leases += 1  # before promotion: making room must never pick this entry
            try:
                if promote and entry.tier == HOST and self._capacity[DEVICE] > 0:
                    try:
                        self._promote(entry)
                    except RuntimeError as exc:  # e.g. CUDA out of memory: the host copy still serves
                        warning_once(logger, "kv store: promotion to %s failed (%s); serving from host",
                                     self._device, exc)
                self._lru[entry.tier].move_to_end(key)
                handle = entry.snapshot()
            except BaseException:
                self._release(entry)
                raise
        self._departures.flush()  # promotion may have dropped device entries the host tier had no room for
        try:
            yield handle
        finally:
            with self._lock:
                self._release(entry)

    @reports_departures
    def evict(self, ns_key: str, donor_id: str, *, token_ids: Any = None) -> bool:
        """Remove one donor's KV. A leased entry disappears from lookups now and is freed on its last release.
        ``token_ids``: evict only an entry holding exactly these tokens (retiring one donor must not take another
        that reused its id). Returns False when absent (or holding other tokens)."""
        with self._lock:
            entry = self._index.get((ns_key, donor_id))
            if entry is None:
                return False
            if token_ids is not None and not np.array_equal(entry.token_ids, np.asarray(token_ids)):
                return False
            if entry.leases:
                entry.doomed = True
                del self._index[(ns_key, donor_id)]
                self._lru[entry.tier].pop((ns_key, donor_id), None)
                self._departures.record(ns_key, donor_id, entry.token_ids)
            else:
                self._drop(entry)
            self._counters["evictions"] += 1
            return True

    @reports_departures
    def evict_namespace(self, ns_key: str) -> int:
        """Evict every donor of one namespace (same lease rules as :meth:`evict`); return how many."""
        with self._lock:
            keys = [key for key in self._index if key[0] == ns_key]
            return sum(self.evict(*key) for key in keys)

    def keys(self, ns_key: str | None = None) -> list[tuple[str, str]]:
        """Resident ``(ns_key, donor_id)`` keys, optionally of one namespace."""
        with self._lock:
            return [key for key in self._index if ns_key is None or key[0] == ns_key]

    def tier_of(self, ns_key: str, donor_id: str) -> str | None:
        with self._lock:
            entry = self._index.get((ns_key, donor_id))
            return entry.tier if entry is not None else None

    def stats(self) -> StoreStats:
        with self._lock:
            self._reap()
            return StoreStats(
                device_bytes=self._used[DEVICE], host_bytes=self._used[HOST],
                device_capacity=self._capacity[DEVICE], host_capacity=self._capacity[HOST],
                device_entries=len(self._lru[DEVICE]), host_entries=len(self._lru[HOST]),
                leased_entries=sum(1 for e in self._index.values() if e.leases), **self._counters,
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    # ------------------------------------------------------------------ internals (lock held)
    def _insert(self, entry: _Entry) -> None:
        key = (entry.ns_key, entry.donor_id)
        self._index[key] = entry
        self._lru[entry.tier][key] = entry
        self._used[entry.tier] += entry.nbytes

    def _drop(self, entry: _Entry) -> None:
        key = (entry.ns_key, entry.donor_id)
        if self._index.get(key) is entry:
            del self._index[key]
            self._departures.record(entry.ns_key, entry.donor_id, entry.token_ids)
        if self._lru[entry.tier].get(key) is entry:
            del self._lru[entry.tier][key]
        self._used[entry.tier] -= entry.nbytes
        entry.kv = None

    def _release(self, entry: _Entry) -> None:
        entry.leases -= 1
        if entry.leases == 0 and entry.doomed:
            self._used[entry.tier] -= entry.nbytes
            entry.kv = None

    def _reap(self) -> None:
        """Forget sources of async copies that have completed."""
        if self._inflight:
            still = []
            for entry in self._inflight:
                if entry.ready is not None and not entry.ready.query():
                    still.append(entry)
                else:
                    entry.keepalive = None
            self._inflight = still

    def _make_room(self, tier: str, nbytes: int) -> bool:
        """Demote (device) or drop (host) unleased LRU entries until ``nbytes`` fit; False if impossible."""
        cap = self._capacity[tier]
        if nbytes > cap:
            return False
        need = self._used[tier] + nbytes - cap
        if need <= 0:
            return True
        if sum(e.nbytes for e in self._lru[tier].values() if not e.leases) < need:
            return False  # decide before moving anything: a failed put leaves the store untouched
        for entry in list(self._lru[tier].values()):
            if self._used[tier] + nbytes <= cap:
                break
            if entry.leases:
                continue
            if tier == DEVICE:
                self._demote(entry)
            else:
                self._drop(entry)
                self._counters["evictions"] += 1
                logger.debug("kv store: dropped %s/%s from host", entry.ns_key[:8], entry.donor_id)
        return True

    def _demote(self, entry: _Entry) -> None:
        entry.leases += 1  # host room-making must not touch it
        try:
            moved = self._capacity[HOST] > 0 and self._make_room(HOST, entry.nbytes)
        finally:
            entry.leases -= 1
        key = (entry.ns_key, entry.donor_id)
        if not moved:
            self._drop(entry)
            self._counters["evictions"] += 1
            logger.debug("kv store: dropped %s/%s from device (host full)", entry.ns_key[:8], entry.donor_id)
            return
        if entry.ready is not None:  # an async promotion may still be writing this tensor
            torch.cuda.current_stream(entry.kv.device).wait_event(entry.ready)
        host_kv = self._to_tier(entry.kv, HOST)
        del self._lru[DEVICE][key]
        self._used[DEVICE] -= entry.nbytes
        entry.kv, entry.tier, entry.ready, entry.keepalive = host_kv, HOST, None, None
        self._lru[HOST][key] = entry
        self._used[HOST] += entry.nbytes
        self._counters["demotions"] += 1
        logger.debug("kv store: demoted %s/%s to host", entry.ns_key[:8], entry.donor_id)

    def _promote(self, entry: _Entry) -> None:
        if not self._make_room(DEVICE, entry.nbytes):
            return  # every device entry is leased: serve from host
        key = (entry.ns_key, entry.donor_id)
        src = entry.kv
        if self._device.type == "cuda":
            current = torch.cuda.current_stream(self._device)
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(self._device)
            side = self._side_stream
            dst = torch.empty(src.shape, dtype=src.dtype, device=self._device)  # allocated on `current`
            side.wait_stream(current)  # dst's memory may have been in use by work queued before
            with torch.cuda.stream(side):
                dst.copy_(src, non_blocking=True)
            dst.record_stream(side)  # the allocator must not reuse dst before the side copy finishes
            event = torch.cuda.Event()
            event.record(side)
            entry.ready, entry.keepalive = event, src
            self._inflight.append(entry)
        else:
            dst = src.to(self._device)
        del self._lru[HOST][key]
        self._used[HOST] -= entry.nbytes
        entry.kv, entry.tier = dst, DEVICE
        self._lru[DEVICE][key] = entry
        self._used[DEVICE] += entry.nbytes
        self._counters["promotions"] += 1

    def _to_tier(self, kv: Any, tier: str) -> Any:
        if tier == DEVICE:
            return kv if kv.device == self._device else kv.to(self._device)
        if kv.device.type == "cpu":
            if self._pin and not kv.is_pinned():
                return kv.pin_memory()
            return kv
        if self._pin:
            host = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True)
            host.copy_(kv)  # synchronous: the host copy is complete when put/demotion returns
            return host
        return kv.cpu()
