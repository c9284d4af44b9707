"""Worker side of the vLLM connector: write donor KV into a request's blocks, capture prompts' KV as donors.

Lifecycle, in the order vLLM's model runner calls it (one worker process per GPU)::

    register_kv_caches(kv_caches)      # once: the paged cache tensors, one per attention layer
    set_blend_view(view, reason)       # blend mode, once: the model view (or why there is none)
    start_load(step_plan)              # each step, before the forward: all loads and blends of the step
    wait_for_layer_load(layer)         # per layer: nothing to wait for (loads are stream-ordered, see below)
    save_kv_layer(...)                 # per layer: nothing (captures read the finished cache in wait_for_save)
    wait_for_save(step_plan)           # each step, after the forward: captures; releases this step's leases
    take_report() / take_load_errors() # what happened, for the scheduler

Cache layout. How K and V sit inside a layer's cache tensor is read from the attention backend by
``_layout.probe_block_layout`` (the backend's own cache-write op run on a scratch copy), never guessed: the caller
passes the resulting :class:`~semblend.integration.vllm._layout.BlockLayout` to :meth:`WorkerSide.register_kv_caches`.
When it is an ordinary strided layout with contiguous channels (the GPU backends), K and V are strided views
``[num_blocks, num_kv_heads, block_size, head_size]`` that ``semblend_core.kv_layout`` describes and the fused
kernel addresses in place; otherwise (vLLM's CPU backend keeps K transposed per block) loads and captures index the
layer's storage with the layout's per-element offsets. Without a layout (the probe failed) the worker loads and
captures nothing and says why in the log: every request is a normal prefill.

Ordering. A load runs the fused gather -> re-rotate -> scatter kernel (``semblend_core.triton_kernels``; its torch
reference on CPU) on the current stream before the forward pass is launched, so every attention layer sees the
loaded KV without per-layer events. Donor entries stay leased until ``wait_for_save`` of the same step, after the
forward was queued behind the load. A load that cannot run (donor gone, geometry changed, any error) reports the
request's target blocks through ``take_load_errors``; with ``kv_load_failure_policy=recompute`` vLLM recomputes them.

Blends (``blend`` mode, :class:`~semblend.integration.vllm._metadata.BlendSpec`). Before the forward, a request's
tokens ``[local_tokens, num_tokens)`` are filled by the shared blended-prefill executor
(``semblend_core.blended_prefill``) over a :class:`~semblend.integration.vllm._model_view.VllmModelView` of vLLM's
own model: every donor of the plan leased and its tokens verified, the reused KV re-rotated into a contiguous scratch
``[num_layers, num_tokens, num_kv_heads, head_size]`` (``assemble_kv``), vLLM's own exact prefix-cache rows ``[0,
local_tokens)`` read from the request's blocks into it, the mandatory / selected tokens recomputed with the model's
weights (``run_blended_prefill(..., logits=False, fixed_prefix=local_tokens)``), and rows ``[local_tokens,
num_tokens)`` written into the request's blocks (the fused kernel on strided layouts, per-element indices on the CPU
backend's). Same ordering and failure rules as loads: on the current stream before the forward; any error reports
every block of the request and vLLM recomputes it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from semblend.integration.vllm._layout import BlockLayout, layer_storage
from semblend.integration.vllm._metadata import (
    BlendSpec,
    KvSignature,
    LoadSpec,
    SavedDonor,
    SaveSpec,
    StepPlan,
    WorkerReport,
)
from semblend_core.kv_layout import HF_CONTIGUOUS, KvCacheView
from semblend_core.rope_correction import RopeSpec

logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int:
    """The layer number in a vLLM attention layer name (``model.layers.12.self_attn.attn`` -> 12)."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"cannot find a layer index in {name!r}")
    return int(match.group(1))


def _selection(name: str | None) -> Any:
    """The executor's ``SelectionStrategy`` for a configured name (None: the deviation check picks)."""
    if name is None:
        return None
    from semblend_core.recompute import SelectionStrategy

    return SelectionStrategy(name=name)


def copy_spec(head_size: int) -> RopeSpec:
    """A shift-free spec for delta-0 copies (captures, context-exact loads): the kernel never rotates with it."""
    return RopeSpec(head_dim=head_size, rotary_dim=2, inv_freq=np.zeros(1), rope_type="copy")


def strided_views(storage: Any, layout: BlockLayout) -> tuple[Any, Any] | None:
    """``(k, v)`` strided views ``[num_blocks, num_kv_heads, block_size, head_size]`` over one layer's 1-D
    storage (:func:`~semblend.integration.vllm._layout.layer_storage`) when the layout is an ordinary strided one
    with contiguous channels (:meth:`BlockLayout.strided`), else None."""
    import torch

    strided = layout.strided()
    if strided is None:
        return None
    (st, sh, _sc), k_base, v_base = strided
    nb = storage.numel() // layout.stride_block if layout.stride_block else 0
    shape = (nb, layout.num_kv_heads, layout.block_size, layout.head_size)
    strides = (layout.stride_block, sh, st, 1)
    off = storage.storage_offset()
    return (torch.as_strided(storage, shape, strides, off + k_base),
            torch.as_strided(storage, shape, strides, off + v_base))


def paged_view(storages: tuple[Any, ...], layout: BlockLayout) -> KvCacheView | None:
    """The fused kernel's view of every layer, or None when the layout is not strided."""
    pairs = [strided_views(s, layout) for s in storages]
    if not pairs or pairs[0] is None:
        return None
    return KvCacheView.from_separate(HF_CONTIGUOUS, [p[0] for p in pairs], [p[1] for p in pairs])


RESERVE_BYTES = 1 << 30  # left free on the cache's device after the donor store's device tier


def free_device_bytes(device: Any) -> int | None:
    """Bytes free on ``device`` now (CUDA: ``mem_get_info``; CPU: available system memory), None if unknown."""
    try:
        if getattr(device, "type", str(device)) == "cuda":
            import torch

            return int(torch.cuda.mem_get_info(device)[0])
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 -- unknown: keep the configured size
        return None


def device_tier_bytes(configured: int, free: int | None, reserve: int = RESERVE_BYTES) -> int:
    """The donor store's device tier: at most ``configured``, and never more than what vLLM left free on the
    device at registration (its KV cache and activations are allocated by then) minus ``reserve``. The store lives
    outside vLLM's memory budget, so this is how it stays out of vLLM's way."""
    if free is None:
        return int(configured)
    return max(0, min(int(configured), int(free) - int(reserve)))


class WorkerSide:
    """All worker-side state of one connector.

    ``store``: a ``semblend_core.kv_tensor_store.KvTensorStore`` (created lazily on the cache's device when None,
    with the given capacities). ``rope``: the model's ``RopeSpec``, or None when re-rotation is not exact (the
    scheduler then never sends a load with a non-zero shift). ``head_size``: from vLLM's KV cache spec.
    """

    def __init__(self, store: Any, rope: RopeSpec | None, *, head_size: int, device_bytes: int = 0,
                 host_bytes: int = 0) -> None:
        self.store = store
        self.rope = rope
        self.head_size = int(head_size)
        self._capacity = (int(device_bytes), int(host_bytes))
        self._copy_rope = copy_spec(self.head_size)
        self._paged: KvCacheView | None = None
        self._storages: tuple[Any, ...] = ()
        self.layout: BlockLayout | None = None
        self.layout_error = "register_kv_caches was not called"
        self.signature: KvSignature | None = None
        self._leases = contextlib.ExitStack()
        self._errors: set[int] = set()
        self._report = WorkerReport()
        self._known: set[tuple[str, str]] = set()
        self.blend_view: Any = None
        self.blend_error = "blend mode is off"
        self.blend_graphs: Any = None  # semblend_core.layer_graphs.LayerLoopGraphs, when set_blend_view enables them
        self._blend_error_logged = False
        # (req_id, BlendStats, host timings) of the latest blends, newest last
        self.recent_blends: collections.deque = collections.deque(maxlen=32)

    # ------------------------------------------------------------------ registration
    def register_kv_caches(self, kv_caches: Mapping[str, Any], layout: BlockLayout | None,
                           layout_error: str = "") -> None:
        """Bind vLLM's per-layer cache tensors (name -> tensor, ordered by layer index) and the backend's layout.

        ``layout``: what ``_layout.probe_block_layout`` read from the backend (every layer is allocated alike), or
        None with ``layout_error`` saying why it could not be read: then nothing is ever loaded or captured.
        """
        names = sorted(kv_caches, key=layer_index)
        if not names:
            raise ValueError("register_kv_caches: no layers")
        self.layer_names = tuple(names)
        first = kv_caches[names[0]]
        for n in names[1:]:
            t = kv_caches[n]
            if t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype:
                layout, layout_error = None, f"layer {n} is not allocated like {names[0]}"
                break
        self.layout = layout
        self.layout_error = "" if layout is not None else (layout_error or "unknown KV layout")
        if layout is None:
            logger.warning("SemBlend: no donor KV will be loaded or captured: %s", self.layout_error)
            return
        self._storages = tuple(layer_storage(kv_caches[n]) for n in names)
        self._paged = paged_view(self._storages, layout)
        dtype = first.dtype
        self.signature = KvSignature(str(dtype).removeprefix("torch."), layout.num_kv_heads, layout.head_size)
        device = first.device
        if self.store is None:
            from semblend_core.kv_tensor_store import KvTensorStore

            free = free_device_bytes(device)
            device_bytes = device_tier_bytes(self._capacity[0], free)
            if device_bytes < self._capacity[0]:
                logger.warning("SemBlend: donor KV device tier capped at %.2f GiB (%.2f GiB configured; %.2f GiB "
                               "free after vLLM's allocation, %.0f GiB kept free); use donor_kv_host_bytes for more",
                               device_bytes / 2**30, self._capacity[0] / 2**30, (free or 0) / 2**30,
                               RESERVE_BYTES / 2**30)
            self.store = KvTensorStore(device_bytes=device_bytes, host_bytes=self._capacity[1], device=device)
        self._dtype, self._device = dtype, device
        logger.info("SemBlend: %d layers registered, %s, layout %s (%s)", len(names), self.signature,
                    layout.source, "strided: fused kernel" if self._paged is not None else "indexed")
        self.warm_up()

    def warm_up(self) -> None:
        """Run the fused kernel's load (shifted and shift-free) and capture paths on scratch tensors with the
        cache's dtype, device, strides and layer count, so the first hit after start-up does not pay its JIT
        compilation (Triton on CUDA: 0.3-0.7 s inside a request). Triton compiles one variant per integer
        argument class (a multiple of 16, or not), so the warm-up covers both classes for the donor length and
        for the number of tokens moved (a first version that warmed 4 tokens of one layer still compiled inside
        the first H200 request). Indexed layouts use plain torch ops: nothing to warm. Never raises."""
        import torch

        from semblend_core.triton_kernels import rerotate_scatter

        layout = self.layout
        strided = layout.strided() if layout is not None else None
        if layout is None or strided is None:
            return
        try:
            (st, sh, _), k_base, v_base = strided
            num_layers = len(self.layer_names)
            most = 33  # the largest donor length below
            blocks = -(-most // layout.block_size)
            span = (blocks - 1) * layout.stride_block + layout.stride_block + max(
                int(layout.k_offsets.max()) - k_base, int(layout.v_offsets.max()) - v_base) + 1
            shape = (blocks, layout.num_kv_heads, layout.block_size, layout.head_size)
            strides = (layout.stride_block, sh, st, 1)
            k, v = (torch.as_strided(torch.zeros(span, dtype=self._dtype, device=self._device), shape, strides)
                    for _ in range(2))
            paged = KvCacheView.from_separate(HF_CONTIGUOUS, [k] * num_layers, [v] * num_layers)
            for donor_len in (32, most):
                donor = KvCacheView.from_donor_store(torch.zeros(
                    (num_layers, 2, donor_len, layout.num_kv_heads, layout.head_size),
                    dtype=self._dtype, device=self._device))
                for moved in (16, 15):
                    slots = torch.arange(moved, dtype=torch.int64, device=self._device)
                    if self.rope is not None:
                        rerotate_scatter(donor, paged, slots, slots, 1, self.rope)
                    rerotate_scatter(donor, paged, slots, slots, 0, self._copy_rope)
                slots = torch.arange(donor_len, dtype=torch.int64, device=self._device)
                rerotate_scatter(paged, donor, slots, slots, 0, self._copy_rope, validate_indices=False)
        except Exception as exc:  # noqa: BLE001 -- warm-up is an optimisation
            logger.warning("SemBlend: kernel warm-up failed (%s: %s)", type(exc).__name__, exc)

    def _move(self, donor: Any, paged: KvCacheView | None, storages: tuple[Any, ...], slots: list[int],
              src_start: int, num_tokens: int, delta: int, rope: RopeSpec | None, *, load: bool) -> None:
        """Copy ``num_tokens`` donor tokens from ``src_start`` to cache ``slots`` (``load``) or cache ``slots`` to
        donor tokens from ``src_start`` (capture), re-rotating keys by ``delta`` on loads.

        ``donor``: ``[num_layers, 2, num_donor_tokens, num_kv_heads, head_size]``; ``paged``: the kernel's view of
        the cache (strided layouts) or None; ``storages``: the layers' 1-D storages (``_layout.layer_storage``).
        """
        import torch

        from semblend_core.rope_correction import rerotate_keys
        from semblend_core.triton_kernels import rerotate_scatter

        layout = self.layout
        assert layout is not None
        device = storages[0].device
        cache_slots = torch.tensor(slots, dtype=torch.int64, device=device)
        donor_slots = torch.arange(src_start, src_start + num_tokens, dtype=torch.int64, device=device)
        if paged is not None:
            donor_view = KvCacheView.from_donor_store(donor)
            if load:
                rerotate_scatter(donor_view, paged, donor_slots, cache_slots, int(delta),
                                 rope if rope is not None else self._copy_rope)
            else:
                rerotate_scatter(paged, donor_view, cache_slots, donor_slots, 0, self._copy_rope,
                                 validate_indices=False)
            return
        k_idx = layout.element_index(cache_slots, "k")
        v_idx = layout.element_index(cache_slots, "v")
        for i, storage in enumerate(storages):
            if load:
                k = donor[i, 0, src_start: src_start + num_tokens]
                if delta:
                    assert rope is not None
                    k = rerotate_keys(k, int(delta), rope)
                storage[k_idx] = k.to(storage.dtype)
                storage[v_idx] = donor[i, 1, src_start: src_start + num_tokens].to(storage.dtype)
            else:
                donor[i, 0, src_start: src_start + num_tokens] = storage[k_idx]
                donor[i, 1, src_start: src_start + num_tokens] = storage[v_idx]

    @property
    def ready(self) -> bool:
        return self.layout is not None and bool(self._storages)

    # ------------------------------------------------------------------ loads
    def start_load(self, plan: StepPlan | None) -> None:
        """Write every load and blend of this step into the paged cache. Never raises: failures go to the error
        path.

        A request's loads (one per exact span, each with its own RoPE shift) succeed or fail together: when one
        fails, every block of every piece is reported, so vLLM recomputes the request's whole loaded range."""
        if not plan:
            return
        by_request: dict[str, list[LoadSpec]] = {}
        for spec in plan.loads:
            by_request.setdefault(spec.req_id, []).append(spec)
        for req_id, specs in by_request.items():
            done = []
            for spec in specs:
                t0 = time.perf_counter()
                try:
                    self._load(spec)
                except Exception as exc:  # noqa: BLE001 -- any failure must reach vLLM's recompute path
                    logger.warning("SemBlend: load for %s failed (%s: %s); vLLM will recompute %d tokens",
                                   req_id, type(exc).__name__, exc, sum(sp.num_tokens for sp in specs))
                    self._fail(specs)
                    done = []
                    break
                done.append(WorkerReport(loaded=((req_id, spec.num_tokens),),
                                         load_s=(time.perf_counter() - t0,), workers=0))
            for report in done:
                self._report = self._report.merge(report)
        for blend in plan.blends:
            self._run_blend(blend)

    # ------------------------------------------------------------------ blends
    def set_blend_view(self, view: Any, reason: str = "", *, graph_tokens: int = 0) -> None:
        """Blend mode: the executor's view of this worker's model (``_model_view.VllmModelView``), or None with
        ``reason`` (plugin not active, model not supported, TP > 1): then every blend is declined and vLLM
        recomputes. ``graph_tokens`` > 0 (``_config.blend_graph_tokens``) on a CUDA worker: hits up to that many
        tokens may replay the layer loop from CUDA graphs (``semblend_core.layer_graphs``). Call once, after
        ``register_kv_caches``."""
        self.blend_view = view
        self.blend_error = "" if view is not None else (reason or "no_model_view")
        self.blend_graphs = None
        if view is not None and graph_tokens > 0 and getattr(self._device, "type", None) == "cuda":
            from semblend_core.layer_graphs import LayerLoopGraphs

            self.blend_graphs = LayerLoopGraphs(view, max_tokens=int(graph_tokens), device=self._device,
                                                dtype=self._dtype)
        if view is None:
            logger.error("SemBlend: blend mode cannot run on this worker (%s); blend hits are declined and "
                         "prefilled normally", self.blend_error)
            self._blend_error_logged = True
            # Once: the scheduler then declines every later hit before crediting it (a stable reason).
            self._report = self._report.merge(WorkerReport(blend_unavailable=(self.blend_error.split(" ")[0]
                                                                              .rstrip(":"),), workers=0))

    def _run_blend(self, spec: BlendSpec) -> None:
        """One request's blend; never raises (any failure reports every block of the request)."""
        t0 = time.perf_counter()
        try:
            record = self._blend(spec)
        except Exception as exc:  # noqa: BLE001 -- any failure must reach vLLM's recompute path
            if self.blend_view is None:
                if not self._blend_error_logged:
                    logger.error("SemBlend: blend declined on this worker (%s); vLLM recomputes", self.blend_error)
                    self._blend_error_logged = True
            else:
                logger.warning("SemBlend: blend for %s failed (%s: %s); vLLM will recompute %d tokens", spec.req_id,
                               type(exc).__name__, exc, spec.num_tokens)
            # vLLM's own exact blocks below local_tokens stay valid (and shared): only the credited ones go back.
            self._errors.update(spec.credited_block_ids())
            self._report = self._report.merge(WorkerReport(load_failed=(spec.req_id,), workers=0))
            return
        blended = spec.num_blended
        recomputed = min(blended, record)
        self._report = self._report.merge(WorkerReport(
            loaded=((spec.req_id, blended),), load_s=(time.perf_counter() - t0,),
            blended=((spec.req_id, blended - recomputed, recomputed),), workers=0))

    def _blend(self, spec: BlendSpec) -> int:
        """Fill ``[local_tokens, num_tokens)`` of the request's blocks. Returns the recomputed tokens: the
        executor's token-layers over the layer count, rounded (mean tokens computed fresh per layer)."""
        import torch

        from semblend_core.blended_prefill import assemble_kv, run_blended_prefill, to_device
        from semblend_core.plan import Span, verify_donor_tokens

        started = time.perf_counter()
        view = self.blend_view
        if view is None:
            raise RuntimeError(f"blend unavailable: {self.blend_error}")
        if not self.ready:
            raise RuntimeError(f"KV layout unknown: {self.layout_error}")
        plan, n, local = spec.plan, int(spec.num_tokens), int(spec.local_tokens)
        if not 0 <= local < n or len(spec.token_ids) < n or len(spec.block_ids) * spec.block_size < n:
            raise ValueError(f"bad blend range [{local}, {n}) for {len(spec.token_ids)} tokens")
        if view.num_layers != len(self._storages) or view.num_kv_heads != self.layout.num_kv_heads \
                or view.head_dim != self.layout.head_size:
            raise ValueError("the model view does not match the KV cache geometry")
        target = np.asarray(spec.token_ids[:n], dtype=np.int64)
        spans = [s for s in plan.spans if s.target_start < n]
        if not spans:
            raise ValueError("the plan has no span below the credited range")
        entries: dict[str, Any] = {}
        for span in spans:
            donor_id = plan.donor_of(span)
            if donor_id is None:
                raise LookupError("a span names no donor")
            if donor_id not in entries:
                entry = self._leases.enter_context(self.store.lease(spec.namespace_key, donor_id))
                if entry.num_layers != len(self._storages):
                    raise ValueError(f"donor has {entry.num_layers} layers, cache has {len(self._storages)}")
                entries[donor_id] = entry
            clipped = Span(span.donor_start, span.target_start, min(span.target_end, n) - span.target_start,
                           span.donor_id)
            if not verify_donor_tokens(clipped, entries[donor_id].token_ids, target):
                raise ValueError(f"KV entry of donor {donor_id} holds other tokens than the plan's span")
        if any(s.delta != 0 for s in spans) and self.rope is None:
            raise ValueError("RoPE re-rotation is not exact for this model")
        donor_kv = {}
        for donor_id, entry in entries.items():
            if entry.kv.device != self._device:  # host tier: one contiguous copy of the entry
                donor_kv[donor_id] = entry.kv.to(self._device, non_blocking=True)
            else:
                entry.wait()
                donor_kv[donor_id] = entry.kv
        # Bounds and distinctness checked here, on the host, so the copies into the cache need no device sync
        # (a sync would hold the forward's launches until the whole executor ran). On the blocks: a slot is
        # block * block_size + offset with offset < block_size, so distinct blocks in range give distinct slots in
        # range (a set of n / block_size ints instead of sorting n slots: ~20x cheaper at 32K tokens). The
        # scheduler's block may hold several kernel blocks; slots count kernel-block rows either way.
        num_slots = (self._storages[0].numel() // self.layout.stride_block) * self.layout.block_size
        used = spec.block_ids[: -(-n // spec.block_size)]
        if min(used) < 0 or (max(used) + 1) * spec.block_size > num_slots or len(set(used)) != len(used):
            raise ValueError(f"blend blocks outside the cache ({num_slots} slots) or repeated")
        slot_list = spec.slots()
        slots = to_device(slot_list, self._device)
        rope = self.rope if self.rope is not None else self._copy_rope
        with torch.inference_mode():
            t0 = time.perf_counter()
            graphs = self.blend_graphs
            k, v = assemble_kv(plan, donor_kv, n, rope, total_len=n,
                               out=graphs.scratch(n) if graphs is not None else None)
            if local:
                self._scratch_rows(k, v, 0, slots[:local], to_cache=False)
            ids = to_device(target, self._device)
            t1 = time.perf_counter()
            stats, _ = run_blended_prefill(view, ids, k, v, plan, reuse_len=n, logits=False, fixed_prefix=local,
                                           check_layer=spec.check_layer,
                                           selection=_selection(spec.selection), graphs=graphs)
            t2 = time.perf_counter()
            self._scratch_rows(k, v, local, slots[local:], to_cache=True)
        # Host times (on CUDA: launch time, the work is queued on the stream): for diagnostics and tests.
        self.recent_blends.append((spec.req_id, stats, {"prepare_s": t0 - started, "assemble_s": t1 - t0,
                                                        "executor_s": t2 - t1, "write_s": time.perf_counter() - t2}))
        return int(round(stats.token_layers / max(1, view.num_layers)))

    def _scratch_rows(self, k: Any, v: Any, start: int, slots: Any, *, to_cache: bool) -> None:
        """Copy scratch rows ``[start, start + len(slots))`` of every layer (``k``/``v``: ``[num_layers,
        num_tokens, num_kv_heads, head_size]``, storage in the HF layout of ``assemble_kv``) into cache ``slots``
        (``to_cache``) or the cache's rows at ``slots`` into the scratch. Unrotated copies."""
        import torch

        from semblend_core.triton_kernels import rerotate_scatter

        count = int(slots.numel())
        if count == 0:
            return
        layout = self.layout
        assert layout is not None
        if self._paged is not None:
            scratch = KvCacheView.from_separate(HF_CONTIGUOUS, [k.transpose(1, 2)[i][None] for i in range(k.shape[0])],
                                                [v.transpose(1, 2)[i][None] for i in range(v.shape[0])])
            rows = torch.arange(start, start + count, dtype=torch.int64, device=slots.device)
            if to_cache:  # slots were checked on the host (_blend)
                rerotate_scatter(scratch, self._paged, rows, slots, 0, self._copy_rope, validate_indices=False)
            else:
                rerotate_scatter(self._paged, scratch, slots, rows, 0, self._copy_rope, validate_indices=False)
            return
        k_idx = layout.element_index(slots, "k")
        v_idx = layout.element_index(slots, "v")
        for i, storage in enumerate(self._storages):
            if to_cache:
                storage[k_idx] = k[i, start:start + count].to(storage.dtype)
                storage[v_idx] = v[i, start:start + count].to(storage.dtype)
            else:
                k[i, start:start + count] = storage[k_idx].to(k.dtype)
                v[i, start:start + count] = storage[v_idx].to(v.dtype)

    def _fail(self, specs: list[LoadSpec]) -> None:
        for spec in specs:
            self._errors.update(spec.block_ids)
        self._report = self._report.merge(WorkerReport(load_failed=(specs[0].req_id,), workers=0))

    def _load(self, spec: LoadSpec) -> None:
        if spec.donor_id is None:
            raise LookupError("the scheduler marked this load as impossible")
        if not self.ready:
            raise RuntimeError(f"KV layout unknown: {self.layout_error}")
        if spec.delta != 0 and self.rope is None:
            raise ValueError("RoPE re-rotation is not exact for this model")
        donor = self._leases.enter_context(self.store.lease(spec.namespace_key, spec.donor_id))
        if donor.num_tokens < spec.donor_start + spec.num_tokens:
            raise ValueError(f"donor holds {donor.num_tokens} tokens, load needs "
                             f"[{spec.donor_start}, {spec.donor_start + spec.num_tokens})")
        if donor.num_layers != len(self._storages):
            raise ValueError(f"donor has {donor.num_layers} layers, cache has {len(self._storages)}")
        kv = donor.kv
        src_start = spec.donor_start
        if kv.device != self._device:  # served from the host tier: copy just the needed tokens
            kv = kv[:, :, spec.donor_start: spec.donor_start + spec.num_tokens].to(self._device, non_blocking=True)
            src_start = 0
        else:
            donor.wait()
        rope = self.rope if spec.delta != 0 else self._copy_rope
        self._move(kv, self._paged, self._storages, spec.slots(), src_start, spec.num_tokens, int(spec.delta),
                   rope, load=True)

    def take_load_errors(self) -> set[int]:
        """Block ids whose load failed since the last call (vLLM recomputes them)."""
        out, self._errors = self._errors, set()
        return out

    # ------------------------------------------------------------------ captures
    def wait_for_save(self, plan: StepPlan | None) -> None:
        """After the forward: capture finished prompts as donors, then release this step's leases."""
        try:
            if plan:
                for spec in plan.saves:
                    self._capture(spec)
                if plan.saves:
                    self._report_evictions()
        finally:
            self._leases.close()
            self._leases = contextlib.ExitStack()

    def _capture(self, spec: SaveSpec) -> None:
        import torch

        t0 = time.perf_counter()
        key = (spec.namespace_key, spec.donor_id)
        try:
            if not self.ready:
                raise RuntimeError(f"KV layout unknown: {self.layout_error}")
            layout = self.layout
            assert layout is not None
            kv = torch.empty((len(self._storages), 2, spec.num_tokens, layout.num_kv_heads, layout.head_size),
                             dtype=self._dtype, device=self._device)
            self._move(kv, self._paged, self._storages, spec.slots(), 0, spec.num_tokens, 0, None, load=False)
            token_ids = spec.token_ids if spec.token_ids else np.zeros(spec.num_tokens, dtype=np.int64)
            self.store.put(spec.namespace_key, spec.donor_id, kv, token_ids)
        except Exception as exc:  # noqa: BLE001 -- a failed capture is a future miss, never an error
            logger.warning("SemBlend: capture of %s failed (%s: %s)", spec.donor_id, type(exc).__name__, exc)
            self._report = self._report.merge(WorkerReport(save_failed=(key,), workers=0))
            return
        self._known.add(key)
        assert self.signature is not None
        saved = SavedDonor(spec.namespace_key, spec.donor_id, spec.num_tokens, self.signature,
                           int(kv.numel() * kv.element_size()))
        self._report = self._report.merge(WorkerReport(saved=(saved,), save_s=(time.perf_counter() - t0,),
                                                       workers=0))

    def _report_evictions(self) -> None:
        if self.store is None:
            return
        resident = set(self.store.keys())
        gone = tuple(sorted(self._known - resident))
        if gone:
            self._known -= set(gone)
            self._report = self._report.merge(WorkerReport(evicted=gone, workers=0))

    # ------------------------------------------------------------------ reporting
    def take_report(self) -> WorkerReport | None:
        """What this worker did since the last call (``workers=1``), or None when nothing happened."""
        report, self._report = self._report, WorkerReport()
        if not report:
            return None
        return dataclasses.replace(report, workers=1)

    def shutdown(self) -> None:
        self._leases.close()
