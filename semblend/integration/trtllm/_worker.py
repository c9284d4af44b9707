"""Worker side of the TensorRT-LLM connector: write donor KV into a request's blocks, capture prompts as donors.

Lifecycle, in the order TensorRT-LLM's executor calls it (every rank; materializing modes run one rank)::

    register_kv_caches(kv_cache_tensor)       # once: the paged pool (``_layout``), checked against the model
    start_load_kv(plan)                       # each step, before the forward: every load of the step, all layers
    wait_for_layer_load(layer) / save_kv_layer(layer)   # per layer: nothing to do (see Ordering)
    wait_for_save(plan)                       # each step, after the forward: captures of finished prompts

Ordering. A load runs the core's fused gather -> re-rotate -> scatter (``semblend_core.triton_kernels
.rerotate_scatter``; its torch twin on CPU) on the forward pass's stream before the forward is enqueued, so every
layer reads the loaded KV without per-layer events. A capture runs in ``wait_for_save`` on the same stream, after
the forward wrote the prompt's KV.

Failure. A load is decided on the scheduler side with the donor leased, the pool geometry checked at registration
and the block count checked when the load is staged, so a load that cannot run is a bug, not a miss. TensorRT-LLM
has no recompute path for tokens a connector was credited with, and zero or stale blocks would be wrong KV served
as if computed; the worker therefore raises (TensorRT-LLM fails the step's requests) rather than continue
(rule 5: never serve wrong KV). A failed capture is only a future miss: it is logged and skipped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import numpy as np

from semblend.integration.trtllm._layout import PoolGeometry, pool_view
from semblend.integration.trtllm._shared import SharedState
from semblend.integration.vllm._metadata import LoadSpec, SaveSpec, StepPlan
from semblend.integration.vllm._worker import copy_spec
from semblend_core.errors import SemBlendError
from semblend_core.kv_layout import KvCacheView, KvLayoutError
from semblend_core.rope_correction import RopeSpec

logger = logging.getLogger(__name__)

__all__ = ["KvLoadError", "WorkerSide"]


class KvLoadError(SemBlendError, RuntimeError):
    """A credited load could not be written: the step must fail rather than compute on wrong KV."""


class WorkerSide:
    """All worker-side state of one connector.

    ``geometry``: what the pool must be (from the model config and ``llm_args``). ``rope``: the model's
    :class:`RopeSpec` for shifted loads, or None when re-rotation is not exact (a shifted load then raises; the
    scheduler never stages one, see ``_scheduler``). ``store``: a ``KvTensorStore`` (built on the pool's device
    with ``device_bytes`` / ``host_bytes`` when None). ``materialize``: False in discovery mode (nothing is bound;
    ``geometry`` may then be None).
    """

    def __init__(self, shared: SharedState, geometry: PoolGeometry | None, rope: RopeSpec | None, *, store: Any = None,
                 device_bytes: int = 0, host_bytes: int = 0, materialize: bool = True) -> None:
        self.shared = shared
        self.geometry = geometry
        self.rope = rope
        self.store = store
        self.materialize = materialize
        self._capacity = (int(device_bytes), int(host_bytes))
        if materialize and geometry is None:
            raise ValueError("a materializing worker needs the pool geometry")
        self._copy_rope = copy_spec(geometry.head_dim) if geometry is not None else None
        self._pool: KvCacheView | None = None
        self._known: set[tuple[str, str]] = set()
        # The last plan whose loads / captures ran: a step without new metadata may leave the previous plan bound,
        # and its blocks may belong to another request by then, so a plan is executed once.
        self._loaded_plan: StepPlan | None = None
        self._saved_plan: StepPlan | None = None

    # ------------------------------------------------------------------ registration
    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        """Bind the pool ``[num_blocks, num_layers, 2, num_kv_heads * tokens_per_block * head_dim]``.

        A pool this adapter cannot address (``_layout.pool_view`` says why) leaves the worker unusable: every
        load is then declined on the scheduler side (``worker_unavailable``) and discovery keeps working.
        """
        if not self.materialize:
            return
        try:
            view = pool_view(kv_cache_tensor, self.geometry)
        except KvLayoutError as exc:
            logger.warning("SemBlend: KV pool not supported (%s); donor KV will not be loaded", exc)
            self.shared.worker_unusable(f"kv_layout_unsupported: {exc}")
            return
        self._pool = view
        if self.store is None:
            from semblend_core.kv_tensor_store import KvTensorStore

            self.store = KvTensorStore(device_bytes=self._capacity[0], host_bytes=self._capacity[1],
                                       device=view.device)
        self.shared.bind_worker(self.store)
        logger.info("SemBlend: KV pool registered: %s, %s, %d layers", tuple(kv_cache_tensor.shape),
                    self.geometry.block_order, self.geometry.num_layers)

    def register_kv_cache_layout(self, layout: Any) -> None:
        """KV cache manager V2's region layout: not addressed by this adapter (``check_materializing`` refuses
        V2 for materializing modes); recorded so that no load is ever credited."""
        self.shared.worker_unusable("kv_cache_manager_v2_layout")

    @property
    def pool(self) -> KvCacheView:
        if self._pool is None:
            raise RuntimeError("register_kv_caches was not called (or the pool is not supported)")
        return self._pool

    # ------------------------------------------------------------------ loads
    def start_load_kv(self, plan: StepPlan | None, stream: Any = None) -> None:
        """Write every load of this step into the pool, on ``stream`` (the forward's). Raises
        :class:`KvLoadError` for a load that cannot be written (module docstring)."""
        if not plan or not plan.loads or plan is self._loaded_plan:
            return
        self._loaded_plan = plan
        with _on_stream(stream):
            for spec in plan.loads:
                t0 = time.perf_counter()
                try:
                    self._load(spec)
                except Exception as exc:
                    self.shared.report_load_failed(spec.req_id)
                    raise KvLoadError(f"SemBlend: credited load of {spec.num_tokens} tokens for request "
                                      f"{spec.req_id} failed ({type(exc).__name__}: {exc})") from exc
                finally:
                    self.shared.unpin(spec.req_id)
                self.shared.report_loaded(spec.req_id, spec.num_tokens)
                logger.debug("SemBlend: loaded %d tokens for %s in %.3f ms", spec.num_tokens, spec.req_id,
                             (time.perf_counter() - t0) * 1e3)

    def _load(self, spec: LoadSpec) -> None:
        import torch

        from semblend_core.triton_kernels import rerotate_scatter

        if spec.donor_id is None:
            raise LookupError("no donor")
        if spec.delta != 0 and self.rope is None:
            raise ValueError("RoPE re-rotation is not exact for this model")
        pool = self.pool
        pinned = self.shared.pinned(spec.req_id)  # leased by the scheduler when it credited the tokens
        with contextlib.ExitStack() as stack:
            donor = pinned if pinned is not None else stack.enter_context(
                self.store.lease(spec.namespace_key, spec.donor_id))
            if donor.num_tokens < spec.donor_start + spec.num_tokens:
                raise ValueError(f"donor holds {donor.num_tokens} tokens, load needs "
                                 f"[{spec.donor_start}, {spec.donor_start + spec.num_tokens})")
            if donor.num_layers != pool.num_layers:
                raise ValueError(f"donor has {donor.num_layers} layers, the pool has {pool.num_layers}")
            kv, src_start = donor.kv, spec.donor_start
            if kv.device != pool.device:  # served from the host tier: move just the needed tokens
                kv = kv[:, :, src_start: src_start + spec.num_tokens].to(pool.device, non_blocking=True)
                src_start = 0
            else:
                donor.wait()
            device = pool.device
            src_slots = torch.arange(src_start, src_start + spec.num_tokens, dtype=torch.int64, device=device)
            dst_slots = torch.tensor(spec.slots(), dtype=torch.int64, device=device)
            rope = self.rope if spec.delta != 0 else self._copy_rope
            rerotate_scatter(KvCacheView.from_donor_store(kv), pool, src_slots, dst_slots, int(spec.delta), rope)

    # ------------------------------------------------------------------ captures
    def wait_for_save(self, plan: StepPlan | None, stream: Any = None) -> None:
        """After the forward: copy finished prompts' KV out of the pool into the donor store."""
        if not plan or not plan.saves or plan is self._saved_plan:
            return
        self._saved_plan = plan
        with _on_stream(stream):
            for spec in plan.saves:
                self._capture(spec)
        self._report_evictions()

    def _capture(self, spec: SaveSpec) -> None:
        import torch

        from semblend_core.triton_kernels import rerotate_scatter

        try:
            pool = self.pool
            geom = pool.geometry("kv_cache_tensor")
            kv = torch.empty((pool.num_layers, 2, spec.num_tokens, geom.num_kv_heads, geom.head_dim),
                             dtype=pool.dtype, device=pool.device)
            src_slots = torch.tensor(spec.slots(), dtype=torch.int64, device=pool.device)
            dst_slots = torch.arange(spec.num_tokens, dtype=torch.int64, device=pool.device)
            rerotate_scatter(pool, KvCacheView.from_donor_store(kv), src_slots, dst_slots, 0, self._copy_rope,
                             validate_indices=False)
            tokens = np.asarray(spec.token_ids if spec.token_ids else np.zeros(spec.num_tokens), dtype=np.int64)
            self.store.put(spec.namespace_key, spec.donor_id, kv, tokens)
        except Exception as exc:  # noqa: BLE001 -- a failed capture is a future miss, never an error
            logger.warning("SemBlend: capture of %s failed (%s: %s)", spec.donor_id, type(exc).__name__, exc)
            return
        self._known.add((spec.namespace_key, spec.donor_id))
        self.shared.report_captured(spec.namespace_key, spec.donor_id, spec.num_tokens)

    def _report_evictions(self) -> None:
        resident = set(self.store.keys())
        gone = sorted(self._known - resident)
        if gone:
            self._known -= set(gone)
            self.shared.report_evicted(gone)

    def get_finished(self, finished_gen_req_ids: Any, started_loading_req_ids: Any) -> tuple[list, list]:
        """Nothing is ever asynchronous: no saving or loading request to report."""
        return [], []


class _on_stream:
    """``torch.cuda.stream(stream)`` for a CUDA stream; a no-op for None (CPU, tests)."""

    def __init__(self, stream: Any) -> None:
        self._ctx = None
        if stream is not None:
            import torch

            self._ctx = torch.cuda.stream(stream)

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
