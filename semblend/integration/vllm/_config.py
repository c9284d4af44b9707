"""Translate vLLM configuration into SemBlend types: adapter settings, ``SemBlendConfig``, ``CacheNamespace``.

Nothing here imports vLLM: every engine object is read by attribute (duck typing), so the translation is testable
without an engine and works across the vLLM releases whose config objects differ in detail.

``kv_connector_extra_config`` holds two kinds of keys:

* adapter keys (:data:`ADAPTER_KEYS`): how the connector behaves inside vLLM (``mode``, donor KV capacity...);
* every other key is a :class:`~semblend_core.SemBlendConfig` field, parsed by ``SemBlendConfig.from_dict`` on top
  of ``SEMBLEND_*`` environment variables. An unknown key fails at start-up with a message naming both lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from semblend_core import CacheNamespace, ConfigError, SemBlendConfig

MODE_DISCOVERY_ONLY = "discovery_only"
MODE_PREFIX = "prefix"
MODES = (MODE_DISCOVERY_ONLY, MODE_PREFIX)
# Modes that write donor KV into a request's blocks (everything but discovery).
MATERIALIZING_MODES = (MODE_PREFIX,)

_GIB = 1 << 30


@dataclass(frozen=True)
class VllmAdapterConfig:
    """Connector settings that are not SemBlend planning knobs.

    * ``mode``: ``discovery_only`` (plan and record, never alter scheduling) or ``prefix`` (load the reusable
      prefix of a hit into the request's own blocks).
    * ``donor_kv_gpu_bytes`` / ``donor_kv_host_bytes``: capacity of the worker's donor KV store per tier (bytes;
      the host tier is pinned memory). Least recently used donors are evicted first.
    * ``min_donor_tokens``: shortest prompt worth capturing as a donor.
    * ``load_moved_prefix``: also load a prefix whose first block is *not* context-exact (its KV sat elsewhere in
      the donor). Off by default: such KV puts mid-document keys where the model expects its attention-sink
      tokens, and on real weights answers diverge (SmolLM2 in vLLM on the H200: teacher-forced top-1 0.60 vs
      cold, ``benchmarks/results/vllm_quality_h200.json``). With it off, a moved prefix loads only when the first
      block is exact, from the donor or from vLLM's own prefix cache.
    """

    mode: str = MODE_DISCOVERY_ONLY
    donor_kv_gpu_bytes: int = 2 * _GIB
    donor_kv_host_bytes: int = 0
    min_donor_tokens: int = 64
    load_moved_prefix: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"kv_connector_extra_config.mode={self.mode!r} is not allowed; allowed: "
                              + ", ".join(MODES))
        if not isinstance(self.load_moved_prefix, bool):
            raise ConfigError(f"kv_connector_extra_config.load_moved_prefix={self.load_moved_prefix!r} is not "
                              "allowed; allowed: true, false")
        for name in ("donor_kv_gpu_bytes", "donor_kv_host_bytes", "min_donor_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"kv_connector_extra_config.{name}={value!r} is not allowed; "
                                  "allowed: a non-negative integer")

    @property
    def materializes(self) -> bool:
        return self.mode in MATERIALIZING_MODES


ADAPTER_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(VllmAdapterConfig))


def _parse_adapter_value(name: str, value: Any) -> Any:
    """JSON gives proper types; env-style strings ("1", "true") are accepted too."""
    if not isinstance(value, str) or name == "mode":
        return value
    text = value.strip().lower()
    if name == "load_moved_prefix":
        return {"true": True, "1": True, "false": False, "0": False}.get(text, value)
    try:
        return int(text)
    except ValueError:
        return value


def parse_extra_config(extra: Mapping[str, Any] | None, *, environ: Mapping[str, str] | None = None
                       ) -> tuple[VllmAdapterConfig, SemBlendConfig]:
    """Split ``kv_connector_extra_config`` into adapter settings and a validated ``SemBlendConfig``.

    Raises :class:`~semblend_core.ConfigError` (a ``ValueError``) for an unknown key or a bad value, naming the
    allowed keys. ``discovery_only`` follows ``mode``; giving both in contradiction is an error.
    """
    extra = dict(extra or {})
    adapter_values = {k: _parse_adapter_value(k, extra.pop(k)) for k in list(extra) if k in ADAPTER_KEYS}
    try:
        adapter = VllmAdapterConfig(**adapter_values)
        core = SemBlendConfig.from_dict(extra, base=SemBlendConfig.from_env(environ))
    except ConfigError as exc:
        raise ConfigError(f"{exc} (kv_connector_extra_config also accepts the adapter keys: "
                          f"{', '.join(ADAPTER_KEYS)})") from None
    want_discovery = adapter.mode == MODE_DISCOVERY_ONLY
    if "discovery_only" in extra and core.discovery_only != want_discovery:
        raise ConfigError(f"kv_connector_extra_config has discovery_only={core.discovery_only} but "
                          f"mode={adapter.mode!r}; set only mode (allowed: {', '.join(MODES)})")
    core = dataclasses.replace(core, discovery_only=want_discovery)
    return adapter, core


# ---------------------------------------------------------------------------------------------- namespace
def _attr(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if obj is None:
            return default
        obj = getattr(obj, name, None)
    return default if obj is None else obj


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else ""


_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "rotary_dim",
              "max_position_embeddings", "head_dim", "rotary_emb_base", "original_max_position_embeddings")


def rope_config_of(hf_config: Any) -> dict[str, Any]:
    """The RoPE-relevant part of a transformers config (object or dict), for the namespace."""
    text_config = _attr(hf_config, "text_config")
    cfg = text_config if text_config is not None and _attr(hf_config, "num_attention_heads") is None else hf_config
    out: dict[str, Any] = {"model_type": str(_attr(cfg, "model_type", default=""))}
    for key in _ROPE_KEYS:
        value = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
        if value is not None:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def kv_layout_name(vllm_config: Any) -> str:
    """The KV cache layout vLLM resolved (``kv_cache_layout`` on 0.33's cache config, ``VLLM_KV_CACHE_LAYOUT``
    otherwise); empty when unknown."""
    layout = _attr(vllm_config, "cache_config", "kv_cache_layout")
    if layout is None:
        import os

        layout = os.environ.get("VLLM_KV_CACHE_LAYOUT", "")
    return str(getattr(layout, "name", layout) or "")


def base_namespace(vllm_config: Any, *, tenant: str = "") -> CacheNamespace:
    """Everything that must match for two requests' KV to be interchangeable, read from a ``VllmConfig``.

    Per-request parts (LoRA adapter, cache salt) are added by :func:`request_namespace`.
    """
    model = _attr(vllm_config, "model_config")
    cache = _attr(vllm_config, "cache_config")
    parallel = _attr(vllm_config, "parallel_config")
    cache_dtype = str(_attr(cache, "cache_dtype", default="auto"))
    model_dtype = _dtype_name(_attr(model, "dtype"))
    tokenizer = str(_attr(model, "tokenizer", default=""))
    tok_rev = str(_attr(model, "tokenizer_revision", default=""))
    return CacheNamespace(
        model=str(_attr(model, "model", default="default")),
        revision=str(_attr(model, "revision", default="")),
        tokenizer=f"{tokenizer}@{tok_rev}" if tok_rev else tokenizer,
        # The KV bytes depend on both: an fp8 cache of a bf16 model is not an fp8 cache of an fp16 model.
        kv_dtype=f"{cache_dtype}/{model_dtype}",
        quantization=str(_attr(model, "quantization", default="")),
        rope=CacheNamespace.rope_key(rope_config_of(_attr(model, "hf_config"))),
        tensor_parallel=int(_attr(parallel, "tensor_parallel_size", default=1)),
        pipeline_parallel=int(_attr(parallel, "pipeline_parallel_size", default=1)),
        block_size=int(_attr(cache, "block_size", default=0) or 0),
        kv_layout=kv_layout_name(vllm_config),
        tenant=tenant,
    )


def lora_key(lora_request: Any) -> str:
    """Identity of a request's LoRA adapter: name and path (ids are assigned per server and can be reused)."""
    if lora_request is None:
        return ""
    name = _attr(lora_request, "lora_name", default="")
    path = _attr(lora_request, "lora_path", default="") or _attr(lora_request, "path", default="")
    return f"{name}@{path}"


def media_key(request: Any) -> str | None:
    """Identity of a request's non-text inputs: ``""`` for a text-only prompt; a digest of every multimodal item's
    modality, content hash (vLLM's ``identifier``) and placeholder offset; ``None`` when the request carries input
    whose identity is unknown (prompt embeddings, an item without a hash): its KV must not be shared at all."""
    if getattr(request, "prompt_embeds", None) is not None:
        return None
    items = getattr(request, "mm_features", None) or ()
    if not items:
        return ""
    parts = []
    for item in items:
        ident = getattr(item, "identifier", None) or getattr(item, "mm_hash", None)
        if not ident:
            return None
        offset = getattr(getattr(item, "mm_position", None), "offset", None)
        parts.append(f"{getattr(item, 'modality', '')}:{ident}@{offset}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def request_namespace(base: CacheNamespace, request: Any) -> CacheNamespace:
    """``base`` specialised with the request's LoRA adapter, cache salt and media identity (:func:`media_key`):
    prompts with different images never share KV even where their token ids (image placeholders) are equal."""
    lora = lora_key(getattr(request, "lora_request", None))
    salt = str(getattr(request, "cache_salt", None) or "")
    media = media_key(request)
    if media:
        salt = f"{salt}|media:{media}"
    if not lora and not salt:
        return base
    return dataclasses.replace(base, lora=lora, cache_salt=salt)
