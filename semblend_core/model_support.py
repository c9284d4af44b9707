"""Which models the blended prefill computes exactly: decided once at start-up, shared by every adapter.

A blended prefill reimplements the model's layer loop (``semblend.integration.transformers.blend``; the vLLM and
SGLang adapters will run the same loop over their own modules). If the model does anything that loop does not,
the result is silently wrong KV: so support is an explicit allowlist, never a structure check alone.

Call order, once per model (the adapter drives it):

1. :func:`check_model_config` on the model's config (a transformers ``PretrainedConfig`` or a ``config.json``
   dict). Pure, numpy only. Accepts only the families of :data:`SUPPORTED_MODEL_TYPES`, whose every per-layer
   operation the loop implements, verified against their transformers modeling code:

   token embedding (unscaled) -> per layer: RMSNorm -> q/k/v projections (bias allowed) -> per-head q/k RMSNorm
   (Qwen3 only) -> rotate-half RoPE -> causal softmax(q k^T * scaling) v over *every* earlier token -> o_proj ->
   residual add -> RMSNorm -> MLP (any dense MLP module; SiLU-gated for these families) -> residual add;
   then a final RMSNorm and an unscaled LM head.

   Knobs other families add to that math (embedding/residual/logit multipliers, clipped QKV, soft-capping,
   parallel residuals, experts...) decline even under an allowed ``model_type`` (:data:`FOREIGN_KNOBS`), and the
   RoPE/attention layout must allow exact re-rotation (``rope_correction.rope_spec_from_config``: no sliding,
   chunked or NoPE layers, no length-dependent RoPE, no MLA).
2. An adapter-specific structure check (exact module classes; only the adapter knows its engine's modules).
3. A self-check on the real model, run by the adapter because only it can execute the model: an exact-prefix
   blended prefill (and one through the recompute path) must equal a cold prefill, compared by
   :func:`compare_self_check` within :func:`self_check_tolerance` of the model's dtype.

Any failure gives ``ModelSupport(supported=False, reason=...)``: the adapter then runs every prompt as a normal
prefill and records the reason (rule 5). Reason strings are stable prefixes: ``unsupported_model_type:<type>``,
``unsupported_config:<knob>``, ``mla_latent_kv``, the RoPE spec's reason, ``sliding_window_layers``,
``chunked_attention_layers``, ``nope_layers``, ``rope_config_unreadable:<error>``, ``self_check_failed:<what>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "FOREIGN_KNOBS",
    "SUPPORTED_MODEL_TYPES",
    "ModelSupport",
    "check_model_config",
    "compare_self_check",
    "self_check_tolerance",
]

# model_type -> the transformers class-name stem of that family (adapters use it for their structure checks).
# Add a family only after checking every operation of its decoder layer, model and LM head against the loop
# above, and with a test that its exact-prefix blended prefill equals cold (tests/core/test_model_support.py,
# tests/integration/transformers/test_hf_model_support.py).
SUPPORTED_MODEL_TYPES: Mapping[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
}

# Config keys by which other families change the per-layer math, with the values that leave it unchanged. Under
# an allowed model_type they should never appear; a config that carries one anyway (a fine-tune's config edited
# by hand, a custom model registered under a known type) is declined rather than trusted.
FOREIGN_KNOBS: Mapping[str, tuple[Any, ...]] = {
    "embedding_multiplier": (None, 1, 1.0),    # Granite
    "residual_multiplier": (None, 1, 1.0),     # Granite
    "logits_scaling": (None, 1, 1.0),          # Granite
    "attention_multiplier": (None,),           # Granite (replaces head_dim ** -0.5)
    "scale_emb": (None, 1, 1.0),               # MiniCPM
    "scale_depth": (None,),                    # MiniCPM
    "clip_qkv": (None,),                       # OLMo, DBRX
    "logit_scale": (None, 1, 1.0),             # Cohere
    "final_logit_softcapping": (None,),        # Gemma 2/3
    "attn_logit_softcapping": (None,),         # Gemma 2
    "query_pre_attn_scalar": (None,),          # Gemma 2/3
    "qk_layernorm": (None, False),             # StableLM, Persimmon
    "use_qk_norm": (None, False),              # Llama 4, Cohere 2
    "use_parallel_residual": (None, False),    # StableLM, GPT-NeoX
    "parallel_attn": (None, False),            # Falcon
    "num_local_experts": (None, 0, 1),         # Mixtral
    "num_experts": (None, 0, 1),               # Qwen2-MoE, OLMoE
    "n_routed_experts": (None, 0),             # DeepSeek
    "moe_layer_freq": (None, 0),               # DeepSeek
}

# Relative L2 error ||blended - cold|| / ||cold|| allowed by the self-check, per dtype. Measured on SmolLM2-135M
# (30 layers, CPU, 32-token probe): fp32 4.5e-7, fp16 6.4e-4, bf16 1.4e-2 (rounding of two different kernel
# orders); the tolerances leave 3.5x (bf16) to 20x (fp32) headroom. Structural errors are far above them: Granite's
# ignored multipliers 7.2, OLMo's ignored clip_qkv 5.7e-2 on tiny random models (fp32).
_SELF_CHECK_RTOL = {"float64": 1e-9, "float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class ModelSupport:
    """Outcome of :func:`check_model_config`. ``rope_spec`` is the model's ``RopeSpec`` once it could be read."""

    supported: bool
    reason: str = ""
    rope_spec: Any = None
    model_type: str = ""

    def __bool__(self) -> bool:
        return self.supported


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _text_config(config: Any) -> Any:
    if not isinstance(config, Mapping) and hasattr(config, "get_text_config"):
        try:
            return config.get_text_config()
        except Exception:  # noqa: BLE001 - an odd config object: read it as it is
            return config
    inner = _get(config, "text_config")
    return inner if inner else config


def _neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    """``value`` is one of ``allowed``; booleans never stand in for numbers (``True == 1``) or the reverse."""
    for a in allowed:
        if value is a:
            return True
        if isinstance(value, bool) or isinstance(a, bool) or a is None:
            continue
        if isinstance(value, (int, float)) and value == a:
            return True
    return False


def check_model_config(config: Any) -> ModelSupport:
    """Whether the blended layer loop computes this model exactly, judged from its config alone. Pure.

    ``config``: a transformers ``PretrainedConfig`` (4.x or 5.x) or a ``config.json`` dict; a multimodal
    wrapper is accepted only if both the wrapper's and the text model's ``model_type`` are allowed. Never raises.
    """
    from semblend_core.rope_correction import rope_spec_from_config

    text = _text_config(config)
    outer_type = str(_get(config, "model_type", "") or "")
    model_type = str(_get(text, "model_type", "") or "")
    for mt in dict.fromkeys((outer_type, model_type)):
        if mt not in SUPPORTED_MODEL_TYPES:
            return ModelSupport(False, f"unsupported_model_type:{mt or 'unknown'}", model_type=model_type)
    if _get(text, "kv_lora_rank", None) or _get(text, "q_lora_rank", None):
        return ModelSupport(False, "mla_latent_kv", model_type=model_type)
    for knob, neutral in FOREIGN_KNOBS.items():
        value = _get(text, knob, None)
        if not _neutral(value, neutral):
            return ModelSupport(False, f"unsupported_config:{knob}={value!r}", model_type=model_type)
    try:
        spec = rope_spec_from_config(text)
    except Exception as exc:  # noqa: BLE001 - unreadable config: decline rather than guess
        return ModelSupport(False, f"rope_config_unreadable:{type(exc).__name__}", model_type=model_type)
    if not spec.exact:
        return ModelSupport(False, spec.reason or "rope_not_shift_invariant", spec, model_type)
    if spec.sliding_window_layers:
        return ModelSupport(False, "sliding_window_layers", spec, model_type)
    if spec.chunked_attention_layers:
        return ModelSupport(False, "chunked_attention_layers", spec, model_type)
    if spec.nope_layers:
        return ModelSupport(False, "nope_layers", spec, model_type)
    return ModelSupport(True, "", spec, model_type)


def self_check_tolerance(dtype: Any) -> float:
    """Relative L2 tolerance of the start-up self-check for a model computing in ``dtype`` (a torch or numpy
    dtype, or its name). Unknown dtypes (fp8...) get the bf16 tolerance's tenfold: loose, but a structural error
    (a missing multiplier) is still orders of magnitude above it."""
    name = str(dtype).replace("torch.", "")
    return _SELF_CHECK_RTOL.get(name, 10 * _SELF_CHECK_RTOL["bfloat16"])


def compare_self_check(reference: Any, candidate: Any, dtype: Any, what: str = "logits") -> tuple[str, float]:
    """``(reason, relative_error)``: reason is ``""`` when ``candidate`` equals ``reference`` within
    :func:`self_check_tolerance`, else ``self_check_failed:<what>``. Arrays of any shape (converted to float64);
    NaN/inf or a shape mismatch always fails."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        return f"self_check_failed:{what}_shape", math.inf
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(cand))):
        return f"self_check_failed:{what}_not_finite", math.inf
    err = float(np.linalg.norm(cand - ref) / max(float(np.linalg.norm(ref)), 1e-30))
    if err > self_check_tolerance(dtype):
        return f"self_check_failed:{what}", err
    return "", err
