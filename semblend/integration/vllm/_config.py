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
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from semblend_core import CacheNamespace, ConfigError, SemBlendConfig

MODE_DISCOVERY_ONLY = "discovery_only"
MODE_PREFIX = "prefix"
MODE_BLEND = "blend"
MODES = (MODE_DISCOVERY_ONLY, MODE_PREFIX, MODE_BLEND)
# Modes that write donor KV into a request's blocks (everything but discovery).
MATERIALIZING_MODES = (MODE_PREFIX, MODE_BLEND)
# Adapter keys that only mean something in blend mode (elsewhere nothing is recomputed: they fail at start-up).
BLEND_KEYS = ("recompute_ratio", "check_layers", "selection", "cuda_graphs")
# The transformers engine's default check layer (``EngineOptions.check_layer``; a test keeps them equal).
DEFAULT_CHECK_LAYER = 1

_GIB = 1 << 30


@dataclass(frozen=True)
class VllmAdapterConfig:
    """Connector settings that are not SemBlend planning knobs.

    * ``mode``: ``discovery_only`` (plan and record, never alter scheduling), ``prefix`` (load the reusable
      prefix of a hit into the request's own blocks) or ``blend`` (fill the prompt up to the end of the hit's
      reusable region with the shared blended-prefill executor: donor KV re-rotated, uncovered, seam and selected
      tokens recomputed with the model's own weights).
    * ``donor_kv_gpu_bytes`` / ``donor_kv_host_bytes``: capacity of the worker's donor KV store per tier (bytes;
      the host tier is pinned memory). Least recently used donors are evicted first.
    * ``min_donor_tokens``: shortest prompt worth capturing as a donor.
    * ``load_moved_prefix``: also load a prefix whose first block is *not* context-exact (its KV sat elsewhere in
      the donor). Off by default: such KV puts mid-document keys where the model expects its attention-sink
      tokens, and on real weights answers diverge (SmolLM2 in vLLM on the H200: teacher-forced top-1 0.60 vs
      cold, ``benchmarks/results/vllm_quality_h200.json``). With it off, a moved prefix loads only when the first
      block is exact, from the donor or from vLLM's own prefix cache.

    Blend mode only (named like the seed vLLM Blend plugin's ``--blend-recompute-ratios`` /
    ``--blend-check-layers``; giving them in another mode is an error, since nothing is recomputed there):

    * ``recompute_ratio``: fraction of the reused tokens the executor recomputes on top of the mandatory ones, in
      ``[0, 1]``; it is the core's ``recompute_budget`` (set one of the two, or both equal). ``None``: the core's.
    * ``check_layers``: the layer whose fresh-vs-reused K/V deviation picks those tokens: an integer ``>= 0``, a
      list of exactly one, or an empty list (no deviation check: only the plan's mandatory positions and any
      ``selection``). The executor checks at one layer, so a longer list fails. Default
      :data:`DEFAULT_CHECK_LAYER` (the transformers engine's). Normalised to a tuple of at most one int.
    * ``selection``: a ``semblend_core.recompute.SelectionStrategy`` name (``SELECTIONS``) that picks the budgeted
      tokens instead of the deviation check; ``None`` keeps the check.
    * ``cuda_graphs``: replay the executor's layer loop from CUDA graphs (``semblend_core.layer_graphs``) for hits
      whose fresh tokens are the same at every layer (ratio 0, or no budgeted token); ``None`` follows vLLM: on
      unless ``enforce_eager``. Costs one KV scratch of ``max_model_len`` tokens on the GPU, held.
    """

    mode: str = MODE_DISCOVERY_ONLY
    donor_kv_gpu_bytes: int = 2 * _GIB
    donor_kv_host_bytes: int = 0
    min_donor_tokens: int = 64
    load_moved_prefix: bool = False
    recompute_ratio: float | None = None
    check_layers: Any = DEFAULT_CHECK_LAYER
    selection: str | None = None
    cuda_graphs: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"kv_connector_extra_config.mode={self.mode!r} is not allowed; allowed: "
                              + ", ".join(MODES))
        ratio = self.recompute_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 0.0 <= ratio <= 1.0 or math.isnan(ratio)):
            raise ConfigError(f"kv_connector_extra_config.recompute_ratio={ratio!r} is not allowed; allowed: a "
                              "number in [0, 1]")
        object.__setattr__(self, "check_layers", _check_layers(self.check_layers))
        if self.selection is not None:
            from semblend_core.recompute import SELECTIONS

            if self.selection not in SELECTIONS:
                raise ConfigError(f"kv_connector_extra_config.selection={self.selection!r} is not allowed; "
                                  f"allowed: {', '.join(SELECTIONS)} (or null)")
        if not isinstance(self.load_moved_prefix, bool):
            raise ConfigError(f"kv_connector_extra_config.load_moved_prefix={self.load_moved_prefix!r} is not "
                              "allowed; allowed: true, false")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ConfigError(f"kv_connector_extra_config.cuda_graphs={self.cuda_graphs!r} is not allowed; "
                              "allowed: true, false, null (follow vLLM's enforce_eager)")
        for name in ("donor_kv_gpu_bytes", "donor_kv_host_bytes", "min_donor_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"kv_connector_extra_config.{name}={value!r} is not allowed; "
                                  "allowed: a non-negative integer")

    @property
    def materializes(self) -> bool:
        return self.mode in MATERIALIZING_MODES

    @property
    def blend(self) -> bool:
        return self.mode == MODE_BLEND

    @property
    def check_layer(self) -> int | None:
        """The one check layer of the executor (``None``: no deviation check)."""
        return self.check_layers[0] if self.check_layers else None


def _check_layers(value: Any) -> tuple[int, ...]:
    allowed = "an integer >= 0, a list of exactly one such integer, or [] (no deviation check)"
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ConfigError(f"kv_connector_extra_config.check_layers={value!r} is not allowed; allowed: {allowed}")
    if len(items) > 1:
        raise ConfigError(f"kv_connector_extra_config.check_layers={value!r} is not allowed: SemBlend's blended "
                          f"prefill checks deviation at one layer (CacheBlend's multi-layer schedule is not "
                          f"implemented); allowed: {allowed}")
    return tuple(items)


ADAPTER_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(VllmAdapterConfig))


def _parse_adapter_value(name: str, value: Any) -> Any:
    """JSON gives proper types; env-style strings ("1", "true") are accepted too."""
    if not isinstance(value, str) or name in ("mode", "selection"):
        return value
    text = value.strip().lower()
    if name in ("load_moved_prefix", "cuda_graphs"):
        return {"true": True, "1": True, "false": False, "0": False}.get(text, value)
    if name == "recompute_ratio":
        try:
            return float(text)
        except ValueError:
            return value
    if name == "check_layers":  # "1", "1,2" or "0 16 32" (the seed plugin's flag style)
        parts = text.replace(",", " ").split()
        try:
            return [int(p) for p in parts]
        except ValueError:
            return value
    try:
        return int(text)
    except ValueError:
        return value


def parse_extra_config(extra: Mapping[str, Any] | None, *, environ: Mapping[str, str] | None = None,
                       modes: tuple[str, ...] = MODES) -> tuple[VllmAdapterConfig, SemBlendConfig]:
    """Split ``kv_connector_extra_config`` into adapter settings and a validated ``SemBlendConfig``.

    Raises :class:`~semblend_core.ConfigError` (a ``ValueError``) for an unknown key or a bad value, naming the
    allowed keys. ``discovery_only`` follows ``mode``; giving both in contradiction is an error. In blend mode
    ``recompute_ratio`` sets the core's ``recompute_budget`` (both given and different: an error); the blend keys
    (:data:`BLEND_KEYS`) in another mode are an error. ``modes``: the modes this engine offers (the TensorRT-LLM
    adapter shares these keys but has no ``blend``).
    """
    extra = dict(extra or {})
    adapter_values = {k: _parse_adapter_value(k, extra.pop(k)) for k in list(extra) if k in ADAPTER_KEYS}
    try:
        adapter = VllmAdapterConfig(**adapter_values)
        core = SemBlendConfig.from_dict(extra, base=SemBlendConfig.from_env(environ))
    except ConfigError as exc:
        raise ConfigError(f"{exc} (kv_connector_extra_config also accepts the adapter keys: "
                          f"{', '.join(ADAPTER_KEYS)})") from None
    if adapter.mode not in modes:
        raise ConfigError(f"kv_connector_extra_config.mode={adapter.mode!r} is not allowed; allowed: "
                          + ", ".join(modes))
    want_discovery = adapter.mode == MODE_DISCOVERY_ONLY
    if "discovery_only" in extra and core.discovery_only != want_discovery:
        raise ConfigError(f"kv_connector_extra_config has discovery_only={core.discovery_only} but "
                          f"mode={adapter.mode!r}; set only mode (allowed: {', '.join(MODES)})")
    core = dataclasses.replace(core, discovery_only=want_discovery)
    misplaced = [k for k in BLEND_KEYS if k in adapter_values]
    if misplaced and MODE_BLEND not in modes:
        raise ConfigError(f"{misplaced[0]} is not allowed: this engine has no blend mode; allowed modes: "
                          + ", ".join(modes))
    if misplaced and not adapter.blend:
        raise ConfigError(f"kv_connector_extra_config.{misplaced[0]} applies only to mode 'blend' (mode is "
                          f"{adapter.mode!r}; nothing is recomputed there): remove it or set mode='blend'")
    if adapter.recompute_ratio is not None:
        if "recompute_budget" in extra and not math.isclose(core.recompute_budget, adapter.recompute_ratio):
            raise ConfigError(f"kv_connector_extra_config has recompute_ratio={adapter.recompute_ratio} and "
                              f"recompute_budget={core.recompute_budget}: they are the same setting; give one")
        core = dataclasses.replace(core, recompute_budget=float(adapter.recompute_ratio))
    if adapter.blend and "load_moved_prefix" in adapter_values:
        raise ConfigError("kv_connector_extra_config.load_moved_prefix applies only to mode 'prefix': blend mode "
                          "recomputes the first tokens whenever they are not context-exact; remove it")
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


# ---------------------------------------------------------------------------------------------- blend capability
BLEND_TENSOR_PARALLEL = "blend_tensor_parallel"
BLEND_PIPELINE_PARALLEL = "blend_pipeline_parallel"


def blend_decline_reason(vllm_config: Any) -> str:
    """Why this deployment cannot run blend mode at all (``""``: it can), judged from vLLM's config alone. Pure.

    * the model: ``semblend_core.model_support.check_model_config`` on vLLM's ``hf_config`` (its stable reason,
      e.g. ``unsupported_model_type:gemma2``); the worker's check of the loaded modules is separate;
    * ``blend_tensor_parallel`` / ``blend_pipeline_parallel``: the executor runs the whole layer stack of an
      unsharded model in one process (``docs/vllm.md`` gives the sharded math it would need).

    The scheduler declines every hit with this reason before crediting anything (a normal prefill).
    """
    from semblend_core.model_support import check_model_config

    model = _attr(vllm_config, "model_config")
    hf_config = _attr(model, "hf_config")
    if hf_config is None:
        return "unsupported_model_type:unknown"
    support = check_model_config(hf_config)
    if not support.supported:
        return support.reason
    parallel = _attr(vllm_config, "parallel_config")
    if int(_attr(parallel, "tensor_parallel_size", default=1)) > 1:
        return BLEND_TENSOR_PARALLEL
    if int(_attr(parallel, "pipeline_parallel_size", default=1)) > 1:
        return BLEND_PIPELINE_PARALLEL
    return ""


def blend_graph_tokens(vllm_config: Any, adapter: VllmAdapterConfig) -> int:
    """Tokens the blend executor's CUDA-graph scratch holds (``max_model_len``), or 0 for no graphs: not blend
    mode, ``cuda_graphs: false``, or unset with vLLM's ``enforce_eager``. Pure."""
    if not adapter.blend or adapter.cuda_graphs is False:
        return 0
    model = _attr(vllm_config, "model_config")
    if adapter.cuda_graphs is None and bool(_attr(model, "enforce_eager", default=False)):
        return 0
    return max(0, int(_attr(model, "max_model_len", default=0) or 0))
