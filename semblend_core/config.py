"""``SemBlendConfig``: the one typed, frozen, validated configuration.

Built three ways, all validated the same way in ``__post_init__``:

* ``SemBlendConfig(**kw)`` in code and notebooks;
* ``SemBlendConfig.from_env()`` reads ``SEMBLEND_<FIELD>`` variables (e.g. ``SEMBLEND_MIN_SIMILARITY=0.7``);
* ``SemBlendConfig.from_dict(d)`` for engine extra config (vLLM ``kv_connector_extra_config``, SGLang args).

Unknown keys and bad values raise :class:`~semblend_core.errors.ConfigError` (a ``ValueError``) whose message names
what is allowed, so a typo fails at start-up rather than silently disabling reuse.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from semblend_core.errors import ConfigError

EMBEDDERS = ("shingle", "jaccard", "minilm", "onnx", "onnx_gpu")
BATHTUB_PRESETS = ("auto", "llama", "qwen2", "mistral", "gemma", "phi3", "flat", "none")
ANN_BACKENDS = ("exact", "usearch", "faiss")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class SemBlendConfig:
    """Every knob SemBlend has. Defaults are the measured operating point (see README, "Configuration")."""

    enabled: bool = True
    # Quality gates: a candidate donor must be this similar and cover this much of the prompt.
    min_similarity: float = 0.60
    min_reuse_ratio: float = 0.50
    min_prompt_tokens: int = 32
    max_prompt_tokens: int = 1 << 20
    # Discovery.
    embedder: str = "shingle"
    embedder_model: str | None = None
    ann_backend: str = "exact"
    max_candidates: int = 4
    max_donors: int = 10_000
    # Donors one plan may draw spans from (1: single-donor plans). Further donors fill the target regions the
    # best donor leaves uncovered (RAG prompts assembled from passages that earlier requests used in other mixes).
    max_donors_per_plan: int = 4
    # Alignment: k-gram size of the rolling hash, winnowing window, and the shortest exact span worth reusing.
    shingle_tokens: int = 8
    winnow_window: int = 8
    chunk_size: int = 16
    fuzzy_chunks: bool = True
    fuzzy_min_ratio: float = 0.80
    # Behaviour.
    discovery_only: bool = False
    strict_prefix_boundary: bool = True
    exact_materialization_only: bool = False
    # Recompute policy: first tokens after every seam, budget of deviation-selected tokens, layer policy.
    seam_recompute_tokens: int = 4
    recompute_budget: float = 0.0
    bathtub_preset: str = "auto"
    layer_recompute: tuple[float, ...] | None = None
    # Where exported models (ONNX) and converted weights are cached.
    cache_dir: str = field(default_factory=lambda: os.path.join(os.path.expanduser("~"), ".cache", "semblend"))

    ENV_PREFIX: ClassVar[str] = "SEMBLEND_"

    def __post_init__(self) -> None:
        def fail(name: str, value: object, allowed: str) -> None:
            raise ConfigError(f"SemBlendConfig.{name}={value!r} is not allowed; allowed: {allowed}")

        for name in ("enabled", "fuzzy_chunks", "discovery_only", "strict_prefix_boundary",
                     "exact_materialization_only"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "true or false")
        for name in ("min_similarity", "min_reuse_ratio", "fuzzy_min_ratio", "recompute_budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0) \
                    or math.isnan(value):
                fail(name, value, "a number in [0, 1]")
        int_ranges = {
            "min_prompt_tokens": (1, 1 << 30), "max_prompt_tokens": (1, 1 << 30), "max_candidates": (1, 64),
            "max_donors": (1, 1 << 26), "shingle_tokens": (2, 64), "winnow_window": (1, 256),
            "max_donors_per_plan": (1, 64),
            "chunk_size": (2, 4096), "seam_recompute_tokens": (0, 4096),
        }
        for name, (lo, hi) in int_ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not (lo <= value <= hi):
                fail(name, value, f"an integer in [{lo}, {hi}]")
        if self.min_prompt_tokens > self.max_prompt_tokens:
            fail("min_prompt_tokens", self.min_prompt_tokens, f"<= max_prompt_tokens ({self.max_prompt_tokens})")
        if self.chunk_size < self.shingle_tokens:
            fail("chunk_size", self.chunk_size, f">= shingle_tokens ({self.shingle_tokens})")
        if self.embedder not in EMBEDDERS:
            fail("embedder", self.embedder, ", ".join(EMBEDDERS))
        if self.ann_backend not in ANN_BACKENDS:
            fail("ann_backend", self.ann_backend, ", ".join(ANN_BACKENDS))
        if self.bathtub_preset not in BATHTUB_PRESETS:
            fail("bathtub_preset", self.bathtub_preset, ", ".join(BATHTUB_PRESETS))
        if self.layer_recompute is not None:
            lr = self.layer_recompute
            if not isinstance(lr, tuple) or not lr or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0 for x in lr
            ):
                fail("layer_recompute", lr, "a non-empty tuple of fractions in [0, 1], one per layer")
        if self.embedder_model is not None and not isinstance(self.embedder_model, str):
            fail("embedder_model", self.embedder_model, "a path or model id string")
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            fail("cache_dir", self.cache_dir, "a non-empty path")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, base: SemBlendConfig | None = None) -> SemBlendConfig:
        """Build from a mapping of field names (strings are parsed like env values). Unknown keys raise."""
        allowed = cls.field_names()
        unknown = sorted(k for k in values if k not in allowed)
        if unknown:
            raise ConfigError(f"unknown SemBlend config key(s) {unknown}; allowed: {', '.join(allowed)}")
        parsed = {k: cls._parse(k, v) for k, v in values.items()}
        return dataclasses.replace(base, **parsed) if base is not None else cls(**parsed)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, base: SemBlendConfig | None = None
                 ) -> SemBlendConfig:
        """Build from ``SEMBLEND_*`` variables. An unknown ``SEMBLEND_`` variable raises (it is almost surely a typo)."""
        env = os.environ if environ is None else environ
        values: dict[str, str] = {}
        allowed = cls.field_names()
        for key, value in env.items():
            if not key.startswith(cls.ENV_PREFIX):
                continue
            name = key[len(cls.ENV_PREFIX):].lower()
            if name not in allowed:
                raise ConfigError(
                    f"unknown environment variable {key}; allowed: "
                    + ", ".join(cls.ENV_PREFIX + n.upper() for n in allowed)
                )
            values[name] = value
        return cls.from_dict(values, base=base)

    @classmethod
    def _parse(cls, name: str, value: Any) -> Any:
        """Parse a string (env / JSON) into the field's type; non-strings pass through to validation."""
        ftype = {f.name: f.type for f in dataclasses.fields(cls)}[name]
        if name == "layer_recompute":
            if isinstance(value, str):
                if value.strip().lower() in ("", "none"):
                    return None
                try:
                    return tuple(float(x) for x in value.split(","))
                except ValueError:
                    raise ConfigError(f"SemBlendConfig.layer_recompute={value!r} is not allowed; allowed: "
                                      "comma-separated fractions in [0, 1], one per layer") from None
            return tuple(value) if isinstance(value, list) else value
        if not isinstance(value, str):
            return value
        text = value.strip()
        if ftype == "bool":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ConfigError(f"SemBlendConfig.{name}={value!r} is not allowed; allowed: {', '.join(_TRUE + _FALSE)}")
        if ftype == "int":
            try:
                return int(text)
            except ValueError:
                raise ConfigError(f"SemBlendConfig.{name}={value!r} is not allowed; allowed: an integer") from None
        if ftype == "float":
            try:
                return float(text)
            except ValueError:
                raise ConfigError(f"SemBlendConfig.{name}={value!r} is not allowed; allowed: a number") from None
        if name == "embedder_model" and text.lower() in ("", "none"):
            return None
        return text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
