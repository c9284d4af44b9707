"""vLLM's Llama / Mistral / Qwen2 / Qwen3 modules as a :class:`~semblend_core.blended_prefill.BlendModelView`.

``blend`` mode runs the shared blended-prefill executor with the weights vLLM loaded: this view maps vLLM's modules
onto the executor's contract and nothing else (no layer loop here, no cache writes). Built once per worker, at
``register_kv_caches``, by :func:`build_view`, which first checks the model's structure against the exact vLLM
classes whose math the view reproduces and returns a decline reason for anything else:

* decoder: ``model.model`` with ``embed_tokens``, ``layers`` (all of them on this rank: no pipeline parallelism)
  and ``norm``; every layer exactly ``LlamaDecoderLayer`` / ``MistralDecoderLayer`` / ``Qwen2DecoderLayer`` /
  ``Qwen3DecoderLayer`` with that family's attention and MLP classes and vLLM's ``RMSNorm``;
* attention: a fused ``qkv_proj`` (output ``[n, q_size + 2 * kv_size]``, split like vLLM's forward), Qwen3's
  per-head ``q_norm`` / ``k_norm`` (Qwen2's optional ones too), full causal decoder attention (no sliding window);
* RoPE: one of vLLM's static-table rotary classes (plain, Llama 3, linear, YaRN) in NeoX (rotate-half) style over
  the whole head (``rotary_dim == head_size``); the view reads ``rotary_emb.cos_sin_cache`` (``[max_pos,
  rotary_dim]``, cos halves then sin halves), so the model's RoPE scaling is already folded in;
* tensor parallel size 1 (a TP shard holds a slice of the heads and of every projection: the executor would need
  vLLM's all-reduces between layers; declined, and the scheduler declines too).

Kernels: the executor runs one layer at a time for a few dozen tokens, so what a call costs on the host decides
its speed (H200, Qwen2.5-7B, 8K prompt, ratio 0: 15 ms of host launches for 5 ms of GPU work through the modules'
``forward``). Where it is safe the view calls the kernels those modules dispatch to directly -- vLLM's
``_C.rms_norm`` and ``_C.silu_and_mul`` ops and ``F.linear`` on the unquantized weights -- skipping the
``CustomOp`` / IR-op / quant-method dispatch (and, in a torch.compile'd engine, whose custom ops are disabled, the
plain-torch fallbacks that are several kernels each). Each kernel is chosen once per worker by
:func:`choose_kernels`: it must exist and give the module's own output on layer 0 (seeded input, relative error
within :data:`SELF_CHECK_TOL`); otherwise that kind of call goes through the module, as before.

Norms are called with one argument: vLLM's ``RMSNorm(x)`` is the plain RMS norm; its fused ``(x, residual)`` form
computes ``norm(x + residual)`` and returns the sum as the new residual, the same math the executor's plain
residual stream does (and it writes in place on GPU, which the executor's tensors must not see).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from semblend_core.blended_prefill import BlendModelView, relative_error

logger = logging.getLogger(__name__)

__all__ = ["Kernels", "VllmModelView", "build_view", "choose_kernels", "model_support", "rotary_self_check"]

_M = "vllm.model_executor.models"
# decoder layer class -> (its module, attention class, MLP class)
_LAYERS = {
    "LlamaDecoderLayer": (f"{_M}.llama", "LlamaAttention", "LlamaMLP"),
    "MistralDecoderLayer": (f"{_M}.mistral", "MistralAttention", "MistralMLP"),
    "Qwen2DecoderLayer": (f"{_M}.qwen2", "Qwen2Attention", "Qwen2MLP"),
    "Qwen3DecoderLayer": (f"{_M}.qwen3", "Qwen3Attention", "Qwen3MLP"),
}
# vLLM 0.26 serves Mistral with Llama's modules; every family may reuse another's MLP class (Qwen3 imports
# Qwen2's): MLP and attention classes are accepted from any of these modules.
_MODULES = frozenset(m for m, _, _ in _LAYERS.values())
_ROTARY = frozenset({"RotaryEmbedding", "Llama3RotaryEmbedding", "LinearScalingRotaryEmbedding",
                     "YaRNScalingRotaryEmbedding"})
_NORM = ("vllm.model_executor.layers.layernorm", "RMSNorm")


def _cls(obj: Any) -> tuple[str, str]:
    return type(obj).__module__, type(obj).__name__


def _tp_size() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        return int(get_tensor_model_parallel_world_size())
    except Exception:  # noqa: BLE001 -- no distributed state: a single process
        return 1


def _rotary_reason(rot: Any, head_dim: int) -> str:
    module, name = _cls(rot)
    if not module.startswith("vllm.model_executor.layers.rotary_embedding") or name not in _ROTARY:
        return f"rotary:{name}"
    if not getattr(rot, "is_neox_style", False):
        return "rotary:not_neox_style"
    if int(getattr(rot, "rotary_dim", -1)) != head_dim or int(getattr(rot, "head_size", -1)) != head_dim:
        return "rotary:partial_rotary_dim"
    cache = getattr(rot, "cos_sin_cache", None)
    if cache is None or cache.dim() != 2 or int(cache.shape[1]) != head_dim:
        return "rotary:no_cos_sin_cache"
    return ""


def _norm_reason(norm: Any) -> str:
    if _cls(norm) != _NORM:
        return f"norm:{type(norm).__name__}"
    if not getattr(norm, "has_weight", True) or getattr(norm, "variance_size_override", None) is not None:
        return "norm:variant"
    return ""


def model_support(model: Any) -> str:
    """``""`` when :class:`VllmModelView` reproduces ``model``'s math, else the decline reason
    (``tensor_parallel``, ``unsupported_layer_structure:<what>``). Pure; once per worker."""
    if _tp_size() != 1:
        return "tensor_parallel"
    decoder = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm"):
        if decoder is None or not hasattr(decoder, name):
            return f"unsupported_layer_structure:no_{name}"
    layers = list(decoder.layers)
    if not layers:
        return "unsupported_layer_structure:no_layers"
    if int(getattr(decoder, "start_layer", 0)) != 0 or int(getattr(decoder, "end_layer", len(layers))) != len(layers):
        return "pipeline_parallel"
    if type(decoder.embed_tokens).__name__ != "VocabParallelEmbedding":
        return f"unsupported_layer_structure:embed_tokens:{type(decoder.embed_tokens).__name__}"
    first = None
    for i, layer in enumerate(layers):
        module, name = _cls(layer)
        if name not in _LAYERS or module != _LAYERS[name][0]:
            return f"unsupported_layer_structure:layer{i}:{name}"
        _, attn_cls, mlp_cls = _LAYERS[name]
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or _cls(attn)[1] != attn_cls or _cls(attn)[0] not in _MODULES:
            return f"unsupported_layer_structure:layer{i}.self_attn"
        if mlp is None or _cls(mlp)[0] not in _MODULES or not _cls(mlp)[1].endswith("MLP"):
            return f"unsupported_layer_structure:layer{i}.mlp"
        if getattr(layer, "ada_rms_norm_t_cond", None) is not None or getattr(attn, "do_llama_4_scaling", False):
            return f"unsupported_layer_structure:layer{i}:mistral_conditioning"
        for norm_name in ("input_layernorm", "post_attention_layernorm"):
            reason = _norm_reason(getattr(layer, norm_name, None))
            if reason:
                return f"unsupported_layer_structure:layer{i}.{norm_name}:{reason}"
        for attr in ("qkv_proj", "o_proj", "rotary_emb", "attn", "q_size", "kv_size", "num_heads", "num_kv_heads",
                     "head_dim", "scaling"):
            if not hasattr(attn, attr):
                return f"unsupported_layer_structure:layer{i}.self_attn.{attr}"
        head_dim = int(attn.head_dim)
        if attn.q_size != attn.num_heads * head_dim or attn.kv_size != attn.num_kv_heads * head_dim:
            return f"unsupported_layer_structure:layer{i}.qkv_sizes"
        reason = _rotary_reason(attn.rotary_emb, head_dim)
        if reason:
            return f"unsupported_layer_structure:layer{i}.{reason}"
        if _has_qk_norm(attn):
            for norm_name in ("q_norm", "k_norm"):
                reason = _norm_reason(getattr(attn, norm_name, None))
                if reason:
                    return f"unsupported_layer_structure:layer{i}.self_attn.{norm_name}:{reason}"
        inner = attn.attn
        if getattr(inner, "sliding_window", None) or getattr(inner, "attn_type", "decoder") != "decoder":
            return f"unsupported_layer_structure:layer{i}.attention_type"
        shape = (name, int(attn.num_heads), int(attn.num_kv_heads), head_dim)
        if first is None:
            first = shape
        elif shape != first:
            return f"unsupported_layer_structure:layer{i}:differs_from_layer0"
    return ""


def _has_qk_norm(attn: Any) -> bool:
    """Qwen3 always normalises q/k per head; Qwen2 only with ``qk_norm`` set."""
    if type(attn).__name__ == "Qwen3Attention":
        return True
    return bool(getattr(attn, "qk_norm", False))


class VllmModelView(BlendModelView):
    """The executor's view of one vLLM decoder (see the module docstring for what it accepts). Read-only: every
    method is a pure function of the loaded weights. Build it with :func:`build_view`."""

    def __init__(self, model: Any) -> None:
        decoder = model.model
        self._decoder = decoder
        self._layers = list(decoder.layers)
        attn0 = self._layers[0].self_attn
        self.num_layers = len(self._layers)
        self.num_heads = int(attn0.num_heads)
        self.num_kv_heads = int(attn0.num_kv_heads)
        self.head_dim = int(attn0.head_dim)
        self._qk_norm = [_has_qk_norm(layer.self_attn) for layer in self._layers]
        self._rotary = attn0.rotary_emb  # one table: every layer's rotary is built from the same config
        self.kernels = Kernels()  # module calls until choose_kernels() has checked the direct ones
        # The modules each call needs, looked up once: nn.Module attribute access is ~1 us each, 25 per layer.
        self._parts = [_LayerParts(
            input_norm=layer.input_layernorm, qkv_proj=layer.self_attn.qkv_proj, o_proj=layer.self_attn.o_proj,
            post_norm=layer.post_attention_layernorm, mlp=layer.mlp,
            q_norm=layer.self_attn.q_norm if qk else None, k_norm=layer.self_attn.k_norm if qk else None,
            split=(int(layer.self_attn.q_size), int(layer.self_attn.kv_size), int(layer.self_attn.kv_size)),
            scaling=float(layer.self_attn.scaling)) for layer, qk in zip(self._layers, self._qk_norm)]

    def embed(self, token_ids: Any) -> Any:
        return self._decoder.embed_tokens(token_ids)

    def rotary(self, positions: Any) -> tuple[Any, Any]:
        import torch

        cache = self._rotary.cos_sin_cache
        if cache.device != positions.device:
            cache = cache.to(positions.device)
        cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)  # each [n, head_dim / 2]
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)

    def qkv(self, layer: int, hidden: Any) -> tuple[Any, Any, Any]:
        part = self._parts[layer]
        out = _linear(self.kernels, part.qkv_proj, _norm(self.kernels, part.input_norm, hidden))
        q, k, v = out.split(part.split, dim=-1)
        n = out.shape[0]
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if part.q_norm is not None:
            q, k = part.q_norm(q), part.k_norm(k)
        return q, k, v

    def attention_scale(self, layer: int) -> float:
        return self._parts[layer].scaling

    def finish_layer(self, layer: int, attn_out: Any, residual: Any) -> Any:
        part = self._parts[layer]
        hidden = residual + _linear(self.kernels, part.o_proj, attn_out)
        return hidden + _mlp(self.kernels, part.mlp, _norm(self.kernels, part.post_norm, hidden))


@dataclass(frozen=True)
class _LayerParts:
    """One decoder layer's modules as :class:`VllmModelView` calls them (``q_norm``/``k_norm``: None without)."""

    input_norm: Any
    qkv_proj: Any
    o_proj: Any
    post_norm: Any
    mlp: Any
    q_norm: Any
    k_norm: Any
    split: tuple[int, int, int]
    scaling: float


SELF_CHECK_TOL = 1e-2  # relative error of a self-check in the model's dtype (bf16 rounding is ~4e-3)


@dataclass(frozen=True)
class Kernels:
    """Which calls of :class:`VllmModelView` go straight to a kernel (True) instead of the module's forward."""

    rms_norm: bool = False  # torch.ops._C.rms_norm for input_layernorm / post_attention_layernorm (q/k norms: module)
    linear: bool = False  # F.linear(x, weight, bias) for qkv_proj, o_proj, gate_up_proj, down_proj
    silu_and_mul: bool = False  # torch.ops._C.silu_and_mul between gate_up_proj and down_proj (the whole MLP)


# The three kinds of call of a layer, each the module's forward or the kernel it dispatches to (``kernels``).
def _norm(kernels: Kernels, norm: Any, x: Any) -> Any:
    if not kernels.rms_norm:
        return norm(x)
    import torch

    x = x if x.is_contiguous() else x.contiguous()
    out = torch.empty_like(x)
    # .data: vLLM's parameter classes override __torch_function__, ~30 us of Python per op they are passed to
    torch.ops._C.rms_norm(out, x, norm.weight.data, norm.variance_epsilon)
    return out


def _linear(kernels: Kernels, linear: Any, x: Any) -> Any:
    if not kernels.linear:
        return linear(x)[0]
    import torch

    bias = linear.bias
    return torch.nn.functional.linear(x, linear.weight.data, None if bias is None else bias.data)


def _mlp(kernels: Kernels, mlp: Any, x: Any) -> Any:
    if not kernels.silu_and_mul:
        return mlp(x)
    import torch

    gate_up = _linear(kernels, mlp.gate_up_proj, x)
    act = torch.empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,), dtype=gate_up.dtype, device=gate_up.device)
    torch.ops._C.silu_and_mul(act, gate_up)
    return _linear(kernels, mlp.down_proj, act)


def _plain_linear(linear: Any) -> bool:
    """An unquantized, unsharded linear layer whose forward is ``F.linear(x, weight, bias)`` (bias added)."""
    return (type(getattr(linear, "quant_method", None)).__name__ == "UnquantizedLinearMethod"
            and not getattr(linear, "skip_bias_add", False) and getattr(linear, "weight", None) is not None
            and linear.weight.dim() == 2)


def choose_kernels(view: VllmModelView, *, rows: int = 16) -> Kernels:
    """The direct kernels that reproduce layer 0's modules on this worker (see the module docstring). For each
    kind, the module and the kernel run on the same seeded input in the model's dtype and must agree within
    :data:`SELF_CHECK_TOL`; a missing op, a quantized or sharded weight, an exception or a mismatch keeps the
    module call. Start-up only: a handful of ``rows`` through one layer. Sets ``view.kernels`` and returns it."""
    import torch

    block = view._layers[0]
    attn, mlp = block.self_attn, block.mlp
    weight = block.input_layernorm.weight
    device, dtype = weight.device, weight.dtype
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(rows, int(weight.shape[0]), generator=gen).to(device=device, dtype=dtype)
    c_ops = getattr(torch.ops, "_C", None)
    chosen: dict[str, bool] = {}

    def agrees(kind: str, direct: Any, module_call: Any) -> bool:
        try:
            err = relative_error(direct(), module_call())
        except Exception as exc:  # noqa: BLE001 -- an op this build lacks or rejects: keep the module call
            logger.info("SemBlend: direct %s kernel unavailable (%s: %s)", kind, type(exc).__name__, exc)
            return False
        if not err <= SELF_CHECK_TOL:
            logger.warning("SemBlend: direct %s kernel differs from the module (relative error %.3g); using the "
                           "module", kind, err)
            return False
        return True

    norms = [block.input_layernorm, block.post_attention_layernorm]
    if c_ops is not None and hasattr(c_ops, "rms_norm"):
        direct = Kernels(rms_norm=True)
        chosen["rms_norm"] = all(agrees("rms_norm", lambda n=n: _norm(direct, n, hidden), lambda n=n: n(hidden))
                                 for n in norms)
    linears = [attn.qkv_proj, attn.o_proj] + [getattr(mlp, name, None) for name in ("gate_up_proj", "down_proj")]
    if all(lin is not None and _plain_linear(lin) for lin in linears):
        direct = Kernels(linear=True)
        chosen["linear"] = all(
            agrees("linear", lambda lin=lin, x=x: _linear(direct, lin, x), lambda lin=lin, x=x: lin(x)[0])
            for lin, x in ((attn.qkv_proj, hidden), (attn.o_proj, _input_for(attn.o_proj, hidden, gen)),
                           (linears[2], hidden), (linears[3], _input_for(linears[3], hidden, gen))))
    if c_ops is not None and hasattr(c_ops, "silu_and_mul") and type(getattr(mlp, "act_fn", None)).__name__ \
            == "SiluAndMul" and all(lin is not None for lin in linears[2:]):
        direct = Kernels(linear=chosen.get("linear", False), silu_and_mul=True)
        chosen["silu_and_mul"] = agrees("silu_and_mul", lambda: _mlp(direct, mlp, hidden), lambda: mlp(hidden))
    view.kernels = Kernels(**chosen)
    return view.kernels


def _input_for(linear: Any, like: Any, gen: Any) -> Any:
    """A seeded input of ``linear``'s input width, in ``like``'s dtype and device."""
    import torch

    return torch.randn(like.shape[0], int(linear.weight.shape[1]), generator=gen).to(like)


def rotary_self_check(view: VllmModelView, model: Any) -> float:
    """Relative error between the rotate-half rotation with :meth:`VllmModelView.rotary`'s tables (what the
    executor applies) and vLLM's own ``rotary_emb`` forward of layer 0, on seeded q/k at positions spread over the
    model's range (0 to ``max_position - 1``). Start-up only: a few hundred rows, no weights involved."""
    import torch

    rot = model.model.layers[0].self_attn.rotary_emb
    cache = rot.cos_sin_cache
    device, dtype = cache.device, next(model.parameters()).dtype
    n, d = 64, view.head_dim
    positions = torch.linspace(0, int(cache.shape[0]) - 1, n, device=device).round().to(torch.int64)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(n, view.num_heads, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(n, view.num_kv_heads, d, generator=gen).to(device=device, dtype=dtype)
    cos, sin = view.rotary(positions)
    cos, sin = cos[:, None].float(), sin[:, None].float()

    def rotate(x: Any) -> Any:
        x = x.float()
        half = torch.cat((-x[..., d // 2:], x[..., :d // 2]), dim=-1)
        return x * cos + half * sin

    want_q, want_k = rotate(q), rotate(k)
    got_q, got_k = rot(positions, q.reshape(n, -1).clone(), k.reshape(n, -1).clone())
    err = 0.0
    for got, want in ((got_q, want_q), (got_k, want_k)):
        err = max(err, relative_error(got.reshape(want.shape), want))
    return err


def build_view(model: Any) -> tuple[VllmModelView | None, str]:
    """``(view, "")`` for a supported vLLM model, ``(None, reason)`` otherwise: the structural check
    (:func:`model_support`), then :func:`rotary_self_check` (``self_check_failed:rotary`` above
    :data:`SELF_CHECK_TOL`). Never raises; runs under ``torch.inference_mode``."""
    import torch

    try:
        reason = model_support(model)
        if reason:
            return None, reason
        view = VllmModelView(model)
        with torch.inference_mode():
            err = rotary_self_check(view, model)
            if not err <= SELF_CHECK_TOL:
                return None, f"self_check_failed:rotary:{err:.3g}"
            kernels = choose_kernels(view)
        logger.info("SemBlend: blend executor kernels %s", kernels)
        return view, ""
    except Exception as exc:  # noqa: BLE001 -- an unreadable model is a decline, never a crash
        return None, f"unsupported_layer_structure:{type(exc).__name__}: {exc}"
