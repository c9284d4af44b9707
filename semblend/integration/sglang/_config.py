"""Translate SGLang configuration into SemBlend types: adapter settings, ``SemBlendConfig``, ``CacheNamespace``.

Nothing here imports SGLang: engine objects (``ServerArgs``, ``ModelConfig``, ``Req``) are read by attribute, so the
translation is testable without an engine.

Configuration reaches the scheduler process (where SGLang builds the tree cache) through its environment:

* ``SEMBLEND_<FIELD>`` variables set :class:`~semblend_core.SemBlendConfig` fields (``SEMBLEND_MIN_SIMILARITY=0.7``);
* ``SEMBLEND_SGLANG_CONFIG`` holds one JSON object (or ``@/path/to/file.json``) with adapter keys
  (:data:`ADAPTER_KEYS`) and ``SemBlendConfig`` fields; it overrides the variables. ``semblend-sglang
  --semblend-config JSON`` sets it.

An unknown key or a bad value raises :class:`~semblend_core.ConfigError` (a ``ValueError``) naming what is allowed;
the launcher and the backend factory both parse at start-up, so a typo stops the server before it serves.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from semblend_core import CacheNamespace, ConfigError, SemBlendConfig

CONFIG_ENV = "SEMBLEND_SGLANG_CONFIG"
BACKEND_NAME = "semblend"

MODE_DISCOVERY_ONLY = "discovery_only"
MODE_PREFIX = "prefix"
MODES = (MODE_DISCOVERY_ONLY, MODE_PREFIX)

_GIB = 1 << 30


@dataclass(frozen=True)
class SglangAdapterConfig:
    """Backend settings that are not SemBlend planning knobs.

    * ``mode``: ``prefix`` (serve the reusable prefix of a hit from donor KV) or ``discovery_only`` (plan and
      record, never change what SGLang computes).
    * ``host_tier_bytes``: capacity of the host copy of donor KV (``semblend_core.kv_tensor_store``), used when the
      donor's radix-tree nodes were evicted; 0 disables it (donors are then served only from SGLang's own pool).
    * ``register_donors``: make finished prompts donors.
    * ``min_donor_tokens``: shortest prompt worth registering.
    * ``load_moved_prefix``: also serve a prefix whose first tokens are not context-exact (the donor had a
      preamble). Off by default, as in the vLLM connector: such KV sits where the model keeps its attention sinks
      and answers diverge on real weights (``semblend_core.plan.SINK_TOKENS``).
    * ``kv_probe_dir``: verification aid, off by default. When set, the backend writes layer 0's K/V of every load
      it serves (``load-<rid>.pt``: the slots after the copy, i.e. what the forward reads) and of every donor it
      registers (``donor-<rid>.pt``) to this folder, so a test can compare served KV with SGLang's own fresh
      computation. Read-only: it never changes KV or scheduling.
    """

    mode: str = MODE_PREFIX
    host_tier_bytes: int = 1 * _GIB
    register_donors: bool = True
    min_donor_tokens: int = 64
    load_moved_prefix: bool = False
    kv_probe_dir: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"{CONFIG_ENV}.mode={self.mode!r} is not allowed; allowed: {', '.join(MODES)}")
        for name in ("host_tier_bytes", "min_donor_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{CONFIG_ENV}.{name}={value!r} is not allowed; allowed: a non-negative integer")
        if not isinstance(self.kv_probe_dir, str):
            raise ConfigError(f"{CONFIG_ENV}.kv_probe_dir={self.kv_probe_dir!r} is not allowed; allowed: a folder path")
        if not isinstance(self.load_moved_prefix, bool):
            raise ConfigError(f"{CONFIG_ENV}.load_moved_prefix={self.load_moved_prefix!r} is not allowed; "
                              "allowed: true or false")
        if not isinstance(self.register_donors, bool):
            raise ConfigError(f"{CONFIG_ENV}.register_donors={self.register_donors!r} is not allowed; "
                              "allowed: true or false")

    @property
    def materializes(self) -> bool:
        return self.mode == MODE_PREFIX


ADAPTER_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SglangAdapterConfig))


def _parse_adapter_value(name: str, value: Any) -> Any:
    """JSON gives proper types; env-style strings ("1", "true") are accepted too."""
    if not isinstance(value, str) or name in ("mode", "kv_probe_dir"):
        return value
    text = value.strip().lower()
    if name in ("register_donors", "load_moved_prefix"):
        return {"1": True, "true": True, "yes": True, "on": True,
                "0": False, "false": False, "no": False, "off": False}.get(text, value)
    try:
        return int(text)
    except ValueError:
        return value


def load_json_option(text: str | None) -> dict[str, Any]:
    """The JSON option: an object literal, or ``@path`` to a file holding one. Empty -> ``{}``."""
    if text is None or not text.strip():
        return {}
    text = text.strip()
    source = "JSON"
    if text.startswith("@"):
        path = text[1:]
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"{CONFIG_ENV}: cannot read {path!r}: {exc}") from None
        source = path
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{CONFIG_ENV}: {source} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{CONFIG_ENV}: expected a JSON object, got {type(value).__name__}")
    return value


def parse_config(option: Mapping[str, Any] | str | None = None, *, environ: Mapping[str, str] | None = None
                 ) -> tuple[SglangAdapterConfig, SemBlendConfig]:
    """Adapter settings and a validated ``SemBlendConfig`` from ``SEMBLEND_*`` variables and the JSON option.

    ``option`` defaults to the ``SEMBLEND_SGLANG_CONFIG`` variable of ``environ`` (default ``os.environ``). Raises
    :class:`~semblend_core.ConfigError` for an unknown key or a bad value, naming the allowed keys.
    ``discovery_only`` follows ``mode``; giving both in contradiction is an error.
    """
    env = dict(os.environ if environ is None else environ)
    raw = env.pop(CONFIG_ENV, None)
    values = dict(load_json_option(raw) if option is None else
                  (load_json_option(option) if isinstance(option, str) else option))
    adapter_values = {k: _parse_adapter_value(k, values.pop(k)) for k in list(values) if k in ADAPTER_KEYS}
    adapter = SglangAdapterConfig(**adapter_values)
    try:
        core = SemBlendConfig.from_dict(values, base=SemBlendConfig.from_env(env))
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({CONFIG_ENV} also accepts the adapter keys: {', '.join(ADAPTER_KEYS)})") from None
    want_discovery = adapter.mode == MODE_DISCOVERY_ONLY
    if "discovery_only" in values and core.discovery_only != want_discovery:
        raise ConfigError(f"{CONFIG_ENV} has discovery_only={core.discovery_only} but mode={adapter.mode!r}; "
                          f"set only mode (allowed: {', '.join(MODES)})")
    return adapter, dataclasses.replace(core, discovery_only=want_discovery)


# ---------------------------------------------------------------------------------------------- namespace
def _attr(obj: Any, name: str, default: Any = None) -> Any:
    value = getattr(obj, name, None) if obj is not None else None
    return default if value is None else value


_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "rotary_dim",
              "max_position_embeddings", "head_dim", "rotary_emb_base", "original_max_position_embeddings")


def text_config_of(hf_config: Any) -> Any:
    """The config that describes the KV cache (a multimodal wrapper's ``text_config``)."""
    text = _attr(hf_config, "text_config")
    return text if text is not None and _attr(hf_config, "num_attention_heads") is None else hf_config


def rope_config_of(hf_config: Any) -> dict[str, Any]:
    """The RoPE-relevant part of a transformers config (object or dict), for the namespace."""
    cfg = text_config_of(hf_config)
    out: dict[str, Any] = {"model_type": str(_attr(cfg, "model_type", ""))}
    for key in _ROPE_KEYS:
        value = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
        if value is not None:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else ""


def base_namespace(server_args: Any, model_config: Any, *, kv_dtype: Any = None, tp_size: int = 1,
                   page_size: int = 1) -> CacheNamespace:
    """Everything that must match for two requests' KV to be interchangeable, from SGLang's ``ServerArgs`` and
    ``ModelConfig``. ``kv_dtype`` is the pool's actual dtype (``kv_cache_dtype`` ``auto`` resolves to the model's).

    Per-request parts (LoRA adapter, ``extra_key``, cache salt) are added by :func:`request_namespace`.
    """
    model_path = str(_attr(model_config, "model_path", _attr(server_args, "model_path", "default")))
    tokenizer = str(_attr(server_args, "tokenizer_path", model_path))
    return CacheNamespace(
        model=model_path,
        revision=str(_attr(model_config, "revision", _attr(server_args, "revision", ""))),
        tokenizer=tokenizer,
        # The bytes depend on both: an fp8 cache of a bf16 model is not an fp8 cache of an fp16 model.
        kv_dtype=f"{_dtype_name(kv_dtype) or _attr(server_args, 'kv_cache_dtype', 'auto')}/"
                 f"{_dtype_name(_attr(model_config, 'dtype'))}",
        quantization=str(_attr(model_config, "quantization", _attr(server_args, "quantization", ""))),
        rope=CacheNamespace.rope_key(rope_config_of(_attr(model_config, "hf_config"))),
        tensor_parallel=int(tp_size or 1),
        pipeline_parallel=int(_attr(server_args, "pp_size", 1)),
        block_size=int(page_size or 1),
        kv_layout="sglang_token_pool",
    )


def request_namespace(base: CacheNamespace, req: Any) -> CacheNamespace:
    """``base`` specialised with the request's LoRA adapter, ``extra_key`` and cache salt (SGLang keeps requests
    with different ``extra_key`` / ``cache_salt`` in disjoint parts of its tree; so does SemBlend)."""
    lora = _attr(req, "lora_id", "") or ""
    extra = _attr(req, "extra_key", "") or ""
    salt = _attr(req, "cache_salt", "") or ""
    if not lora and not extra and not salt:
        return base
    # extra_key is SGLang's namespace tag (LoRA ids, user tags); cache_salt is the tenant salt.
    return dataclasses.replace(base, lora=str(lora), cache_salt=f"{extra}\x1f{salt}")
