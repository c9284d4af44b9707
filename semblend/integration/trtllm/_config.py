"""Translate TensorRT-LLM configuration into SemBlend types: adapter settings, ``SemBlendConfig``, ``CacheNamespace``.

Nothing here imports TensorRT-LLM: ``llm_args`` (a ``TorchLlmArgs``) and requests are read by attribute, so the
translation is testable without the engine and tolerant of the releases whose objects differ in detail.

Where the settings come from. ``KvCacheConnectorConfig`` carries only the module and the two class names, so the
connector reads its settings from the environment:

* ``TLLM_SEMBLEND_CONFIG``: a JSON object, or the path of a JSON file, holding adapter keys (``mode``,
  ``donor_kv_gpu_bytes``...) and any :class:`~semblend_core.SemBlendConfig` field; unknown keys fail at start-up.
  The ``TLLM_`` prefix matters: TensorRT-LLM forwards only ``TLLM*`` / ``TRTLLM*`` variables to the MPI workers it
  spawns, and the connector is built inside them.
* ``SEMBLEND_*`` variables (``SemBlendConfig.from_env``) are the base the JSON is applied on; they reach the workers
  only when the launcher passes the environment through (``mpirun -x``, a single-process run).

The adapter keys and their validation are the vLLM adapter's (``VllmAdapterConfig``, engine-agnostic in substance);
this module adds the TensorRT-LLM start-up checks (:func:`check_materializing`) and the namespace.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from semblend.integration.vllm._config import (
    MODE_DISCOVERY_ONLY,
    MODE_PREFIX,
    VllmAdapterConfig,
    parse_extra_config,
    rope_config_of,
)
from semblend_core import CacheNamespace, ConfigError, SemBlendConfig

AdapterConfig = VllmAdapterConfig  # same keys, same validation (see the module docstring)
MODES = (MODE_DISCOVERY_ONLY, MODE_PREFIX)  # vLLM's blend mode has no TensorRT-LLM counterpart

CONFIG_ENV = "TLLM_SEMBLEND_CONFIG"
# Attention backends whose paged-pool layout was read from TensorRT-LLM's source (see ``_layout``), and the order
# inside a block each one uses. FLASHINFER is left out until its reading of the pool is confirmed.
BACKEND_LAYOUTS: dict[str, str] = {"TRTLLM": "HND", "VANILLA": "NHD"}

__all__ = [
    "BACKEND_LAYOUTS", "CONFIG_ENV", "MODES", "MODE_DISCOVERY_ONLY", "AdapterConfig", "base_namespace",
    "check_materializing", "kv_cache_setting", "load_settings", "request_namespace", "tokens_per_block",
]


def _attr(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if obj is None:
            return default
        obj = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    return default if obj is None else obj


# ---------------------------------------------------------------------------------------------- settings
def _read_config_env(environ: Mapping[str, str]) -> dict[str, Any]:
    text = environ.get(CONFIG_ENV, "").strip()
    if not text:
        return {}
    if not text.startswith("{"):
        try:
            with open(os.path.expanduser(text), encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(f"{CONFIG_ENV}={text!r} is neither a JSON object nor a readable file: {exc}") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{CONFIG_ENV} is not valid JSON ({exc}); allowed: a JSON object of adapter keys "
                          "and SemBlendConfig fields") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{CONFIG_ENV} must hold a JSON object, got {type(values).__name__}")
    return values


def load_settings(environ: Mapping[str, str] | None = None) -> tuple[AdapterConfig, SemBlendConfig]:
    """Adapter settings and a validated ``SemBlendConfig`` from ``TLLM_SEMBLEND_CONFIG`` over ``SEMBLEND_*``.

    Raises :class:`~semblend_core.ConfigError` naming the allowed keys for an unknown key or a bad value.
    """
    env = os.environ if environ is None else environ
    values = _read_config_env(env)
    try:
        return parse_extra_config(values, environ=env, modes=MODES)
    except ConfigError as exc:
        raise ConfigError(f"{CONFIG_ENV}: {exc}") from None


# ---------------------------------------------------------------------------------------------- llm_args
def kv_cache_setting(llm_args: Any, name: str, default: Any = None) -> Any:
    """One ``llm_args.kv_cache_config`` field (``KvCacheConfig`` object or dict), ``default`` when unset."""
    return _attr(llm_args, "kv_cache_config", name, default=default)


def tokens_per_block(llm_args: Any) -> int:
    """``kv_cache_config.tokens_per_block`` (TensorRT-LLM's default: 32); older releases kept it on ``llm_args``."""
    value = kv_cache_setting(llm_args, "tokens_per_block")
    if value is None:
        value = _attr(llm_args, "tokens_per_block", default=32)
    return int(value)


def check_materializing(llm_args: Any) -> None:
    """Refuse, at start-up, a deployment where a materializing mode cannot keep SemBlend's rules.

    Raises :class:`~semblend_core.ConfigError` naming the setting and what is allowed. The reasons, all from
    TensorRT-LLM's source (``docs/trtllm.md`` names the commits):

    * block reuse off: ``KVCacheManager::addSequence`` consults the connector only on the block-reuse path; with
      ``enable_block_reuse=False`` the connector is ignored;
    * a host (secondary) block pool: offloading swaps a block's memory-pool index, so the block ids the connector
      receives stop indexing the registered primary pool;
    * tensor/pipeline parallelism or attention DP: the scheduler (rank 0) cannot see the other ranks' donor stores,
      and a synchronous load has no failure path that falls back to prefill;
    * KV cache manager V2: it hands connectors a region layout, not the pool tensor this adapter addresses;
    * an attention backend whose block layout is not known here.
    """
    if not kv_cache_setting(llm_args, "enable_block_reuse", default=True):
        raise ConfigError("SemBlend mode 'prefix' needs kv_cache_config.enable_block_reuse=True: TensorRT-LLM "
                          "ignores the KV cache connector when block reuse is off. Use mode 'discovery_only'.")
    host = kv_cache_setting(llm_args, "host_cache_size", default=0) or 0
    if int(host) > 0:
        raise ConfigError(f"SemBlend mode 'prefix' needs kv_cache_config.host_cache_size unset or 0 (got {host}): "
                          "host offloading remaps block ids away from the registered GPU pool")
    if kv_cache_setting(llm_args, "use_kv_cache_manager_v2", default=False):
        raise ConfigError("SemBlend mode 'prefix' supports KV cache manager V1 only; set "
                          "kv_cache_config.use_kv_cache_manager_v2=False or use mode 'discovery_only'")
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size"):
        value = int(_attr(llm_args, name, default=1) or 1)
        if value != 1:
            raise ConfigError(f"SemBlend mode 'prefix' needs {name}=1 (got {value}); allowed with parallelism: "
                              "mode 'discovery_only'")
    if _attr(llm_args, "enable_attention_dp", default=False):
        raise ConfigError("SemBlend mode 'prefix' does not support enable_attention_dp=True; use 'discovery_only'")
    backend = str(_attr(llm_args, "attn_backend", default="TRTLLM")).upper()
    if backend not in BACKEND_LAYOUTS:
        raise ConfigError(f"SemBlend mode 'prefix' does not know the KV block layout of attn_backend={backend!r}; "
                          f"allowed: {', '.join(BACKEND_LAYOUTS)}")


# ---------------------------------------------------------------------------------------------- namespace
def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else ""


def base_namespace(llm_args: Any, hf_config: Any, *, tenant: str = "") -> CacheNamespace:
    """Everything that must match for two requests' KV to be interchangeable, read from ``llm_args``.

    Per-request parts (LoRA task, cache salt) are added by :func:`request_namespace`.
    """
    tokenizer = _attr(llm_args, "tokenizer", default="")
    tokenizer = str(tokenizer if isinstance(tokenizer, (str, os.PathLike)) else type(tokenizer).__name__)
    tok_rev = str(_attr(llm_args, "tokenizer_revision", default=""))
    quant = _attr(llm_args, "quant_config")
    quant_key = ""
    if quant is not None:
        quant_key = "/".join(str(_attr(quant, k, default="")) for k in ("quant_algo", "kv_cache_quant_algo"))
    kv_dtype = str(kv_cache_setting(llm_args, "dtype", default="auto"))
    return CacheNamespace(
        model=str(_attr(llm_args, "model", default="default")),
        revision=str(_attr(llm_args, "revision", default="")),
        tokenizer=f"{tokenizer}@{tok_rev}" if tok_rev else tokenizer,
        kv_dtype=f"{kv_dtype}/{_dtype_name(_attr(llm_args, 'dtype', default='auto'))}",
        quantization=quant_key,
        rope=CacheNamespace.rope_key(rope_config_of(hf_config)) if hf_config is not None else "",
        tensor_parallel=int(_attr(llm_args, "tensor_parallel_size", default=1) or 1),
        pipeline_parallel=int(_attr(llm_args, "pipeline_parallel_size", default=1) or 1),
        block_size=tokens_per_block(llm_args),
        kv_layout="trtllm/" + BACKEND_LAYOUTS.get(str(_attr(llm_args, "attn_backend", default="TRTLLM")).upper(),
                                                  str(_attr(llm_args, "attn_backend", default=""))),
        tenant=tenant,
    )


def request_salt(request: Any) -> str | None:
    """A request's cache salt: ``cache_salt`` (newer releases, a string) or ``cache_salt_id`` (older, an int); ``""``
    for a request without one; None when the request exposes neither attribute (the salt is unknown).

    ``RequestData``'s docstring: connectors that key content on tokens MUST mix the salt into their identifiers.
    """
    known = False
    for name in ("cache_salt", "cache_salt_id"):
        if hasattr(request, name):
            known = True
            salt = getattr(request, name)
            if salt not in (None, ""):
                return str(salt)
    return "" if known else None


def request_namespace(base: CacheNamespace, request: Any) -> CacheNamespace:
    """``base`` specialised with the request's LoRA task and cache salt."""
    lora = getattr(request, "lora_task_id", None)
    lora_key = "" if lora in (None, -1) else f"task:{lora}"
    salt = request_salt(request) or ""
    if not lora_key and not salt:
        return base
    return dataclasses.replace(base, lora=lora_key, cache_salt=salt)
