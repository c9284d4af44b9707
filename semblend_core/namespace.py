"""``CacheNamespace``: everything that must match for two requests' KV to be interchangeable.

KV computed under one model revision, tokenizer, dtype, quantization, LoRA adapter, RoPE configuration, parallel
layout, block size, KV layout, cache salt or tenant is meaningless (or a data leak) under another. Donors are stored
per namespace and never looked up across namespaces (rule 4). Adapters build a namespace from the engine's config;
notebooks may use :meth:`CacheNamespace.default`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


def _canonical(value: Any) -> Any:
    """A JSON-able, order-independent form of a nested config value (for RoPE dicts and the like)."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 1e6 and 1000000 are the same theta
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclass(frozen=True)
class CacheNamespace:
    """Identity of a KV cache. Two requests may share KV only if their namespaces are equal.

    ``rope`` is a canonical JSON string of the RoPE configuration (theta, scaling, partial rotary); build it with
    :meth:`rope_key` so that equal configs compare equal.
    """

    model: str = "default"
    revision: str = ""
    tokenizer: str = ""
    kv_dtype: str = ""
    quantization: str = ""
    lora: str = ""
    rope: str = ""
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    block_size: int = 0
    kv_layout: str = ""
    cache_salt: str = ""
    tenant: str = ""
    _key: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"CacheNamespace.{name}={value!r}: expected a non-negative integer")
        payload = json.dumps({k: v for k, v in asdict(self).items() if k != "_key"}, sort_keys=True)
        object.__setattr__(self, "_key", hashlib.sha256(payload.encode()).hexdigest()[:32])

    @property
    def key(self) -> str:
        """Stable 128-bit hex digest of every field; the store's partition key."""
        return self._key

    @staticmethod
    def rope_key(rope_config: Mapping[str, Any] | None) -> str:
        """Canonical string for a RoPE config dict (``rope_theta``, ``rope_scaling``, ``partial_rotary_factor``...)."""
        if not rope_config:
            return ""
        return json.dumps(_canonical(rope_config), sort_keys=True, separators=(",", ":"))

    @classmethod
    def default(cls) -> CacheNamespace:
        return _DEFAULT

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "_key"}


_DEFAULT = CacheNamespace()
