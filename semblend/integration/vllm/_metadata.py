"""What the scheduler side tells the worker side each step, and what the workers report back.

Plain frozen dataclasses of ints, strings and tuples (one exception: :attr:`BlendSpec.token_ids` is an int64 array,
because turning a 32K-token prompt into a tuple and back cost ~6 ms of the hit's critical path): vLLM pickles them
from the scheduler process to every worker and back. ``connector_v1`` wraps them in vLLM's ``KVConnectorMetadata``
/ ``KVConnectorWorkerMetadata`` classes.

Token slots: target token ``t`` of a request lives in slot ``block_ids[t // block_size - first_block] *
block_size + t % block_size`` where ``first_block = target_start // block_size``; :meth:`LoadSpec.slots` and
:meth:`SaveSpec.slots` compute that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _slots(block_ids: tuple[int, ...], block_size: int, start: int, num_tokens: int) -> np.ndarray:
    """int64 cache slot of each token of ``[start, start + num_tokens)``; ``block_ids[0]`` holds ``start``. Vectorized:
    a 32K-token blend used to spend ~5 ms of the hit's critical path in a Python loop here."""
    tokens = np.arange(start, start + num_tokens, dtype=np.int64)
    blocks = np.asarray(block_ids, dtype=np.int64)[tokens // block_size - start // block_size]
    return blocks * block_size + tokens % block_size


@dataclass(frozen=True)
class LoadSpec:
    """Load donor tokens ``[donor_start, donor_start + num_tokens)`` into target tokens ``[target_start, ...)``.

    ``delta = target_start - donor_start``: the RoPE shift applied to the donor keys. ``block_ids`` are the request's
    blocks covering the target range (the first holds ``target_start``). ``donor_id`` is ``None`` when the scheduler
    already knows the load cannot happen: the worker then reports every block as failed (recompute).
    """

    req_id: str
    namespace_key: str
    donor_id: str | None
    donor_start: int
    target_start: int
    num_tokens: int
    block_ids: tuple[int, ...]
    block_size: int

    @property
    def delta(self) -> int:
        return self.target_start - self.donor_start

    def slots(self) -> np.ndarray:
        """Cache slot of every target token, in token order (``num_tokens`` entries)."""
        return _slots(self.block_ids, self.block_size, self.target_start, self.num_tokens)


@dataclass(frozen=True)
class BlendSpec:
    """``blend`` mode: fill target tokens ``[local_tokens, num_tokens)`` of a request before the forward with the
    shared blended-prefill executor (``semblend_core.blended_prefill``), then vLLM computes
    ``[num_tokens, prompt_len)``.

    * ``plan``: the request's ``SemanticKvPlan`` as the scheduler will have it executed: only donors whose KV every
      worker holds (others were dropped with ``SemBlendPipeline.drop_donors``), and ``recompute_ranges`` that
      already include every position the executor must compute at every layer (uncovered positions are
      mandatory anyway): the planner's seam heads, fuzzy regions, and the attention-sink positions
      ``[local_tokens, SINK_TOKENS)`` whenever they are not context-exact (see ``_scheduler``). Only spans
      below ``num_tokens`` are read, each from its own donor entry (``plan.donor_of(span)``), re-rotated by its
      ``delta``. ``plan.recompute_budget`` is the ``recompute_ratio``.
    * ``token_ids``: the prompt's first ``num_tokens`` tokens, a read-only int64 array (the executor embeds the
      recomputed ones; left out of ``==`` and ``hash``).
    * ``block_ids``: the request's blocks covering ``[0, num_tokens)`` from block 0; ``local_tokens`` (a multiple of
      ``block_size``) is vLLM's own exact prefix-cache hit: the executor's ``fixed_prefix`` -- its KV is final,
      never written, never recomputed, attended to as it is.
    * ``check_layer`` / ``selection``: the executor's deviation-check layer (``None``: no check) and
      ``SelectionStrategy`` name (``None``: the check picks the budgeted tokens).

    The range ``[local_tokens, num_tokens)`` is approximate KV: it never enters vLLM's exact prefix cache and never
    becomes a donor (the scheduler taints it). The worker reports ``loaded=((req_id, num_tokens - local_tokens),)``
    and ``blended=((req_id, reused, recomputed),)`` on success; on any failure ``load_failed=(req_id,)`` and the
    blocks of :meth:`credited_block_ids` (vLLM recomputes them; the local blocks stay valid and shared).
    """

    req_id: str
    namespace_key: str
    plan: Any
    token_ids: np.ndarray = field(compare=False)
    num_tokens: int
    block_ids: tuple[int, ...]
    block_size: int
    local_tokens: int = 0
    check_layer: int | None = 1
    selection: str | None = None

    @property
    def num_blended(self) -> int:
        """Tokens the executor fills (credited to vLLM): ``num_tokens - local_tokens``."""
        return self.num_tokens - self.local_tokens

    def credited_block_ids(self) -> tuple[int, ...]:
        """Blocks holding ``[local_tokens, num_tokens)``: what a failed blend reports for recomputation."""
        return self.block_ids[self.local_tokens // self.block_size:]

    def slots(self) -> np.ndarray:
        """Cache slot of every token of ``[0, num_tokens)``, in token order."""
        return _slots(self.block_ids, self.block_size, 0, self.num_tokens)


@dataclass(frozen=True)
class SaveSpec:
    """Capture prompt tokens ``[0, num_tokens)`` of a request, held in ``block_ids``, as donor ``donor_id``."""

    req_id: str
    namespace_key: str
    donor_id: str
    num_tokens: int
    block_ids: tuple[int, ...]
    block_size: int
    token_ids: tuple[int, ...] = ()  # the prompt, kept with the KV so the store can refuse a mismatched re-put

    def slots(self) -> np.ndarray:
        return _slots(self.block_ids, self.block_size, 0, self.num_tokens)


@dataclass(frozen=True)
class StepPlan:
    """All connector work of one engine step. Empty in discovery-only mode."""

    loads: tuple[LoadSpec, ...] = ()
    saves: tuple[SaveSpec, ...] = ()
    blends: tuple[BlendSpec, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.loads or self.saves or self.blends)


@dataclass(frozen=True)
class KvSignature:
    """What must match between a stored donor and the running cache: per-worker geometry and element type."""

    dtype: str
    num_kv_heads: int
    head_size: int


@dataclass(frozen=True)
class SavedDonor:
    namespace_key: str
    donor_id: str
    num_tokens: int
    signature: KvSignature
    nbytes: int


@dataclass(frozen=True)
class WorkerReport:
    """One or more workers' results of one step (``aggregate`` concatenates; ``workers`` counts reporters).

    * ``saved``: donors captured into the worker's store; ``save_failed``: ``(namespace_key, donor_id)`` not saved.
    * ``evicted``: ``(namespace_key, donor_id)`` dropped from the store (LRU or capacity).
    * ``loaded``: ``(req_id, num_tokens)`` loads completed; ``load_failed``: req ids whose load failed (their
      blocks are also returned by ``get_block_ids_with_load_errors`` so vLLM recomputes them).
    * ``blended``: ``(req_id, reused_tokens, recomputed_tokens)`` per completed blend (blend mode, with its
      ``loaded`` entry): of the ``num_tokens - local_tokens`` tokens filled, ``recomputed_tokens`` is the
      executor's token-layers computed fresh (``BlendStats.token_layers``) divided by the number of layers,
      rounded (the mean tokens per layer: uncovered, sink, seam and selected ones), ``reused_tokens`` the rest.
    * ``blend_unavailable``: a stable reason why this worker cannot run the executor at all (its model-view or
      self-check failed, e.g. ``self_check_failed:...``): the scheduler declines every later blend with it,
      before credit. Sent once.
    * ``load_s`` / ``save_s``: seconds spent in loads / captures (for metrics).
    """

    saved: tuple[SavedDonor, ...] = ()
    save_failed: tuple[tuple[str, str], ...] = ()
    evicted: tuple[tuple[str, str], ...] = ()
    loaded: tuple[tuple[str, int], ...] = ()
    load_failed: tuple[str, ...] = ()
    load_s: tuple[float, ...] = field(default=())
    save_s: tuple[float, ...] = field(default=())
    workers: int = 1
    blended: tuple[tuple[str, int, int], ...] = ()
    blend_unavailable: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.saved or self.save_failed or self.evicted or self.loaded or self.load_failed
                    or self.blended or self.blend_unavailable)

    def merge(self, other: WorkerReport) -> WorkerReport:
        return WorkerReport(
            saved=self.saved + other.saved, save_failed=self.save_failed + other.save_failed,
            evicted=self.evicted + other.evicted, loaded=self.loaded + other.loaded,
            load_failed=self.load_failed + other.load_failed, load_s=self.load_s + other.load_s,
            save_s=self.save_s + other.save_s, workers=self.workers + other.workers,
            blended=self.blended + other.blended, blend_unavailable=self.blend_unavailable + other.blend_unavailable,
        )
