"""The one blended-prefill executor every engine shares: donor KV in, selected tokens recomputed, target KV out.

An engine adapter maps its own model modules onto a :class:`BlendModelView` (embeddings, per-layer Q/K/V, RoPE
tables, output projection + MLP) and hands the executor a plan, the prompt and a contiguous KV scratch; the
executor never imports an engine and never grows per-engine branches. Lifecycle of one hit::

    k, v = assemble_kv(plan, donor_kv, reuse_len, rope_spec, total_len=n)   # reused KV re-rotated into place
    stats, logits = run_blended_prefill(view, ids, k, v, plan, reuse_len=reuse_len, logits=...)
    # the adapter copies k / v rows [0, n) where its engine keeps KV (HF: they already are its cache; vLLM: the
    # request's paged blocks) -- for an engine that computes the suffix itself, ``n == reuse_len`` and
    # ``logits=False``

Needs the ``gpu`` extra (torch; triton for the fused kernels on CUDA). Importing ``semblend_core`` does not import
this module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

__all__ = ["BlendModelView"]


class BlendModelView(ABC):
    """A thin, read-only view of one decoder-only model for the executor. Token-major throughout: hidden states
    ``[n, hidden_size]``, heads ``[n, num_heads, head_dim]``. Every method is pure with respect to the model (no
    cache writes, no state) and may be called once per layer per hit.

    Only rotate-half (NeoX-style) RoPE is supported: the families on ``semblend_core.model_support``'s allowlist
    (Llama, Mistral, Qwen2, Qwen3) all use it, and a view for anything else must not be built (decline instead).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @abstractmethod
    def embed(self, token_ids: Any) -> Any:
        """``token_ids`` LongTensor ``[n]`` -> hidden ``[n, hidden_size]`` in the model's dtype."""

    @abstractmethod
    def rotary(self, positions: Any) -> tuple[Any, Any]:
        """``positions`` LongTensor ``[n]`` -> ``(cos, sin)`` ``[n, head_dim]``, rotate-half tables with duplicated
        halves (``cos[:, :D/2] == cos[:, D/2:]``, the Hugging Face convention), any float dtype. RoPE scaling of the
        model (llama3, yarn...) is already folded in."""

    @abstractmethod
    def qkv(self, layer: int, hidden: Any) -> tuple[Any, Any, Any]:
        """Input norm, Q/K/V projections (and per-head q/k norms where the family has them) of the residual
        stream ``hidden [n, hidden_size]`` -> ``q [n, num_heads, head_dim]``, ``k``/``v [n, num_kv_heads,
        head_dim]`` *before* RoPE. Views of one fused projection output are fine."""

    @abstractmethod
    def attention_scale(self, layer: int) -> float:
        """The softmax scale of ``layer``'s attention (usually ``head_dim ** -0.5``)."""

    @abstractmethod
    def finish_layer(self, layer: int, attn_out: Any, residual: Any) -> Any:
        """``attn_out [n, num_heads * head_dim]`` (attention output before ``o_proj``) and the layer's input
        residual stream ``[n, hidden_size]`` -> the layer's output residual stream: ``o_proj``, residual add,
        post-attention norm, MLP, residual add."""

    def logits(self, hidden: Any) -> Any:
        """Final norm and LM head of ``hidden [m, hidden_size]`` -> float32 ``[m, vocab]``. Only engines whose
        executor run computes the suffix itself need it; the default says this view has none."""
        raise NotImplementedError(f"{type(self).__name__} has no LM head: run the executor with logits=False")
