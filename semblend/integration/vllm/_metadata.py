"""What the scheduler side tells the worker side each step, and what the workers report back.

Plain frozen dataclasses of ints, strings and tuples: vLLM pickles them from the scheduler process to every worker
and back. ``connector_v1`` wraps them in vLLM's ``KVConnectorMetadata`` / ``KVConnectorWorkerMetadata`` classes.

Token slots: target token ``t`` of a request lives in slot ``block_ids[t // block_size - first_block] *
block_size + t % block_size`` where ``first_block = target_start // block_size``; :meth:`LoadSpec.slots` and
:meth:`SaveSpec.slots` compute that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _slots(block_ids: tuple[int, ...], block_size: int, start: int, num_tokens: int) -> list[int]:
    first = start // block_size
    out = []
    for t in range(start, start + num_tokens):
        out.append(block_ids[t // block_size - first] * block_size + t % block_size)
    return out


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

    def slots(self) -> list[int]:
        """Cache slot of every target token, in token order (``num_tokens`` entries)."""
        return _slots(self.block_ids, self.block_size, self.target_start, self.num_tokens)


@dataclass(frozen=True)
class BlendSpec:
    """``blend`` mode: fill target tokens ``[0, num_tokens)`` of a request before the forward with the shared
    blended-prefill executor (``semblend_core.blended_prefill``), then vLLM computes ``[num_tokens, prompt_len)``.

    ``plan`` is the request's ``SemanticKvPlan`` (spans with their donor ids, recompute ranges, layer policy and
    budget); only spans below ``num_tokens`` are read, each from its own donor entry. ``token_ids`` are the prompt's
    first ``num_tokens`` tokens (the executor embeds the recomputed ones). ``block_ids`` cover ``[0, num_tokens)``
    from block 0. The whole range is approximate KV: it never enters vLLM's exact prefix cache and never becomes a
    donor (the scheduler taints it). A failure reports every block (vLLM recomputes the range).
    """

    req_id: str
    namespace_key: str
    plan: Any
    token_ids: tuple[int, ...]
    num_tokens: int
    block_ids: tuple[int, ...]
    block_size: int

    def slots(self) -> list[int]:
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

    def slots(self) -> list[int]:
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

    def __bool__(self) -> bool:
        return bool(self.saved or self.save_failed or self.evicted or self.loaded or self.load_failed)

    def merge(self, other: WorkerReport) -> WorkerReport:
        return WorkerReport(
            saved=self.saved + other.saved, save_failed=self.save_failed + other.save_failed,
            evicted=self.evicted + other.evicted, loaded=self.loaded + other.loaded,
            load_failed=self.load_failed + other.load_failed, load_s=self.load_s + other.load_s,
            save_s=self.save_s + other.save_s, workers=self.workers + other.workers,
        )
