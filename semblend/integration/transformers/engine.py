"""``SemBlendEngine``: a Hugging Face causal LM that reuses donor KV across semantically similar prompts.

The reference engine: every step of semantic KV reuse happens here in plain PyTorch, where each can be checked.

Lifecycle of one ``generate`` call::

    ids = tokenize(prompt)
    plan = pipeline.plan(ids, text)                      # semblend_core: donor discovery + alignment (never raises)
    if plan.is_hit and donor KV is resident:             # a lease on every donor in plan.donor_ids; a donor whose
                                                         # KV is gone drops its spans (gates re-checked) or declines;
                                                         # each span's tokens checked against its entry
        k, v = assemble_kv(plan, donor_kv)               # each span from its donor's KV, moved to its target
                                                         # positions (RoPE re-rotation by its own delta)
        logits = run_blended_prefill(view, ids, k, v,    # semblend_core's one layer pass over the model's
                                     plan)               # TransformersModelView: seam / uncovered / deviation
                                                         # tokens and the suffix ids[P:]; logits of the last token
        pipeline.record_outcome(plan, "materialized", loaded_tokens=...)
    else:                                                # a miss, a decline, or ANY error: normal cold prefill
        logits = model(ids)
    first = argmax(logits)                               # TTFT ends here
    rest = model.generate(ids + [first], past_key_values=cache)
    donor store <- (ids, per-layer KV of the prompt)     # capacity-bounded; the prompt becomes a donor

``P`` is the end of the last reused span (at most ``len(ids) - suffix_tokens``): everything after it is the suffix,
computed fresh at every layer in the same pass (each weight is read once per hit).

Supported models: the families of ``semblend_core.model_support.SUPPORTED_MODEL_TYPES`` (Llama, Mistral, Qwen2,
Qwen3) with full attention and exactly re-rotatable RoPE, whose start-up self-check passes (a probe prompt's
blended prefill equals its cold prefill). Every other model (other families, sliding-window, chunked or NoPE layers,
RoPE whose re-rotation is not exact, MLA) still generates, always cold, with outcome ``declined`` and the reason. Works on CPU and CUDA; one request at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from semblend.integration.transformers.blend import TransformersModelView, model_support
from semblend_core.blended_prefill import BlendStats, assemble_kv, run_blended_prefill
from semblend_core.config import SemBlendConfig
from semblend_core.namespace import CacheNamespace
from semblend_core.plan import Outcome, Reason, SemanticKvPlan, verify_donor_tokens

logger = logging.getLogger(__name__)

__all__ = ["EngineOptions", "GenerationResult", "PrefillResult", "SemBlendEngine"]

_MISS_OUTCOMES = {
    Reason.NO_CANDIDATE: Outcome.COLD, Reason.DISABLED: Outcome.COLD,
    Reason.EXACT_PREFIX_SUFFICIENT: Outcome.EXACT, Reason.NO_GAIN_OVER_EXACT_PREFIX: Outcome.EXACT,
}
REASON_DONOR_KV_EVICTED = "donor_kv_evicted"
REASON_NOTHING_BEFORE_SUFFIX = "nothing_before_suffix"
REASON_GUARD_LOW_MARGIN = "guard_low_margin"


class _DonorKvMismatch(Exception):
    """The leased KV entry of donor ``args[0]`` holds tokens (``args[1]``) other than the plan's on some span."""

# model -> {(dtype, device, options...): (reason, report)}: the self-check runs once per model and setting.
_SELF_CHECKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    * ``self_check``: at start-up, run a short probe prompt through the blended prefill (an exact prefix, and a
      seamed self-donor through the recompute path) and compare with a cold prefill
      (``semblend_core.model_support.compare_self_check``); a model that fails declines every prompt with
      ``self_check_failed:<what>``. Costs three prefills of a few dozen tokens, once per model, dtype and device.
      Off only for tests that need a deliberately broken loop.
    * ``guard``: a ``semblend_core.recompute.HitGuard``; a hit whose blended first-token margin is below its
      threshold is discarded and served by a normal prefill (outcome ``declined``, reason ``guard_low_margin``).
      ``None`` (default): no guard.
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
    self_check: bool = True
    selection: Any = None
    guard: Any = None  # a semblend_core.recompute.HitGuard: risky hits (first-token margin) are served cold

    def __post_init__(self) -> None:
        if not isinstance(self.self_check, bool):
            raise ValueError(f"EngineOptions.self_check={self.self_check!r}; allowed: True, False")
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


def spans_mismatching_donor_tokens(plan: SemanticKvPlan, prompt_ids: Sequence[int],
                                   donor_tokens: Mapping[str, Any]) -> tuple[Any, ...]:
    """Spans of ``plan`` whose donor KV entry does not hold the planned tokens (empty: every span checks out).

    ``donor_tokens`` maps each donor of the plan to the token ids stored *with its KV entry* (``DonorKv.token_ids``):
    a span is good only if that entry's tokens ``[donor_start, donor_end)`` equal the prompt's
    ``[target_start, target_end)``. A donor missing from the mapping fails all its spans. Catches KV entries that
    changed owner or content behind the planner's back (a reused donor id, a store shared by two engines), so
    they decline ``donor_kv_mismatch`` instead of serving another prompt's KV. Cost: one comparison of the
    reused tokens.
    """
    target = np.asarray(prompt_ids, dtype=np.int64)
    bad = []
    for span in plan.spans:
        tokens = donor_tokens.get(plan.donor_of(span))
        if tokens is None or not verify_donor_tokens(span, tokens, target):
            bad.append(span)
    return tuple(bad)


class SemBlendEngine:
    """Semantic KV reuse around a transformers causal LM (Llama, Qwen2/3, Mistral-family decoders).

    Args:
        model: a ``*ForCausalLM`` in eval mode, on CPU or CUDA.
        tokenizer: its tokenizer (strings are tokenized as given: apply a chat template first if you want one).
        config: :class:`SemBlendConfig` (gates, alignment, recompute budget, bathtub preset).
        options: :class:`EngineOptions`.
        pipeline: an existing ``SemBlendPipeline`` to share (default: a new one sized for this model). Engines
            sharing a pipeline share its KV store too (the first engine's, sized by its options), so a donor one
            engine registered serves the others; request ids carry an engine-unique prefix so they never collide.
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

        if self.pipeline.kv_store is not None:
            self.kv_store = self.pipeline.kv_store  # one donor lifetime per pipeline: share its KV store
        else:
            cap = self.options.kv_capacity_bytes
            on_device = self.options.kv_tier == "device"
            self.kv_store = KvTensorStore(device_bytes=cap if on_device else 0, host_bytes=0 if on_device else cap,
                                          device=self.device if on_device else None)
            self.pipeline.attach_kv_store(self.kv_store)
        # Donor ids are request ids: unique per pipeline even when several engines (or several processes' engines
        # registering into one store) count requests from 0.
        self._id_prefix = f"{uuid.uuid4().hex[:8]}-"
        self._ids = itertools.count()
        self._torch = torch
        self._blend_view: TransformersModelView | None = None  # built on the first hit, then reused
        self.self_check_report: Mapping[str, float] = MappingProxyType({})
        if self.supported and self.options.self_check:
            reason, report = self._cached_self_check()
            self.self_check_report = MappingProxyType(report)
            if reason:
                self.supported, self.unsupported_reason = False, reason
                logger.warning("SemBlend declines this model: its blended prefill does not reproduce a cold "
                               "prefill (%s, %s); every prompt runs a normal prefill", reason, report)

    def _cached_self_check(self) -> tuple[str, dict[str, float]]:
        key = (str(self.dtype), str(self.device), self.options.check_layer, self.options.rope_correction,
               self.options.suffix_tokens)
        per_model = _SELF_CHECKS.setdefault(self.model, {})
        if key not in per_model:
            per_model[key] = self._self_check()
        return per_model[key]

    def _self_check(self) -> tuple[str, dict[str, float]]:
        """``(reason, relative errors)``: blended prefills of a probe prompt against its cold prefill.

        Two plans over the probe's own KV (so every reused row is exactly what a cold prefill computes): an exact
        prefix (only the suffix runs through the loop), and the same tokens as two spans with a seam (delta 0)
        and a 50% budget, which runs the recompute path (deviation check, nested active sets). Any difference
        beyond rounding means the loop computes something the model does not.
        """
        from semblend_core.model_support import compare_self_check, self_check_tolerance
        from semblend_core.pipeline import recompute_ranges
        from semblend_core.plan import Span

        torch = self._torch
        n = max(32, 2 * self.options.suffix_tokens + 16)
        vocab = int(self.model.get_input_embeddings().num_embeddings)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(min(3, vocab - 1), vocab, (n,), generator=gen).tolist()
        half = n // 2
        cases = {
            "exact_prefix": ((Span(0, 0, n),), ((n - 1, n),), 0.0),
            "recompute_path": ((Span(0, 0, half), Span(half, half, n - half)),
                               recompute_ranges((Span(0, 0, half), Span(half, half, n - half)), n, 2), 0.5),
        }
        report: dict[str, float] = {"tolerance": self_check_tolerance(self.dtype), "probe_tokens": float(n)}
        try:
            cold = self.cold_prefill(ids)
            k, v = self.donor_kv(cold)
            for name, (spans, ranges, budget) in cases.items():
                plan = SemanticKvPlan(True, Reason.HIT, n, self.namespace, donor_id="self-check", donor_len=n,
                                      spans=spans, recompute_ranges=ranges, recompute_budget=budget,
                                      layer_recompute=(budget,) * self.num_layers if budget else ())
                res = self.prefill_with_plan(ids, plan, k, v)
                start = self._reuse_end(plan, n)
                rk, rv = self.donor_kv(res)
                suffix_ref, suffix_got = torch.stack((k, v))[:, :, start:], torch.stack((rk, rv))[:, :, start:]
                for what, ref, got in (("logits", cold.logits, res.logits), ("suffix_kv", suffix_ref, suffix_got)):
                    reason, err = compare_self_check(ref.float().cpu().numpy(), got.float().cpu().numpy(),
                                                     self.dtype, what=f"{name}_{what}")
                    report[f"{name}_{what}"] = err
                    if reason:
                        return reason, report
        except Exception as exc:  # noqa: BLE001 - a loop that crashes on this model is a decline, not a failure
            logger.debug("self-check failure", exc_info=True)
            return f"self_check_failed:{type(exc).__name__}", report
        return "", report

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
        request_id = "cold" if force_cold else f"{self._id_prefix}req-{next(self._ids)}"
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

    def prefill_with_plan(self, prompt_ids: Sequence[int], plan: SemanticKvPlan, donor_k: Any,
                          donor_v: Any = None) -> PrefillResult:
        """Materialize ``plan`` with explicit donor KV (``[num_layers, donor_len, kv_heads, head_dim]``), or for a
        multi-donor plan ``donor_k={donor_id: (k, v), ...}`` covering ``plan.donor_ids`` (``donor_v`` unset).

        Bypasses discovery and the donor stores: tests and benchmarks use it to control the plan exactly. Raises
        on errors (no cold fallback) so that a broken materialization cannot hide behind one.
        """
        ids = [int(t) for t in prompt_ids]
        if plan.target_len != len(ids):
            raise ValueError(f"plan.target_len={plan.target_len} but the prompt has {len(ids)} tokens")
        start = time.perf_counter()
        if isinstance(donor_k, Mapping):
            if donor_v is not None:
                raise ValueError("pass either donor_k and donor_v, or one mapping donor_id -> (k, v)")
            kv = {d: self._torch.stack(tuple(pair), dim=1) for d, pair in donor_k.items()}
        else:
            kv = self._torch.stack((donor_k, donor_v), dim=1)
        return self._materialize(ids, plan, kv, start, 0.0, "explicit", None)

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
        from semblend_core.errors import DuplicateDonorError, StoreFullError

        try:
            k, v = self.donor_kv(pre)
            self.kv_store.put(self.namespace.key, pre.request_id, self._torch.stack((k, v), dim=1),
                              list(pre.prompt_ids))
        except (StoreFullError, DuplicateDonorError) as exc:  # too large, all else leased, or an id taken
            logger.debug("donor %s not stored: %s", pre.request_id, exc)
            return
        try:
            self.pipeline.register_donor(pre.request_id, list(pre.prompt_ids), namespace=self.namespace)
        except Exception as exc:  # donating is best effort; the request itself already succeeded
            self.kv_store.evict(self.namespace.key, pre.request_id, token_ids=pre.prompt_ids)
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
            return self._decline(ids, start, plan, REASON_NOTHING_BEFORE_SUFFIX, request_id, plan_s)
        try:
            with contextlib.ExitStack() as leases:
                # Each lease pins one donor's KV for the whole materialization: eviction cannot pull it away.
                entries, missing = {}, []
                for donor_id in plan.donor_ids:
                    try:
                        entries[donor_id] = leases.enter_context(self.kv_store.lease(self.namespace.key, donor_id))
                    except DonorKvMissingError:
                        missing.append(donor_id)
                if missing:
                    # Attached stores retire such donors themselves; this covers a store wired some other way.
                    for donor_id in missing:
                        self._retire(donor_id)
                    # Those donors' spans are dropped and the gates re-checked on what is left (never silently:
                    # a plan that no longer passes declines with the reason, one that does is what gets loaded).
                    reduced = self.pipeline.drop_donors(plan, missing)
                    logger.info("SemBlend: KV of donor(s) %s is gone; %s", ", ".join(missing),
                                "their spans are dropped" if reduced.is_hit else f"declining ({reduced.reason})")
                    if not reduced.is_hit or self._reuse_end(reduced, len(ids)) <= 0:
                        return self._decline(ids, start, plan, REASON_DONOR_KV_EVICTED, request_id, plan_s)
                    plan = reduced
                    entries = {d: entries[d] for d in plan.donor_ids}
                bad = spans_mismatching_donor_tokens(plan, ids, {d: e.token_ids for d, e in entries.items()})
                if bad:
                    donor_id = plan.donor_of(bad[0]) or str(plan.donor_id)
                    raise _DonorKvMismatch(donor_id, entries[donor_id].token_ids)
                for entry in entries.values():
                    entry.wait()
                kv = entries[plan.donor_ids[0]].kv if len(entries) == 1 else {d: e.kv for d, e in entries.items()}
                result = self._materialize(ids, plan, kv, start, plan_s, request_id, plan.donor_id)
        except _DonorKvMismatch as exc:
            # The KV under this id belongs to another prompt than the planner's donor: serving it would be wrong
            # KV. Neither side can serve the planned donor any more: drop that entry and the planner's record
            # (after the leases are released, so the entry can go).
            donor_id, entry_tokens = exc.args
            logger.warning("SemBlend: KV entry of donor %s holds other tokens than the plan's; running a normal "
                           "prefill", donor_id)
            self.kv_store.evict(self.namespace.key, donor_id, token_ids=entry_tokens)
            self._retire(donor_id)
            return self._decline(ids, start, plan, Reason.DONOR_KV_MISMATCH, request_id, plan_s)
        except Exception as exc:  # rule 5: a failed reuse is a normal prefill, never a failed request
            reason = f"{Reason.INTERNAL_ERROR}:{type(exc).__name__}"
            logger.warning("SemBlend materialization failed (%s: %s); running a normal prefill",
                           type(exc).__name__, exc)
            logger.debug("materialization failure", exc_info=True)
            return self._decline(ids, start, plan, reason, request_id, plan_s)
        guard = self.options.guard
        if guard is not None and guard.fires(result.logits):
            # A near-tie first token: the small error of reused KV decides the answer. Serve it cold (the blended
            # work is wasted; benchmarks/quality_frontier.py measures that cost and the catch rate).
            return self._decline(ids, start, result.plan, REASON_GUARD_LOW_MARGIN, request_id, plan_s)
        self.pipeline.record_outcome(result.plan, Outcome.MATERIALIZED, loaded_tokens=result.plan.reused_tokens)
        return result

    def _retire(self, donor_id: str) -> None:
        from semblend_core.errors import StoreFullError

        try:
            self.pipeline.remove_donor(donor_id, self.namespace)
        except StoreFullError:  # pinned by someone else's in-flight load: it retires when that load fails
            pass

    def _decline(self, ids: list[int], start: float, plan: SemanticKvPlan, reason: str, request_id: str,
                 plan_s: float) -> PrefillResult:
        self.pipeline.record_outcome(plan, Outcome.DECLINED, reason=reason)
        return self._cold(ids, start, plan, Outcome.DECLINED, reason, request_id, plan_s=plan_s)

    def _on_device(self, entry: Any) -> Any:
        if entry.device == self.device:
            return entry
        # One contiguous copy of the whole entry at pinned-memory bandwidth: the strided k/v halves would be staged
        # through pageable memory (about 10x slower on the H100 host, measured).
        return entry.to(self.device, non_blocking=True)

    def _materialize(self, ids: list[int], plan: SemanticKvPlan, donor_kv: Any, start: float, plan_s: float,
                     request_id: str, donor_id: str | None) -> PrefillResult:
        """``donor_kv``: the donor's ``[L, 2, T, H, D]`` KV on any device (copied to the model's inside ``load``),
        or for a multi-donor plan a mapping ``donor_id -> `` such a tensor covering ``plan.donor_ids``."""
        torch = self._torch
        t0 = time.perf_counter()
        n = len(ids)
        if not plan.spans:
            raise ValueError("a materialized plan needs at least one span")
        prefix_len = self._reuse_end(plan, n)
        if prefix_len <= 0:
            raise ValueError("nothing to reuse before the last prompt token")
        if isinstance(donor_kv, Mapping):
            donor_kv = {key: self._on_device(entry) for key, entry in donor_kv.items()}
            checks = [(key, donor_kv.get(key), plan.spans_of(key)) for key in plan.donor_ids]
        else:
            if plan.multi_donor:
                raise ValueError(f"plan reads {len(plan.donor_ids)} donors {plan.donor_ids}; pass one KV per donor")
            donor_kv = self._on_device(donor_kv)
            checks = [(plan.donor_id, donor_kv, plan.spans)]
        for key, entry, spans in checks:
            if entry is None:
                raise ValueError(f"no KV given for donor {key!r} of the plan")
            if any(s.donor_end > entry.shape[2] for s in spans):
                raise ValueError(f"plan spans exceed donor {key!r}'s KV ({entry.shape[2]} tokens)")
            if entry.shape[0] != self.num_layers:
                raise ValueError(f"donor {key!r} KV has {entry.shape[0]} layers, the model {self.num_layers}")
        with torch.no_grad():
            k, v = assemble_kv(plan, donor_kv, prefix_len, self.rope_spec,
                               rope_correction=self.options.rope_correction, total_len=n)
            _sync(self.device)
            t1 = time.perf_counter()
            if self._blend_view is None:
                self._blend_view = TransformersModelView(self.model)
            # One pass over the layers: recomputed prefix tokens and the suffix together; logits of the last token.
            stats, logits = run_blended_prefill(self._blend_view, torch.tensor(ids, device=self.device), k, v, plan,
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
