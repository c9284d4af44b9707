"""RoPE re-rotation of cached keys.

A key cached at position ``p`` is ``K_p = s * R(p) k`` where ``R`` rotates channel pairs by ``p * inv_freq``
and ``s`` is the attention scaling (YaRN's mscale, 1 otherwise). Because rotations compose,
``K_{p+d} = R(d) K_p``: moving a cached key by ``d`` positions is one rotation by ``d * inv_freq`` and needs
neither ``p`` nor ``s``. This holds for any position-independent ``inv_freq`` (default, linear, llama3, YaRN,
proportional); it fails for dynamic NTK and LongRoPE (``inv_freq`` depends on the sequence length), so such
specs carry ``exact=False`` and the planner declines materialization.

Lifecycle, in call order:

1. ``rope_spec_from_config(hf_config)`` once per model (or ``rope_specs_per_layer`` when layers differ):
   reads a transformers ``PretrainedConfig`` (4.x or 5.x) or a plain ``config.json`` dict, computes
   ``inv_freq`` with this module's own float64 code, and says whether re-rotation is exact. Needs only numpy.
2. ``rerotate_keys(keys, delta, spec)`` per materialized span (torch, imported lazily):
   ``[num_tokens, num_kv_heads, head_dim]`` keys rotated at ``p`` become keys rotated at ``p + delta``.
3. ``apply_rope(x, positions, spec)`` rotates raw (un-rotated) keys at absolute positions, attention scaling
   included; the reference engine and the tests use it as the model's own rotation.

Angles are computed in float64 (``delta * inv_freq`` for ``|delta|`` in the tens of thousands loses radians
in fp32); the rotation itself runs in fp32 and the result is cast back to the input dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is optional: imported inside the functions that need it
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "RopeSpec",
    "apply_rope",
    "rerotate_keys",
    "rerotate_keys_",
    "rope_spec_from_config",
    "rope_specs_per_layer",
    "REASON_NOT_SHIFT_INVARIANT",
    "REASON_MLA",
    "REASON_MROPE",
    "REASON_PER_LAYER_ROPE",
    "REASON_HETEROGENEOUS",
    "REASON_KV_SHARING",
    "REASON_ODD_ROTARY_DIM",
    "REASON_THETA_MISSING",
]

# Stable reason strings (dashboards and tests key on them). The first equals
# plan.Reason.ROPE_NOT_SHIFT_INVARIANT.
REASON_NOT_SHIFT_INVARIANT = "rope_not_shift_invariant"
REASON_MLA = "mla_latent_kv"
REASON_MROPE = "mrope_multimodal_positions"
REASON_PER_LAYER_ROPE = "rope_differs_by_layer_type"
REASON_HETEROGENEOUS = "heterogeneous_layers"
REASON_KV_SHARING = "kv_shared_layers"
REASON_ODD_ROTARY_DIM = "odd_rotary_dim"
REASON_THETA_MISSING = "rope_theta_missing"
# Built with a suffix: f"unknown_rope_type:{name}", f"unsupported_layer_type:{name}", f"no_rope:{model_type}".

# Models whose rotary code pairs channel 2i with 2i+1 (checked against their transformers modeling files:
# rotate_every_two / x[..., 0::2] with repeat_interleave'd cos, or complex pairs for Llama 4).
_INTERLEAVED_MODEL_TYPES = frozenset(
    "gptj codegen cohere cohere2 cohere2_moe glm glm4 helium ernie4_5 ernie4_5_moe llama4 llama4_text".split()
)
# Model defaults transformers applies when config.json omits the key.
_DEFAULT_PARTIAL_ROTARY = {"gpt_neox": 0.25, "phi": 0.5, "stablelm": 0.25}
_DEFAULT_ROTARY_DIM = {"gptj": 64, "codegen": 64}
# Models that use learned/absolute positions or ALiBi: their keys carry no rotation that could be undone.
_NON_ROPE_MODEL_TYPES = frozenset(
    "gpt2 gpt_bigcode gpt_neo opt bloom mpt bert roberta distilbert t5 bart xglm".split()
)
# Models whose rotary code is multimodal RoPE (3-D positions split over mrope_section) even when the config
# omits mrope_section: every transformers modeling file that reads mrope_section ("_text" suffix stripped).
_MROPE_MODEL_TYPES = frozenset(
    "qwen2_vl qwen2_5_vl qwen3_vl qwen3_vl_moe qwen2_5_omni qwen3_omni_moe qwen3_5 qwen3_5_moe qwen4_exp "
    "glm4v glm4v_moe glm_image glm_ocr ernie4_5_vl_moe hunyuan_vl paddleocr_vl cohere_compass cosmos3_edge "
    "neomme".split()
)
_KNOWN_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# Model types whose transformers default theta is 10000 (no per-model default_theta); a config.json of another
# model that omits rope_theta is declined rather than given a guessed theta. "" = a hand-written dict.
_THETA_10K_MODEL_TYPES = frozenset(
    ["", *"gptj codegen llama mistral qwen2 qwen3 gpt_neox phi phi3 stablelm gemma gemma2".split()]
)


@dataclass(frozen=True)
class RopeSpec:
    """How a model rotates keys; everything a re-rotation kernel needs.

    * ``head_dim``: size of one head; ``rotary_dim`` (even, <= head_dim) channels are rotated, the rest pass
      through. ``rotary_dim == 0`` means the layer applies no RoPE (re-rotation is the identity).
    * ``interleaved``: False = rotate-half / NeoX pairing (channel i with i + rotary_dim/2: Llama, Qwen2,
      Mistral, SmolLM); True = GPT-J pairing (channel 2i with 2i+1).
    * ``inv_freq``: float64 numpy array ``[rotary_dim // 2]``, already scaled (linear/llama3/YaRN). Read-only.
      It may be empty only when ``exact`` is False and it could not be computed (unknown rope type).
    * ``attention_scaling``: multiplier applied to cos/sin by the model (YaRN mscale); irrelevant to
      re-rotation.
    * ``exact``: re-rotation reproduces the model's own keys; when False, ``reason`` says why and callers
      decline.
    * ``sliding_window_layers``: layer indices using sliding-window attention (declared; adapters decline or
      handle them explicitly). ``sliding_window``: their window size as the config states it (0 when none).
    * ``chunked_attention_layers``: layer indices using chunked attention (Llama 4), declared like sliding
      windows.
    * ``nope_layers``: layer indices that apply no RoPE at all (SmolLM3, Llama 4): their cached keys are
      position-free and must be reused without re-rotation.
    * ``layer_type``: the ``layer_types`` entry this spec was built for (``None``: the model-wide spec).
    """

    head_dim: int
    rotary_dim: int
    inv_freq: np.ndarray
    interleaved: bool = False
    attention_scaling: float = 1.0
    exact: bool = True
    reason: str = ""
    rope_type: str = "default"
    sliding_window_layers: tuple[int, ...] = ()
    sliding_window: int = 0
    chunked_attention_layers: tuple[int, ...] = ()
    nope_layers: tuple[int, ...] = ()
    layer_type: str | None = None

    def __post_init__(self) -> None:
        inv = np.array(self.inv_freq, dtype=np.float64, copy=True).reshape(-1)
        inv.setflags(write=False)  # the spec is frozen; so is its array
        object.__setattr__(self, "inv_freq", inv)
        if self.head_dim <= 0:
            raise ValueError(f"RopeSpec.head_dim={self.head_dim}: expected a positive integer")
        if self.rotary_dim < 0 or self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise ValueError(
                f"RopeSpec.rotary_dim={self.rotary_dim}: expected an even integer in "
                f"[0, head_dim={self.head_dim}]"
            )
        if inv.size != self.rotary_dim // 2 and not (inv.size == 0 and not self.exact):
            raise ValueError(
                f"RopeSpec.inv_freq has {inv.size} entries; "
                f"rotary_dim={self.rotary_dim} needs {self.rotary_dim // 2}"
            )
        if self.exact and not np.all(np.isfinite(inv)):
            raise ValueError("RopeSpec.inv_freq must be finite")
        if not self.exact and not self.reason:
            raise ValueError("RopeSpec with exact=False needs a reason")

    # Arrays make the generated __eq__/__hash__ unusable; compare values instead.
    def _key(self) -> tuple:
        return (
            self.head_dim,
            self.rotary_dim,
            self.inv_freq.tobytes(),
            self.interleaved,
            self.attention_scaling,
            self.exact,
            self.reason,
            self.rope_type,
            self.sliding_window_layers,
            self.sliding_window,
            self.chunked_attention_layers,
            self.nope_layers,
            self.layer_type,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RopeSpec):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def can_rerotate(self) -> bool:
        """True when :func:`rerotate_keys` may be called without ``allow_inexact``."""
        return self.exact and self.inv_freq.size == self.rotary_dim // 2


# ------------------------------------------------------------------------------------------------------------
# Config reading
# ------------------------------------------------------------------------------------------------------------


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` for mappings, ``getattr(cfg, key)`` for config objects; ``None`` counts as missing."""
    if isinstance(cfg, Mapping):
        value = cfg.get(key)
    else:
        try:
            value = getattr(cfg, key, None)
        except Exception:  # some config properties raise when a sibling field is unset
            value = None
    return default if value is None else value


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    raise ValueError(f"rope parameters must be a dict, got {type(value).__name__}")


def _head_dim(cfg: Any) -> int:
    head_dim = _get(cfg, "head_dim")
    if head_dim:
        return int(head_dim)
    hidden = _get(cfg, "hidden_size", _get(cfg, "n_embd", _get(cfg, "d_model")))
    heads = _get(cfg, "num_attention_heads", _get(cfg, "n_head"))
    if not hidden or not heads:
        raise ValueError(
            "cannot determine head_dim: config needs head_dim, or hidden_size and num_attention_heads"
        )
    return int(hidden) // int(heads)


def _rope_parameters(cfg: Any, model_type: str) -> dict[str, Any]:
    """The rope parameter dict, in transformers 5's ``rope_parameters`` form (possibly nested by layer type).

    transformers 5 keeps everything in ``config.rope_parameters`` (``rope_type``, ``rope_theta``, scaling
    keys, ``partial_rotary_factor``; nested ``{layer_type: {...}}`` for Gemma 3 and others) and exposes
    ``rope_scaling`` as an alias of it. transformers 4 and old ``config.json`` files keep ``rope_theta`` at
    the top level and the scaling dict (with ``type`` or ``rope_type``) in ``rope_scaling``.
    """
    params = _as_dict(_get(cfg, "rope_parameters")) or _as_dict(_get(cfg, "rope_scaling"))
    if _is_nested(params, cfg):
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in params.items()}
    # Gemma 3 before transformers 5: global layers use rope_theta (+ rope_scaling), sliding layers use
    # rope_local_base_freq.
    local_theta = _get(cfg, "rope_local_base_freq")
    if local_theta is not None:
        full = dict(params)
        full.setdefault("rope_theta", _get(cfg, "rope_theta", 1_000_000.0))
        return {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        }
    return params


def _is_nested(params: Mapping[str, Any], cfg: Any) -> bool:
    labels = set(_get(cfg, "layer_types", ()) or ()) | {
        "full_attention",
        "sliding_attention",
        "chunked_attention",
    }
    return bool(params) and all(k in labels for k in params)


def _resolve_flat(params: Mapping[str, Any], cfg: Any, model_type: str) -> dict[str, Any]:
    """Fill in theta, partial rotary factor and original length the way transformers standardizes them."""
    rp = dict(params)
    rope_type = rp.get("rope_type") or rp.get("type") or "default"
    rp["rope_type"] = str(rope_type)
    if rp.get("rope_theta") is None:
        rp["rope_theta"] = _get(cfg, "rope_theta", _get(cfg, "rotary_emb_base"))
    if rp["rope_theta"] is None and model_type in _THETA_10K_MODEL_TYPES:
        rp["rope_theta"] = 10_000.0  # GPT-J/CodeGen hard-code it; transformers' base default elsewhere
    if rp.get("partial_rotary_factor") is None:
        prf = _get(cfg, "partial_rotary_factor", _get(cfg, "rotary_pct"))
        if prf is None:
            prf = _DEFAULT_PARTIAL_ROTARY.get(model_type)
        if prf is not None:
            rp["partial_rotary_factor"] = prf
    if rp["rope_type"] in ("llama3", "yarn", "longrope"):
        # Phi-3 keeps the pretraining length outside rope_scaling; transformers gives that copy priority.
        original = _get(cfg, "original_max_position_embeddings")
        if original is None:
            original = rp.get("original_max_position_embeddings", _get(cfg, "max_position_embeddings"))
        rp["original_max_position_embeddings"] = original
    return rp


# ------------------------------------------------------------------------------------------------------------
# inv_freq formulas (float64, written from the published methods; tests compare them with transformers)
# ------------------------------------------------------------------------------------------------------------


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
    """Su et al. (RoFormer): ``theta_i = base ** (-2i / dim)`` for ``i < dim / 2``."""
    return 1.0 / (float(base) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def _llama3_inv_freq(base: float, dim: int, rp: Mapping[str, Any]) -> np.ndarray:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend in between."""
    inv = _base_inv_freq(base, dim)
    factor = float(rp["factor"])
    low_ff = float(rp["low_freq_factor"])
    high_ff = float(rp["high_freq_factor"])
    old_len = float(rp["original_max_position_embeddings"])
    wavelen = 2.0 * math.pi / inv
    low_freq_wavelen = old_len / low_ff
    high_freq_wavelen = old_len / high_ff
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    out = np.where(wavelen > low_freq_wavelen, inv / factor, inv)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, (1.0 - smooth) * inv / factor + smooth * inv, out)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(base: float, dim: int, rp: Mapping[str, Any], cfg: Any) -> tuple[np.ndarray, float]:
    """YaRN (Peng et al. 2023): NTK-by-parts ramp from extrapolated to interpolated frequencies; mscale."""
    original = float(rp["original_max_position_embeddings"])
    factor = rp.get("factor")
    if factor is None:  # DeepSeek-style configs give only the two lengths
        factor = float(_get(cfg, "max_position_embeddings")) / original
    factor = float(factor)
    attention = rp.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all_dim))
        else:
            attention = _yarn_mscale(factor)
    beta_fast = float(rp.get("beta_fast") or 32)
    beta_slow = float(rp.get("beta_slow") or 1)

    # The dimension index whose wavelength fits num_rotations times into the original context.
    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp
    pos_freqs = float(base) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inv = (1.0 / (factor * pos_freqs)) * (1.0 - extrapolation_weight) + (
        1.0 / pos_freqs
    ) * extrapolation_weight
    return inv, float(attention)


def _longrope(base: float, dim: int, rp: Mapping[str, Any], cfg: Any) -> tuple[np.ndarray, float]:
    """LongRoPE with the *short* factors (what the model uses up to ``original_max_position_embeddings``)."""
    original = float(rp["original_max_position_embeddings"])
    factor = rp.get("factor")
    if factor is None:
        factor = float(_get(cfg, "max_position_embeddings", original)) / original
    attention = rp.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = np.asarray(rp.get("short_factor") or (), dtype=np.float64)
    if short.size != dim // 2:
        return np.zeros(0), float(attention)
    return _base_inv_freq(base, dim) / short, float(attention)


def _proportional(base: float, head_dim: int, rp: Mapping[str, Any]) -> np.ndarray:
    """Proportional RoPE: the first ``partial_rotary_factor`` of the pairs rotate with exponent
    ``2i / head_dim``, the remaining pairs get frequency 0 (so the encoding spans the whole head)."""
    rope_angles = int(float(rp.get("partial_rotary_factor", 1.0)) * head_dim // 2)
    inv = 1.0 / (float(base) ** (np.arange(0, 2 * rope_angles, 2, dtype=np.float64) / head_dim))
    inv = np.concatenate([inv, np.zeros(head_dim // 2 - rope_angles)])
    return inv / float(rp.get("factor", 1.0))


# ------------------------------------------------------------------------------------------------------------
# Layer layout (sliding windows, chunked attention, NoPE layers)
# ------------------------------------------------------------------------------------------------------------


def _layer_types(cfg: Any, model_type: str) -> tuple[list[str] | None, str]:
    """Per-layer attention types (``None``: all full attention) and a problem string ("" when none)."""
    num_layers = _get(cfg, "num_hidden_layers", _get(cfg, "n_layer", _get(cfg, "num_layers")))
    declared = _get(cfg, "layer_types")
    if declared:
        return [str(t) for t in declared], ""
    window = _get(cfg, "sliding_window")
    use_sw = _get(cfg, "use_sliding_window") if _has(cfg, "use_sliding_window") else None
    if use_sw is not None:  # Qwen2/Qwen3: layers >= max_window_layers slide, if enabled
        if not use_sw or not window:
            return None, ""
        if num_layers is None:
            return None, "sliding_window_layers_unknown"
        first = int(_get(cfg, "max_window_layers", 0))
        return ["sliding_attention" if i >= first else "full_attention" for i in range(int(num_layers))], ""
    if not window:
        return None, ""
    if num_layers is None:
        return None, "sliding_window_layers_unknown"
    pattern = _get(cfg, "sliding_window_pattern", _get(cfg, "_sliding_window_pattern"))
    if pattern is None and model_type.startswith("gemma2"):
        pattern = 2  # Gemma 2 alternates, starting with a sliding layer
    if pattern:  # Gemma: every pattern-th layer is global
        pattern = int(pattern)
        return [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(int(num_layers))
        ], ""
    return ["sliding_attention"] * int(num_layers), ""  # Mistral / Phi-3: every layer slides


def _has(cfg: Any, key: str) -> bool:
    return key in cfg if isinstance(cfg, Mapping) else hasattr(cfg, key)


def _nope_layers(cfg: Any) -> tuple[int, ...]:
    # SmolLM3 / Llama 4: no_rope_layers[i] == 1 means layer i *uses* RoPE (transformers' naming).
    flags = _get(cfg, "no_rope_layers")
    if not flags:
        return ()
    return tuple(i for i, use_rope in enumerate(flags) if not int(use_rope))


# ------------------------------------------------------------------------------------------------------------
# Public: spec construction
# ------------------------------------------------------------------------------------------------------------


def rope_spec_from_config(
    config: Any, *, layer_type: str | None = None, interleaved: bool | None = None
) -> RopeSpec:
    """Build the :class:`RopeSpec` of a model from its transformers config (object or ``config.json`` dict).

    ``layer_type`` picks one entry of ``layer_types`` when rope parameters differ per layer type (Gemma 3's
    sliding layers use another theta); without it such a model gets ``exact=False``
    (``rope_differs_by_layer_type``): use :func:`rope_specs_per_layer` instead. ``interleaved`` overrides the
    pairing style, which is otherwise read from ``model_type`` (GPT-J-style models are listed; everything else
    is rotate-half, the transformers convention). A multimodal wrapper config is read through its
    ``text_config``.

    Never guesses: unknown rope types, length-dependent scaling (dynamic NTK, LongRoPE), MLA, multimodal RoPE,
    heterogeneous or KV-sharing layers, unknown layer types and a missing theta (for models whose default is
    not 10000) give ``exact=False`` with a reason. Raises ``ValueError`` only when the config lacks the head
    geometry or ``layer_type`` is not one of the config's. Pure; needs only numpy.
    """
    cfg = config
    outer_type = str(_get(cfg, "model_type", "") or "")
    if _get(cfg, "num_attention_heads") is None and _get(cfg, "n_head") is None and _get(cfg, "text_config"):
        cfg = _get(cfg, "text_config")  # multimodal wrapper: the text model holds the KV cache
    model_type = str(_get(cfg, "model_type", "") or "")
    head_dim = _head_dim(cfg)
    is_interleaved = (model_type in _INTERLEAVED_MODEL_TYPES) if interleaved is None else bool(interleaved)

    types, layout_problem = _layer_types(cfg, model_type)
    sliding = tuple(i for i, t in enumerate(types or ()) if t == "sliding_attention")
    chunked = tuple(i for i, t in enumerate(types or ()) if t == "chunked_attention")
    layout = dict(
        sliding_window_layers=sliding,
        sliding_window=int(_get(cfg, "sliding_window", 0) or 0) if sliding else 0,
        chunked_attention_layers=chunked,
        nope_layers=_nope_layers(cfg),
        layer_type=layer_type,
        interleaved=is_interleaved,
    )

    def declined(
        reason: str,
        rotary_dim: int = 0,
        inv: np.ndarray | None = None,
        scale: float = 1.0,
        rope_type: str = "default",
    ) -> RopeSpec:
        logger.debug("RoPE re-rotation not exact for model_type=%r: %s", model_type, reason)
        return RopeSpec(
            head_dim=head_dim,
            rotary_dim=rotary_dim,
            inv_freq=np.zeros(0) if inv is None else inv,
            attention_scaling=scale,
            exact=False,
            reason=reason,
            rope_type=rope_type,
            **layout,
        )

    # Model-wide blockers first: they make every layer's re-rotation meaningless.
    if model_type in _NON_ROPE_MODEL_TYPES or _get(cfg, "alibi"):
        return declined(f"no_rope:{model_type or 'alibi'}")
    if _get(cfg, "kv_lora_rank"):
        return declined(REASON_MLA)
    # transformers 5 gives every config object a per_layer_config view; is_heterogeneous says if it is used.
    heterogeneous = (
        bool(cfg.get("per_layer_config"))
        if isinstance(cfg, Mapping)
        else (_get(cfg, "is_heterogeneous", False) is True)
    )
    if heterogeneous:
        return declined(REASON_HETEROGENEOUS)
    if int(_get(cfg, "num_kv_shared_layers", 0) or 0) > 0:
        return declined(REASON_KV_SHARING)
    if layout_problem:
        return declined(layout_problem)
    unknown_layers = sorted({t for t in types or () if t not in _KNOWN_LAYER_TYPES})
    if unknown_layers:
        return declined(f"unsupported_layer_type:{unknown_layers[0]}")

    if {outer_type.removesuffix("_text"), model_type.removesuffix("_text")} & _MROPE_MODEL_TYPES:
        return declined(REASON_MROPE)

    params = _rope_parameters(cfg, model_type)
    if _is_nested(params, cfg):
        if layer_type is None:
            distinct = {
                repr(sorted(v.items())) if isinstance(v, Mapping) else repr(v) for v in params.values()
            }
            if len(distinct) > 1:
                return declined(REASON_PER_LAYER_ROPE)
            layer_type = next(iter(params))
        if layer_type not in params:
            raise ValueError(f"layer_type={layer_type!r} not in rope parameters (allowed: {sorted(params)})")
        entry = params[layer_type]
        if entry is None:  # a NoPE layer type
            return RopeSpec(head_dim=head_dim, rotary_dim=0, inv_freq=np.zeros(0), rope_type="none", **layout)
        params = entry
    rp = _resolve_flat(params, cfg, model_type)
    rope_type = rp["rope_type"]
    if "mrope_section" in rp or rope_type == "mrope":
        return declined(REASON_MROPE, rope_type=rope_type)
    if rp["rope_theta"] is None:
        return declined(REASON_THETA_MISSING, rope_type=rope_type)
    base = float(rp["rope_theta"])

    if model_type in _DEFAULT_ROTARY_DIM or _has(cfg, "rotary_dim"):
        # GPT-J / CodeGen give the rotated width directly; an explicit None means the whole head.
        rotary_dim_cfg = (
            _get(cfg, "rotary_dim") if _has(cfg, "rotary_dim") else _DEFAULT_ROTARY_DIM[model_type]
        )
        dim = head_dim if rotary_dim_cfg is None else min(int(rotary_dim_cfg), head_dim)
    else:
        dim = int(head_dim * float(rp.get("partial_rotary_factor", 1.0)))
    if rope_type == "proportional":
        dim = head_dim  # the encoding spans the head; the tail pairs get frequency 0

    if dim % 2:
        return declined(REASON_ODD_ROTARY_DIM, rope_type=rope_type)

    scale = 1.0
    if rope_type == "default":
        inv = _base_inv_freq(base, dim)
    elif rope_type == "linear":
        inv = _base_inv_freq(base, dim) / float(rp["factor"])
    elif rope_type == "llama3":
        inv = _llama3_inv_freq(base, dim, rp)
    elif rope_type == "yarn":
        inv, scale = _yarn(base, dim, rp, cfg)
    elif rope_type == "proportional":
        inv = _proportional(base, head_dim, rp)
    elif rope_type == "longrope":
        inv, scale = _longrope(base, dim, rp, cfg)
        return declined(REASON_NOT_SHIFT_INVARIANT, dim, inv, scale, rope_type)
    elif "dynamic" in rope_type:
        # Below max_position_embeddings dynamic NTK is the default rope; above it theta grows with the length.
        return declined(REASON_NOT_SHIFT_INVARIANT, dim, _base_inv_freq(base, dim), 1.0, rope_type)
    else:
        return declined(f"unknown_rope_type:{rope_type}", rope_type=rope_type)
    return RopeSpec(
        head_dim=head_dim,
        rotary_dim=dim,
        inv_freq=inv,
        attention_scaling=float(scale),
        rope_type=rope_type,
        **layout,
    )


def rope_specs_per_layer(config: Any, *, interleaved: bool | None = None) -> tuple[RopeSpec, ...]:
    """One :class:`RopeSpec` per layer index (``num_hidden_layers`` of them), honouring per-layer-type rope
    parameters and NoPE layers (``rotary_dim == 0``). Layers of the same type share one spec object."""
    cfg = config
    if _get(cfg, "num_attention_heads") is None and _get(cfg, "n_head") is None and _get(cfg, "text_config"):
        cfg = _get(cfg, "text_config")
    num_layers = _get(cfg, "num_hidden_layers", _get(cfg, "n_layer", _get(cfg, "num_layers")))
    if num_layers is None:
        raise ValueError("config has no num_hidden_layers")
    model_type = str(_get(cfg, "model_type", "") or "")
    base_spec = rope_spec_from_config(cfg, interleaved=interleaved)
    types, _ = _layer_types(cfg, model_type)
    params = _rope_parameters(cfg, model_type)
    by_type: dict[str, RopeSpec] = {}
    if _is_nested(params, cfg) and (base_spec.exact or base_spec.reason == REASON_PER_LAYER_ROPE):
        for t in params:
            by_type[t] = rope_spec_from_config(cfg, layer_type=t, interleaved=interleaved)
    nope = set(base_spec.nope_layers)
    specs: list[RopeSpec] = []
    for i in range(int(num_layers)):
        t = types[i] if types else "full_attention"
        spec = by_type.get(t, base_spec)
        if i in nope:
            spec = by_type.setdefault(
                "__nope__",
                RopeSpec(
                    head_dim=spec.head_dim,
                    rotary_dim=0,
                    inv_freq=np.zeros(0),
                    rope_type="none",
                    interleaved=spec.interleaved,
                    sliding_window_layers=spec.sliding_window_layers,
                    sliding_window=spec.sliding_window,
                    chunked_attention_layers=spec.chunked_attention_layers,
                    nope_layers=spec.nope_layers,
                ),
            )
        specs.append(spec)
    return tuple(specs)


# ------------------------------------------------------------------------------------------------------------
# Public: rotation (torch, imported lazily)
# ------------------------------------------------------------------------------------------------------------

_FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


def _check_keys(keys: Any, spec: RopeSpec, name: str) -> None:
    import torch

    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(keys).__name__}")
    dtype_name = str(keys.dtype).removeprefix("torch.")
    if dtype_name.startswith("float8"):
        raise ValueError(
            f"{name} has dtype {keys.dtype}: fp8 keys cannot be re-rotated in place without a scale; "
            "dequantize to bf16/fp16/fp32 first"
        )
    if dtype_name not in _FLOAT_DTYPE_NAMES:
        raise ValueError(f"{name} has dtype {keys.dtype}; allowed: float32, float16, bfloat16 (float64)")
    if keys.dim() != 3:
        raise ValueError(
            f"{name} must have shape [num_tokens, num_kv_heads, head_dim], got {tuple(keys.shape)}"
        )
    if keys.shape[-1] != spec.head_dim:
        raise ValueError(f"{name}.shape[-1]={keys.shape[-1]} does not match spec.head_dim={spec.head_dim}")
    if spec.inv_freq.size != spec.rotary_dim // 2 or (not spec.exact and spec.inv_freq.size == 0):
        raise ValueError(f"spec has no usable inv_freq ({spec.reason or 'missing'})")


def _positions_tensor(value: Any, num_tokens: int, device: Any, name: str) -> torch.Tensor:
    """An int or integer tensor (``[]`` or ``[num_tokens]``) as a float64 tensor ``[num_tokens or 1, 1]``."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {value.dtype}")
        if value.dim() == 0:
            return value.to(device=device, dtype=torch.float64).reshape(1, 1)
        if value.dim() != 1 or value.shape[0] != num_tokens:
            raise ValueError(
                f"{name} must be an int or a tensor of shape [num_tokens={num_tokens}], "
                f"got {tuple(value.shape)}"
            )
        return value.to(device=device, dtype=torch.float64).reshape(-1, 1)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int or an integer tensor, got {type(value).__name__}")
    return torch.tensor([[float(value)]], dtype=torch.float64, device=device)


def _rotate(
    x: torch.Tensor, angles: torch.Tensor, spec: RopeSpec, scale: float, out: torch.Tensor | None
) -> torch.Tensor:
    """Rotate the first ``spec.rotary_dim`` channels of ``x`` ``[N, H, D]`` by float64 ``angles``
    ``[N or 1, R/2]``, scaling cos/sin by ``scale``; writes into ``out`` (allocated when None)."""
    import torch

    half = spec.rotary_dim // 2
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    # cos/sin from float64 angles, the rotation in fp32: precision is lost in the angle, not the multiply.
    cos = (torch.cos(angles) * scale).to(compute_dtype).unsqueeze(1)  # [N or 1, 1, R/2]
    sin = (torch.sin(angles) * scale).to(compute_dtype).unsqueeze(1)
    rot = x[..., : spec.rotary_dim].to(compute_dtype)
    if spec.interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if spec.interleaved:
        rotated = torch.stack((y1, y2), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((y1, y2), dim=-1)
    if out is None:
        out = torch.empty_like(x)
        out[..., spec.rotary_dim :] = x[..., spec.rotary_dim :]
    elif out.data_ptr() != x.data_ptr():
        out[..., spec.rotary_dim :].copy_(x[..., spec.rotary_dim :])
    out[..., : spec.rotary_dim].copy_(rotated)  # copy_ casts back to the output dtype
    return out


def _check_out(out: Any, keys: torch.Tensor) -> None:
    import torch

    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != keys.shape or out.dtype != keys.dtype or out.device != keys.device:
        raise ValueError(
            f"out must match keys in shape, dtype and device: "
            f"got {tuple(out.shape)} {out.dtype} {out.device}, "
            f"keys are {tuple(keys.shape)} {keys.dtype} {keys.device}"
        )


def rerotate_keys(
    keys: torch.Tensor,
    delta: int | torch.Tensor,
    spec: RopeSpec,
    *,
    out: torch.Tensor | None = None,
    allow_inexact: bool = False,
) -> torch.Tensor:
    """Move cached keys by ``delta`` positions: keys rotated at ``p`` -> keys rotated at ``p + delta``.

    * ``keys``: ``[num_tokens, num_kv_heads, head_dim]``, float32/float16/bfloat16 (fp8 raises ``ValueError``:
      dequantize first), any device. Not modified unless it is ``out``.
    * ``delta``: an int for all tokens, or an integer tensor ``[num_tokens]`` (one shift per token).
    * ``out``: optional tensor like ``keys`` to write into (may be ``keys`` itself for an in-place update).
    * ``allow_inexact``: re-rotate even when ``spec.exact`` is False (the result is then *not* the model's
      key).

    Returns keys of the input dtype and shape. The attention scaling is not applied again (it is already in
    the cached keys). Channels past ``spec.rotary_dim`` are copied unchanged. Pure apart from ``out``.
    """
    import torch

    if not spec.exact and not allow_inexact:
        raise ValueError(
            f"re-rotation is not exact for this model ({spec.reason}); the caller should decline"
        )
    _check_keys(keys, spec, "keys")
    if out is not None:
        _check_out(out, keys)
    if keys.shape[0] == 0 or spec.rotary_dim == 0:
        if out is None:
            return keys.clone()
        if out.data_ptr() != keys.data_ptr():
            out.copy_(keys)
        return out
    d = _positions_tensor(delta, keys.shape[0], keys.device, "delta")
    inv = torch.tensor(spec.inv_freq, dtype=torch.float64, device=keys.device)
    return _rotate(keys, d * inv, spec, 1.0, out)


def rerotate_keys_(
    keys: torch.Tensor, delta: int | torch.Tensor, spec: RopeSpec, *, allow_inexact: bool = False
) -> torch.Tensor:
    """In-place :func:`rerotate_keys` (``out=keys``); returns ``keys``."""
    return rerotate_keys(keys, delta, spec, out=keys, allow_inexact=allow_inexact)


def apply_rope(x: torch.Tensor, positions: int | torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Rotate raw keys at absolute positions as the model does: ``s * R(p) x`` on the rotary channels.

    * ``x``: ``[num_tokens, num_kv_heads, head_dim]`` un-rotated keys (float32/float16/bfloat16).
    * ``positions``: an int for all tokens or an integer tensor ``[num_tokens]``.

    ``s = spec.attention_scaling`` multiplies the rotated channels only, as transformers scales cos and sin.
    Works for any spec whose ``inv_freq`` is present (also ``exact=False`` ones: the rotation at one
    position is well defined; only moving keys between positions is not). Returns a new tensor of ``x``'s
    dtype.
    """
    import torch

    _check_keys(x, spec, "x")
    if x.shape[0] == 0 or spec.rotary_dim == 0:
        return x.clone()
    p = _positions_tensor(positions, x.shape[0], x.device, "positions")
    inv = torch.tensor(spec.inv_freq, dtype=torch.float64, device=x.device)
    return _rotate(x, p * inv, spec, float(spec.attention_scaling), None)
