"""Worker side of the vLLM connector: write donor KV into a request's blocks, capture prompts' KV as donors.

Lifecycle, in the order vLLM's model runner calls it (one worker process per GPU)::

    register_kv_caches(kv_caches)      # once: the paged cache tensors, one per attention layer
    start_load(step_plan)              # each step, before the forward: all loads of the step, all layers
    wait_for_layer_load(layer)         # per layer: nothing to wait for (loads are stream-ordered, see below)
    save_kv_layer(...)                 # per layer: nothing (captures read the finished cache in wait_for_save)
    wait_for_save(step_plan)           # each step, after the forward: captures; releases this step's leases
    take_report() / take_load_errors() # what happened, for the scheduler

Cache layout. vLLM 0.26 - 0.33 attention backends keep one tensor per layer with the logical shape
``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (physical order set by the KV cache layout, NHD or HND).
Two ways to split it into K and V exist:

* ``"content"`` (FlashAttention, Triton, FlashInfer backends): K = ``[..., :head_size]``, V = ``[..., head_size:]``;
* ``"token_halves"`` (the CPU backend): the block's ``[block_size, 2 * head_size]`` rows are read as
  ``[2 * block_size, head_size]``, K = the first ``block_size`` rows, V = the rest.

Older releases' ``[2, num_blocks, block_size, num_kv_heads, head_size]`` tensors are recognised too. Each split
gives strided ``[num_blocks, num_kv_heads, block_size, head_size]`` views that ``semblend_core.kv_layout`` describes
(``HF_CONTIGUOUS``: a block axis, heads before tokens), so the fused kernel addresses vLLM's memory in place.

Ordering. A load runs the fused gather -> re-rotate -> scatter kernel (``semblend_core.triton_kernels``; its torch
reference on CPU) on the current stream before the forward pass is launched, so every attention layer sees the
loaded KV without per-layer events. Donor entries stay leased until ``wait_for_save`` of the same step, after the
forward was queued behind the load. A load that cannot run (donor gone, geometry changed, any error) reports the
request's target blocks through ``take_load_errors``; with ``kv_load_failure_policy=recompute`` vLLM recomputes them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from semblend.integration.vllm._metadata import (
    KvSignature,
    LoadSpec,
    SavedDonor,
    SaveSpec,
    StepPlan,
    WorkerReport,
)
from semblend_core.kv_layout import HF_CONTIGUOUS, VLLM_FLASH_NHD, KvCacheView
from semblend_core.rope_correction import RopeSpec

logger = logging.getLogger(__name__)

KV_SPLITS = ("content", "token_halves")
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int:
    """The layer number in a vLLM attention layer name (``model.layers.12.self_attn.attn`` -> 12)."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"cannot find a layer index in {name!r}")
    return int(match.group(1))


def split_kv(layer: Any, head_size: int, kv_split: str = "content") -> tuple[Any, Any]:
    """``(k, v)`` views ``[num_blocks, num_kv_heads, block_size, head_size]`` of one vLLM layer cache (no copy).

    ``layer``: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (0.26 - 0.33; any physical order) or
    ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (older flash-attn layout).
    """
    if layer.dim() == 5 and layer.shape[0] == 2:
        return layer[0].permute(0, 2, 1, 3), layer[1].permute(0, 2, 1, 3)
    if layer.dim() != 4 or layer.shape[-1] != 2 * head_size:
        raise ValueError(f"unrecognised vLLM KV cache shape {tuple(layer.shape)} for head_size {head_size}; "
                         "expected [num_blocks, num_kv_heads, block_size, 2 * head_size]")
    if kv_split == "content":
        return layer[..., :head_size], layer[..., head_size:]
    if kv_split == "token_halves":
        nb, nh, bs, _ = layer.shape
        rows = layer.view(nb, nh, 2 * bs, head_size)
        return rows[:, :, :bs], rows[:, :, bs:]
    raise ValueError(f"kv_split={kv_split!r}; allowed: {', '.join(KV_SPLITS)}")


def copy_spec(head_size: int) -> RopeSpec:
    """A shift-free spec for delta-0 copies (captures, context-exact loads): the kernel never rotates with it."""
    return RopeSpec(head_dim=head_size, rotary_dim=2, inv_freq=np.zeros(1), rope_type="copy")


class WorkerSide:
    """All worker-side state of one connector.

    ``store``: a ``semblend_core.kv_tensor_store.KvTensorStore`` (created lazily on the cache's device when None,
    with the given capacities). ``rope``: the model's ``RopeSpec``, or None when re-rotation is not exact (the
    scheduler then never sends a load with a non-zero shift). ``head_size``: from vLLM's KV cache spec.
    """

    def __init__(self, store: Any, rope: RopeSpec | None, *, head_size: int, kv_split: str = "content",
                 device_bytes: int = 0, host_bytes: int = 0) -> None:
        if kv_split not in KV_SPLITS:
            raise ValueError(f"kv_split={kv_split!r}; allowed: {', '.join(KV_SPLITS)}")
        self.store = store
        self.rope = rope
        self.head_size = int(head_size)
        self.kv_split = kv_split
        self._capacity = (int(device_bytes), int(host_bytes))
        self._copy_rope = copy_spec(self.head_size)
        self._paged: KvCacheView | None = None
        self.signature: KvSignature | None = None
        self._leases = contextlib.ExitStack()
        self._errors: set[int] = set()
        self._report = WorkerReport()
        self._known: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ registration
    def register_kv_caches(self, kv_caches: Mapping[str, Any]) -> None:
        """Bind vLLM's per-layer cache tensors (name -> tensor), ordered by layer index."""
        names = sorted(kv_caches, key=layer_index)
        if not names:
            raise ValueError("register_kv_caches: no layers")
        first = kv_caches[names[0]]
        if first.dim() == 5 and first.shape[0] == 2:
            view = KvCacheView(VLLM_FLASH_NHD, tuple(kv_caches[n] for n in names))
        else:
            pairs = [split_kv(kv_caches[n], self.head_size, self.kv_split) for n in names]
            view = KvCacheView.from_separate(HF_CONTIGUOUS, [p[0] for p in pairs], [p[1] for p in pairs])
        geom = view.geometry("vllm kv cache")  # checks every layer alike
        self._paged = view
        self.layer_names = tuple(names)
        self.signature = KvSignature(str(view.dtype).removeprefix("torch."), geom.num_kv_heads, geom.head_dim)
        if self.store is None:
            from semblend_core.kv_tensor_store import KvTensorStore

            self.store = KvTensorStore(device_bytes=self._capacity[0], host_bytes=self._capacity[1],
                                       device=view.device)
        logger.info("SemBlend: %d layers registered, %s, split=%s", len(names), self.signature, self.kv_split)

    @property
    def paged(self) -> KvCacheView:
        if self._paged is None:
            raise RuntimeError("register_kv_caches was not called")
        return self._paged

    # ------------------------------------------------------------------ loads
    def start_load(self, plan: StepPlan | None) -> None:
        """Write every load of this step into the paged cache. Never raises: failures go to the error path."""
        if not plan:
            return
        for spec in plan.loads:
            t0 = time.perf_counter()
            try:
                self._load(spec)
            except Exception as exc:  # noqa: BLE001 -- any failure must reach vLLM's recompute path
                logger.warning("SemBlend: load for %s failed (%s: %s); vLLM will recompute %d tokens",
                               spec.req_id, type(exc).__name__, exc, spec.num_tokens)
                self._fail(spec)
                continue
            self._report = self._report.merge(WorkerReport(loaded=((spec.req_id, spec.num_tokens),),
                                                           load_s=(time.perf_counter() - t0,), workers=0))

    def _fail(self, spec: LoadSpec) -> None:
        self._errors.update(spec.block_ids)
        self._report = self._report.merge(WorkerReport(load_failed=(spec.req_id,), workers=0))

    def _load(self, spec: LoadSpec) -> None:
        import torch

        from semblend_core.triton_kernels import rerotate_scatter

        if spec.donor_id is None:
            raise LookupError("the scheduler marked this load as impossible")
        if spec.delta != 0 and self.rope is None:
            raise ValueError("RoPE re-rotation is not exact for this model")
        paged = self.paged
        donor = self._leases.enter_context(self.store.lease(spec.namespace_key, spec.donor_id))
        if donor.num_tokens < spec.donor_start + spec.num_tokens:
            raise ValueError(f"donor holds {donor.num_tokens} tokens, load needs "
                             f"[{spec.donor_start}, {spec.donor_start + spec.num_tokens})")
        if donor.num_layers != paged.num_layers:
            raise ValueError(f"donor has {donor.num_layers} layers, cache has {paged.num_layers}")
        kv = donor.kv
        device = paged.device
        src_start = spec.donor_start
        if kv.device != device:  # served from the host tier: copy just the needed tokens
            kv = kv[:, :, spec.donor_start: spec.donor_start + spec.num_tokens].to(device, non_blocking=True)
            src_start = 0
        else:
            donor.wait()
        src = KvCacheView.from_donor_store(kv)
        src_slots = torch.arange(src_start, src_start + spec.num_tokens, dtype=torch.int64, device=device)
        dst_slots = torch.tensor(spec.slots(), dtype=torch.int64, device=device)
        rope = self.rope if spec.delta != 0 else self._copy_rope
        rerotate_scatter(src, paged, src_slots, dst_slots, int(spec.delta), rope)

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

        from semblend_core.triton_kernels import rerotate_scatter

        t0 = time.perf_counter()
        key = (spec.namespace_key, spec.donor_id)
        try:
            paged = self.paged
            geom = paged.geometry("vllm kv cache")
            kv = torch.empty((paged.num_layers, 2, spec.num_tokens, geom.num_kv_heads, geom.head_dim),
                             dtype=paged.dtype, device=paged.device)
            src_slots = torch.tensor(spec.slots(), dtype=torch.int64, device=paged.device)
            dst_slots = torch.arange(spec.num_tokens, dtype=torch.int64, device=paged.device)
            rerotate_scatter(paged, KvCacheView.from_donor_store(kv), src_slots, dst_slots, 0, self._copy_rope,
                             validate_indices=False)
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
        return WorkerReport(report.saved, report.save_failed, report.evicted, report.loaded, report.load_failed,
                            report.load_s, report.save_s, workers=1)

    def shutdown(self) -> None:
        self._leases.close()
