"""Blended prefill for Hugging Face Llama-family decoders: donor KV in, fresh KV for a few tokens, cache out.

Lifecycle for one hit (:class:`~semblend.integration.transformers.engine.SemBlendEngine` drives it):

1. :func:`model_support` once per model: the family must be on ``semblend_core.model_support``'s allowlist
   (Llama, Mistral, Qwen2, Qwen3: every per-layer operation implemented below), with full attention in every
   layer and RoPE whose re-rotation is exact, and its modules exactly that family's transformers classes.
   Anything else returns a decline reason. The engine then runs a start-up self-check on the real weights.
2. :func:`assemble_kv`: per layer, the target's KV ``[n, num_kv_heads, head_dim]`` (stored in the cache's own
   layout) built from donor KV: every span's keys re-rotated by its ``delta`` and values copied, all spans and
   layers of one donor in one ``semblend_core.triton_kernels.rerotate_scatter`` call (a multi-donor plan makes
   one call per donor, each reading its own KV entry); other rows stay zero until computed.
3. :func:`blend_prefill`: the custom layer loop. Each layer computes fresh Q/K/V only for its *active* positions
   (RoPE at their absolute positions with the model's own rotary code), writes the fresh K/V into the assembled
   cache, runs partial attention of those queries over the whole cache (``semblend_core.partial_attention``),
   then ``o_proj``, residual, ``post_attention_layernorm``, MLP, residual; after the last layer the final norm
   and LM head on the last token give the logits.

Which positions are active (CacheBlend-style, with EPIC's seam heads):

* mandatory at every layer: ``plan.recompute_ranges`` inside the prefix (uncovered tokens, seam heads, fuzzy
  regions) and the whole suffix after the last reused token, which is computed exactly as a cold prefill would.
* when the budget allows extra tokens, every layer up to ``check_layer`` runs on *all* prefix tokens; at
  ``check_layer`` the fresh K/V of the reused tokens are compared with the reused K/V
  (``semblend_core.recompute.deviation_scores``) and the most deviating ones stay active.
* or, with a ``selection`` strategy (``semblend_core.recompute.SelectionStrategy``), no check layer: the strategy
  ranks the reused tokens (``query``: by the attention the last prompt tokens pay them in a short probe pass of the
  mandatory tokens over the reused KV) and ``select_depths`` spends ``plan.recompute_budget`` token-layers on them.
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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from semblend_core.plan import SemanticKvPlan

logger = logging.getLogger(__name__)

__all__ = ["BlendStats", "assemble_kv", "blend_prefill", "model_support"]

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
    probe_token_layers: int = 0  # rows x layers of a selection probe pass (query-aware selection), all counted

    @property
    def token_layers(self) -> int:
        return sum(self.active_per_layer) + self.probe_token_layers


def assemble_kv(plan: SemanticKvPlan, donor_kv: Any, prefix_len: int, spec: Any, *, rope_correction: bool = True,
                total_len: int | None = None) -> tuple[Any, Any]:
    """Target KV for positions ``[0, total_len)`` with rows ``[0, prefix_len)`` filled from the donors' KV.

    Args:
        donor_kv: the donor's stacked KV ``[num_layers, 2, donor_len, num_kv_heads, head_dim]`` (keys rotated at
            donor positions; the ``KvTensorStore`` entry layout) on the device the result should live on, or, for
            a multi-donor plan, a mapping ``donor_id -> `` such a tensor with an entry for every donor in
            ``plan.donor_ids`` (a bare tensor serves every span of the plan). Each donor's spans of every layer are
            gathered, re-rotated by their own ``delta`` and scattered by one
            ``semblend_core.triton_kernels.rerotate_scatter`` call (one Triton launch per donor on CUDA, its torch
            twin elsewhere) straight from that donor's entry: nothing is stacked or copied first.
        prefix_len: spans are used only below this position.
        total_len: rows to allocate (default ``prefix_len``); rows past ``prefix_len`` are zero, for the layer loop
            to fill.
        rope_correction: re-rotate moved keys by each span's delta. False exists only for the ablation that shows
            why it is needed.

    Returns ``(k, v)``, each a ``[num_layers, total_len, num_kv_heads, head_dim]`` view in the donors' dtype whose
    storage is in the Hugging Face cache layout ``[num_layers, num_kv_heads, total_len, head_dim]``
    (``k.transpose(1, 2)`` is contiguous), so the cache is built without a copy. Rows no span covers are zero.
    """
    import torch

    from semblend_core.kv_layout import HF_CONTIGUOUS, KvCacheView
    from semblend_core.triton_kernels import rerotate_scatter

    total_len = prefix_len if total_len is None else int(total_len)
    if total_len < prefix_len:
        raise ValueError(f"total_len={total_len} < prefix_len={prefix_len}")
    entries = donor_kv if isinstance(donor_kv, Mapping) else None
    if entries is not None and not entries:
        raise ValueError("assemble_kv needs at least one donor KV entry")
    first = next(iter(entries.values())) if entries is not None else donor_kv
    num_layers, _, _, kv_heads, head_dim = first.shape
    device = first.device
    k_store = torch.zeros((num_layers, kv_heads, total_len, head_dim), dtype=first.dtype, device=device)
    v_store = torch.zeros_like(k_store)
    # Slots per donor entry, in the plan's donor order (a bare tensor is one entry for every span).
    groups: dict[Any, tuple[list, list, list]] = {}
    for span in plan.spans:
        t0, t1 = span.target_start, min(span.target_end, prefix_len)
        if t1 <= t0:
            continue
        key = plan.donor_of(span) if entries is not None else None
        src_slots, dst_slots, deltas = groups.setdefault(key, ([], [], []))
        dst_slots.append(np.arange(t0, t1, dtype=np.int64))
        src_slots.append(np.arange(span.donor_start, span.donor_start + (t1 - t0), dtype=np.int64))
        deltas.append(np.full(t1 - t0, span.delta if rope_correction else 0, dtype=np.int64))
    if groups:
        # HF layout per layer: [batch=1, kv_heads, tokens, head_dim]; slot == token position.
        dst = KvCacheView.from_separate(HF_CONTIGUOUS, [k_store[i][None] for i in range(num_layers)],
                                        [v_store[i][None] for i in range(num_layers)])
    for key, (src_slots, dst_slots, deltas) in groups.items():
        entry = donor_kv if entries is None else entries.get(key)
        if entry is None:
            raise KeyError(f"no KV entry given for donor {key!r} of the plan")
        if tuple(entry.shape[:2]) != (num_layers, 2) or tuple(entry.shape[3:]) != (kv_heads, head_dim) \
                or entry.dtype != first.dtype or entry.device != device:
            raise ValueError(f"donor {key!r} KV {tuple(entry.shape)} {entry.dtype} on {entry.device} does not "
                             f"match {tuple(first.shape)} {first.dtype} on {device}")
        delta = np.concatenate(deltas)
        rerotate_scatter(KvCacheView.from_donor_store(entry), dst,
                         torch.as_tensor(np.concatenate(src_slots), device=device),
                         torch.as_tensor(np.concatenate(dst_slots), device=device),
                         torch.as_tensor(delta, device=device) if delta.any() else 0, spec,
                         validate_indices=False)
    return k_store.transpose(1, 2), v_store.transpose(1, 2)


def _nested_counts(plan: SemanticKvPlan, num_layers: int, candidates: int, check_layer: int) -> list[int]:
    """Budgeted active tokens per layer (of ``candidates`` seamed reused tokens); the budget means what it says.

    Layers ``0..check_layer`` compute every token (the deviation check). After it, active sets must be nested (a
    token is fresh at layer ``l`` only if it was fresh below), so the shape is the running minimum of the layer
    policy ``plan.layer_recompute`` (flat when it is empty): the bathtub's early part survives, its late rise
    cannot. That shape is then scaled so that the mean over the layers after the check layer of
    ``count / candidates`` equals ``plan.recompute_budget`` (to the token; less only where the shape saturates at
    every token or is zero). Taking the running minimum alone used to spend 3.2% / 9.6% per layer for "5% / 15%".
    """
    from semblend_core.recompute import layer_budget

    budget = float(plan.recompute_budget)
    post = list(range(check_layer + 1, num_layers))
    out = [candidates] * (check_layer + 1)
    if not post or candidates <= 0 or budget <= 0.0:
        return out + [0] * len(post)
    use_policy = len(plan.layer_recompute) == num_layers
    shape, running = [], math.inf
    for layer in post:
        frac = layer_budget(plan.layer_recompute, layer, default=budget) if use_policy else budget
        running = min(running, max(0.0, float(frac)))
        shape.append(running)
    if shape[0] <= 0.0:
        return out + [0] * len(post)
    target = min(budget, 1.0) * candidates * len(post)  # token-layers to spend after the check
    lo, hi = 0.0, 1.0 / min(g for g in shape if g > 0.0)
    for _ in range(64):  # sum(min(1, s * g)) is continuous and non-decreasing in s
        mid = 0.5 * (lo + hi)
        if sum(min(1.0, mid * g) for g in shape) * candidates < target:
            lo = mid
        else:
            hi = mid
    counts = [int(math.floor(min(1.0, hi * g) * candidates + 1e-9)) for g in shape]
    # Floors lose < 1 token per layer: hand the remainder to the first layers below saturation (still nested).
    remainder = int(round(target)) - sum(counts)
    for i, c in enumerate(counts):
        if remainder <= 0:
            break
        if c < candidates and shape[i] > 0.0:
            counts[i] += 1
            remainder -= 1
    return out + counts


# RMSNorm classes whose forward is exactly ``weight * normalize(x)`` (no offset, no bias): the loop replaces their
# seven-kernel eager forward by torch's one-call ``rms_norm`` (same math, fp32 accumulation). On a serving host
# the blended prefill of a 7B model is CPU-launch-bound (benchmarks/results/ttft_h100.json), so kernel count is
# latency. Anything else (Gemma's ``1 + weight``, unknown classes) keeps its own forward.
_PLAIN_RMSNORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"})


_ROTATE_HALF_MODULES = frozenset(f"transformers.models.{m}.modeling_{m}" for m in ("llama", "qwen2", "qwen3", "mistral"))


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


def blend_prefill(model: Any, input_ids: Any, k: Any, v: Any, plan: SemanticKvPlan, *, reuse_len: int,
                  check_layer: int | None = 1, selection: Any = None) -> tuple[BlendStats, Any]:
    """The whole blended prefill in one pass over the layers: recomputed prefix tokens *and* the suffix.

    Args:
        input_ids: LongTensor ``[n]``, the whole prompt.
        k, v: ``[num_layers, n, num_kv_heads, head_dim]`` from :func:`assemble_kv` with ``total_len=n`` (modified
            in place: on return they hold the prompt's complete KV).
        reuse_len: donor KV is used only below this position; ``[reuse_len, n)`` is the suffix, computed fresh at
            every layer like a cold prefill would (``reuse_len < n``: the last token is always fresh).
        selection: a ``SelectionStrategy``; replaces the deviation check (``check_layer`` is then ignored).

    Returns ``(stats, logits)``: float32 logits ``[vocab]`` of the last prompt token. Running the suffix inside
    the same loop (instead of the model's forward on the assembled cache) reads every weight once per hit, not
    twice, and halves the kernel launches.
    """
    import torch

    from semblend_core.partial_attention import partial_attention
    from semblend_core.recompute import deviation_scores
    from semblend_core.rope_store import rope_store

    decoder = model.get_decoder()
    layers = decoder.layers
    num_layers = len(layers)
    total = int(input_ids.shape[0])
    if not 0 < reuse_len < total:
        raise ValueError(f"reuse_len must lie in [1, {total}), got {reuse_len}")
    device = k.device

    mandatory_mask = np.zeros(total, dtype=bool)
    for a, b in plan.recompute_ranges:
        mandatory_mask[max(0, a):min(reuse_len, b)] = True
    covered = np.zeros(total, dtype=bool)
    seamed = np.zeros(total, dtype=bool)
    for s in plan.spans:
        a, b = s.target_start, min(s.target_end, reuse_len)
        if b > a:
            covered[a:b] = True
            if not s.context_exact:
                seamed[a:b] = True
    mandatory_mask |= ~covered  # uncovered prefix rows and the whole suffix
    candidates_mask = seamed & ~mandatory_mask  # reused tokens whose KV saw another context
    n_candidates = int(candidates_mask.sum())

    if selection is not None:
        check_layer = None  # the strategy picks the budgeted tokens instead of the deviation check
    check = check_layer is not None and n_candidates > 0
    if check:
        check_layer = max(0, min(int(check_layer), num_layers - 1))
        counts = _nested_counts(plan, num_layers, n_candidates, check_layer)
        check = counts[check_layer + 1] > 0 if check_layer + 1 < num_layers else False
    if not check:
        counts = [0] * num_layers
        check_layer = -1

    mandatory = np.flatnonzero(mandatory_mask)  # never empty: the suffix [reuse_len, total) is in it
    mandatory_prefix = int(np.searchsorted(mandatory, reuse_len))

    in_norms = [_fast_norm(layer.input_layernorm) for layer in layers]
    post_norms = [_fast_norm(layer.post_attention_layernorm) for layer in layers]
    qkv = [tuple(_proj(getattr(layer.self_attn, name)) for name in ("q_proj", "k_proj", "v_proj")) for layer in layers]
    o_res = [_proj_residual(layer.self_attn.o_proj) for layer in layers]
    mlp_res = [_mlp_residual(layer.mlp) for layer in layers]
    rotary = _rotary_fn(layers[0].self_attn)
    # The fused RoPE + cache store (semblend_core.rope_store: Triton on CUDA, its torch twin elsewhere) implements
    # exactly the rotate-half RoPE of these families; any other attention module keeps its own rotary function.
    fused_rope = type(layers[0].self_attn).__module__ in _ROTATE_HALF_MODULES

    ids = input_ids.to(device)
    sel_depth, probe_cost = None, 0
    if selection is not None and n_candidates > 0 and plan.recompute_budget > 0:
        sel_depth, probe_cost = _select(selection, plan, candidates_mask, reuse_len, num_layers, decoder, ids, k, v,
                                        mandatory, (in_norms, post_norms, qkv, o_res, mlp_res, rotary, fused_rope))
    active = np.arange(total, dtype=np.int64) if check else mandatory
    if sel_depth is not None:
        active = np.union1d(mandatory, np.flatnonzero(sel_depth > 0))
    pos_t = torch.as_tensor(active, device=device)
    hidden = decoder.embed_tokens(ids[pos_t])  # [n, hidden]: 2-D end to end, so every projection is one mm
    cos, sin = decoder.rotary_emb(hidden, pos_t[None])  # recomputed only when the active set changes
    active_counts: list[int] = []
    full_rows = check  # active == every position (full causal attention is cheaper through SDPA)

    for layer_idx, layer in enumerate(layers):
        attn = layer.self_attn
        head_dim = attn.head_dim
        x = in_norms[layer_idx](hidden)
        n = x.shape[0]
        q_proj, k_proj, v_proj = qkv[layer_idx]
        q = q_proj(x).view(n, -1, head_dim)  # token-major [n, heads, D] throughout
        kk = k_proj(x).view(n, -1, head_dim)
        vv = v_proj(x).view(n, -1, head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms before RoPE
            q, kk = attn.q_norm(q), attn.k_norm(kk)
        if fused_rope and layer_idx != check_layer:
            # One launch: RoPE on q and k, fresh k/v written into this layer's cache rows.
            q = rope_store(q, kk, vv, cos[0], sin[0], pos_t, k[layer_idx], v[layer_idx])
        else:
            qh, kh = rotary(q.transpose(0, 1)[None], kk.transpose(0, 1)[None], cos, sin)  # HF wants [1, H, n, D]
            q, fresh_k = qh[0].transpose(0, 1), kh[0].transpose(0, 1)
            if layer_idx == check_layer:
                # CacheBlend: tokens whose fresh K/V differ most from the reused K/V carry the cross-context
                # error. At the check layer every position is active, so row index == position.
                cand = np.flatnonzero(candidates_mask)
                cand_t = torch.as_tensor(cand, device=device)
                score = deviation_scores(fresh_k[cand_t], k[layer_idx, cand_t], vv[cand_t], v[layer_idx, cand_t])
                order = torch.argsort(score.float(), descending=True, stable=True).cpu().numpy()
                ranked = cand[order]
            k[layer_idx, pos_t] = fresh_k.to(k.dtype)
            v[layer_idx, pos_t] = vv.to(v.dtype)
        active_counts.append(int(np.searchsorted(active, reuse_len)))  # prefix rows only; the suffix is counted apart

        # A token's attention and MLP at this layer are needed only if it is still active at the next layer; at
        # the last layer only the last token's (its hidden state gives the logits).
        if layer_idx == num_layers - 1:
            next_active = active[-1:]
        elif check and layer_idx >= check_layer:
            next_active = np.union1d(mandatory, ranked[:counts[layer_idx + 1]])
        elif sel_depth is not None:
            next_active = np.union1d(mandatory, np.flatnonzero(sel_depth > layer_idx + 1))
        else:
            next_active = active
        if next_active.size == 0:
            break  # deeper layers keep the reused KV everywhere
        changed = next_active.size != active.size
        if changed:
            rows = torch.as_tensor(np.searchsorted(active, next_active), device=device)
            q, hidden = q[rows], hidden[rows]
            pos_t = torch.as_tensor(next_active, device=device)
            full_rows = False
        if full_rows:
            # Every position is a query: plain causal SDPA (flash attention on CUDA). K/V are expanded to the
            # query heads explicitly because not every SDPA backend takes grouped KV.
            group = q.shape[1] // k.shape[2]
            kx = k[layer_idx].repeat_interleave(group, dim=1) if group > 1 else k[layer_idx]
            vx = v[layer_idx].repeat_interleave(group, dim=1) if group > 1 else v[layer_idx]
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], kx.transpose(0, 1)[None], vx.transpose(0, 1)[None], is_causal=True,
                scale=attn.scaling,
            )[0].transpose(0, 1)
        else:
            out = partial_attention(q, k[layer_idx], v[layer_idx], pos_t, scale=attn.scaling, check_positions=False)
        hidden = o_res[layer_idx](out.reshape(out.shape[0], -1), hidden)
        hidden = mlp_res[layer_idx](post_norms[layer_idx](hidden), hidden)
        active = next_active
        if changed and layer_idx < num_layers - 1:
            cos, sin = decoder.rotary_emb(hidden, pos_t[None])
    active_counts += [0] * (num_layers - len(active_counts))
    stats = BlendStats(reuse_len, tuple(active_counts), check, mandatory_prefix, probe_cost)
    last = decoder.norm(hidden[-1:])
    logits = model.get_output_embeddings()(last)
    return stats, logits[-1].float()


def _select(selection: Any, plan: SemanticKvPlan, candidates_mask: np.ndarray, reuse_len: int, num_layers: int,
            decoder: Any, ids: Any, k: Any, v: Any, mandatory: np.ndarray, parts: tuple) -> tuple[Any, int]:
    """``(depth [n] or None, probe token-layers)`` for a ``SelectionStrategy`` (``semblend_core.recompute``)."""
    from semblend_core.recompute import select_depths

    offset = np.full(candidates_mask.shape[0], np.iinfo(np.int64).max // 2, dtype=np.int64)
    for s in plan.spans:
        a, b = s.target_start, min(s.target_end, reuse_len)
        if b > a:
            offset[a:b] = np.arange(b - a)
    scores, cost = None, 0
    if selection.name == "query":
        mass, cost = _query_probe(decoder, parts, ids, k, v, mandatory, selection.query_tokens,
                                  min(selection.probe_layers, num_layers))
        scores = mass.cpu().numpy()
    depth = select_depths(candidates_mask, float(plan.recompute_budget), num_layers, scores=scores,
                          span_offset=offset, chunk_heads=selection.chunk_heads, depth=selection.depth)
    return (depth if depth.any() else None), cost


def _query_probe(decoder: Any, parts: tuple, ids: Any, k: Any, v: Any, active: np.ndarray, query_tokens: int,
                 probe_layers: int) -> tuple[Any, int]:
    """Run the mandatory positions ``active`` through layers ``[0, probe_layers)`` over the reused KV and return
    the attention mass their last ``query_tokens`` rows pay each position (summed over probe layers, heads and
    queries; float32 ``[n]``) and the probe's token-layers.

    Writes fresh K/V of ``active`` rows into ``k``/``v`` at the probe layers; the main pass rewrites exactly those
    rows (mandatory positions are active at every layer) before any query reads them.
    """
    import torch

    from semblend_core.partial_attention import partial_attention
    from semblend_core.recompute import suffix_attention_mass
    from semblend_core.rope_store import rope_store

    in_norms, post_norms, qkv, o_res, mlp_res, rotary, fused_rope = parts
    layers = decoder.layers
    device = k.device
    pos_t = torch.as_tensor(active, device=device)
    hidden = decoder.embed_tokens(ids[pos_t])
    cos, sin = decoder.rotary_emb(hidden, pos_t[None])
    m = min(int(query_tokens), int(active.size))
    mass = torch.zeros(k.shape[1], dtype=torch.float32, device=device)
    for layer_idx in range(probe_layers):
        attn = layers[layer_idx].self_attn
        x = in_norms[layer_idx](hidden)
        n = x.shape[0]
        q_proj, k_proj, v_proj = qkv[layer_idx]
        q = q_proj(x).view(n, -1, attn.head_dim)
        kk = k_proj(x).view(n, -1, attn.head_dim)
        vv = v_proj(x).view(n, -1, attn.head_dim)
        if hasattr(attn, "q_norm"):
            q, kk = attn.q_norm(q), attn.k_norm(kk)
        if fused_rope:
            q = rope_store(q, kk, vv, cos[0], sin[0], pos_t, k[layer_idx], v[layer_idx])
        else:
            qh, kh = rotary(q.transpose(0, 1)[None], kk.transpose(0, 1)[None], cos, sin)
            q = qh[0].transpose(0, 1)
            k[layer_idx, pos_t] = kh[0].transpose(0, 1).to(k.dtype)
            v[layer_idx, pos_t] = vv.to(v.dtype)
        mass += suffix_attention_mass(q[-m:], k[layer_idx], pos_t[-m:], attn.scaling)
        if layer_idx == probe_layers - 1:
            break
        out = partial_attention(q, k[layer_idx], v[layer_idx], pos_t, scale=attn.scaling, check_positions=False)
        hidden = o_res[layer_idx](out.reshape(n, -1), hidden)
        hidden = mlp_res[layer_idx](post_norms[layer_idx](hidden), hidden)
    return mass, probe_layers * int(active.size)
