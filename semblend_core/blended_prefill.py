"""The one blended-prefill executor every engine shares: donor KV in, selected tokens recomputed, target KV out.

An engine adapter maps its own model modules onto a :class:`BlendModelView` (embeddings, per-layer Q/K/V, RoPE
tables, output projection + MLP) and hands the executor a plan, the prompt and a contiguous KV scratch; the
executor never imports an engine and never grows per-engine branches. Lifecycle of one hit::

    k, v = assemble_kv(plan, donor_kv, reuse_len, rope_spec, total_len=n)   # reused KV re-rotated into place
    stats, logits = run_blended_prefill(view, ids, k, v, plan, reuse_len=reuse_len, logits=...)
    # the adapter copies k / v rows [0, n) where its engine keeps KV (HF: they already are its cache; vLLM: the
    # request's paged blocks) -- for an engine that computes the suffix itself, ``n == reuse_len`` and
    # ``logits=False``

1. The adapter decides once per model that the family is supported (``semblend_core.model_support``'s allowlist:
   Llama, Mistral, Qwen2, Qwen3, full attention, RoPE whose re-rotation is exact) and builds its view once; any
   other model is declined, never run here.
2. :func:`assemble_kv`: per layer, the target's KV ``[n, num_kv_heads, head_dim]`` (stored in the Hugging Face
   cache layout) built from donor KV: every span's keys re-rotated by its ``delta`` and values copied, all spans
   and layers of one donor in one ``semblend_core.triton_kernels.rerotate_scatter`` call (a multi-donor plan makes
   one call per donor, each reading its own KV entry); other rows stay zero until computed.
3. :func:`run_blended_prefill`: the layer loop. Each layer computes fresh Q/K/V only for its *active* positions
   (:meth:`BlendModelView.qkv`), rotates Q/K at their absolute positions and writes the fresh K/V into the
   assembled cache in one call (``semblend_core.rope_store``: fused Triton on CUDA, its torch twin elsewhere), runs
   attention of those queries over the whole cache (``semblend_core.partial_attention``; causal SDPA when every
   position is a query), then :meth:`BlendModelView.finish_layer` (``o_proj``, residual, post-attention norm, MLP,
   residual). With ``logits=True`` the final norm and LM head on the last token give the logits; with
   ``logits=False`` the loop stops once the last layer's K/V are written.

Which positions are active (CacheBlend-style, with EPIC's seam heads):

* never: ``[0, fixed_prefix)``, the engine's own exact prefix-cache hit: final KV, attended to as it is.
* mandatory at every layer: ``plan.recompute_ranges`` inside the reused region (uncovered tokens, seam heads, fuzzy
  regions), every position below ``reuse_len`` no span covers, and (``logits=True``) the whole suffix after the last
  reused token, which is computed exactly as a cold prefill would.
* when the budget allows extra tokens, every layer up to ``check_layer`` runs on *all* positions from
  ``fixed_prefix`` on; at ``check_layer`` the fresh K/V of the reused tokens are compared with the reused K/V
  (``semblend_core.recompute.deviation_scores``; the reused rows are saved before the fresh ones overwrite them) and
  the most deviating ones stay active.
* or, with a ``selection`` strategy (``semblend_core.recompute.SelectionStrategy``), no check layer: the strategy
  ranks the reused tokens (``query``: by the attention the last mandatory tokens pay them in a short probe pass of
  the mandatory tokens over the reused KV) and ``select_depths`` spends ``plan.recompute_budget`` token-layers on
  them.
* per-layer counts follow the plan's bathtub policy ``plan.layer_recompute`` (fraction of the reused tokens that
  sit in seamed spans), but a token can only be fresh at layer ``l`` if its hidden state was fresh at every layer
  below: the active sets must be nested. So the count at layer ``l`` is the running *minimum* of the policy up to
  ``l``: early layers get the policy's high counts, later layers never exceed it. The late-layer rise of a bathtub
  cannot be honoured by hidden-state propagation and is deliberately not approximated.

A run whose fresh rows are the same at every layer (no check; selected tokens, if any, fresh at all layers) can
replay its loop from CUDA graphs (``graphs=``, ``semblend_core.layer_graphs``; the loop is :func:`static_layers`).

Everything runs in the view's dtype on the device of ``k``; callers wrap it in ``torch.no_grad()`` (or
``inference_mode``). Needs the ``gpu`` extra (torch; triton for the fused kernels on CUDA). Importing
``semblend_core`` does not import this module, and importing this module does not import torch.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from semblend_core.plan import SemanticKvPlan

__all__ = ["BlendModelView", "BlendStats", "assemble_kv", "relative_error", "run_blended_prefill", "static_layers",
           "to_device"]


class BlendModelView(ABC):
    """A thin, read-only view of one decoder-only model for the executor. Token-major throughout: hidden states
    ``[n, hidden_size]``, heads ``[n, num_heads, head_dim]``. Every method is pure with respect to the model (no
    cache writes, no state). The executor calls ``qkv``/``finish_layer`` about once per layer per hit (a query-aware
    selection probe re-runs its first layers), ``rotary`` whenever its set of fresh positions shrinks.

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


@dataclass(frozen=True)
class BlendStats:
    """What the layer loop did. Counts cover the reused region ``[fixed_prefix, prefix_len)`` only: the suffix
    ``[prefix_len, n)`` (computed at every layer) is the caller's to count, and ``[0, fixed_prefix)`` is never
    computed.

    * ``prefix_len``: the run's ``reuse_len``.
    * ``active_per_layer``: number of positions below ``prefix_len`` computed fresh at each layer.
    * ``checked``: whether the deviation check ran (all positions from ``fixed_prefix`` on through layers
      ``0..check_layer``).
    * ``mandatory``: positions below ``prefix_len`` fresh at every layer (uncovered, or in the plan's recompute
      ranges).
    * ``probe_token_layers``: rows x layers of a selection probe pass (query-aware selection), all counted.
    * ``fixed_prefix``: the run's ``fixed_prefix`` (the engine's exact prefix-cache hit, never recomputed).
    """

    prefix_len: int
    active_per_layer: tuple[int, ...]
    checked: bool
    mandatory: int
    probe_token_layers: int = 0
    fixed_prefix: int = 0

    @property
    def token_layers(self) -> int:
        return sum(self.active_per_layer) + self.probe_token_layers


def assemble_kv(plan: SemanticKvPlan, donor_kv: Any, prefix_len: int, spec: Any, *, rope_correction: bool = True,
                total_len: int | None = None, out: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
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
        out: ``(k_store, v_store)`` ``[num_layers, num_kv_heads, >= total_len, head_dim]`` (the HF layout, donors'
            dtype and device) to fill instead of allocating, e.g. ``semblend_core.layer_graphs``' scratch: rows
            ``[0, total_len)`` are zeroed and filled, later rows are left alone, the result is a view of them.

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
    if out is None:
        k_store = torch.zeros((num_layers, kv_heads, total_len, head_dim), dtype=first.dtype, device=device)
        v_store = torch.zeros_like(k_store)
    else:
        k_store, v_store = (t[:, :, :total_len] for t in out)
        want = (num_layers, kv_heads, total_len, head_dim)
        for t in (k_store, v_store):
            if tuple(t.shape) != want or t.dtype != first.dtype or t.device != device or t.stride(-1) != 1:
                raise ValueError(f"out buffer {tuple(t.shape)} {t.dtype} on {t.device} cannot hold {want} "
                                 f"{first.dtype} on {device}")
        k_store.zero_()
        v_store.zero_()
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
                         to_device(np.concatenate(src_slots), device), to_device(np.concatenate(dst_slots), device),
                         to_device(delta, device) if delta.any() else 0, spec,
                         validate_indices=False)
    return k_store.transpose(1, 2), v_store.transpose(1, 2)


def to_device(array: np.ndarray, device: Any, *, out: Any = None) -> Any:
    """An integer numpy array as a tensor on ``device`` without stalling the host: on CUDA through pinned memory
    with a non-blocking copy. (A copy from pageable memory first waits for every kernel queued before it, so each
    index upload in the layer loop used to stop the host from running ahead of the GPU.) Elsewhere the tensor
    shares the array's memory. ``out``: a tensor of the array's shape on ``device`` to copy into (a static buffer,
    e.g. a CUDA graph's input), returned."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(array))
    cuda = getattr(device, "type", str(device).split(":")[0]) == "cuda"
    if out is not None:
        return out.copy_(t.pin_memory() if cuda else t, non_blocking=cuda)
    if not cuda:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def relative_error(got: Any, want: Any) -> float:
    """``||got - want|| / ||want||`` in float32 (a zero ``want`` counts as 1e-30): how self-checks compare a fast
    path with its reference. One host sync on CUDA."""
    want = want.float()
    return float((got.float() - want).norm() / want.norm().clamp_min(1e-30))


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


def static_layers(view: BlendModelView, ids: Any, slots: Any, positions: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """The layer loop of a run whose fresh rows are the same at every layer, with no branch on the host: what
    ``semblend_core.layer_graphs`` captures. ``ids`` / ``slots`` / ``positions`` LongTensors ``[m]``: the fresh
    rows' tokens, the cache rows their K/V are written to, and the positions their RoPE rotates at and their
    attention reaches up to (causally); for a real row ``slot == position``. Writes every layer's fresh K/V at
    ``slots`` and returns ``(q, hidden)``: the last layer's rotated queries ``[m, num_heads, head_dim]`` and its
    input residual stream."""
    from semblend_core.partial_attention import partial_attention
    from semblend_core.rope_store import rope_store

    hidden = view.embed(ids)
    cos, sin = view.rotary(positions)
    last = int(view.num_layers) - 1
    for layer_idx in range(last + 1):
        q, kk, vv = view.qkv(layer_idx, hidden)
        # The first layer checks the kernels' arguments; the others repeat its geometry.
        q = rope_store(q, kk, vv, cos, sin, slots, k[layer_idx], v[layer_idx], validate=layer_idx == 0)
        if layer_idx == last:
            break
        out = partial_attention(q, k[layer_idx], v[layer_idx], positions, scale=view.attention_scale(layer_idx),
                                check_positions=False, validate=layer_idx == 0)
        hidden = view.finish_layer(layer_idx, out.reshape(out.shape[0], -1), hidden)
    return q, hidden


def run_blended_prefill(view: BlendModelView, input_ids: Any, k: Any, v: Any, plan: SemanticKvPlan, *,
                        reuse_len: int, check_layer: int | None = 1, selection: Any = None, logits: bool = True,
                        fixed_prefix: int = 0, graphs: Any = None) -> tuple[BlendStats, Any]:
    """The whole blended prefill in one pass over the layers (see the module docstring for the active sets).

    Args:
        view: the model, through its engine's :class:`BlendModelView`.
        input_ids: LongTensor ``[n]``, the whole prompt (any device; moved to ``k``'s).
        k, v: ``[num_layers, n, num_kv_heads, head_dim]`` in the view's dtype (attention reads them together with
            the fresh queries), any strides with a unit stride on head_dim (e.g.
            :func:`assemble_kv`'s result with ``total_len=n``): reused rows hold the re-rotated donor KV, rows
            ``[0, fixed_prefix)`` the engine's final KV. Modified in place: on return every row that was computed
            holds its fresh K/V (with ``logits=True`` that makes ``k``/``v`` the prompt's complete KV).
        plan: the hit's plan; its spans are used only below ``reuse_len``.
        reuse_len: donor KV is used only below this position. ``logits=True``: ``0 < reuse_len < n``, and
            ``[reuse_len, n)`` is the suffix, computed fresh at every layer like a cold prefill would (the last
            token is always fresh). ``logits=False``: ``0 < reuse_len <= n`` (an engine that computes the suffix
            itself passes ``n``).
        check_layer: the deviation check's layer (clamped to the model), or None for no check.
        selection: a ``SelectionStrategy``; replaces the deviation check (``check_layer`` is then ignored).
        logits: compute the last token's logits (``view.logits``). False: stop once the last layer's K/V are
            written (no attention or MLP at the last layer) and return ``None`` for them; when nothing is mandatory
            and nothing selected, return at once (zero counts, ``k``/``v`` untouched).
        fixed_prefix: positions ``[0, fixed_prefix)`` already hold final KV (the engine's own exact prefix-cache
            hit): never recomputed, never selection candidates (even where the plan has no span), attended to as
            they are. ``0 <= fixed_prefix <= reuse_len``.
        graphs: a ``semblend_core.layer_graphs.LayerLoopGraphs`` of this view: a run whose fresh rows are the
            same at every layer (no check; a selection only if its tokens are fresh at every layer) replays its
            captured loop when ``k``/``v`` are views of its scratch; anything it cannot take runs eagerly. Same
            results either way (up to rounding).

    Returns ``(stats, logits)``: float32 logits ``[vocab]`` of the last prompt token, or None with
    ``logits=False``. Running the suffix inside the same loop (instead of the model's forward on the assembled
    cache) reads every weight once per hit, not twice, and halves the kernel launches.

    Raises ValueError for arguments outside these ranges, ``k``/``v`` not ``[view.num_layers, n, ...]``, or
    ``logits=True`` on a view without an LM head (checked before any work).
    """
    import torch

    from semblend_core.partial_attention import partial_attention
    from semblend_core.recompute import deviation_scores
    from semblend_core.rope_store import rope_store

    num_layers = int(view.num_layers)
    total = int(input_ids.shape[0])
    reuse_len, fixed_prefix = int(reuse_len), int(fixed_prefix)
    if logits and not 0 < reuse_len < total:
        raise ValueError(f"reuse_len must lie in [1, {total}) with logits=True, got {reuse_len}")
    if not logits and not 0 < reuse_len <= total:
        raise ValueError(f"reuse_len must lie in [1, {total}] with logits=False, got {reuse_len}")
    if not 0 <= fixed_prefix <= reuse_len:
        raise ValueError(f"fixed_prefix must lie in [0, reuse_len={reuse_len}], got {fixed_prefix}")
    if logits and type(view).logits is BlendModelView.logits:
        raise ValueError(f"{type(view).__name__} has no LM head: run the executor with logits=False")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or tuple(t.shape[:2]) != (num_layers, total):
            raise ValueError(f"{name} must be [num_layers={num_layers}, n={total}, num_kv_heads, head_dim], "
                             f"got {tuple(t.shape)}")
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
    mandatory_mask |= ~covered  # uncovered rows below reuse_len and the whole suffix
    mandatory_mask[:fixed_prefix] = False  # the engine's exact hit is final
    candidates_mask = seamed & ~mandatory_mask  # reused tokens whose KV saw another context
    candidates_mask[:fixed_prefix] = False
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

    mandatory = np.flatnonzero(mandatory_mask)  # with logits=True never empty: the suffix is in it
    mandatory_prefix = int(np.searchsorted(mandatory, reuse_len))

    ids = input_ids.to(device)
    sel_depth, probe_cost = None, 0
    if selection is not None and n_candidates > 0 and plan.recompute_budget > 0:
        sel_depth, probe_cost = _select(selection, plan, candidates_mask, reuse_len, view, ids, k, v, mandatory)
    active = np.arange(fixed_prefix, total, dtype=np.int64) if check else mandatory
    if sel_depth is not None:
        active = np.union1d(mandatory, np.flatnonzero(sel_depth > 0))
    if active.size == 0:  # logits=False only: every row below reuse_len is reused as it is
        return BlendStats(reuse_len, (0,) * num_layers, False, 0, probe_cost, fixed_prefix), None
    # Static: the fresh rows are the same at every layer (no check; selected tokens, if any, fresh at all layers).
    # One loop for it, static_layers: replayed from its CUDA graph when ``graphs`` has one, else run as it is.
    if not check and (sel_depth is None or bool((sel_depth[sel_depth > 0] >= num_layers).all())):
        replayed = graphs.run(ids, active, k, v) if graphs is not None else None
        if replayed is None:
            pos_t = to_device(active, device)
            replayed = static_layers(view, ids[pos_t], pos_t, pos_t, k, v)
        return _finish_static(view, replayed, active, k, v, logits,
                              BlendStats(reuse_len, (int(np.searchsorted(active, reuse_len)),) * num_layers,
                                         False, mandatory_prefix, probe_cost, fixed_prefix))
    # Otherwise the fresh rows change between layers: at the check layer (ranked by deviation) or where selected
    # tokens stop.
    pos_t = to_device(active, device)
    hidden = view.embed(ids[pos_t])  # [n, hidden]: 2-D end to end, so every projection is one mm
    cos, sin = view.rotary(pos_t)  # recomputed only when the active set changes
    active_counts: list[int] = []
    # Active == every position (full causal attention is cheaper through SDPA); with a fixed prefix the queries
    # start at fixed_prefix and SDPA's square causal mask would not fit.
    full_rows = check and fixed_prefix == 0

    validate = True  # the kernels check their arguments once per geometry: every layer repeats the first's
    for layer_idx in range(num_layers):
        q, kk, vv = view.qkv(layer_idx, hidden)
        if layer_idx == check_layer:
            cand = np.flatnonzero(candidates_mask)
            cand_t = to_device(cand, device)
            # Indexing copies: the reused rows survive the store below, which overwrites them with fresh K/V.
            reused_k, reused_v = k[layer_idx, cand_t], v[layer_idx, cand_t]
        # One call: RoPE on q and k, fresh k/v written into this layer's cache rows.
        q = rope_store(q, kk, vv, cos, sin, pos_t, k[layer_idx], v[layer_idx], validate=validate)
        if layer_idx == check_layer:
            # CacheBlend: tokens whose fresh K/V differ most from the reused K/V carry the cross-context error.
            score = deviation_scores(k[layer_idx, cand_t], reused_k, v[layer_idx, cand_t], reused_v)
            order = torch.argsort(score.float(), descending=True, stable=True).cpu().numpy()
            ranked = cand[order]
        active_counts.append(int(np.searchsorted(active, reuse_len)))  # prefix rows only; the suffix is counted apart

        # A token's attention and MLP at this layer are needed only if it is still active at the next layer; at
        # the last layer only the last token's (its hidden state gives the logits), or nobody's without logits.
        if layer_idx == num_layers - 1:
            if not logits:
                break
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
            rows = to_device(np.searchsorted(active, next_active), device)
            q, hidden = q[rows], hidden[rows]
            pos_t = to_device(next_active, device)
            full_rows = False
            validate = True
        scale = view.attention_scale(layer_idx)
        if full_rows:
            # Every position is a query: plain causal SDPA (flash attention on CUDA). K/V are expanded to the
            # query heads explicitly because not every SDPA backend takes grouped KV.
            group = q.shape[1] // k.shape[2]
            kx = k[layer_idx].repeat_interleave(group, dim=1) if group > 1 else k[layer_idx]
            vx = v[layer_idx].repeat_interleave(group, dim=1) if group > 1 else v[layer_idx]
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], kx.transpose(0, 1)[None], vx.transpose(0, 1)[None], is_causal=True,
                scale=scale,
            )[0].transpose(0, 1)
        else:
            out = partial_attention(q, k[layer_idx], v[layer_idx], pos_t, scale=scale, check_positions=False,
                                    validate=validate)
            validate = changed  # the next layer's rope_store sees new shapes only if the set changed here
        hidden = view.finish_layer(layer_idx, out.reshape(out.shape[0], -1), hidden)
        active = next_active
        if changed and layer_idx < num_layers - 1:
            cos, sin = view.rotary(pos_t)
    active_counts += [0] * (num_layers - len(active_counts))
    stats = BlendStats(reuse_len, tuple(active_counts), check, mandatory_prefix, probe_cost, fixed_prefix)
    if not logits:
        return stats, None
    return stats, view.logits(hidden[-1:])[-1].float()


def _finish_static(view: BlendModelView, replayed: tuple[Any, Any], active: np.ndarray, k: Any, v: Any,
                   logits: bool, stats: BlendStats) -> tuple[BlendStats, Any]:
    """After :func:`static_layers` (replayed or run): with logits, the last layer for the last token only (as the
    changing-rows loop does), then the LM head."""
    if not logits:
        return stats, None
    from semblend_core.partial_attention import partial_attention

    q, hidden = replayed
    m, last = int(active.size), int(view.num_layers) - 1
    pos = to_device(active[-1:], k.device)
    out = partial_attention(q[m - 1:m], k[last], v[last], pos, scale=view.attention_scale(last),
                            check_positions=False)
    hidden = view.finish_layer(last, out.reshape(1, -1), hidden[m - 1:m])
    return stats, view.logits(hidden)[-1].float()


def _select(selection: Any, plan: SemanticKvPlan, candidates_mask: np.ndarray, reuse_len: int, view: BlendModelView,
            ids: Any, k: Any, v: Any, mandatory: np.ndarray) -> tuple[Any, int]:
    """``(depth [n] or None, probe token-layers)`` for a ``SelectionStrategy`` (``semblend_core.recompute``).

    ``query`` ranks by the attention the last mandatory rows pay each candidate (:func:`_query_probe`); with no
    mandatory row to ask (possible only with ``logits=False``) it falls back to the positional ranking
    (``scores=None``: round-robin over spans)."""
    from semblend_core.recompute import select_depths

    num_layers = int(view.num_layers)
    offset = np.full(candidates_mask.shape[0], np.iinfo(np.int64).max // 2, dtype=np.int64)
    for s in plan.spans:
        a, b = s.target_start, min(s.target_end, reuse_len)
        if b > a:
            offset[a:b] = np.arange(b - a)
    scores, cost = None, 0
    if selection.name == "query" and mandatory.size:
        mass, cost = _query_probe(view, ids, k, v, mandatory, selection.query_tokens,
                                  min(selection.probe_layers, num_layers))
        scores = mass.cpu().numpy()
    depth = select_depths(candidates_mask, float(plan.recompute_budget), num_layers, scores=scores,
                          span_offset=offset, chunk_heads=selection.chunk_heads, depth=selection.depth)
    return (depth if depth.any() else None), cost


def _query_probe(view: BlendModelView, ids: Any, k: Any, v: Any, active: np.ndarray, query_tokens: int,
                 probe_layers: int) -> tuple[Any, int]:
    """Run the mandatory positions ``active`` (non-empty) through layers ``[0, probe_layers)`` over the reused KV
    and return the attention mass their last ``query_tokens`` rows pay each position (summed over probe layers,
    heads and queries; float32 ``[n]``) and the probe's token-layers.

    Writes fresh K/V of ``active`` rows into ``k``/``v`` at the probe layers; the main pass rewrites exactly those
    rows (mandatory positions are active at every layer) before any query reads them.
    """
    import torch

    from semblend_core.partial_attention import partial_attention
    from semblend_core.recompute import suffix_attention_mass
    from semblend_core.rope_store import rope_store

    device = k.device
    pos_t = to_device(active, device)
    hidden = view.embed(ids[pos_t])
    cos, sin = view.rotary(pos_t)
    m = min(int(query_tokens), int(active.size))
    mass = torch.zeros(k.shape[1], dtype=torch.float32, device=device)
    for layer_idx in range(probe_layers):
        q, kk, vv = view.qkv(layer_idx, hidden)
        q = rope_store(q, kk, vv, cos, sin, pos_t, k[layer_idx], v[layer_idx])
        scale = view.attention_scale(layer_idx)
        mass += suffix_attention_mass(q[-m:], k[layer_idx], pos_t[-m:], scale)
        if layer_idx == probe_layers - 1:
            break
        out = partial_attention(q, k[layer_idx], v[layer_idx], pos_t, scale=scale, check_positions=False)
        hidden = view.finish_layer(layer_idx, out.reshape(out.shape[0], -1), hidden)
    return mass, probe_layers * int(active.size)
