"""From a ``SemanticKvPlan`` to a prefix load for SGLang's tree cache, and the reasons to decline one.

Engine-free (numpy only): the backend (``_cache``) calls :func:`prefix_load` after SGLang's own exact match and
before it allocates anything, so every decline here costs nothing but the plan.

A prefix load serves target positions ``[exact, exact + num_tokens)`` (SGLang computes a prompt's KV as one prefix,
so only the reusable prefix of a hit can be skipped: ``plan.prefix_reusable_tokens(page_size)``). Each position ``t``
takes the donor's KV at ``donor_positions[t - exact]``, its keys re-rotated by ``deltas[t - exact]`` positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from semblend_core.plan import Reason, SemanticKvPlan


class DeclineReason:
    """Stable reason strings of the SGLang backend (dashboards and tests key on them)."""

    NO_REUSABLE_PREFIX = "no_reusable_prefix"      # the hit does not start at prompt token 0
    ENGINE_PREFIX_COVERS = "engine_prefix_covers"  # SGLang's exact match already covers the reusable prefix
    ROPE_NOT_SHIFT_INVARIANT = Reason.ROPE_NOT_SHIFT_INVARIANT
    DONOR_KV_EVICTED = "donor_kv_evicted"          # neither SGLang's tree nor the host tier holds the donor's KV
    NO_FREE_SLOTS = "no_free_slots"                # the pool cannot hold the donor KV even after eviction
    NOT_FIRST_ROUND = "not_first_round"            # a retracted / resumed request: only fresh prompts are served
    UNSUPPORTED_POOL = "unsupported_pool"          # the KV pool is not a plain token pool (quantized, hybrid, ...)
    LOAD_FAILED = "load_failed"                    # the copy raised; slots freed, normal prefill
    ABORTED_BEFORE_ADMISSION = "aborted_before_admission"
    RESET = "reset"                                # the tree was flushed while the load waited for admission
    REMATCHED = "rematched"                        # a later match of the same request replaced the load
    MOVED_FIRST_BLOCK = Reason.MOVED_FIRST_BLOCK   # the first tokens would get KV from elsewhere in the donor


@dataclass(frozen=True, eq=False)
class PrefixLoad:
    """What to copy for one request. ``donor_positions`` / ``deltas``: int64 ``[num_tokens]``."""

    donor_id: str
    exact: int
    num_tokens: int
    donor_positions: np.ndarray
    deltas: np.ndarray
    context_exact: bool

    @property
    def donor_tokens_needed(self) -> int:
        """Length of the donor prefix that must be resident (its last read position + 1)."""
        return int(self.donor_positions.max()) + 1 if self.num_tokens else 0

    @property
    def shifted(self) -> bool:
        return bool(np.any(self.deltas != 0))


def prefix_load(plan: SemanticKvPlan, exact: int, limit: int, page_size: int, *, rope_exact: bool,
                load_moved_prefix: bool = False) -> PrefixLoad | str:
    """The load for ``plan`` beyond SGLang's ``exact`` matched tokens, or the reason to decline.

    ``limit``: most prompt tokens SGLang lets a prefix cover (its match key's length: the last prompt token always
    runs). ``page_size``: SGLang's page size; the load ends on a page boundary (``exact`` is one already).
    ``rope_exact``: whether the model's keys can be re-rotated exactly (shift-free loads are allowed regardless).
    ``load_moved_prefix``: see :data:`semblend_core.plan.SINK_TOKENS`. All loaded tokens come from the first span's donor (the
    plan's prefix view stops where the donor changes). Pure.
    """
    if not plan.is_hit or not plan.spans:
        return plan.reason
    if plan.spans[0].target_start != 0:
        return DeclineReason.NO_REUSABLE_PREFIX
    end = min(plan.prefix_reusable_tokens(page_size), limit)
    end -= end % page_size
    if end <= 0:
        return DeclineReason.NO_REUSABLE_PREFIX
    if end <= exact:
        return DeclineReason.ENGINE_PREFIX_COVERS
    if not load_moved_prefix and plan.moves_sink_tokens(exact):
        return DeclineReason.MOVED_FIRST_BLOCK
    donor = plan.donor_of(plan.spans[0])
    donor_pos: list[np.ndarray] = []
    deltas: list[np.ndarray] = []
    covered = 0
    context_exact = True
    for span in plan.spans:  # contiguous from 0 (prefix_reusable_tokens checked it); clip to [exact, end)
        if span.target_start != covered or covered >= end or plan.donor_of(span) != donor:
            break
        lo, hi = max(span.target_start, exact), min(span.target_end, end)
        if lo < hi:
            donor_pos.append(np.arange(lo - span.delta, hi - span.delta, dtype=np.int64))
            deltas.append(np.full(hi - lo, span.delta, dtype=np.int64))
            context_exact &= span.context_exact
        covered = span.target_end
    positions = np.concatenate(donor_pos) if donor_pos else np.zeros(0, dtype=np.int64)
    if positions.size != end - exact:  # never expected: prefix_reusable_tokens promised contiguous coverage
        return DeclineReason.NO_REUSABLE_PREFIX
    delta_arr = np.concatenate(deltas)
    if np.any(delta_arr != 0) and not rope_exact:
        return DeclineReason.ROPE_NOT_SHIFT_INVARIANT
    return PrefixLoad(str(donor), int(exact), int(end - exact), positions, delta_arr, context_exact)
