"""The radix-cache backend factory and its registration with SGLang.

SGLang calls :func:`create_tree_cache` with a ``TreeCacheBuildContext`` in the scheduler process when the server runs
with ``--radix-cache-backend semblend``. :func:`register` puts it in SGLang's registry
(``sglang.srt.mem_cache.registry.register_radix_cache_backend``); the ``sglang.srt.plugins`` entry point calls it in
every SGLang process (``load_plugins()`` runs at the start of the scheduler, engine, detokenizer and DP controller),
and ``semblend-sglang`` calls it before launching.

The factory reads configuration (``_config``), refuses what it cannot serve safely with a named error, and builds:
the ``SemBlendPipeline`` (planning), the namespace (model, revision, tokenizer, dtypes, quantization, RoPE, TP/PP,
page size; per request LoRA, ``extra_key``, cache salt), the model's RoPE spec (re-rotation), the host tier and the
outcome counters (prometheus_client, when SGLang runs with ``--enable-metrics``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from semblend.integration.sglang._config import BACKEND_NAME, base_namespace, parse_config, text_config_of
from semblend_core.errors import ConfigError

if TYPE_CHECKING:
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

    from semblend.integration.sglang._cache import SemBlendRadixCache
    from semblend_core.rope_correction import RopeSpec

logger = logging.getLogger(__name__)

_EXPORTERS: dict[int, Any] = {}


def register() -> None:
    """Register the ``semblend`` backend with SGLang's radix-cache registry. Idempotent; the plugin entry point.

    Configuration is validated by the factory (and by ``semblend-sglang`` before it launches), not here: SGLang
    logs and swallows a plugin's exception, which would turn a bad key into "backend not registered".
    """
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, create_tree_cache)


def rope_of(hf_config: Any) -> tuple[RopeSpec | None, str]:
    """``(spec, reason)``: the model's RoPE spec when one exact spec covers every layer (the fused kernel applies
    one rotation to all layers), else ``(None, reason)`` and only shift-free loads are served."""
    from semblend_core.rope_correction import rope_spec_from_config

    try:
        spec = rope_spec_from_config(text_config_of(hf_config))
    except (ValueError, TypeError) as exc:
        return None, f"rope config unreadable: {exc}"
    if not spec.can_rerotate:
        return None, spec.reason or "rope not shift-invariant"
    if spec.nope_layers or spec.sliding_window_layers or spec.chunked_attention_layers:
        return None, "per-layer rope differs (NoPE, sliding or chunked layers)"
    return spec, ""


def _refuse(ctx: TreeCacheBuildContext) -> str | None:
    """Why this server cannot use the backend at all (SGLang features built on other tree caches)."""
    if ctx.disable_radix_cache:
        return "--disable-radix-cache is set (SemBlend extends the radix cache)"
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm or ctx.is_dsa:
        return "hybrid (sliding-window / SSM / sparse) models keep more than one KV pool"
    if ctx.enable_hierarchical_cache:
        return "--enable-hierarchical-cache needs SGLang's unified radix cache"
    if getattr(ctx.params, "is_eagle", False):
        return "EAGLE speculative decoding keys the tree by bigrams"
    return None


def _exporter(pipeline: Any, server_args: Any) -> Any:
    """Outcome counters in prometheus_client's default registry (SGLang exports it, multiprocess-aware, on
    ``/metrics`` with ``--enable-metrics``). One exporter per process."""
    if not getattr(server_args, "enable_metrics", False):
        return None
    from semblend_core._compat import has_module

    if not has_module("prometheus_client"):
        logger.warning("SemBlend: prometheus_client missing; outcome counters stay in the pipeline telemetry")
        return None
    from semblend_core.telemetry import PrometheusExporter

    key = id(pipeline)
    if key not in _EXPORTERS:
        _EXPORTERS[key] = PrometheusExporter(pipeline.telemetry)
    return _EXPORTERS[key]


def create_tree_cache(ctx: TreeCacheBuildContext) -> SemBlendRadixCache:
    """SGLang's ``RadixCacheFactory`` for ``--radix-cache-backend semblend``. Raises ``ConfigError`` naming the
    problem when the configuration or the server's features rule SemBlend out."""
    from semblend.integration.sglang._cache import SemBlendRadixCache
    from semblend_core.pipeline import SemBlendPipeline

    adapter, core = parse_config()
    reason = _refuse(ctx)
    if reason is not None:
        raise ConfigError(f"--radix-cache-backend {BACKEND_NAME}: {reason}; drop the flag or the feature")
    model_config = ctx.model_config
    allocator = ctx.params.token_to_kv_pool_allocator
    kvcache = allocator.get_kvcache() if allocator is not None else None
    namespace = base_namespace(ctx.server_args, model_config, kv_dtype=getattr(kvcache, "dtype", None),
                               tp_size=ctx.tp_size, page_size=ctx.params.page_size)
    rope, rope_reason = rope_of(getattr(model_config, "hf_config", None))
    if rope is None and adapter.materializes:
        logger.warning("SemBlend: RoPE re-rotation is not exact for this model (%s); only shift-free prefixes "
                       "will be loaded", rope_reason)
    host_store = None
    if adapter.materializes and adapter.host_tier_bytes > 0:
        from semblend_core.kv_tensor_store import KvTensorStore

        host_store = KvTensorStore(device_bytes=0, host_bytes=adapter.host_tier_bytes)
    pipeline = SemBlendPipeline(core)
    _exporter(pipeline, ctx.server_args)
    cache = SemBlendRadixCache(ctx.params, pipeline=pipeline, adapter=adapter, namespace=namespace, rope=rope,
                               host_store=host_store)
    logger.info("SemBlend radix cache: mode %s, namespace %s, rope %s, host tier %d bytes", adapter.mode,
                namespace.key[:12], "exact" if rope is not None else f"shift-free only ({rope_reason})",
                adapter.host_tier_bytes if host_store is not None else 0)
    return cache
