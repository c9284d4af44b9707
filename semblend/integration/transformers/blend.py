"""Blended prefill for Hugging Face Llama-family decoders: donor KV in, fresh KV for a few tokens, cache out.

Lifecycle for one hit (:class:`~semblend.integration.transformers.engine.SemBlendEngine` drives it):

1. :func:`model_support` once per model: the decoder must be Llama-shaped (``input_layernorm``, ``self_attn`` with
   ``q/k/v/o_proj`` and optional ``q_norm``/``k_norm``, ``post_attention_layernorm``, ``mlp``), with full attention
   in every layer and RoPE whose re-rotation is exact. Anything else returns a decline reason.
2. :func:`assemble_kv`: per layer, the target's KV ``[prefix_len, num_kv_heads, head_dim]`` built from donor KV:
   every span's keys re-rotated by its ``delta`` (``semblend_core.rope_correction.rerotate_keys``), values copied;
   uncovered rows stay zero until recomputed.
3. :func:`recompute_layers`: the custom layer loop. Each layer computes fresh Q/K/V only for its *active* positions
   (RoPE at their absolute positions with the model's own rotary code), writes the fresh K/V into the assembled
   cache, runs partial attention of those queries over the whole cache (``semblend_core.partial_attention``),
   then ``o_proj``, residual, ``post_attention_layernorm``, MLP, residual.

Which positions are active (CacheBlend-style, with EPIC's seam heads):

* mandatory at every layer: ``plan.recompute_ranges`` inside the prefix (uncovered tokens, seam heads, fuzzy
  regions). The suffix after the last reused token is not part of this loop: the engine runs it through the
  model's own forward on the assembled cache.
* when the budget allows extra tokens, every layer up to ``check_layer`` runs on *all* prefix tokens; at
  ``check_layer`` the fresh K/V of the reused tokens are compared with the reused K/V
  (``semblend_core.recompute.deviation_scores``) and the most deviating ones stay active.
* per-layer counts follow the plan's bathtub policy ``plan.layer_recompute`` (fraction of the reused tokens that
  sit in seamed spans), but a token can only be fresh at layer ``l`` if its hidden state was fresh at every layer
  below: the active sets must be nested. So the count at layer ``l`` is the running *minimum* of the policy up to
  ``l``: early layers get the policy's high counts, later layers never exceed it. The late-layer rise of a bathtub
  cannot be honoured by hidden-state propagation and is deliberately not approximated.

Everything runs under ``torch.no_grad()`` in the model's dtype; CPU and CUDA alike.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from semblend_core.plan import SemanticKvPlan

logger = logging.getLogger(__name__)

__all__ = ["BlendStats", "assemble_kv", "model_support", "recompute_layers"]

# Decoder families whose layers follow the Llama layout this loop reimplements (checked structurally as well).
_MLA_MARKERS = ("kv_lora_rank", "q_lora_rank")


def model_support(model: Any) -> tuple[bool, str, Any]:
    """``(supported, reason, rope_spec)`` for a transformers causal LM. Pure; call once per model.

    Declines (reason strings are stable): ``mla_latent_kv`` (DeepSeek-style latent KV), ``sliding_window_layers``,
    ``chunked_attention_layers``, ``nope_layers``, the RoPE spec's own reason when re-rotation is not exact
    (``rope_not_shift_invariant``...), ``unsupported_layer_structure:<what>``.
    """
    from semblend_core.rope_correction import rope_spec_from_config

    config = model.config
    if any(getattr(config, m, None) for m in _MLA_MARKERS):
        return False, "mla_latent_kv", None
    try:
        spec = rope_spec_from_config(config)
    except Exception as exc:  # unreadable config: decline rather than guess
        return False, f"rope_config_unreadable:{type(exc).__name__}", None
    if not spec.exact:
        return False, spec.reason or "rope_not_shift_invariant", spec
    if spec.sliding_window_layers:
        return False, "sliding_window_layers", spec
    if spec.chunked_attention_layers:
        return False, "chunked_attention_layers", spec
    if spec.nope_layers:
        return False, "nope_layers", spec
    try:
        decoder = model.get_decoder()
    except Exception:
        return False, "unsupported_layer_structure:no_decoder", spec
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(decoder, name):
            return False, f"unsupported_layer_structure:no_{name}", spec
    for i, layer in enumerate(decoder.layers):
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, name):
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


@dataclass(frozen=True)
class BlendStats:
    """What the layer loop did.

    * ``active_per_layer``: number of prefix positions computed fresh at each layer.
    * ``checked``: whether the deviation check ran (all prefix tokens through layers ``0..check_layer``).
    * ``mandatory``: prefix positions fresh at every layer (plan's recompute ranges inside the prefix).
    """

    prefix_len: int
    active_per_layer: tuple[int, ...]
    checked: bool
    mandatory: int

    @property
    def token_layers(self) -> int:
        return sum(self.active_per_layer)


def assemble_kv(plan: SemanticKvPlan, donor_k: Any, donor_v: Any, prefix_len: int, spec: Any, *,
                rope_correction: bool = True, device: Any = None) -> tuple[Any, Any]:
    """Target KV for positions ``[0, prefix_len)`` from the donor's KV.

    Args:
        donor_k, donor_v: ``[num_layers, donor_len, num_kv_heads, head_dim]`` (keys rotated at donor positions),
            on any device; copied to ``device`` (default: the donor's).
        rope_correction: re-rotate moved keys by each span's delta. False exists only for the ablation that shows
            why it is needed.

    Returns ``(k, v)``, each ``[num_layers, prefix_len, num_kv_heads, head_dim]`` in the donor's dtype; rows no span
    covers are zero. One re-rotation per span covering all layers (layers folded into the head axis).
    """
    import torch

    from semblend_core.rope_correction import rerotate_keys

    device = donor_k.device if device is None else torch.device(device)
    num_layers, _, kv_heads, head_dim = donor_k.shape
    if donor_k.device != device:
        # One contiguous host->device copy per tensor (full pinned-memory bandwidth); slicing tokens first would
        # make strided views that torch stages through pageable memory.
        donor_k = donor_k.to(device, non_blocking=True)
        donor_v = donor_v.to(device, non_blocking=True)
    k = torch.zeros((num_layers, prefix_len, kv_heads, head_dim), dtype=donor_k.dtype, device=device)
    v = torch.zeros_like(k)
    for span in plan.spans:
        t0, t1 = span.target_start, min(span.target_end, prefix_len)
        if t1 <= t0:
            continue
        d0, d1 = span.donor_start, span.donor_start + (t1 - t0)
        src_k = donor_k[:, d0:d1]
        v[:, t0:t1] = donor_v[:, d0:d1]
        if span.delta != 0 and rope_correction:
            # [L, T, H, D] -> [T, L*H, D]: one call moves every layer's keys of this span.
            flat = src_k.permute(1, 0, 2, 3).reshape(t1 - t0, num_layers * kv_heads, head_dim)
            flat = rerotate_keys(flat, span.delta, spec)
            src_k = flat.reshape(t1 - t0, num_layers, kv_heads, head_dim).permute(1, 0, 2, 3)
        k[:, t0:t1] = src_k
    return k, v


def _nested_counts(plan: SemanticKvPlan, num_layers: int, candidates: int, check_layer: int) -> list[int]:
    """Extra (budgeted) active tokens per layer: bathtub fractions of ``candidates``, made non-increasing."""
    from semblend_core.recompute import layer_budget

    counts = []
    for layer in range(num_layers):
        frac = layer_budget(plan.layer_recompute, layer, default=plan.recompute_budget) \
            if len(plan.layer_recompute) in (0, num_layers) else plan.recompute_budget
        counts.append(int(math.floor(frac * candidates + 1e-9)))
    running = candidates
    out = []
    for layer, c in enumerate(counts):
        if layer <= check_layer:
            out.append(candidates)  # all tokens are computed up to the check layer anyway
            continue
        running = min(running, c)
        out.append(running)
    return out


def recompute_layers(model: Any, input_ids: Any, k: Any, v: Any, plan: SemanticKvPlan, *,
                     check_layer: int | None = 1) -> BlendStats:
    """Refresh the assembled cache in place for the plan's prefix ``[0, prefix_len)``, layer by layer.

    Args:
        input_ids: LongTensor ``[prefix_len]`` of target token ids for the prefix.
        k, v: ``[num_layers, prefix_len, num_kv_heads, head_dim]`` from :func:`assemble_kv` (modified in place).
        check_layer: layer whose fresh-vs-reused K/V deviation picks the budgeted tokens; ``None`` disables the
            check (only the plan's mandatory positions are recomputed).

    Returns :class:`BlendStats`. Nothing is computed when no prefix position needs fresh KV.
    """
    import torch

    from semblend_core.partial_attention import partial_attention
    from semblend_core.recompute import deviation_scores

    decoder = model.get_decoder()
    layers = decoder.layers
    num_layers = len(layers)
    prefix_len = int(input_ids.shape[0])
    device = k.device

    mandatory_mask = np.zeros(prefix_len, dtype=bool)
    for a, b in plan.recompute_ranges:
        mandatory_mask[max(0, a):min(prefix_len, b)] = True
    covered = np.zeros(prefix_len, dtype=bool)
    seamed = np.zeros(prefix_len, dtype=bool)
    for s in plan.spans:
        a, b = s.target_start, min(s.target_end, prefix_len)
        if b > a:
            covered[a:b] = True
            if not s.context_exact:
                seamed[a:b] = True
    mandatory_mask |= ~covered
    candidates_mask = seamed & ~mandatory_mask  # reused tokens whose KV saw another context
    n_candidates = int(candidates_mask.sum())

    check = check_layer is not None and n_candidates > 0
    if check:
        check_layer = max(0, min(int(check_layer), num_layers - 1))
        counts = _nested_counts(plan, num_layers, n_candidates, check_layer)
        check = counts[check_layer + 1] > 0 if check_layer + 1 < num_layers else False
    if not check:
        counts = [0] * num_layers
        check_layer = -1

    mandatory = np.flatnonzero(mandatory_mask)
    if not check and mandatory.size == 0:
        return BlendStats(prefix_len, tuple([0] * num_layers), False, 0)

    active = np.arange(prefix_len, dtype=np.int64) if check else mandatory
    ids = input_ids.to(device)
    hidden = decoder.embed_tokens(ids[torch.as_tensor(active, device=device)])[None]  # [1, n, hidden]
    active_counts: list[int] = []
    full_prefix = check  # active == every prefix position (full causal attention is cheaper through SDPA)

    for layer_idx, layer in enumerate(layers):
        pos_t = torch.as_tensor(active, device=device, dtype=torch.long)
        attn = layer.self_attn
        head_dim = attn.head_dim
        x = layer.input_layernorm(hidden)
        n = x.shape[1]
        q = attn.q_proj(x).view(1, n, -1, head_dim)
        kk = attn.k_proj(x).view(1, n, -1, head_dim)
        vv = attn.v_proj(x).view(1, n, -1, head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms before RoPE
            q, kk = attn.q_norm(q), attn.k_norm(kk)
        q, kk, vv = q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2)  # [1, heads, n, D]
        cos, sin = decoder.rotary_emb(vv, pos_t[None])
        q, kk = _rotary_fn(attn)(q, kk, cos, sin)
        fresh_k = kk[0].transpose(0, 1)  # [n, kv_heads, D]
        fresh_v = vv[0].transpose(0, 1)

        if layer_idx == check_layer:
            # CacheBlend: tokens whose fresh K/V differ most from the reused K/V carry the cross-context error.
            # At the check layer every prefix position is active, so row index == position.
            cand = np.flatnonzero(candidates_mask)
            cand_t = torch.as_tensor(cand, device=device)
            score = deviation_scores(fresh_k[cand_t], k[layer_idx, cand_t], fresh_v[cand_t], v[layer_idx, cand_t])
            order = torch.argsort(score.float(), descending=True, stable=True).cpu().numpy()
            ranked = cand[order]
        k[layer_idx, pos_t] = fresh_k.to(k.dtype)
        v[layer_idx, pos_t] = fresh_v.to(v.dtype)
        active_counts.append(int(active.size))
        if layer_idx == num_layers - 1:
            break  # the last layer's attention/MLP outputs feed nothing: only its K/V matter

        # A token's attention and MLP at this layer are needed only if it is still active at the next layer.
        next_active = active
        if check and layer_idx >= check_layer:
            next_active = np.union1d(mandatory, ranked[:counts[layer_idx + 1]])
        if next_active.size == 0:
            break  # deeper layers keep the reused KV everywhere
        if next_active.size != active.size:
            rows = torch.as_tensor(np.searchsorted(active, next_active), device=device)
            q, hidden = q[:, :, rows], hidden[:, rows]
            pos_t = torch.as_tensor(next_active, device=device, dtype=torch.long)
            full_prefix = False
        if full_prefix:
            # Every prefix token is a query: plain causal SDPA (flash attention on CUDA). K/V are expanded to the
            # query heads explicitly because not every SDPA backend takes grouped KV.
            group = q.shape[1] // k.shape[2]
            kx = k[layer_idx].repeat_interleave(group, dim=1) if group > 1 else k[layer_idx]
            vx = v[layer_idx].repeat_interleave(group, dim=1) if group > 1 else v[layer_idx]
            out = torch.nn.functional.scaled_dot_product_attention(
                q, kx.transpose(0, 1)[None], vx.transpose(0, 1)[None], is_causal=True, scale=attn.scaling,
            )[0].transpose(0, 1)
        else:
            out = partial_attention(q[0].transpose(0, 1).contiguous(), k[layer_idx], v[layer_idx], pos_t,
                                    scale=attn.scaling, check_positions=False)
        hidden = hidden + attn.o_proj(out.reshape(1, out.shape[0], -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        active = next_active
    active_counts += [0] * (num_layers - len(active_counts))
    return BlendStats(prefix_len, tuple(active_counts), check, int(mandatory.size))
