"""Which target tokens to compute fresh when reusing donor KV: selection inside a recompute budget.

Lifecycle, per request, after the core has produced a :class:`~semblend_core.plan.SemanticKvPlan`:

1. (optional) at one or more *check layers*, the adapter computes fresh K/V for the reused tokens and calls
   :func:`deviation_scores` against the reused (re-rotated donor) K/V: one score per target token;
2. :func:`select_recompute` turns the plan, a budget fraction and those scores into sorted unique positions;
3. :func:`layer_budget` gives the bathtub policy's per-layer fraction when an adapter refreshes tokens per layer.

Token classes, in priority order (each position is counted once, in the first class that claims it):

* ``uncovered`` -- no exact span covers it; there is no donor KV to reuse. Mandatory.
* ``suffix`` -- the last ``suffix_tokens`` prompt tokens (the query), so the engine produces fresh logits.
  Mandatory.
* ``seam`` -- the first ``seam_tokens`` tokens of every span that is not context-exact. The reused KV there saw a
  different left context in the donor, and the first tokens of a reused chunk carry most of that error (EPIC's
  attention-sink finding). Budgeted.
* ``deviation`` -- reused tokens whose fresh K/V differ most from the reused K/V at the check layers (CacheBlend's
  selective recompute). Budgeted.
* ``planned`` -- any other position the planner put in ``plan.recompute_ranges`` (for example a fuzzy region that a
  span happens to overlap). Mandatory: the plan is the contract and an adapter never reuses what it marks fresh.

Budget: mandatory positions are always returned, even when they alone exceed the budget. ``seam`` and then
``deviation`` positions fill at most ``floor(budget * target_len)`` *extra* positions. Seam tokens are taken round-robin
by offset (offset 0 of every seam, then offset 1, ...), so a tight budget still refreshes the first token of every
seam; deviation tokens are taken highest score first, ties to the lower position.

Pure numpy. Scores may be torch tensors (read through ``.detach().cpu()`` without importing torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from semblend_core.plan import SemanticKvPlan

CLASSES = ("uncovered", "suffix", "planned", "seam", "deviation")

__all__ = ["CLASSES", "RecomputeSelection", "deviation_scores", "layer_budget", "select_recompute"]


@dataclass(frozen=True)
class RecomputeSelection:
    """Positions to compute fresh and where they came from.

    * ``positions``: read-only sorted unique int64 numpy array of target positions, each in ``[0, target_len)``.
    * ``breakdown``: read-only mapping with one count per class in :data:`CLASSES` (disjoint; they sum to
      ``len(positions)``), plus ``"mandatory"`` (uncovered + suffix + planned), ``"budget_tokens"`` (the extra
      positions the budget allowed) and ``"total"``.

    Unpacks as ``positions, breakdown = select_recompute(...)``.
    """

    positions: np.ndarray
    breakdown: Mapping[str, int]

    def __iter__(self):
        return iter((self.positions, self.breakdown))

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @property
    def fraction(self) -> float:
        """Recomputed positions over ``target_len`` (0.0 for an empty prompt)."""
        target_len = self.breakdown.get("target_len", 0)
        return len(self) / target_len if target_len else 0.0


def _as_numpy(x: Any, name: str) -> np.ndarray:
    """numpy view/copy of an array-like or a torch tensor (duck-typed: no torch import)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got dtype object")
    return arr


def _coverage(plan: SemanticKvPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``covered`` bool mask, per-position offset inside its span, and bool mask of seam-span membership."""
    n = plan.target_len
    covered = np.zeros(n, dtype=bool)
    offset = np.full(n, -1, dtype=np.int64)
    in_seam_span = np.zeros(n, dtype=bool)
    for span in plan.spans:
        a = max(0, span.target_start)
        b = min(n, span.target_end)
        if b <= a:
            continue
        covered[a:b] = True
        offset[a:b] = np.arange(a - span.target_start, b - span.target_start, dtype=np.int64)
        if not span.context_exact:
            in_seam_span[a:b] = True
    return covered, offset, in_seam_span


def select_recompute(
    plan: SemanticKvPlan,
    budget: float | None = None,
    deviation: Any | None = None,
    *,
    seam_tokens: int | None = None,
    suffix_tokens: int = 1,
) -> RecomputeSelection:
    """Select the target positions to compute fresh for ``plan`` (see the module docstring for the classes).

    Args:
        plan: the core's plan. ``plan.spans`` decide coverage and seams; ``plan.recompute_ranges`` are honoured
            (positions the planner marked fresh are never dropped unless they are budgeted seam heads).
        budget: fraction of ``target_len`` available for seam + deviation tokens on top of the mandatory ones;
            ``None`` takes ``plan.recompute_budget``. Must be in ``[0, 1]``.
        deviation: optional per-token scores, shape ``[target_len]``, or ``[num_check_layers, target_len]`` (the
            maximum over check layers is used: a token wrong at any check layer is wrong). numpy or torch. Only
            reused positions compete; NaN scores rank last.
        seam_tokens: tokens refreshed after every seam. ``None`` takes the seam heads the planner already put in
            ``plan.recompute_ranges`` (its ``seam_recompute_tokens``); an integer recomputes them from the spans.
        suffix_tokens: the last ``suffix_tokens`` prompt tokens are always fresh (at least the last one when the
            prompt is non-empty).

    Returns:
        :class:`RecomputeSelection`. Pure; call once per request (O(target_len + spans) numpy work).
    """
    target_len = int(plan.target_len)
    if budget is None:
        budget = float(plan.recompute_budget)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget) \
            or not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be a number in [0, 1], got {budget!r}")
    if isinstance(suffix_tokens, bool) or not isinstance(suffix_tokens, (int, np.integer)) or suffix_tokens < 0:
        raise ValueError(f"suffix_tokens must be a non-negative integer, got {suffix_tokens!r}")
    if seam_tokens is not None and (isinstance(seam_tokens, bool) or not isinstance(seam_tokens, (int, np.integer))
                                    or seam_tokens < 0):
        raise ValueError(f"seam_tokens must be None or a non-negative integer, got {seam_tokens!r}")

    scores = None
    if deviation is not None:
        scores = _as_numpy(deviation, "deviation").astype(np.float64, copy=False)
        if scores.ndim == 2:
            scores = scores.max(axis=0) if scores.shape[0] else np.full(target_len, np.nan)
        if scores.ndim != 1 or scores.shape[0] != target_len:
            raise ValueError(f"deviation must have shape [target_len] or [num_check_layers, target_len] with "
                             f"target_len={target_len}, got {_as_numpy(deviation, 'deviation').shape}")

    if target_len == 0:
        return _finish(target_len, [], 0)

    covered, offset, in_seam_span = _coverage(plan)
    planned_mask = np.zeros(target_len, dtype=bool)
    for a, b in plan.recompute_ranges:
        planned_mask[max(0, a):min(target_len, b)] = True

    claimed = np.zeros(target_len, dtype=bool)
    chosen: list[tuple[str, np.ndarray]] = []

    def claim(name: str, mask: np.ndarray) -> None:
        new = mask & ~claimed
        claimed[new] = True
        chosen.append((name, np.flatnonzero(new)))

    # (a) and (d): mandatory.
    claim("uncovered", ~covered)
    suffix = np.zeros(target_len, dtype=bool)
    suffix[max(0, target_len - max(1, int(suffix_tokens))):] = True
    claim("suffix", suffix)

    # Seam heads: planner's (recompute ranges inside a seam span) or recomputed from the spans.
    if seam_tokens is None:
        seam_mask = planned_mask & in_seam_span
    else:
        seam_mask = in_seam_span & (offset >= 0) & (offset < int(seam_tokens))
    # Anything else the planner marked fresh stays fresh.
    claim("planned", planned_mask & ~seam_mask)

    budget_tokens = math.floor(budget * target_len + 1e-9)
    room = budget_tokens

    # (b) seams, round-robin by offset: stable sort on offset keeps positions ascending within one offset.
    seam_pos = np.flatnonzero(seam_mask & ~claimed)
    if seam_pos.size and room > 0:
        order = np.argsort(offset[seam_pos], kind="stable")
        take = seam_pos[order[:room]]
        room -= take.size
        mask = np.zeros(target_len, dtype=bool)
        mask[take] = True
        claim("seam", mask)
    else:
        chosen.append(("seam", np.zeros(0, dtype=np.int64)))

    # (c) deviation: reused positions only, highest score first, ties to the lower position, NaN last.
    if scores is not None and room > 0:
        cand = np.flatnonzero(covered & ~claimed)
        s = scores[cand]
        s = np.where(np.isnan(s), -np.inf, s)
        order = np.lexsort((cand, -s))  # primary key: -score; secondary: position
        take = cand[order[:room]]
        mask = np.zeros(target_len, dtype=bool)
        mask[take] = True
        claim("deviation", mask)
    else:
        chosen.append(("deviation", np.zeros(0, dtype=np.int64)))

    return _finish(target_len, chosen, budget_tokens)


def _finish(target_len: int, chosen: Sequence[tuple[str, np.ndarray]], budget_tokens: int) -> RecomputeSelection:
    parts = [p for _, p in chosen]
    positions = np.unique(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    positions.setflags(write=False)
    counts = {name: 0 for name in CLASSES}
    for name, p in chosen:
        counts[name] += int(p.size)
    counts["mandatory"] = counts["uncovered"] + counts["suffix"] + counts["planned"]
    counts["budget_tokens"] = int(budget_tokens)
    counts["total"] = int(positions.size)
    counts["target_len"] = int(target_len)
    return RecomputeSelection(positions=positions, breakdown=MappingProxyType(counts))


def deviation_scores(fresh_k: Any, reused_k: Any, fresh_v: Any | None = None, reused_v: Any | None = None) -> Any:
    """Per-token deviation between fresh and reused KV at one check layer.

    ``score[t] = ||fresh_k[t] - reused_k[t]||_2 (+ ||fresh_v[t] - reused_v[t]||_2 when V is given)``, computed in
    float32, every axis but the first flattened (so ``[num_tokens, num_kv_heads, head_dim]`` and
    ``[num_tokens, hidden]`` both work). Torch inputs return a float32 torch tensor ``[num_tokens]`` on the input's
    device; numpy inputs return a float32 numpy array. Mixing the two raises ``TypeError``. Pure.
    """
    pairs = [(fresh_k, reused_k, "k")]
    if (fresh_v is None) != (reused_v is None):
        raise ValueError("pass both fresh_v and reused_v, or neither")
    if fresh_v is not None:
        pairs.append((fresh_v, reused_v, "v"))
    is_torch = [hasattr(x, "detach") for pair in pairs for x in pair[:2]]
    if any(is_torch) and not all(is_torch):
        raise TypeError("deviation_scores: pass all torch tensors or all numpy arrays, not a mix")
    total = None
    for fresh, reused, name in pairs:
        if tuple(fresh.shape) != tuple(reused.shape):
            raise ValueError(f"fresh_{name} shape {tuple(fresh.shape)} != reused_{name} shape {tuple(reused.shape)}")
        if len(fresh.shape) < 1:
            raise ValueError(f"fresh_{name} must have a leading token axis, got a scalar")
        n = fresh.shape[0]
        if all(is_torch):
            if fresh.device != reused.device:
                raise ValueError(f"fresh_{name} is on {fresh.device} but reused_{name} on {reused.device}")
            diff = fresh.detach().float().reshape(n, -1) - reused.detach().float().reshape(n, -1)
            score = diff.norm(dim=1) if diff.shape[1] else diff.sum(dim=1)
        else:
            diff = np.asarray(fresh, dtype=np.float32).reshape(n, -1) - np.asarray(reused, dtype=np.float32).reshape(
                n, -1)
            score = np.linalg.norm(diff, axis=1).astype(np.float32)
        total = score if total is None else total + score
    return total


def layer_budget(layer_recompute: tuple[float, ...], layer: int, default: float = 0.0) -> float:
    """Fraction of reused tokens to refresh at ``layer`` under the bathtub policy.

    ``layer_recompute`` is ``plan.layer_recompute`` (one fraction per layer). An empty tuple means the model's
    layer count was unknown when planning: ``default`` is returned. A layer outside ``[0, len)`` of a non-empty
    tuple raises ``IndexError`` (the plan was made for another model).
    """
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"layer must be an integer, got {layer!r}")
    if not layer_recompute:
        return float(default)
    if not 0 <= layer < len(layer_recompute):
        raise IndexError(f"layer {layer} outside [0, {len(layer_recompute)}) of layer_recompute")
    value = float(layer_recompute[layer])
    return min(1.0, max(0.0, value))


# ----------------------------------------------------------------------------------------------------------------
# Depth-scheduled selection (query-aware): which reused tokens stay fresh, and through how many layers.
#
# The blended prefill can only compute a token fresh at layer ``l`` if it was fresh at every layer below (its hidden
# state must exist), so a selection is a *depth* per position: position ``t`` is fresh at layers ``[0, depth[t])``.
# The strategies below rank the reused tokens of non-context-exact spans (the *candidates*) and spend a budget of
# token-layers on them; the adapter's layer loop only reads the depths.
# ----------------------------------------------------------------------------------------------------------------

SELECTIONS = ("query", "position")

__all__ += ["SELECTIONS", "SelectionStrategy", "select_depths", "suffix_attention_mass"]


@dataclass(frozen=True)
class SelectionStrategy:
    """How the budgeted tokens are chosen (see :func:`select_depths`).

    * ``name``: ``query`` -- the reused tokens the prompt's last ``query_tokens`` tokens attend to most in a probe
      pass over layers ``[0, probe_layers)`` (the probe runs the mandatory tokens only, over the reused KV; its
      token-layers count as recompute); ``position`` -- the first candidates of every reused span, in round-robin
      order (attention-sink / seam heads without any probe).
    * ``depth``: fraction of the layers a selected token stays fresh (``1.0``: every layer). A budget of
      ``B * candidates * num_layers`` token-layers buys ``B / depth`` of the candidates at that depth.
    * ``chunk_heads``: the first ``chunk_heads`` candidates of every span are taken before the ranked ones
      (inside the budget).
    """

    name: str = "query"
    probe_layers: int = 2
    query_tokens: int = 8
    depth: float = 1.0
    chunk_heads: int = 0

    def __post_init__(self) -> None:
        if self.name not in SELECTIONS:
            raise ValueError(f"SelectionStrategy.name={self.name!r}; allowed: {', '.join(SELECTIONS)}")
        for field_name in ("probe_layers", "query_tokens", "chunk_heads"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SelectionStrategy.{field_name}={value!r}; allowed: an integer >= 0")
        if self.name == "query" and (self.probe_layers < 1 or self.query_tokens < 1):
            raise ValueError("SelectionStrategy(name='query') needs probe_layers >= 1 and query_tokens >= 1")
        if isinstance(self.depth, bool) or not isinstance(self.depth, (int, float)) or not 0.0 < self.depth <= 1.0:
            raise ValueError(f"SelectionStrategy.depth={self.depth!r}; allowed: a number in (0, 1]")


def select_depths(candidates: Any, budget: float, num_layers: int, *, scores: Any | None = None,
                  span_offset: Any | None = None, chunk_heads: int = 0, depth: float = 1.0) -> np.ndarray:
    """Per-position fresh depth for the budgeted tokens: int64 ``[target_len]``, 0 where nothing is refreshed.

    Args:
        candidates: bool ``[target_len]``, the positions allowed to be selected (reused, not already mandatory).
        budget: mean fraction of the candidates refreshed per layer, in ``[0, 1]``: the selection spends at most
            ``floor(budget * n_candidates * num_layers)`` token-layers (``budget=1`` refreshes every candidate at
            every layer).
        scores: float ``[target_len]``; higher is selected first, ties to the lower position, NaN last. ``None``
            ranks by ``span_offset`` (round-robin over spans: offset 0 of every span, then offset 1, ...).
        span_offset: int ``[target_len]``, each position's offset inside its span (needed for ``chunk_heads`` and
            when ``scores`` is None).
        chunk_heads: candidates with ``span_offset < chunk_heads`` are taken first (round-robin), then the ranked.
        depth: fraction of the layers a selected token stays fresh; the depth is ``ceil(depth * num_layers)``,
            deeper when the budget covers every candidate at that depth (so ``budget=1`` is always every layer).

    Pure and deterministic; O(target_len log target_len).
    """
    cand = _as_numpy(candidates, "candidates").astype(bool, copy=False)
    n = cand.shape[0]
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget) \
            or not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be a number in [0, 1], got {budget!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if not 0.0 < float(depth) <= 1.0:
        raise ValueError(f"depth must be in (0, 1], got {depth!r}")
    out = np.zeros(n, dtype=np.int64)
    pos = np.flatnonzero(cand)
    if pos.size == 0:
        return out
    layers = int(min(num_layers, max(1, math.ceil(float(depth) * num_layers - 1e-9))))
    token_layers = math.floor(budget * pos.size * num_layers + 1e-9)
    k = min(pos.size, token_layers // layers)
    if k == 0:
        return out
    if k == pos.size:  # every candidate fits: the surplus deepens them (a full budget is every layer)
        layers = max(layers, min(int(num_layers), token_layers // pos.size))
    offset = None if span_offset is None else _as_numpy(span_offset, "span_offset").astype(np.int64, copy=False)
    if offset is not None and offset.shape != (n,):
        raise ValueError(f"span_offset must have shape [{n}], got {offset.shape}")
    if scores is None:
        if offset is None:
            raise ValueError("pass scores or span_offset")
        key = -offset[pos].astype(np.float64)
    else:
        s = _as_numpy(scores, "scores").astype(np.float64, copy=False)
        if s.shape != (n,):
            raise ValueError(f"scores must have shape [{n}], got {s.shape}")
        key = np.where(np.isnan(s[pos]), -np.inf, s[pos])
    head = np.zeros(pos.size, dtype=bool)
    if chunk_heads > 0:
        if offset is None:
            raise ValueError("chunk_heads needs span_offset")
        head = offset[pos] < int(chunk_heads)
    head_rank = np.where(head, offset[pos] if offset is not None else 0, np.iinfo(np.int64).max)
    # Primary: chunk heads first (by offset), then the key descending; ties to the lower position.
    order = np.lexsort((pos, -key, head_rank))
    out[pos[order[:k]]] = layers
    return out


def suffix_attention_mass(q: Any, k: Any, query_positions: Any, scale: float) -> Any:
    """Attention probability mass each key position receives from a few queries, summed over queries and heads.

    Args:
        q: ``[m, num_heads, head_dim]`` queries (RoPE applied) at ``query_positions`` (int ``[m]``, ascending).
        k: ``[n, num_kv_heads, head_dim]`` keys of positions ``[0, n)`` (num_heads a multiple of num_kv_heads).
        scale: softmax scale.

    Returns float32 ``[n]`` (torch, on ``q``'s device): causal softmax per query and head, summed. The whole row
    sums to ``m * num_heads``. Pure; O(m * n * heads) -- for the probe's few suffix queries, not for prefill.
    """
    import torch

    m, heads, dim = q.shape
    n, kv_heads, _ = k.shape
    if heads % kv_heads:
        raise ValueError(f"num_heads={heads} is not a multiple of num_kv_heads={kv_heads}")
    group = heads // kv_heads
    qg = q.float().reshape(m, kv_heads, group, dim)
    logits = torch.einsum("mhgd,nhd->hgmn", qg, k.float()) * float(scale)
    qpos = torch.as_tensor(query_positions, device=q.device).reshape(m, 1)
    mask = torch.arange(n, device=q.device).reshape(1, n) > qpos  # [m, n], True where the key is in the future
    logits = logits.masked_fill(mask, float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(0, 1, 2))


# ----------------------------------------------------------------------------------------------------------------
# Per-hit guard: a cheap signal, read off the blended prefill's own output, that a hit is risky.
#
# The frontier (benchmarks/quality_frontier.py) shows where reused answers leave the cold answer: at near-ties. A
# blended prefill whose first-token distribution has a small top-1/top-2 margin is the one whose answer flips; a
# large margin survives the small KV error of a reused document. The guard reads that margin from the logits the
# blended prefill already produced (no extra model work) and tells the engine to serve the hit cold instead.
# ----------------------------------------------------------------------------------------------------------------

GUARD_ACTIONS = ("cold",)

__all__ += ["GUARD_ACTIONS", "HitGuard", "first_token_margin"]


def first_token_margin(logits: Any) -> float:
    """Top-1 minus top-2 log-probability of a next-token distribution ``logits [vocab]`` (nats; equal to the
    logit gap, the softmax normaliser cancels). ``inf`` for a one-token vocabulary, ``-inf`` if a NaN is present.
    numpy or torch (read through ``.detach().cpu()``); pure."""
    x = _as_numpy(logits, "logits").astype(np.float64, copy=False).reshape(-1)
    if x.size == 0:
        raise ValueError("logits must not be empty")
    if np.isnan(x).any():
        return float("-inf")
    if x.size == 1:
        return float("inf")
    top2 = np.partition(x, x.size - 2)[-2:]
    return float(top2[1] - top2[0])


@dataclass(frozen=True)
class HitGuard:
    """Flag a blended prefill whose first-token margin is below ``min_margin`` nats; ``action`` is what the engine
    then does (``cold``: discard the blended KV and run a normal prefill, recorded as a decline with reason
    ``guard_low_margin``). The cost is the cold prefill of every flagged hit; the frontier reports the catch rate
    (divergent hits flagged) and that cost per threshold.
    """

    min_margin: float = 1.0
    action: str = "cold"

    def __post_init__(self) -> None:
        if isinstance(self.min_margin, bool) or not isinstance(self.min_margin, (int, float)) \
                or math.isnan(self.min_margin) or self.min_margin < 0:
            raise ValueError(f"HitGuard.min_margin={self.min_margin!r}; allowed: a number >= 0 (nats)")
        if self.action not in GUARD_ACTIONS:
            raise ValueError(f"HitGuard.action={self.action!r}; allowed: {', '.join(GUARD_ACTIONS)}")

    def fires(self, logits: Any) -> bool:
        """Whether the blended prefill's next-token ``logits [vocab]`` are too close to a tie to trust."""
        return first_token_margin(logits) < float(self.min_margin)
