"""Hugging Face Llama-family decoders as clients of the shared blended-prefill executor.

Lifecycle for one model (:class:`~semblend.integration.transformers.engine.SemBlendEngine` drives it):

1. :func:`model_support` once per model: the family must be on ``semblend_core.model_support``'s allowlist
   (Llama, Mistral, Qwen2, Qwen3: every per-layer operation the view below maps), with full attention in every
   layer and RoPE whose re-rotation is exact, and its modules exactly that family's transformers classes.
   Anything else returns a decline reason. The engine then runs a start-up self-check on the real weights.
2. :class:`TransformersModelView` once per model (the engine caches it): the model's modules mapped onto
   ``semblend_core.blended_prefill.BlendModelView``, with host-cheap fast paths (one ``rms_norm`` call per norm, one
   GEMM per projection, the residual adds in the GEMM epilogues).
3. Per hit, ``semblend_core.blended_prefill``: :func:`assemble_kv` (donor KV re-rotated into place) and
   :func:`~semblend_core.blended_prefill.run_blended_prefill` (the layer loop; its module docstring says which
   tokens it recomputes). :func:`blend_prefill` is that call for a bare model.

``BlendStats``, ``assemble_kv`` and ``_nested_counts`` are re-exported from the core for existing imports.
"""

from __future__ import annotations

import sys
from typing import Any

from semblend_core.blended_prefill import (
    BlendModelView,
    BlendStats,
    _nested_counts,  # noqa: F401  (re-exported for tests/integration/transformers/test_blend_budget.py)
    assemble_kv,
    run_blended_prefill,
)
from semblend_core.plan import SemanticKvPlan

__all__ = ["BlendStats", "TransformersModelView", "assemble_kv", "blend_prefill", "model_support"]


def model_support(model: Any) -> tuple[bool, str, Any]:
    """``(supported, reason, rope_spec)`` for a transformers causal LM, from its config and modules. Pure; call
    once per model (the engine adds the start-up self-check on top, see ``SemBlendEngine``).

    First :func:`semblend_core.model_support.check_model_config` (the family allowlist, foreign knobs, RoPE and
    attention layout: its reasons), then the modules: the model, its decoder, every decoder layer, attention, MLP
    and norm must be exactly the allowed family's transformers classes (a subclass or a custom model registered
    under a known ``model_type`` may compute something else), declining with
    ``unsupported_layer_structure:<what>``.
    """
    from semblend_core.model_support import SUPPORTED_MODEL_TYPES, check_model_config

    support = check_model_config(model.config)
    spec = support.rope_spec
    if not support.supported:
        return False, support.reason, spec
    family = SUPPORTED_MODEL_TYPES[support.model_type]
    module = f"transformers.models.{support.model_type}.modeling_{support.model_type}"

    def exact(obj: Any, cls: str) -> bool:
        return type(obj).__name__ == cls and type(obj).__module__ == module

    if not exact(model, f"{family}ForCausalLM"):
        return False, f"unsupported_layer_structure:model_class:{type(model).__name__}", spec
    try:
        decoder = model.get_decoder()
    except Exception:
        return False, "unsupported_layer_structure:no_decoder", spec
    if not exact(decoder, f"{family}Model"):
        return False, f"unsupported_layer_structure:decoder_class:{type(decoder).__name__}", spec
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(decoder, name):
            return False, f"unsupported_layer_structure:no_{name}", spec
    if not exact(decoder.norm, f"{family}RMSNorm"):
        return False, f"unsupported_layer_structure:norm_class:{type(decoder.norm).__name__}", spec
    for i, layer in enumerate(decoder.layers):
        if not exact(layer, f"{family}DecoderLayer"):
            return False, f"unsupported_layer_structure:layer{i}:{type(layer).__name__}", spec
        for name, cls in (("input_layernorm", "RMSNorm"), ("self_attn", "Attention"),
                          ("post_attention_layernorm", "RMSNorm"), ("mlp", "MLP")):
            if not exact(getattr(layer, name, None), family + cls):
                return False, f"unsupported_layer_structure:layer{i}.{name}", spec
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"):
            if not hasattr(attn, name):
                return False, f"unsupported_layer_structure:layer{i}.self_attn.{name}", spec
        if _rotary_fn(attn) is None:
            return False, f"unsupported_layer_structure:layer{i}.apply_rotary_pos_emb", spec
    if spec.head_dim != decoder.layers[0].self_attn.head_dim:
        return False, "unsupported_layer_structure:head_dim_mismatch", spec
    return True, "", spec


def _rotary_fn(attn: Any) -> Any:
    """The model's own ``apply_rotary_pos_emb`` (from the module that defines its attention class)."""
    module = sys.modules.get(type(attn).__module__)
    return getattr(module, "apply_rotary_pos_emb", None)


# RMSNorm classes whose forward is exactly ``weight * normalize(x)`` (no offset, no bias): the loop replaces their
# seven-kernel eager forward by torch's one-call ``rms_norm`` (same math, fp32 accumulation). On a serving host
# the blended prefill of a 7B model is CPU-launch-bound (benchmarks/results/ttft_h100.json), so kernel count is
# latency. Anything else (Gemma's ``1 + weight``, unknown classes) keeps its own forward.
_PLAIN_RMSNORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"})


def _fast_norm(module: Any) -> Any:
    import torch

    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if type(module).__name__ not in _PLAIN_RMSNORMS or weight is None or eps is None \
            or getattr(module, "bias", None) is not None:
        return module
    shape = (int(weight.shape[-1]),)

    def norm(x: Any) -> Any:
        return torch.nn.functional.rms_norm(x, shape, weight, eps)

    return norm


_GATED_MLPS = frozenset({"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP"})
_SILU_CLASSES = frozenset({"SiLU", "SiLUActivation"})


def _plain_linear(module: Any) -> bool:
    import torch

    return type(module) is torch.nn.Linear


def _proj(module: Any) -> Any:
    """``x [n, in] -> module(x)``: one ``mm``/``addmm`` on the pre-transposed weight view (no module-call or
    ``linear -> matmul`` dispatch layers, which cost more host time than the GEMM itself for ~100 tokens)."""
    import torch

    if not _plain_linear(module):
        return module
    wt, bias = module.weight.t(), module.bias
    if bias is None:
        return lambda x: torch.mm(x, wt)
    return lambda x: torch.addmm(bias, x, wt)


def _proj_residual(module: Any) -> Any:
    """``(x, residual) -> residual + module(x)`` as one GEMM with the residual in its epilogue when bias-free."""
    import torch

    if _plain_linear(module) and module.bias is None:
        wt = module.weight.t()
        return lambda x, residual: torch.addmm(residual, x, wt)
    return lambda x, residual: residual + module(x)


def _mlp_residual(mlp: Any) -> Any:
    """``(x, residual) -> residual + mlp(x)``; for the gated SiLU MLPs of these families, five kernels:
    gate GEMM, up GEMM, in-place SiLU, in-place multiply, down GEMM with the residual add in its epilogue."""
    import torch

    projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(mlp, "act_fn", None)
    if type(mlp).__name__ not in _GATED_MLPS or type(act).__name__ not in _SILU_CLASSES \
            or not all(_plain_linear(m) and m.bias is None for m in projections):
        return lambda x, residual: residual + mlp(x)
    wg, wu, wd = (m.weight.t() for m in projections)

    def run(x: Any, residual: Any) -> Any:
        gate = torch.nn.functional.silu(torch.mm(x, wg), inplace=True)
        gate.mul_(torch.mm(x, wu))
        return torch.addmm(residual, gate, wd)

    return run


class TransformersModelView(BlendModelView):
    """A transformers ``*ForCausalLM`` of an allowlisted family as a ``BlendModelView``.

    Build it only for a model :func:`model_support` accepts. Construction walks the layers once and binds their
    weights (pre-transposed views, no copies): cheap, but build it once per model and reuse it (the engine does).
    It reads the parameters as they are at construction: rebuild after moving or re-casting the model.
    """

    def __init__(self, model: Any) -> None:
        import torch

        decoder = model.get_decoder()
        layers = decoder.layers
        attn0 = layers[0].self_attn
        self.num_layers = len(layers)
        self.head_dim = int(attn0.head_dim)
        self.num_kv_heads = int(attn0.k_proj.out_features) // self.head_dim
        self._embed = decoder.embed_tokens
        self._rotary = decoder.rotary_emb
        self._norm = decoder.norm
        self._lm_head = model.get_output_embeddings()
        param = next(model.parameters())
        # rotary_emb(x, position_ids) reads only x's dtype and device.
        self._like = torch.empty(0, dtype=param.dtype, device=param.device)
        self._qkv = []
        self._finish = []
        self._scale = []
        for layer in layers:
            attn = layer.self_attn
            # Qwen3-style per-head norms before RoPE; None elsewhere.
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            self._qkv.append((_fast_norm(layer.input_layernorm), _proj(attn.q_proj), _proj(attn.k_proj),
                              _proj(attn.v_proj), q_norm, k_norm, int(attn.head_dim)))
            self._finish.append((_proj_residual(attn.o_proj), _fast_norm(layer.post_attention_layernorm),
                                 _mlp_residual(layer.mlp)))
            self._scale.append(float(attn.scaling))

    def embed(self, token_ids: Any) -> Any:
        return self._embed(token_ids)

    def rotary(self, positions: Any) -> tuple[Any, Any]:
        cos, sin = self._rotary(self._like, positions[None])  # [1, n, D] in the model's dtype
        return cos[0], sin[0]

    def qkv(self, layer: int, hidden: Any) -> tuple[Any, Any, Any]:
        in_norm, q_proj, k_proj, v_proj, q_norm, k_norm, head_dim = self._qkv[layer]
        x = in_norm(hidden)
        n = x.shape[0]
        q = q_proj(x).view(n, -1, head_dim)
        k = k_proj(x).view(n, -1, head_dim)
        v = v_proj(x).view(n, -1, head_dim)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        return q, k, v

    def attention_scale(self, layer: int) -> float:
        return self._scale[layer]

    def finish_layer(self, layer: int, attn_out: Any, residual: Any) -> Any:
        o_res, post_norm, mlp_res = self._finish[layer]
        hidden = o_res(attn_out, residual)
        return mlp_res(post_norm(hidden), hidden)

    def logits(self, hidden: Any) -> Any:
        return self._lm_head(self._norm(hidden)).float()


def blend_prefill(model: Any, input_ids: Any, k: Any, v: Any, plan: SemanticKvPlan, *, reuse_len: int,
                  check_layer: int | None = 1, selection: Any = None) -> tuple[BlendStats, Any]:
    """:func:`~semblend_core.blended_prefill.run_blended_prefill` (``logits=True``) on a fresh
    :class:`TransformersModelView` of ``model``; callers that run many hits should build the view once."""
    return run_blended_prefill(TransformersModelView(model), input_ids, k, v, plan, reuse_len=reuse_len,
                               check_layer=check_layer, selection=selection)
