"""``SemBlendRadixCache``: SGLang's ``RadixCache`` that also serves the reusable prefix of a semantic hit.

SGLang's radix tree stays authoritative (rule 1): every match runs the tree's own ``match_prefix`` first, and SemBlend
only adds tokens past what the tree matched. Lifecycle of one request, in SGLang's call order:

1. ``match_prefix(params)`` (scheduler, every time the request is considered while it waits): the tree's exact match
   (``exact`` tokens); then ``pipeline.plan(prompt, engine_prefix_tokens=exact)`` and :func:`._load.prefix_load`.
   Every decline (miss, no gain, RoPE not shift-invariant, donor KV gone, no room) is decided **before** anything is
   allocated. On a hit it allocates ``n`` fresh slots, copies the donor KV into them (keys re-rotated by the RoPE
   shift with ``semblend_core.triton_kernels.rerotate_scatter``: Triton on GPU, its torch twin on CPU) from

   * SGLang's own KV pool: the donor's tree nodes, locked while copied; or
   * the host tier (``semblend_core.kv_tensor_store``) when the donor's nodes were evicted,

   sets ``req.skip_radix_cache_insert = True`` (approximate KV, and everything computed after it, never enters the
   tree: rule 3) and returns the tree's result with ``device_prefix_len = exact + n`` and ``cache_protected_len =
   exact``. A repeated match with the same exact part returns the same load; a different one replaces it.
2. ``prefix_device_indices(req)`` (allocation of the extend batch): the tree path up to ``exact`` followed by the
   donor slots. From here the request's row owns them: SGLang's ``release_kv_cache`` frees ``[exact, end)`` of the
   row, donor slots included, exactly once. This is where ``materialized`` is recorded (rule 2).
3. ``release_aborted_request`` (abort before admission) and ``reset`` (flush): slots that never reached a row are
   freed here, and only here.
4. ``on_release(req, checkpointed=True)`` (a finished request whose prompt went into the tree): the prompt becomes a
   donor (tokens in the planning store; its KV copied to the host tier when that tier is on).

Slots held for waiting requests count as ``protected_size`` so SGLang's pool invariant (available + evictable +
protected == total) holds at every step.
"""

from __future__ import annotations

import logging
import time
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from semblend.integration.sglang._config import SglangAdapterConfig, request_namespace
from semblend.integration.sglang._load import DeclineReason, PrefixLoad, prefix_load
from semblend_core.kv_layout import SGLANG_TOKEN_POOL, KvCacheView
from semblend_core.plan import Outcome, SemanticKvPlan
from semblend_core.rope_correction import RopeSpec

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    from semblend_core.kv_tensor_store import KvTensorStore
    from semblend_core.namespace import CacheNamespace
    from semblend_core.pipeline import SemBlendPipeline

logger = logging.getLogger(__name__)

SOURCE_POOL = "pool"
SOURCE_HOST = "host"


def copy_spec(head_dim: int) -> RopeSpec:
    """A shift-free spec for delta-0 copies: the kernel never rotates with it."""
    return RopeSpec(head_dim=head_dim, rotary_dim=2, inv_freq=np.zeros(1), rope_type="copy")


def pool_view(kvcache: Any) -> KvCacheView | None:
    """A :class:`KvCacheView` over SGLang's ``MHATokenToKVPool`` (per layer ``[num_slots, num_kv_heads,
    head_dim]`` K and V), or None when the pool is anything else (quantized, HND, MLA, hybrid)."""
    k, v = getattr(kvcache, "k_buffer", None), getattr(kvcache, "v_buffer", None)
    if type(kvcache).__name__ != "MHATokenToKVPool" or not k or not v:
        return None
    if getattr(kvcache, "kv_cache_layout", "nhd") != "nhd" or getattr(kvcache, "store_dtype", None) != kvcache.dtype:
        return None
    if getattr(kvcache, "head_dim", None) != getattr(kvcache, "v_head_dim", None):
        return None
    return KvCacheView.from_separate(SGLANG_TOKEN_POOL, list(k), list(v))


@dataclass
class _Load:
    """Donor slots held for one request between its match and its admission."""

    load: PrefixLoad
    plan: SemanticKvPlan
    slots: torch.Tensor  # int64 [num_tokens] pool slots holding the donor KV
    node: Any  # the tree node of the exact match (the request locks it at admission)
    key_len: int
    skip_before: bool  # req.skip_radix_cache_insert before we set it
    source: str


class SemBlendRadixCache(RadixCache):
    """See the module docstring. Built by :func:`semblend.integration.sglang.factory.create_tree_cache`."""

    def __init__(self, params: CacheInitParams, *, pipeline: SemBlendPipeline, adapter: SglangAdapterConfig,
                 namespace: CacheNamespace, rope: RopeSpec | None, host_store: KvTensorStore | None = None,
                 decline_all: str | None = None) -> None:
        self._pending: dict[str, _Load] = {}
        self._pending_tokens = 0
        super().__init__(params)
        self.pipeline = pipeline
        self.adapter = adapter
        self.namespace = namespace
        self.rope = rope
        self.host_store = host_store
        self.decline_all = decline_all
        self._view: KvCacheView | None = None
        kvcache = self.token_to_kv_pool_allocator.get_kvcache() if self.token_to_kv_pool_allocator else None
        if kvcache is not None:
            self._view = pool_view(kvcache)
            if self._view is None and adapter.materializes and decline_all is None:
                logger.warning("SemBlend: KV pool %s is not a plain token pool; donor KV will not be served",
                               type(kvcache).__name__)
                self.decline_all = DeclineReason.UNSUPPORTED_POOL
            if self._view is not None:
                self._copy_rope = copy_spec(int(kvcache.head_dim))
        self.counters: dict[str, int] = {}

    # ------------------------------------------------------------------ accounting
    def _count(self, outcome: str, reason: str) -> None:
        key = f"{outcome}:{reason}"
        self.counters[key] = self.counters.get(key, 0) + 1

    def _record(self, plan: SemanticKvPlan, outcome: str, reason: str, loaded: int = 0) -> None:
        self.pipeline.record_outcome(plan, outcome, loaded_tokens=loaded, reason=reason)
        self._count(outcome, reason)

    def pending_requests(self) -> list[str]:
        """Requests holding donor slots that have not reached a row (empty when the scheduler is idle)."""
        return list(self._pending)

    def protected_size(self):
        # Slots held for waiting requests are neither free nor in the tree: count them as protected so SGLang's
        # pool invariant holds while a request waits.
        return super().protected_size() + self._pending_tokens

    # ------------------------------------------------------------------ SGLang hooks
    def reset(self) -> None:
        pending = getattr(self, "_pending", None)
        if pending:
            for rid in list(pending):
                self._drop(rid, DeclineReason.RESET)
        super().reset()

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        req = params.req
        if req is None or self.disable:
            return result
        try:
            return self._semantic_match(params.key, req, result)
        except Exception as exc:  # noqa: BLE001 -- rule 5: never fail inference
            logger.warning("SemBlend: match for %s failed (%s: %s); normal prefill", getattr(req, "rid", "?"),
                           type(exc).__name__, exc)
            logger.debug("match failure", exc_info=True)
            self._drop(getattr(req, "rid", None), DeclineReason.LOAD_FAILED, req=req)
            return result

    def prefix_device_indices(self, req: Req) -> torch.Tensor:
        held = self._pending.pop(req.rid, None)
        path = self.path_device_indices(req.last_node)
        if held is None:
            return path[: req.prefix_len]
        self._pending_tokens -= held.load.num_tokens
        if req.prefix_len != held.load.exact + held.load.num_tokens or held.node is not req.last_node:
            # Never expected: the scheduler changed the match after we served it. Hand back only the exact part
            # would break SGLang's prefix_len; freeing here and failing loudly is the honest answer.
            self.token_to_kv_pool_allocator.free(held.slots)
            req.skip_radix_cache_insert = held.skip_before
            raise RuntimeError(f"SemBlend: request {req.rid} reached allocation with prefix_len {req.prefix_len}, "
                               f"served {held.load.exact}+{held.load.num_tokens}")
        self._record(held.plan, Outcome.MATERIALIZED, f"{held.source}_prefix", held.load.num_tokens)
        if self.adapter.kv_probe_dir:
            self._probe("load", req.rid, list(req.origin_input_ids), held.slots,
                        positions=list(range(held.load.exact, held.load.exact + held.load.num_tokens)),
                        donor_id=held.load.donor_id, source=held.source)
        return torch.cat([path[: held.load.exact], held.slots.to(path.device)])

    def release_aborted_request(self, handle: Any) -> None:
        super().release_aborted_request(handle)
        self._drop(getattr(handle, "rid", None), DeclineReason.ABORTED_BEFORE_ADMISSION)

    def on_release(self, req: Req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        held = self._pending.get(req.rid)
        if held is not None:  # released without an admission (never expected): the slots never reached the row
            self._drop(req.rid, DeclineReason.ABORTED_BEFORE_ADMISSION, req=req)
        if checkpointed and self.adapter.register_donors:
            try:
                self._register_donor(req)
            except Exception as exc:  # noqa: BLE001 -- rule 5
                logger.warning("SemBlend: registering donor %s failed (%s: %s)", req.rid, type(exc).__name__, exc)

    # ------------------------------------------------------------------ internals
    def _drop(self, rid: str | None, reason: str, *, req: Req | None = None) -> None:
        """Free the donor slots held for ``rid`` (never reached a row) and restore the request's flag."""
        held = self._pending.pop(rid, None) if rid is not None else None
        if held is None:
            return
        self._pending_tokens -= held.load.num_tokens
        self.token_to_kv_pool_allocator.free(held.slots)
        if req is not None:
            req.skip_radix_cache_insert = held.skip_before
        self._record(held.plan, Outcome.DECLINED, reason)

    def _semantic_match(self, key: RadixKey, req: Req, result: MatchResult) -> MatchResult:
        exact = int(result.device_prefix_len)
        held = self._pending.get(req.rid)
        if held is not None:
            if held.load.exact == exact and held.node is result.last_device_node and held.key_len == len(key):
                return result._replace(device_prefix_len=exact + held.load.num_tokens, cache_protected_len=exact)
            self._drop(req.rid, DeclineReason.REMATCHED, req=req)
        if getattr(req.kv, "holds_kv", False) or req.output_ids or getattr(req, "is_retracted", False):
            return result  # a later chunk or a resumed request: SemBlend serves fresh prompts only
        prompt = req.origin_input_ids
        if len(prompt) < self.pipeline.config.min_prompt_tokens:
            return result
        ns = request_namespace(self.namespace, req)
        plan = self.pipeline.plan(list(prompt), namespace=ns, engine_prefix_tokens=exact)
        if not plan.is_hit:
            self._count("miss", plan.reason)
            return result
        if not self.adapter.materializes:
            self._count(Outcome.DISCOVERY_ONLY, plan.reason)
            return result
        if self.decline_all is not None:
            self._record(plan, Outcome.DECLINED, self.decline_all)
            return result
        load = prefix_load(plan, exact, len(key), self.page_size, rope_exact=self.rope is not None,
                           load_moved_prefix=self.adapter.load_moved_prefix)
        if isinstance(load, str):
            self._record(plan, Outcome.EXACT if load == DeclineReason.ENGINE_PREFIX_COVERS else Outcome.DECLINED,
                         load)
            return result
        source, donor_slots, donor_node = self._find_source(load, key, ns)
        if source is None:
            self._record(plan, Outcome.DECLINED, DeclineReason.DONOR_KV_EVICTED)
            return result
        slots = self._allocate(load.num_tokens, (donor_node, result.last_device_node))
        if slots is None:
            self._record(plan, Outcome.DECLINED, DeclineReason.NO_FREE_SLOTS)
            return result
        # From here the slots are ours until a row takes them: free them on any failure.
        try:
            self._copy(load, source, donor_slots, donor_node, slots, ns)
        except Exception:
            self.token_to_kv_pool_allocator.free(slots)
            raise
        self._pending[req.rid] = _Load(load, plan, slots, result.last_device_node, len(key),
                                       bool(req.skip_radix_cache_insert), source)
        self._pending_tokens += load.num_tokens
        req.skip_radix_cache_insert = True
        return result._replace(device_prefix_len=exact + load.num_tokens, cache_protected_len=exact)

    def _find_source(self, load: PrefixLoad, key: RadixKey, ns: CacheNamespace
                     ) -> tuple[str | None, torch.Tensor | None, Any]:
        """Where the donor's KV is: its tree nodes in SGLang's pool (preferred) or the host tier."""
        rec = self.pipeline.store.lookup_id(load.donor_id, ns.key)
        need = load.donor_tokens_needed
        if rec is not None and rec.tokens.shape[0] >= need:
            donor_key = RadixKey(array("q", rec.tokens[:need].tolist()), key.extra_key, cache_salt=key.cache_salt)
            m = super().match_prefix(MatchPrefixParams(key=donor_key))
            if m.device_prefix_len >= need:
                path = self.path_device_indices(m.last_device_node)
                return SOURCE_POOL, path[torch.from_numpy(load.donor_positions).to(path.device)], m.last_device_node
        if self.host_store is not None:
            snap = self.host_store.get(ns.key, load.donor_id)
            if snap is not None and snap.num_tokens >= need:
                return SOURCE_HOST, None, None
        return None, None, None

    def _allocate(self, n: int, keep: tuple[Any, ...]) -> torch.Tensor | None:
        """``n`` fresh slots, evicting unlocked tree leaves if needed, or None with the tree untouched when even
        eviction could not make room. The nodes in ``keep`` (the donor's path and the request's own exact match,
        which the scheduler locks only at admission) are locked meanwhile, so they are neither evicted nor counted."""
        allocator = self.token_to_kv_pool_allocator
        if allocator.available_size() >= n:
            return allocator.alloc(n)
        locked = [node for node in keep if node is not None]
        for node in locked:
            self.inc_lock_ref(node)
        try:
            if allocator.available_size() + self.evictable_size() < n:
                return None
            self.evict(EvictParams(num_tokens=n - allocator.available_size()))
        finally:
            for node in locked:
                self.dec_lock_ref(node)
        if allocator.available_size() < n:
            return None
        return allocator.alloc(n)

    def _copy(self, load: PrefixLoad, source: str, donor_slots: torch.Tensor | None, donor_node: Any,
              slots: torch.Tensor, ns: CacheNamespace) -> None:
        from semblend_core.triton_kernels import rerotate_scatter

        t0 = time.perf_counter()
        assert self._view is not None
        deltas: Any = torch.from_numpy(load.deltas).to(slots.device)
        rope = self.rope if load.shifted else self._copy_rope
        if not load.shifted:
            deltas = 0
        if source == SOURCE_POOL:
            self.inc_lock_ref(donor_node)  # the donor's nodes stay put while their KV is read
            try:
                rerotate_scatter(self._view, self._view, donor_slots, slots, deltas, rope)
            finally:
                self.dec_lock_ref(donor_node)
        else:
            assert self.host_store is not None
            with self.host_store.lease(ns.key, load.donor_id, promote=False) as donor:
                kv = donor.kv.to(slots.device, non_blocking=True)
                src_slots = torch.from_numpy(load.donor_positions).to(slots.device)
                rerotate_scatter(KvCacheView.from_donor_store(kv), self._view, src_slots, slots, deltas, rope)
        if slots.device.type == "cuda":
            # The forward may run on another stream (overlap scheduling): the slots must hold the KV before the
            # scheduler hands them to a batch.
            torch.cuda.current_stream(slots.device).synchronize()
        logger.debug("SemBlend: loaded %d tokens of %s from %s in %.2f ms", load.num_tokens, load.donor_id, source,
                     (time.perf_counter() - t0) * 1e3)

    def _register_donor(self, req: Req) -> None:
        prompt = list(req.origin_input_ids)
        if len(prompt) < max(1, self.adapter.min_donor_tokens) or getattr(req, "is_retracted", False):
            return
        ns = request_namespace(self.namespace, req)
        self.pipeline.register_donor(str(req.rid), prompt, namespace=ns)
        if (self.host_store is None and not self.adapter.kv_probe_dir) or self._view is None:
            return
        key = RadixKey(array("q", prompt), req.extra_key, cache_salt=req.cache_salt).page_aligned(self.page_size)
        m = super().match_prefix(MatchPrefixParams(key=key))
        n = int(m.device_prefix_len)
        if n <= 0:
            return
        slots = self.path_device_indices(m.last_device_node)[:n]
        if self.adapter.kv_probe_dir:
            self._probe("donor", req.rid, prompt, slots, positions=list(range(n)))
        k0 = self._view.layers[0][0]
        nbytes = 2 * len(self._view.layers) * n * k0[0].numel() * k0.element_size()
        if self.host_store is not None and nbytes <= self.adapter.host_tier_bytes:
            kv = torch.stack([torch.stack((k[slots], v[slots])) for k, v in self._view.layers]).to("cpu")
            self.host_store.put(ns.key, str(req.rid), kv, prompt[:n], tier="host")

    def _probe(self, kind: str, rid: str, prompt: list[int], slots: torch.Tensor, **meta: Any) -> None:
        """``kv_probe_dir`` (see ``SglangAdapterConfig``): layer 0's K/V at ``slots``, read-only."""
        import os

        assert self._view is not None
        k, v = self._view.layers[0]
        path = os.path.join(self.adapter.kv_probe_dir, f"{kind}-{rid}.pt")
        torch.save({"prompt": prompt, "k": k[slots].to("cpu").clone(), "v": v[slots].to("cpu").clone(), **meta},
                   path)
