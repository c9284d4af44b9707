"""``SemBlendConnectorV1``: semantic KV reuse for a stock ``vllm serve`` through vLLM's KV connector API (v1).

Enable it with one flag, no patch to vLLM (``docs/vllm.md`` has the details)::

    vllm serve MODEL --enable-prefix-caching --kv-transfer-config '{
      "kv_connector": "SemBlendConnectorV1",
      "kv_connector_module_path": "semblend.integration.vllm.connector_v1",
      "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
      "kv_connector_extra_config": {"mode": "discovery_only", "min_similarity": 0.6}}'

vLLM builds one instance per role. The scheduler-side instance delegates to
:class:`~semblend.integration.vllm._scheduler.SchedulerSide`, the worker-side one to
:class:`~semblend.integration.vllm._worker.WorkerSide`; this module only translates vLLM objects into SemBlend types
and back. It is the one module of the adapter that imports vLLM at run time (it must subclass vLLM's base classes);
vLLM types used only in annotations stay under ``TYPE_CHECKING``.

Targets the connector API of vLLM 0.26 - 0.33 (the abstract methods are the same; 0.33 adds
``bind_kv_cache_manager``, handled by the base class, and ``get_transfer_results``, which defaults to our
``get_finished``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from semblend.integration.vllm._config import (
    base_namespace,
    blend_decline_reason,
    blend_graph_tokens,
    parse_extra_config,
)
from semblend.integration.vllm._metadata import KvSignature, StepPlan, WorkerReport
from semblend.integration.vllm._metrics import ConnectorStats
from semblend_core import ConfigError
from semblend_core._compat import require

require("vllm", extra="vllm")

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

__all__ = ["SemBlendConnectorMetadata", "SemBlendConnectorStats", "SemBlendConnectorV1", "SemBlendWorkerMetadata"]


# ---------------------------------------------------------------------------------------------- vLLM wrappers
class SemBlendConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> workers, once per step: a :class:`~semblend.integration.vllm._metadata.StepPlan`."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class SemBlendWorkerMetadata(KVConnectorWorkerMetadata):
    """Workers -> scheduler, once per step: a :class:`~semblend.integration.vllm._metadata.WorkerReport`."""

    def __init__(self, report: WorkerReport) -> None:
        self.report = report

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, SemBlendWorkerMetadata):
            return self
        return SemBlendWorkerMetadata(self.report.merge(other.report))


class SemBlendConnectorStats(KVConnectorStats):
    """vLLM's stats container; ``data`` follows the :class:`~semblend.integration.vllm._metrics.ConnectorStats`
    schema (vLLM ships ``data`` between processes)."""

    def _window(self) -> ConnectorStats:
        return ConnectorStats(self.data)

    def reset(self) -> None:
        self.data = ConnectorStats().to_dict()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        return SemBlendConnectorStats(data=self._window().merge(ConnectorStats(other.data)).to_dict())

    def reduce(self) -> dict[str, int | float]:
        return self._window().reduce()

    def is_empty(self) -> bool:
        return self._window().is_empty()


class SemBlendPromMetrics(KVConnectorPromMetrics):
    """Prometheus series in the API server process, fed from the aggregated connector stats."""

    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._labelnames_outcome = list(labelnames) + ["outcome", "reason"]
        self._outcomes = self._counter_cls(
            name="vllm:semblend_outcomes", documentation="SemBlend per-request outcomes by reason.",
            labelnames=self._labelnames_outcome)
        self._loaded = self._counter_cls(
            name="vllm:semblend_loaded_tokens", documentation="Prompt tokens whose KV SemBlend loaded.",
            labelnames=labelnames)
        self._would = self._counter_cls(
            name="vllm:semblend_would_credit_tokens",
            documentation="discovery_only: prompt tokens prefix mode would have credited.", labelnames=labelnames)
        self._would_per_request = self._histogram_cls(
            name="vllm:semblend_would_credit_tokens_per_request",
            documentation="discovery_only: tokens prefix mode would have credited, per planned request.",
            labelnames=labelnames, buckets=[0, 16, 64, 256, 1024, 4096, 16384, 65536])
        self._blend_reused = self._counter_cls(
            name="vllm:semblend_blend_reused_tokens",
            documentation="blend: prompt tokens whose donor KV the blended prefill kept.", labelnames=labelnames)
        self._blend_recomputed = self._counter_cls(
            name="vllm:semblend_blend_recomputed_tokens",
            documentation="blend: prompt tokens the blended prefill computed fresh (mean per layer).",
            labelnames=labelnames)
        self._blend_fraction = self._histogram_cls(
            name="vllm:semblend_blend_recomputed_fraction",
            documentation="blend: recomputed / (reused + recomputed) tokens, per hit.", labelnames=labelnames,
            buckets=[0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0])
        buckets = [1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25]
        self._plan = self._histogram_cls(
            name="vllm:semblend_plan_seconds", documentation="SemBlend planning time per request.",
            labelnames=labelnames, buckets=buckets)
        self._load = self._histogram_cls(
            name="vllm:semblend_load_seconds", documentation="SemBlend donor KV load time per request.",
            labelnames=labelnames, buckets=buckets)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = [str(v) for v in self.per_engine_labelvalues.get(engine_idx, [])]
        window = ConnectorStats(transfer_stats_data)
        for key, n in window.outcomes.items():
            outcome, _, reason = key.partition(":")
            self._outcomes.labels(*labels, outcome, reason).inc(n)
        if window.loaded_tokens:
            self._loaded.labels(*labels).inc(window.loaded_tokens)
        if window.would_credit_tokens:
            self._would.labels(*labels).inc(window.would_credit_tokens)
        for n in window.would_credit_samples:
            self._would_per_request.labels(*labels).observe(n)
        if window.blend_reused_tokens:
            self._blend_reused.labels(*labels).inc(window.blend_reused_tokens)
        if window.blend_recomputed_tokens:
            self._blend_recomputed.labels(*labels).inc(window.blend_recomputed_tokens)
        for reused, recomputed in window.blend_hits:
            if reused + recomputed:
                self._blend_fraction.labels(*labels).observe(recomputed / (reused + recomputed))
        for s in window.plan_s:
            self._plan.labels(*labels).observe(s)
        for s in window.load_s:
            self._load.labels(*labels).observe(s)


# ---------------------------------------------------------------------------------------------- helpers
def _single_attention_group(kv_cache_config: Any) -> Any | None:
    """The KV cache spec when the cache is one full-attention group (what prefix mode supports), else None."""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or ())
    if len(groups) != 1:
        return None
    spec = getattr(groups[0], "kv_cache_spec", None)
    if spec is None or type(spec).__name__ != "FullAttentionSpec" or getattr(spec, "sliding_window", None):
        return None
    return spec


def _rope_of(hf_config: Any) -> tuple[Any, bool, str]:
    """``(RopeSpec or None, exact, reason)``. Exact only when one spec covers every layer (no NoPE, sliding or
    chunked layers: the fused kernel applies one rotation to all layers)."""
    from semblend_core.rope_correction import rope_spec_from_config

    try:
        spec = rope_spec_from_config(hf_config)
    except (ValueError, TypeError) as exc:
        return None, False, f"rope config unreadable: {exc}"
    if not spec.can_rerotate:
        return None, False, spec.reason or "rope not shift-invariant"
    if spec.nope_layers or spec.sliding_window_layers or spec.chunked_attention_layers:
        return None, False, "per-layer rope differs (NoPE, sliding or chunked layers)"
    return spec, True, ""


def read_kv_layout(vllm_config: Any, kv_cache_config: Any, kv_caches: dict[str, Any]) -> Any:
    """The attention backend's K/V layout (``_layout.BlockLayout``), read by running the backend's own cache-write
    op (``impl.do_kv_cache_update``) of the first attention layer on a scratch copy. Raises ``LayoutProbeError``
    (or whatever the backend raised) when it cannot be read."""
    from semblend.integration.vllm._layout import LayoutProbeError, block_axis_of, probe_block_layout
    from semblend.integration.vllm._worker import layer_index

    names = sorted(kv_caches, key=layer_index)
    context = getattr(getattr(vllm_config, "compilation_config", None), "static_forward_context", None) or {}
    layer = context.get(names[0])
    impl = getattr(layer, "impl", None)
    if impl is None or not hasattr(impl, "do_kv_cache_update"):
        raise LayoutProbeError(f"attention layer {names[0]} exposes no backend cache-write op to read the layout")
    kinds = {type(getattr(context.get(n), "impl", None)).__name__ for n in names}
    if len(kinds) != 1:
        raise LayoutProbeError(f"layers use different attention backends: {sorted(kinds)}")
    spec = _single_attention_group(kv_cache_config)
    if spec is None:
        raise LayoutProbeError("the KV cache is not one full-attention group")
    cache = kv_caches[names[0]]
    num_blocks = int(kv_cache_config.num_blocks)
    axis = block_axis_of(cache, num_blocks)
    per_block = cache.shape[axis] // num_blocks  # kernel blocks per manager block
    block_size = int(vllm_config.cache_config.block_size)
    if block_size % per_block:
        raise LayoutProbeError(f"{cache.shape[axis]} kernel blocks do not divide {num_blocks} blocks of "
                               f"{block_size} tokens")

    def write(key: Any, value: Any, scratch: Any, slot_mapping: Any) -> None:
        impl.do_kv_cache_update(layer, key, value, scratch, slot_mapping)

    return probe_block_layout(cache, write, num_kv_heads=int(spec.num_kv_heads), head_size=int(spec.head_size),
                              kernel_block_size=block_size // per_block, block_axis=axis,
                              source=f"probe:{type(impl).__name__}")


def blend_model_view(vllm_config: Any, kv_caches: dict[str, Any]) -> tuple[Any, str]:
    """``(view, "")``: the blended-prefill executor's view of the model that owns these KV caches (recorded by
    SemBlend's model plugin, ``_plugin``), or ``(None, reason)``. Never raises."""
    from semblend.integration.vllm import _plugin
    from semblend.integration.vllm._model_view import build_view
    from semblend.integration.vllm._worker import layer_index

    try:
        if not _plugin.is_registered():
            return None, "model_plugin_not_loaded: " + _plugin.NOT_REGISTERED
        names = sorted(kv_caches, key=layer_index)
        context = getattr(getattr(vllm_config, "compilation_config", None), "static_forward_context", None) or {}
        model = _plugin.model_owning(context.get(names[0]))
        if model is None:
            archs = getattr(getattr(vllm_config.model_config, "hf_config", None), "architectures", None)
            return None, (f"model_not_recorded: architecture {archs} is not one SemBlend's model plugin wraps "
                          f"({', '.join(_plugin.ARCHITECTURES)})")
        return build_view(model)
    except Exception as exc:  # noqa: BLE001 -- no view means every blend declines, never a crash
        return None, f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------- connector
class SemBlendConnectorV1(KVConnectorBase_V1):
    """vLLM KV connector for SemBlend. See the module docstring; the two sides are in ``_scheduler``/``_worker``."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        kv_transfer = vllm_config.kv_transfer_config
        self.adapter, self.core_config = parse_extra_config(getattr(kv_transfer, "kv_connector_extra_config", None))
        model_config = vllm_config.model_config
        hf_config = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
        self.rope, self.rope_exact, rope_reason = _rope_of(hf_config)
        spec = _single_attention_group(kv_cache_config)
        self.blend_unavailable = ""
        if self.adapter.materializes:
            self._check_materializing_mode(self.adapter.mode, vllm_config, kv_cache_config, spec)
            if not self.rope_exact:
                logger.warning("SemBlend: RoPE re-rotation is not exact for this model (%s); only context-exact "
                               "KV will be reused", rope_reason)
        if self.adapter.blend:
            self._check_blend_mode(hf_config)
            self.blend_unavailable = blend_decline_reason(vllm_config)
            if self.blend_unavailable:
                logger.warning("SemBlend: mode 'blend' cannot run on this deployment (%s): every hit is declined "
                               "and prefilled normally (docs/vllm.md)", self.blend_unavailable)
        self.namespace = base_namespace(vllm_config)
        self.scheduler_side = None
        self.worker_side = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_side = self._build_scheduler_side(vllm_config, kv_cache_config, spec, hf_config)
        else:
            self.worker_side = self._build_worker_side(vllm_config, spec)
        logger.info("SemBlend connector (%s) in mode %s, namespace %s", role.name, self.adapter.mode,
                    self.namespace.key[:12])

    # ------------------------------------------------------------------ start-up
    @staticmethod
    def _check_materializing_mode(mode: str, vllm_config: Any, kv_cache_config: Any, spec: Any) -> None:
        kv_transfer = vllm_config.kv_transfer_config
        policy = getattr(kv_transfer, "kv_load_failure_policy", "recompute")
        if policy != "recompute":
            raise ConfigError(f"SemBlend mode {mode!r} needs kv_load_failure_policy='recompute' (got {policy!r}): "
                              "a donor load that fails must fall back to prefill, not fail the request")
        if kv_cache_config is not None and spec is None:
            raise ConfigError(f"SemBlend mode {mode!r} supports models whose KV cache is one full-attention group; "
                              "this model has sliding-window, hybrid or several KV cache groups. No SemBlend mode "
                              "suits it: any KV connector turns off vLLM's hybrid KV cache manager; run it without "
                              "the connector (docs/vllm.md)")
        if getattr(vllm_config.model_config, "is_encoder_decoder", False):
            raise ConfigError(f"SemBlend mode {mode!r} does not support encoder-decoder models")

    def _check_blend_mode(self, hf_config: Any) -> None:
        """Blend settings that depend on the model: the check layer must exist."""
        num_layers = int(getattr(hf_config, "num_hidden_layers", 0) or 0)
        layer = self.adapter.check_layer
        if layer is not None and num_layers and layer >= num_layers:
            raise ConfigError(f"kv_connector_extra_config.check_layers={list(self.adapter.check_layers)} is not "
                              f"allowed for this model: allowed: one layer in [0, {num_layers - 1}] or []")

    def _build_scheduler_side(self, vllm_config: Any, kv_cache_config: Any, spec: Any, hf_config: Any) -> Any:
        from semblend.integration.vllm._scheduler import SchedulerSide
        from semblend_core import SemBlendPipeline
        from semblend_core.bathtub import ModelShape

        num_layers = int(getattr(hf_config, "num_hidden_layers", 0) or 0)
        shape = ModelShape(num_layers=num_layers, model_type=str(getattr(hf_config, "model_type", "") or "")) \
            if num_layers > 0 else None
        pipeline = SemBlendPipeline(self.core_config, model_shape=shape)
        signature = None
        if spec is not None:
            signature = KvSignature(str(spec.dtype).removeprefix("torch."), int(spec.num_kv_heads),
                                    int(spec.head_size))
        parallel = vllm_config.parallel_config
        workers = int(getattr(parallel, "tensor_parallel_size", 1)) * int(getattr(parallel, "pipeline_parallel_size",
                                                                                 1))
        side = SchedulerSide(pipeline, self.adapter, self.namespace, block_size=int(vllm_config.cache_config.block_size),
                             rope_exact=self.rope_exact, kv_signature=signature, num_workers=workers,
                             blend_unavailable=self.blend_unavailable)
        hash_block_size = getattr(kv_cache_config, "hash_block_size", None)
        self._hash_block_size = int(hash_block_size) if hash_block_size else None
        return side

    def _build_worker_side(self, vllm_config: Any, spec: Any) -> Any:
        from semblend.integration.vllm import _plugin
        from semblend.integration.vllm._worker import WorkerSide

        if self.adapter.blend and not _plugin.is_registered():
            raise ConfigError(_plugin.NOT_REGISTERED)  # the worker could never reach the model: say so at start-up

        head_size = int(spec.head_size) if spec is not None else int(vllm_config.model_config.get_head_size())
        return WorkerSide(None, self.rope if self.rope_exact else None, head_size=head_size,
                          device_bytes=self.adapter.donor_kv_gpu_bytes, host_bytes=self.adapter.donor_kv_host_bytes)

    @property
    def requires_kv_delivery(self) -> bool:
        """Best effort: a dropped capture is a future miss, never a correctness problem."""
        return False

    # ============================================================== scheduler side
    def bind_gpu_block_pool(self, gpu_block_pool: Any) -> None:
        if self.scheduler_side is not None:
            self.scheduler_side.bind_block_pool(gpu_block_pool, self._hash_block_size)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        block_ids = blocks.get_block_ids()[0] if blocks is not None else []
        self.scheduler_side.update_state_after_alloc(request, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return SemBlendConnectorMetadata(self.scheduler_side.build_connector_meta(scheduler_output))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        report = meta.report if isinstance(meta, SemBlendWorkerMetadata) else None
        invalid = getattr(connector_output, "invalid_block_ids", None) or ()
        self.scheduler_side.update_connector_output(report, invalid)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.scheduler_side.request_finished(request)
        return False, None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        side = self.scheduler_side if self.scheduler_side is not None else None
        window = side.stats.take() if side is not None else self._worker_stats_take()
        return SemBlendConnectorStats(data=window) if window else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return SemBlendConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: Any, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVConnectorPromMetrics | None:
        return SemBlendPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def semblend_stats(self) -> dict[str, Any]:
        """The pipeline's telemetry (scheduler side): outcomes, reasons, store size."""
        return self.scheduler_side.pipeline.stats() if self.scheduler_side is not None else {}

    # ============================================================== worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout, error = None, ""
        if self.adapter.materializes:
            try:
                layout = read_kv_layout(self._vllm_config, self._kv_cache_config, kv_caches)
            except Exception as exc:  # noqa: BLE001 -- an unreadable layout means no loads, never a crash
                error = f"{type(exc).__name__}: {exc}"
        else:
            error = "discovery_only mode loads nothing"
        self.worker_side.register_kv_caches(kv_caches, layout, error)
        if self.adapter.blend:
            view, reason = blend_model_view(self._vllm_config, kv_caches)
            self.worker_side.set_blend_view(view, reason,
                                            graph_tokens=blend_graph_tokens(self._vllm_config, self.adapter))

    def _plan(self) -> StepPlan | None:
        meta = self._connector_metadata
        return meta.plan if isinstance(meta, SemBlendConnectorMetadata) else None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker_side.start_load(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are queued on the forward's stream before it starts (see _worker)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # captures read the finished cache in wait_for_save

    def wait_for_save(self) -> None:
        self.worker_side.wait_for_save(self._plan())

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.take_load_errors() if self.worker_side is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        report = self.worker_side.take_report() if self.worker_side is not None else None
        return SemBlendWorkerMetadata(report) if report is not None else None

    def _worker_stats_take(self) -> dict[str, Any] | None:
        return None  # worker timings travel in the worker report and are recorded by the scheduler side

    def shutdown(self) -> None:
        if self.worker_side is not None:
            self.worker_side.shutdown()

