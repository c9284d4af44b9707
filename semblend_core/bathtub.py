"""Bathtub layer policy: how much of the reused KV each layer refreshes.

Measurements in CacheBlend/EPIC-style systems show the deviation between reused and fresh KV is largest in the
first layers (context mixing starts there) and again in the last layers (which shape the output distribution),
and smallest in the middle: a bathtub. The policy gives layer ``l`` of ``L`` the fraction
``budget * shape(l)`` of reused tokens to recompute, where ``shape`` has mean 1 (so the average over layers is the
configured budget) and is clipped to [0, 1/budget].

The layer count always comes from the model's config (``ModelShape.num_layers``), never from a name. The preset is
chosen by the config's ``model_type`` (``auto``) or named explicitly; ``SemBlendConfig.layer_recompute`` overrides
everything with one fraction per layer. The preset parameters are starting points that the reference-engine
benchmark (``benchmarks/quality.py``) measures and that README's ablation table justifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from semblend_core.errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about the model, read from its config by the adapter."""

    num_layers: int
    model_type: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers <= 0:
            raise ConfigError(f"ModelShape.num_layers={self.num_layers!r}; allowed: a positive integer from the "
                              "model config (num_hidden_layers)")


@dataclass(frozen=True)
class BathtubPreset:
    """``shape(l) ∝ floor + early * exp(-l / (tau*L)) + late * exp(-(L-1-l) / (tau*L))``, normalised to mean 1."""

    early: float
    late: float
    floor: float
    tau: float


PRESETS: dict[str, BathtubPreset | None] = {
    "llama": BathtubPreset(early=3.0, late=1.5, floor=0.5, tau=0.08),
    "qwen2": BathtubPreset(early=3.0, late=2.0, floor=0.5, tau=0.08),
    "mistral": BathtubPreset(early=3.0, late=1.5, floor=0.5, tau=0.08),
    "gemma": BathtubPreset(early=2.5, late=2.0, floor=0.6, tau=0.10),
    "phi3": BathtubPreset(early=2.5, late=1.5, floor=0.6, tau=0.10),
    "flat": BathtubPreset(early=0.0, late=0.0, floor=1.0, tau=1.0),
    "none": None,
}

# model_type (config field) -> preset; unknown types get the flat policy rather than a guess.
MODEL_TYPE_PRESETS = {
    "llama": "llama", "mistral": "mistral", "mixtral": "mistral", "qwen2": "qwen2", "qwen2_moe": "qwen2",
    "qwen3": "qwen2", "qwen3_moe": "qwen2", "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma",
    "gemma3_text": "gemma", "phi3": "phi3", "smollm3": "llama", "granite": "llama",
}


def resolve_preset(preset: str, model_type: str) -> str:
    if preset != "auto":
        return preset
    return MODEL_TYPE_PRESETS.get(model_type.lower(), "flat")


def layer_recompute_policy(shape: ModelShape | None, budget: float, preset: str = "auto",
                           override: tuple[float, ...] | None = None) -> tuple[float, ...]:
    """Per-layer fraction of reused tokens to refresh; ``()`` when the layer count is unknown or preset is none."""
    if override is not None:
        if shape is not None and len(override) != shape.num_layers:
            raise ConfigError(f"layer_recompute has {len(override)} entries but the model has {shape.num_layers} "
                              "layers; allowed: exactly one fraction per layer")
        return tuple(float(x) for x in override)
    if shape is None:
        return ()
    name = resolve_preset(preset, shape.model_type)
    if name not in PRESETS:
        raise ConfigError(f"bathtub preset {name!r} unknown; allowed: auto, {', '.join(PRESETS)}")
    params = PRESETS[name]
    if params is None or budget <= 0.0:
        return tuple(0.0 for _ in range(shape.num_layers)) if params is not None else ()
    n = shape.num_layers
    raw = []
    for layer in range(n):
        early = params.early * math.exp(-layer / max(params.tau * n, 1e-9))
        late = params.late * math.exp(-(n - 1 - layer) / max(params.tau * n, 1e-9))
        raw.append(params.floor + early + late)
    mean = sum(raw) / n
    return tuple(min(1.0, budget * r / mean) for r in raw)
