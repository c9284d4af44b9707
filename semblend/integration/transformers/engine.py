"""``SemBlendEngine``: a Hugging Face causal LM that reuses donor KV across semantically similar prompts.

The reference engine: every step of semantic KV reuse happens here in plain PyTorch, where each can be checked.

Lifecycle of one ``generate`` call::

    ids = tokenize(prompt)
    plan = pipeline.plan(ids, text)                      # semblend_core: donor discovery + alignment (never raises)
    if plan.is_hit and donor KV is resident:
        k, v = assemble_kv(plan, donor_kv)               # donor KV moved to target positions (RoPE re-rotation)
        logits = blend_prefill(model, ids, k, v, plan)   # one layer pass: seam / uncovered / deviation tokens
                                                         # and the suffix ids[P:]; logits of the last token
        pipeline.record_outcome(plan, "materialized", loaded_tokens=...)
    else:                                                # a miss, a decline, or ANY error: normal cold prefill
        logits = model(ids)
    first = argmax(logits)                               # TTFT ends here
    rest = model.generate(ids + [first], past_key_values=cache)
    donor store <- (ids, per-layer KV of the prompt)     # capacity-bounded; the prompt becomes a donor

``P`` is the end of the last reused span (at most ``len(ids) - suffix_tokens``): everything after it is the suffix,
computed fresh at every layer in the same pass (each weight is read once per hit).

Unsupported models (sliding-window, chunked or NoPE layers, RoPE whose re-rotation is not exact, MLA) still
generate, always cold, with outcome ``declined`` and the reason. Works on CPU and CUDA; one request at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from semblend.integration.transformers.blend import BlendStats, assemble_kv, blend_prefill, model_support
from semblend_core.config import SemBlendConfig
from semblend_core.namespace import CacheNamespace
from semblend_core.plan import Outcome, Reason, SemanticKvPlan

logger = logging.getLogger(__name__)

__all__ = ["EngineOptions", "GenerationResult", "PrefillResult", "SemBlendEngine"]

_MISS_OUTCOMES = {
    Reason.NO_CANDIDATE: Outcome.COLD, Reason.DISABLED: Outcome.COLD,
    Reason.EXACT_PREFIX_SUFFICIENT: Outcome.EXACT, Reason.NO_GAIN_OVER_EXACT_PREFIX: Outcome.EXACT,
}
REASON_DONOR_KV_EVICTED = "donor_kv_evicted"
REASON_NOTHING_BEFORE_SUFFIX = "nothing_before_suffix"


@dataclass(frozen=True)
class EngineOptions:
    """Engine-side knobs that are not part of :class:`SemBlendConfig` (which every adapter shares).

    * ``check_layer``: layer whose fresh-vs-reused K/V deviation picks the budgeted tokens (CacheBlend uses the
      second layer: layer-0 K/V depend only on the token and its position, so they never deviate). ``None``
      disables the deviation check: only the plan's mandatory positions (uncovered, seam heads) are recomputed.
    * ``rope_correction``: re-rotate moved keys. False exists for the ablation that shows why it is needed.
    * ``donate_materialized``: whether a prompt served from donor KV becomes a donor itself. Off by default: its KV
      is an approximation of a cold prefill, and a chain of such donors would compound the error; prompts that
      ran cold always donate.
    * ``suffix_tokens``: the last this-many prompt tokens are always computed fresh at every layer, even when a
      span covers them (at least the last one). In chat prompts they are the assistant header, which
      steers the first answer token; refreshing a few costs almost nothing.
    * ``kv_capacity_bytes`` / ``kv_tier``: donor KV store (``semblend_core.kv_tensor_store``) size, on the model's
      device or in (pinned) host memory; ``host`` donors are copied to the device by every hit.
    * ``namespace``: cache namespace of this engine (default: built from the model and tokenizer).
    * ``selection``: a ``semblend_core.recompute.SelectionStrategy`` that picks the budgeted tokens instead of the
      deviation check (``check_layer`` is then unused); ``None`` keeps the check.
    """

    check_layer: int | None = 1
    rope_correction: bool = True
    donate_materialized: bool = False
    suffix_tokens: int = 8
    kv_capacity_bytes: int = 2 << 30
    kv_tier: str = "device"
    namespace: CacheNamespace | None = None
    selection: Any = None

    def __post_init__(self) -> None:
        if self.check_layer is not None and (isinstance(self.check_layer, bool) or not isinstance(
                self.check_layer, int) or self.check_layer < 0):
            raise ValueError(f"EngineOptions.check_layer={self.check_layer!r}; allowed: None or an integer >= 0")
        if isinstance(self.suffix_tokens, bool) or not isinstance(self.suffix_tokens, int) or self.suffix_tokens < 1:
            raise ValueError(f"EngineOptions.suffix_tokens={self.suffix_tokens!r}; allowed: an integer >= 1")
        if self.kv_tier not in ("device", "host"):
            raise ValueError(f"EngineOptions.kv_tier={self.kv_tier!r}; allowed: device, host")
        if isinstance(self.kv_capacity_bytes, bool) or not isinstance(self.kv_capacity_bytes, int) \
                or self.kv_capacity_bytes <= 0:
            raise ValueError(f"EngineOptions.kv_capacity_bytes={self.kv_capacity_bytes!r}; allowed: a positive int")


@dataclass(frozen=True)
class PrefillResult:
    """The prompt's cache and next-token logits, ready for decoding or teacher forcing.

    * ``cache``: a transformers ``DynamicCache`` holding KV for every prompt token (mutated by later forwards).
    * ``logits``: float32 ``[vocab]`` next-token logits after the last prompt token.
    * ``timings``: seconds for ``plan``, ``load`` (donor KV copied to the device, gathered, re-rotated,
      assembled), ``recompute`` (the one layer pass over budgeted prefix tokens and the suffix, logits included),
      ``suffix`` (hand-off of the assembled KV as the cache; the whole model forward when cold) and ``total``.
    * ``recomputed_fraction``: token-layer work done over a cold prefill's (1.0 when cold).
    """

    prompt_ids: tuple[int, ...]
    cache: Any
    logits: Any
    outcome: str
    reason: str
    plan: SemanticKvPlan | None
    timings: Mapping[str, float]
    recomputed_fraction: float
    stats: BlendStats | None = None
    donor_id: str | None = None
    request_id: str = ""

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def reuse_ratio(self) -> float:
        return self.plan.reuse_ratio if self.plan is not None and self.outcome == Outcome.MATERIALIZED else 0.0


@dataclass(frozen=True)
class GenerationResult:
    """One ``generate`` call. ``token_ids`` are the generated tokens only; ``ttft_s`` ends when the first one is
    chosen; ``timings`` is :attr:`PrefillResult.timings` plus ``decode`` (the remaining tokens)."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    ttft_s: float
    plan: SemanticKvPlan | None
    outcome: str
    reason: str
    recomputed_fraction: float
    timings: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    donor_id: str | None = None
    request_id: str = ""

    @property
    def reuse_ratio(self) -> float:
        return self.plan.reuse_ratio if self.plan is not None and self.outcome == Outcome.MATERIALIZED else 0.0


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_layers_kv(cache: Any) -> list[tuple[Any, Any]]:
    """Per-layer ``(keys, values)`` ``[batch, kv_heads, seq, head_dim]`` of a transformers cache (4.x and 5.x)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def build_dynamic_cache(model: Any, k: Any, v: Any) -> Any:
    """A ``DynamicCache`` from ``k``/``v`` ``[num_layers, seq, kv_heads, head_dim]`` (copied into HF layout)."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x
        cache = DynamicCache()
    for layer in range(k.shape[0]):
        cache.update(k[layer].transpose(0, 1)[None].contiguous(), v[layer].transpose(0, 1)[None].contiguous(), layer)
    return cache


class SemBlendEngine:
    """Semantic KV reuse around a transformers causal LM (Llama, Qwen2/3, Mistral-family decoders).

    Args:
        model: a ``*ForCausalLM`` in eval mode, on CPU or CUDA.
        tokenizer: its tokenizer (strings are tokenized as given: apply a chat template first if you want one).
        config: :class:`SemBlendConfig` (gates, alignment, recompute budget, bathtub preset).
        options: :class:`EngineOptions`.
        pipeline: an existing ``SemBlendPipeline`` to share (default: a new one sized for this model).
    """

    def __init__(self, model: Any, tokenizer: Any, config: SemBlendConfig | None = None,
                 options: EngineOptions | None = None, *, pipeline: Any = None) -> None:
        import torch

        from semblend_core.bathtub import ModelShape
        from semblend_core.pipeline import SemBlendPipeline

        self.model = model
        self.tokenizer = tokenizer
        self.config = config if config is not None else SemBlendConfig()
        self.options = options if options is not None else EngineOptions()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers = int(text_config.num_hidden_layers)
        self.supported, self.unsupported_reason, self.rope_spec = model_support(model)
        if not self.supported:
            logger.warning("SemBlend declines this model (%s); every prompt runs a normal prefill",
                           self.unsupported_reason)
        self.pipeline = pipeline if pipeline is not None else SemBlendPipeline(
            self.config, model_shape=ModelShape(self.num_layers, str(getattr(text_config, "model_type", ""))))
        self.namespace = self.options.namespace or self._default_namespace(text_config)
        from semblend_core.kv_tensor_store import KvTensorStore

        cap = self.options.kv_capacity_bytes
        on_device = self.options.kv_tier == "device"
        self.kv_store = KvTensorStore(device_bytes=cap if on_device else 0, host_bytes=0 if on_device else cap,
                                      device=self.device if on_device else None)
        self._ids = itertools.count()
        self._torch = torch

    def _default_namespace(self, text_config: Any) -> CacheNamespace:
        rope = {k: getattr(text_config, k, None) for k in ("rope_parameters", "rope_scaling", "rope_theta",
                                                            "partial_rotary_factor")}
        return CacheNamespace(
            model=str(getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__),
            tokenizer=str(getattr(self.tokenizer, "name_or_path", "") or ""),
            kv_dtype=str(self.dtype).replace("torch.", ""),
            rope=CacheNamespace.rope_key({k: v for k, v in rope.items() if v is not None}),
        )

    # ------------------------------------------------------------------ public API
    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return [int(t) for t in prompt]

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, do_sample: bool = False, *,
                 force_cold: bool = False, **generate_kwargs: Any) -> GenerationResult:
        """Prefill (reusing donor KV when the plan allows), then decode with the model's own ``generate``.

        ``force_cold`` runs a plain prefill that neither plans nor donates (the baseline). ``generate_kwargs`` go
        to ``model.generate`` for the tokens after the first (sampling settings...).
        """
        torch = self._torch
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenize(prompt)
        start = time.perf_counter()
        pre = self.prefill(ids, text=text, register=False, force_cold=force_cold)
        logits = pre.logits
        if do_sample:
            probs = torch.softmax(logits.float(), dim=-1)
            first = int(torch.multinomial(probs, 1).item())
        else:
            first = int(torch.argmax(logits).item())
        ttft = time.perf_counter() - start
        generated = [first]
        t_dec = time.perf_counter()
        generated += self.decode(pre, first, max_new_tokens - 1, do_sample=do_sample, **generate_kwargs)
        _sync(self.device)
        decode_s = time.perf_counter() - t_dec
        self._donate(pre)
        timings = dict(pre.timings)
        timings["decode"] = decode_s
        return GenerationResult(
            text=self.tokenizer.decode(generated, skip_special_tokens=True), token_ids=tuple(generated),
            prompt_tokens=len(ids), ttft_s=ttft, plan=pre.plan, outcome=pre.outcome, reason=pre.reason,
            recomputed_fraction=pre.recomputed_fraction, timings=MappingProxyType(timings),
            donor_id=pre.donor_id, request_id=pre.request_id,
        )

    def prefill(self, prompt: str | Sequence[int], *, text: str | None = None, register: bool = True,
                force_cold: bool = False) -> PrefillResult:
        """Plan and prefill one prompt; returns its cache and next-token logits.

        ``register`` makes the prompt a donor right away (``generate`` registers after decoding). ``force_cold``
        skips planning and never donates (the cold baseline of benchmarks). Never raises for a planning or reuse
        failure: that request runs cold and the result carries the reason.
        """
        ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("empty prompt")
        if text is None and isinstance(prompt, str):
            text = prompt
        request_id = "cold" if force_cold else f"req-{next(self._ids)}"
        start = time.perf_counter()
        if force_cold:
            result = self._cold(ids, start, None, Outcome.COLD, "forced_cold", request_id)
        elif not self.supported:
            result = self._cold(ids, start, None, Outcome.DECLINED, self.unsupported_reason, request_id)
        else:
            plan = self.pipeline.plan(ids, text=text, namespace=self.namespace)
            plan_s = time.perf_counter() - start
            if not plan.is_hit:
                result = self._cold(ids, start, plan, _MISS_OUTCOMES.get(plan.reason, Outcome.DECLINED),
                                    plan.reason, request_id, plan_s=plan_s)
            elif self.config.discovery_only:
                result = self._cold(ids, start, plan, Outcome.DISCOVERY_ONLY, plan.reason, request_id,
                                    plan_s=plan_s)
            else:
                result = self._materialize_or_cold(ids, plan, start, plan_s, request_id)
        if register:
            self._donate(result)
        return result

    def decode(self, prefill: PrefillResult, first_token: int, max_new_tokens: int, do_sample: bool = False,
               **generate_kwargs: Any) -> list[int]:
        """Tokens after ``first_token`` from ``prefill``'s cache with the model's own ``generate`` (extends the
        cache in place). Stops at EOS; returns at most ``max_new_tokens`` ids."""
        torch = self._torch
        if max_new_tokens <= 0 or int(first_token) in self._eos_ids():
            return []
        full = torch.tensor([list(prefill.prompt_ids) + [int(first_token)]], device=self.device)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=full, attention_mask=torch.ones_like(full), past_key_values=prefill.cache,
                max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=self._pad_id(), **generate_kwargs,
            )
        return [int(t) for t in out[0, full.shape[1]:].tolist()]

    def fork(self, prefill: PrefillResult) -> PrefillResult:
        """A copy of ``prefill`` with its own cache holding only the prompt's KV (decode one, teacher-force the
        other)."""
        k, v = self.donor_kv(prefill)
        return dataclasses.replace(prefill, cache=build_dynamic_cache(self.model, k, v))

    def prefill_with_plan(self, prompt_ids: Sequence[int], plan: SemanticKvPlan, donor_k: Any, donor_v: Any
                          ) -> PrefillResult:
        """Materialize ``plan`` with explicit donor KV (``[num_layers, donor_len, kv_heads, head_dim]``).

        Bypasses discovery and the donor stores: tests and benchmarks use it to control the plan exactly. Raises
        on errors (no cold fallback) so that a broken materialization cannot hide behind one.
        """
        ids = [int(t) for t in prompt_ids]
        if plan.target_len != len(ids):
            raise ValueError(f"plan.target_len={plan.target_len} but the prompt has {len(ids)} tokens")
        start = time.perf_counter()
        return self._materialize(ids, plan, self._torch.stack((donor_k, donor_v), dim=1), start, 0.0, "explicit",
                                 None)

    def cold_prefill(self, prompt_ids: Sequence[int]) -> PrefillResult:
        """A plain prefill (no planning, no donation): the baseline."""
        return self._cold([int(t) for t in prompt_ids], time.perf_counter(), None, Outcome.COLD, "forced_cold",
                          "cold")

    def donor_kv(self, prefill: PrefillResult) -> tuple[Any, Any]:
        """``(k, v)`` ``[num_layers, prompt_len, kv_heads, head_dim]`` of a prefill's prompt tokens (copies)."""
        n = prefill.prompt_tokens
        pairs = cache_layers_kv(prefill.cache)
        k = self._torch.stack([kk[0, :, :n].transpose(0, 1) for kk, _ in pairs])
        v = self._torch.stack([vv[0, :, :n].transpose(0, 1) for _, vv in pairs])
        return k, v

    def stats(self) -> dict[str, Any]:
        out = self.pipeline.stats()
        out["kv_store"] = self.kv_store.stats().to_dict()
        return out

    # ------------------------------------------------------------------ internals
    def _eos_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    def _pad_id(self) -> int | None:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            eos = self._eos_ids()
            pad = min(eos) if eos else None
        return pad

    def _donate(self, pre: PrefillResult) -> None:
        """Make a finished prompt a donor: KV into the KV store, tokens into the planner's index."""
        if not self.supported or pre.request_id in ("", "cold"):
            return
        if pre.outcome == Outcome.MATERIALIZED and not self.options.donate_materialized:
            return
        if pre.prompt_tokens < self.config.min_prompt_tokens:
            return
        from semblend_core.errors import StoreFullError

        try:
            k, v = self.donor_kv(pre)
            self.kv_store.put(self.namespace.key, pre.request_id, self._torch.stack((k, v), dim=1),
                              list(pre.prompt_ids))
        except StoreFullError as exc:  # larger than the store, or everything else is leased: not a donor
            logger.debug("donor %s not stored: %s", pre.request_id, exc)
            return
        try:
            self.pipeline.register_donor(pre.request_id, list(pre.prompt_ids), namespace=self.namespace)
        except Exception as exc:  # donating is best effort; the request itself already succeeded
            self.kv_store.evict(self.namespace.key, pre.request_id)
            logger.warning("could not register %s as a donor (%s: %s)", pre.request_id, type(exc).__name__, exc)

    def _forward(self, ids: Sequence[int], cache: Any) -> Any:
        """Model forward over ``ids`` appended to ``cache``; float32 logits ``[vocab]`` of the last token."""
        torch = self._torch
        input_ids = torch.tensor([list(ids)], device=self.device)
        with torch.no_grad():
            try:
                out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            except TypeError:  # transformers 4.4x before logits_to_keep
                out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return out.logits[0, -1].float()

    def _cold(self, ids: list[int], start: float, plan: SemanticKvPlan | None, outcome: str, reason: str,
              request_id: str, *, plan_s: float = 0.0) -> PrefillResult:
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:
            cache = DynamicCache()
        t0 = time.perf_counter()
        logits = self._forward(ids, cache)
        _sync(self.device)
        t1 = time.perf_counter()
        timings = {"plan": plan_s, "load": 0.0, "recompute": 0.0, "suffix": t1 - t0, "total": t1 - start}
        return PrefillResult(tuple(ids), cache, logits, outcome, reason, plan, MappingProxyType(timings), 1.0,
                             request_id=request_id)

    def _reuse_end(self, plan: SemanticKvPlan, n: int) -> int:
        """End of the reused region of an ``n``-token prompt: the last span's end, kept clear of the always-fresh
        suffix; ``<= 0`` when nothing is left to reuse."""
        if not plan.spans:
            return 0
        return min(max(s.target_end for s in plan.spans), n - min(self.options.suffix_tokens, n))

    def _materialize_or_cold(self, ids: list[int], plan: SemanticKvPlan, start: float, plan_s: float,
                             request_id: str) -> PrefillResult:
        from semblend_core.kv_tensor_store import DonorKvMissingError

        if self._reuse_end(plan, len(ids)) <= 0:
            # Everything reusable lies inside the always-fresh suffix: a prefill is all there is to do.
            self.pipeline.record_outcome(plan, Outcome.DECLINED, reason=REASON_NOTHING_BEFORE_SUFFIX)
            return self._cold(ids, start, plan, Outcome.DECLINED, REASON_NOTHING_BEFORE_SUFFIX, request_id,
                              plan_s=plan_s)
        try:
            # The lease pins the donor's KV for the whole materialization: eviction cannot pull it away.
            with self.kv_store.lease(self.namespace.key, str(plan.donor_id)) as donor:
                donor.wait()
                result = self._materialize(ids, plan, donor.kv, start, plan_s, request_id, plan.donor_id)
        except DonorKvMissingError:
            self.pipeline.record_outcome(plan, Outcome.DECLINED, reason=REASON_DONOR_KV_EVICTED)
            return self._cold(ids, start, plan, Outcome.DECLINED, REASON_DONOR_KV_EVICTED, request_id, plan_s=plan_s)
        except Exception as exc:  # rule 5: a failed reuse is a normal prefill, never a failed request
            reason = f"{Reason.INTERNAL_ERROR}:{type(exc).__name__}"
            logger.warning("SemBlend materialization failed (%s: %s); running a normal prefill",
                           type(exc).__name__, exc)
            logger.debug("materialization failure", exc_info=True)
            self.pipeline.record_outcome(plan, Outcome.DECLINED, reason=reason)
            return self._cold(ids, start, plan, Outcome.DECLINED, reason, request_id, plan_s=plan_s)
        self.pipeline.record_outcome(plan, Outcome.MATERIALIZED, loaded_tokens=plan.reused_tokens)
        return result

    def _materialize(self, ids: list[int], plan: SemanticKvPlan, donor_kv: Any, start: float, plan_s: float,
                     request_id: str, donor_id: str | None) -> PrefillResult:
        """``donor_kv``: the donor's ``[L, 2, T, H, D]`` KV on any device (copied to the model's inside ``load``)."""
        torch = self._torch
        t0 = time.perf_counter()
        if donor_kv.device != self.device:
            # One contiguous copy of the whole entry at pinned-memory bandwidth: the strided k/v halves would be
            # staged through pageable memory (about 10x slower on the H100 host, measured).
            donor_kv = donor_kv.to(self.device, non_blocking=True)
        n = len(ids)
        if not plan.spans:
            raise ValueError("a materialized plan needs at least one span")
        prefix_len = self._reuse_end(plan, n)
        if prefix_len <= 0:
            raise ValueError("nothing to reuse before the last prompt token")
        if any(s.donor_end > donor_kv.shape[2] for s in plan.spans):
            raise ValueError(f"plan spans exceed the donor KV ({donor_kv.shape[2]} tokens)")
        if donor_kv.shape[0] != self.num_layers:
            raise ValueError(f"donor KV has {donor_kv.shape[0]} layers, the model {self.num_layers}")
        with torch.no_grad():
            k, v = assemble_kv(plan, donor_kv, prefix_len, self.rope_spec,
                               rope_correction=self.options.rope_correction, total_len=n)
            _sync(self.device)
            t1 = time.perf_counter()
            # One pass over the layers: recomputed prefix tokens and the suffix together; logits of the last token.
            stats, logits = blend_prefill(self.model, torch.tensor(ids, device=self.device), k, v, plan,
                                          reuse_len=prefix_len, check_layer=self.options.check_layer,
                                          selection=self.options.selection)
            _sync(self.device)
            t2 = time.perf_counter()
            cache = build_dynamic_cache(self.model, k, v)  # k/v storage is already in the cache's layout: no copy
            del k, v
            _sync(self.device)
            t3 = time.perf_counter()
        suffix = n - prefix_len
        fraction = (stats.token_layers + suffix * self.num_layers) / (n * self.num_layers)
        # "recompute" covers the fused layer pass (budgeted prefix tokens + suffix); "suffix" is the cache hand-off.
        timings = {"plan": plan_s, "load": t1 - t0, "recompute": t2 - t1, "suffix": t3 - t2, "total": t3 - start}
        return PrefillResult(tuple(ids), cache, logits, Outcome.MATERIALIZED, Reason.HIT, plan,
                             MappingProxyType(timings), float(fraction), stats=stats, donor_id=donor_id,
                             request_id=request_id)
