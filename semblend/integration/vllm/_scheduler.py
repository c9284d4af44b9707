"""Scheduler side of the vLLM connector: plan, credit tokens, stage loads and captures, keep the exact cache exact.

Lifecycle, in the order vLLM calls it (one scheduler process; all methods run on its thread)::

    get_num_new_matched_tokens(request, n_local)   # may repeat for one request while it waits; salts hashes
    update_state_after_alloc(request, blocks, n)   # the scheduler committed n external tokens: stage the load
    build_connector_meta(scheduler_output)         # once per step: loads + donor captures -> StepPlan
    update_connector_output(report, invalid_ids)   # after the step: what the workers actually did
    request_finished(request)                      # exactly once per request (finished, aborted)

Modes
-----
* ``discovery_only``: every request is planned once and its outcome recorded; ``(0, False)`` always, no blocks
  are touched, nothing is staged. Donors are registered from finished prompts.
* ``prefix``: the reusable prefix of a hit (``plan.prefix_reusable_tokens(block_size)``) beyond vLLM's own prefix
  hit is credited, after every reason to decline was checked here: RoPE shift not exact, donor KV not resident
  in the workers' store (evicted, never captured), geometry or dtype of the stored KV differs from this cache.
  Donors are registered only after the workers confirm their KV was captured.
* ``blend``: the prompt is credited up to the end of the hit's reusable region (the last span's end, at most
  ``prompt_len - 1``, floored to the block size) beyond vLLM's own hit, uncovered tokens before and between spans
  included: the workers fill that range with the shared blended-prefill executor (donor KV re-rotated from every
  donor the plan uses, uncovered / sink / seam / selected tokens computed with the model's weights) and vLLM
  computes the rest. Every reason to decline is checked first (:meth:`SchedulerSide._gate_blend`): the deployment
  cannot blend (model family, tensor or pipeline parallel, a worker that reported it cannot), vLLM's hit covers
  the region, a shifted span with inexact RoPE, donor KV not resident (such donors are dropped from the plan with
  ``SemBlendPipeline.drop_donors`` and the quality gates re-applied; decline only if it fails them), stored KV of
  another geometry, or too little left to reuse. The moved-first-block rule of ``prefix`` does not apply: the
  first ``SINK_TOKENS`` positions are made mandatory recompute whenever they are not context-exact
  (``SemanticKvPlan.with_sink_recompute``; recomputed at every layer over an exact causal context, they equal a
  cold prefill's). The whole blended range is tainted.

Exact-cache safety
------------------
vLLM hashes a request's full blocks from its token ids (chained: block ``i``'s hash covers tokens ``[0, (i+1)*B)``)
and caches them for any later request with the same tokens. KV loaded from a donor with a position shift, and
every block computed after it (its attention saw the approximate KV), is *not* what a cold prefill computes, so it
must never be served as an exact hit. So when the connector offers such a credit (``get_num_new_matched_tokens``,
before vLLM allocates), it re-salts ``request.block_hashes`` from the first approximate block on with a
per-request secret. vLLM then caches the blocks it allocates for the credit under those salted hashes, and every
hash it later derives for this request (prompt tail, decode) chains on them: unique, no other request can match
it. Blocks before the credit (vLLM's own exact hit) keep their hashes. A context-exact load (donor and target both
start at token 0: the donor's KV is bit-for-bit what this prompt would compute) is left shareable.

Salting at the offer costs nothing when vLLM does not take it: the request then computes its KV itself, under
hashes nobody else looks up (a lost sharing opportunity, never a wrong hit). Had the hashes not been salted before
the allocation (never expected), ``update_state_after_alloc`` evicts the request's blocks from the prefix-cache
table (``BlockPool.evict_blocks`` removes only the hash entries; the request keeps its blocks) and salts them then.
Salting at the offer keeps ``evict_blocks`` (~2,000 blocks at 32K tokens) off the hit's path before the forward.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from semblend.integration.vllm._config import (
    MODE_DISCOVERY_ONLY,
    VllmAdapterConfig,
    media_key,
    request_namespace,
)
from semblend.integration.vllm._metadata import (
    BlendSpec,
    KvSignature,
    LoadSpec,
    SaveSpec,
    StepPlan,
    WorkerReport,
)
from semblend.integration.vllm._metrics import ConnectorStats
from semblend_core import CacheNamespace, Outcome, Reason, SemanticKvPlan
from semblend_core.errors import SemBlendError

logger = logging.getLogger(__name__)


class DeclineReason:
    """Adapter-side reasons to decline a planned hit (stable strings, like ``semblend_core.Reason``)."""

    NO_REUSABLE_PREFIX = "no_reusable_prefix"
    ENGINE_PREFIX_COVERS = "engine_prefix_covers"
    DONOR_KV_EVICTED = "donor_kv_evicted"
    KV_LAYOUT_MISMATCH = "kv_layout_mismatch"
    SCHEDULER_SKIPPED = "scheduler_skipped_load"
    LOAD_FAILED = "load_failed"
    PREEMPTED = "preempted"
    ABORTED = "aborted"
    MULTIMODAL_PROMPT = "multimodal_prompt"
    MOVED_FIRST_BLOCK = Reason.MOVED_FIRST_BLOCK  # the first block would get moved KV (load_moved_prefix)
    ROPE_NOT_SHIFT_INVARIANT = Reason.ROPE_NOT_SHIFT_INVARIANT
    NO_GAIN = Reason.NO_GAIN_OVER_EXACT_PREFIX  # blend: fewer than chunk_size reusable tokens beyond vLLM's hit
    BLEND_TENSOR_PARALLEL = "blend_tensor_parallel"
    BLEND_PIPELINE_PARALLEL = "blend_pipeline_parallel"


@dataclass
class _Decision:
    """The credit computed for one ``num_computed_tokens``; reused while the request waits."""

    num_local: int
    plan: SemanticKvPlan
    credit: int = 0
    reason: str = ""
    # The reusable prefix as (donor_start, target_start, length) pieces covering target [0, n), one per exact
    # span (each has its own RoPE shift; several only with strict_prefix_boundary=false).
    segments: tuple[tuple[int, int, int], ...] = ()
    # Donor of every segment: the first span's (in a multi-donor plan, not always plan.donor_id).
    donor_id: str | None = None
    # blend: the plan the workers execute (unusable donors dropped, sink positions made mandatory) and the end of
    # the blended range (num_local + credit).
    blend_plan: SemanticKvPlan | None = None
    end: int = 0


@dataclass
class _RequestState:
    req_id: str
    namespace: CacheNamespace
    prompt: Sequence[int]
    num_prompt_tokens: int
    decision: _Decision | None = None
    outcome_recorded: bool = False
    # The outcome so far (outcome, reason, loaded tokens): the last admission decides it; recorded once at the end.
    pending: tuple[str, str, int] | None = None
    credited: int = 0          # tokens credited to vLLM at the last admission
    finished_at_step: int | None = None  # request_finished came while its load result was still due
    tainted_from_block: int | None = None  # hash-block index from which block hashes were re-salted
    approximate: bool = False  # approximate KV was committed into its blocks: never a donor
    block_ids: list[int] = field(default_factory=list)
    capture_issued: bool = False
    load_in_flight: tuple[LoadSpec | BlendSpec, ...] | None = None
    blend_counts: tuple[int, int] | None = None  # (reused, recomputed) the workers reported for the last blend
    plan: SemanticKvPlan | None = None
    unsupported: str = ""      # a reason never to plan, load or capture this request (e.g. multimodal_prompt)


@dataclass
class _Resident:
    """A donor whose KV the workers hold. ``votes`` counts workers that confirmed the capture."""

    num_tokens: int
    signature: KvSignature
    votes: int = 0


class SchedulerSide:
    """All scheduler-side state of one connector. Engine objects are read by attribute only.

    ``pipeline``: a ``SemBlendPipeline``. ``base_namespace``: from ``_config.base_namespace``. ``kv_signature``: the
    geometry of this engine's cache per worker (``None``: unknown, stored donors are not checked).
    ``rope_exact``: RoPE re-rotation reproduces the model's keys for every layer. ``num_workers``: how many workers
    must confirm a capture before the donor is usable (tensor x pipeline parallel size). ``blend_unavailable``:
    blend mode only, why this deployment cannot blend at all (``_config.blend_decline_reason``; ``""``: it can).
    """

    MAX_AWAITING_CAPTURE = 4096  # backstop: captures the workers never answered are forgotten oldest first

    def __init__(self, pipeline: Any, adapter: VllmAdapterConfig, base_namespace: CacheNamespace, *,
                 block_size: int, rope_exact: bool, kv_signature: KvSignature | None = None,
                 num_workers: int = 1, blend_unavailable: str = "") -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.pipeline = pipeline
        self.adapter = adapter
        self.base_namespace = base_namespace
        self.block_size = block_size
        self.hash_block_size = block_size
        self.rope_exact = rope_exact
        self.kv_signature = kv_signature
        self.num_workers = max(1, int(num_workers))
        self.blend_unavailable = blend_unavailable
        self.stats = ConnectorStats()
        self._block_pool: Any = None
        self._requests: dict[str, _RequestState] = {}
        self._pending_loads: dict[str, tuple[LoadSpec | BlendSpec, ...]] = {}
        self._resident: dict[tuple[str, str], _Resident] = {}
        self._awaiting_capture: OrderedDict[tuple[str, str], tuple[Sequence[int], CacheNamespace]] = OrderedDict()
        self._load_votes: dict[str, int] = {}
        # Finished requests whose load result is still due (vLLM calls request_finished before it hands over the
        # same step's worker output): their outcome waits for it.
        self._finishing: dict[str, _RequestState] = {}
        # Content digest of each captured (or being captured) donor prompt, both ways (capture deduplication).
        self._by_content: dict[tuple[str, bytes], tuple[str, str]] = {}
        self._content_of: dict[tuple[str, str], tuple[str, bytes]] = {}
        self._step = 0
        self._secret = os.urandom(16)

    # ------------------------------------------------------------------ binding
    @property
    def discovery_only(self) -> bool:
        return self.adapter.mode == MODE_DISCOVERY_ONLY

    @property
    def _registers_without_kv(self) -> bool:
        """Blend mode on a deployment that cannot blend: no KV is captured (it could never be used); finished
        prompts are registered as donors like in discovery mode, so hits are still planned and declined with
        the reason (the evidence of what blend would reuse here)."""
        return self.adapter.blend and bool(self.blend_unavailable)

    def bind_block_pool(self, block_pool: Any, hash_block_size: int | None = None) -> None:
        """The scheduler's ``BlockPool`` (needed to evict prefix-cache entries of approximate blocks)."""
        self._block_pool = block_pool
        if hash_block_size:
            if self.block_size % hash_block_size:
                raise ValueError(f"hash_block_size {hash_block_size} does not divide block_size {self.block_size}")
            self.hash_block_size = int(hash_block_size)

    # ------------------------------------------------------------------ state
    def _state(self, request: Any) -> _RequestState:
        st = self._requests.get(request.request_id)
        if st is None:
            ids = request.prompt_token_ids if request.prompt_token_ids is not None else ()
            # One conversion per request (fromiter is the cheapest path from a list of Python ints); the array is
            # reused for every plan of the request and for its donor registration.
            prompt = np.fromiter(ids, dtype=np.int64, count=len(ids))
            st = _RequestState(
                req_id=request.request_id,
                namespace=request_namespace(self.base_namespace, request),
                prompt=prompt,
                num_prompt_tokens=int(request.num_prompt_tokens),
            )
            if media_key(request) is None:  # prompt embeddings or media without a content hash
                st.unsupported = DeclineReason.MULTIMODAL_PROMPT
            self._requests[request.request_id] = st
        return st

    def _record(self, st: _RequestState, plan: SemanticKvPlan, outcome: str, reason: str | None = None,
                loaded_tokens: int = 0) -> None:
        """Note the request's outcome so far. A later admission of the same request (after a preemption)
        replaces it; :meth:`_finalize` records the last one, once (rule 2: ``materialized`` only after the workers
        confirmed the load, with the tokens they loaded)."""
        if st.outcome_recorded:
            return
        if (outcome != Outcome.MATERIALIZED and st.pending is not None and st.pending[0] == Outcome.MATERIALIZED
                and self._resumes_on_own_blocks(st)):
            return  # the request runs on the KV its earlier load materialized: that outcome stands
        st.pending = (outcome, reason or plan.reason, int(loaded_tokens))

    def _resumes_on_own_blocks(self, st: _RequestState) -> bool:
        """vLLM's hit for this admission reaches into the request's own salted blocks: after a preemption, vLLM
        finds them under the hashes only this request carries, so the request resumes on its own approximate KV
        (as if never preempted; no other request can reach them)."""
        d = st.decision
        return (st.approximate and d is not None and st.tainted_from_block is not None
                and d.num_local > st.tainted_from_block * self.hash_block_size)

    def _finalize(self, st: _RequestState) -> None:
        """Record the request's one outcome in the pipeline's telemetry and in the connector stats (Prometheus),
        with the same reason and loaded-token count in both."""
        if st.outcome_recorded:
            return
        st.outcome_recorded = True
        plan = st.decision.plan if st.decision is not None else st.plan
        if st.pending is None or plan is None:
            return
        outcome, reason, loaded = st.pending
        if outcome == Outcome.MATERIALIZED and loaded <= 0:
            outcome, reason, loaded = Outcome.DECLINED, "nothing_loaded", 0
        self.pipeline.record_outcome(plan, outcome, loaded_tokens=loaded, reason=reason)
        self.stats.outcome(outcome, reason, loaded)
        if outcome == Outcome.MATERIALIZED:
            self.stats.loaded(loaded)
            self.stats.credited(st.credited)
            if st.blend_counts is not None:
                self.stats.blended(*st.blend_counts)

    # How the pipeline classifies a miss (it records these itself; the connector mirrors them in its stats).
    _MISS_OUTCOMES: ClassVar[dict[str, str]] = {
        Reason.NO_CANDIDATE: Outcome.COLD, Reason.DISABLED: Outcome.COLD,
        Reason.EXACT_PREFIX_SUFFICIENT: Outcome.EXACT, Reason.NO_GAIN_OVER_EXACT_PREFIX: Outcome.EXACT,
    }

    def _count_plan_outcome(self, st: _RequestState, plan: SemanticKvPlan, reason: str | None = None) -> None:
        """Outcomes the pipeline records itself (misses; discovery-only hits): count them for metrics once.
        ``reason`` overrides the plan's (a discovery hit that prefix mode would decline says why)."""
        if st.outcome_recorded:
            return
        st.outcome_recorded = True
        if plan.is_hit:
            outcome = Outcome.DISCOVERY_ONLY
        else:
            outcome = self._MISS_OUTCOMES.get(plan.reason, Outcome.DECLINED)
        self.stats.outcome(outcome, reason or plan.reason)

    def _would_credit(self, st: _RequestState, plan: SemanticKvPlan, num_local: int) -> tuple[int, str]:
        """``(tokens, reason)`` prefix mode would credit for this plan, residency aside (discovery captures no KV):
        the same prefix, block and RoPE rules as :meth:`_decide`."""
        if not plan.is_hit:
            return 0, plan.reason
        n = min(plan.prefix_reusable_tokens(self.block_size), st.num_prompt_tokens - 1)
        segments = self._prefix_segments(plan, max(0, n))
        n = sum(length for _, _, length in segments)
        if not self.rope_exact:
            n = min(n, _contiguous_end([seg for seg in segments if seg[0] == seg[1]]))
        n -= n % self.block_size
        if n <= 0:
            reason = DeclineReason.NO_REUSABLE_PREFIX if self.rope_exact or not segments else \
                Reason.ROPE_NOT_SHIFT_INVARIANT
            return 0, reason
        if n <= num_local:
            return 0, DeclineReason.ENGINE_PREFIX_COVERS
        return n - num_local, plan.reason

    def num_tracked_requests(self) -> int:
        """Requests with state here (0 when the scheduler is idle: nothing leaks)."""
        return len(self._requests) + len(self._pending_loads) + len(self._load_votes) + len(self._finishing)

    # ------------------------------------------------------------------ get_num_new_matched_tokens
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` (vLLM's own block-aligned hit) whose KV the workers will load.

        Synchronous loads only (``False``): the KV is written in ``start_load_kv`` of the step that computes the
        rest of the prompt. Idempotent for a repeated call with the same ``num_computed_tokens``.
        """
        try:
            st = self._state(request)
            if st.unsupported:
                self._decline_unplanned(st)
                return 0, False
            if self.discovery_only:
                if st.plan is None:
                    st.plan = self._plan(st, num_computed_tokens)
                    would, reason = self._would_credit(st, st.plan, num_computed_tokens)
                    self.stats.would_credit(would)
                    # The pipeline recorded the hit in its telemetry; the stats say what prefix would have done.
                    self._count_plan_outcome(st, st.plan, reason if st.plan.is_hit and not would else None)
                return 0, False
            if self.adapter.blend:
                d = self._decide_blend(st, num_computed_tokens)
                approx = d.num_local if d.credit else None  # the whole blended range is approximate
            else:
                d = self._decide(st, request, num_computed_tokens)
                approx = _approximate_from(d.segments, d.num_local, d.num_local + d.credit) if d.credit else None
            if approx is not None:
                # Before vLLM allocates: it caches the credited blocks under the salted hashes (module docstring).
                self._salt(request, st, approx)
            return d.credit, False
        except Exception as exc:  # noqa: BLE001 -- rule 5: never fail inference
            logger.warning("SemBlend: planning for %s failed (%s: %s); normal prefill",
                           getattr(request, "request_id", "?"), type(exc).__name__, exc)
            return 0, False

    def _decline_unplanned(self, st: _RequestState) -> None:
        """Record (once) that a request was not planned at all, with its reason."""
        if st.outcome_recorded:
            return
        st.outcome_recorded = True
        plan = SemanticKvPlan(False, st.unsupported, int(st.num_prompt_tokens), st.namespace)
        self.pipeline.record_outcome(plan, Outcome.DECLINED, reason=st.unsupported)
        self.stats.outcome(Outcome.DECLINED, st.unsupported)

    def _plan(self, st: _RequestState, num_computed_tokens: int) -> SemanticKvPlan:
        t0 = time.perf_counter()
        plan = self.pipeline.plan(st.prompt, namespace=st.namespace, engine_prefix_tokens=num_computed_tokens)
        self.stats.plan_time(time.perf_counter() - t0)
        return plan

    def _new_decision(self, st: _RequestState, num_local: int) -> _Decision:
        """A fresh decision for this ``num_computed_tokens``. One plan per request (the pipeline records a miss each
        time it plans): a re-admission after a preemption or a new local hit reuses it; only the credit is
        recomputed by the caller. A miss is counted here and comes back with its reason."""
        plan = st.plan if st.plan is not None else self._plan(st, num_local)
        d = _Decision(num_local=num_local, plan=plan)
        st.decision, st.plan = d, plan
        if not plan.is_hit:
            self._count_plan_outcome(st, plan)  # the pipeline recorded the miss in its telemetry
            d.reason = plan.reason
        return d

    def _decide(self, st: _RequestState, request: Any, num_local: int) -> _Decision:
        d = st.decision
        if d is not None and d.num_local == num_local:
            if d.credit and not self._donor_loadable(d):  # the KV may have been evicted while the request waited
                d.credit, d.reason = 0, DeclineReason.DONOR_KV_EVICTED
                self._record(st, d.plan, Outcome.DECLINED, d.reason)
            return d
        d = self._new_decision(st, num_local)
        plan = d.plan
        if not plan.is_hit:
            return d
        # Only the prompt counts: a resumed request's output tokens are never reused.
        n = min(plan.prefix_reusable_tokens(self.block_size), st.num_prompt_tokens - 1)
        n -= n % self.block_size
        segments = self._prefix_segments(plan, n)
        n = sum(length for _, _, length in segments)
        n -= n % self.block_size
        if n <= 0:
            d.reason = DeclineReason.NO_REUSABLE_PREFIX
        elif n <= num_local:
            d.reason = DeclineReason.ENGINE_PREFIX_COVERS
        elif not self.adapter.load_moved_prefix and plan.moves_sink_tokens(num_local, self.block_size):
            # The first block is neither vLLM's own nor context-exact in the donor (VllmAdapterConfig docs).
            d.reason = DeclineReason.MOVED_FIRST_BLOCK
        else:
            d.donor_id = plan.donor_of(plan.spans[0])
            resident = self._resident.get((st.namespace.key, d.donor_id))
            if not self.rope_exact:  # only shift-free pieces can be loaded
                exact = [seg for seg in segments if seg[0] == seg[1]]
                n = min(n, _contiguous_end(exact))
            if n <= num_local:
                d.reason = Reason.ROPE_NOT_SHIFT_INVARIANT
            elif resident is None or resident.votes < self.num_workers:
                d.reason = DeclineReason.DONOR_KV_EVICTED
            elif self.kv_signature is not None and resident.signature != self.kv_signature:
                d.reason = DeclineReason.KV_LAYOUT_MISMATCH
            else:
                # The store may hold fewer tokens than the donor prompt (a capture of a truncated prompt).
                n = min(n, _resident_end(segments, resident.num_tokens))
                n -= n % self.block_size
                if n <= num_local:
                    d.reason = DeclineReason.DONOR_KV_EVICTED
                else:
                    d.segments = _clip(segments, n)
                    d.credit = n - num_local
        if not d.credit:
            outcome = Outcome.EXACT if d.reason == DeclineReason.ENGINE_PREFIX_COVERS else Outcome.DECLINED
            self._record(st, plan, outcome, d.reason)
        return d

    def _prefix_segments(self, plan: SemanticKvPlan, n: int) -> list[tuple[int, int, int]]:
        """The exact spans covering target ``[0, n)`` contiguously from 0, as (donor_start, target_start, length);
        stops at a gap or at a span of another donor."""
        out: list[tuple[int, int, int]] = []
        covered = 0
        for span in plan.spans:
            if covered >= n or span.target_start != covered:
                break
            if plan.donor_of(span) != plan.donor_of(plan.spans[0]):  # one load reads one donor entry
                break
            length = min(span.target_end, n) - span.target_start
            out.append((span.donor_start, span.target_start, length))
            covered += length
        return out

    def _donor_loadable(self, d: _Decision) -> bool:
        resident = self._resident.get((d.plan.namespace.key, d.donor_id))
        return (resident is not None and resident.votes >= self.num_workers
                and _resident_end(d.segments, resident.num_tokens) >= d.num_local + d.credit)

    # ------------------------------------------------------------------ blend mode
    def _decide_blend(self, st: _RequestState, num_local: int) -> _Decision:
        """The blend credit for this ``num_computed_tokens`` (one pipeline plan per request, like :meth:`_decide`;
        a waiting request re-checks its donors' residency on every call)."""
        d = st.decision
        if d is not None and d.num_local == num_local:
            if d.credit and self.blend_unavailable:  # a worker reported it cannot blend while the request waited
                d.credit, d.reason = 0, self.blend_unavailable
                self._record(st, d.plan, Outcome.DECLINED, d.reason)
            elif d.credit and self._unusable_donors(st.namespace.key, d.blend_plan, num_local, d.end) != ((), ()):
                d.credit, d.reason = 0, DeclineReason.DONOR_KV_EVICTED
                self._record(st, d.plan, Outcome.DECLINED, d.reason)
            return d
        d = self._new_decision(st, num_local)
        plan = d.plan
        if not plan.is_hit:
            return d
        d.reason = self._gate_blend(st, d)
        if not d.credit:
            exact = num_local > 0 and d.reason in (DeclineReason.ENGINE_PREFIX_COVERS, DeclineReason.NO_GAIN)
            self._record(st, plan, Outcome.EXACT if exact else Outcome.DECLINED, d.reason)
        return d

    def _gate_blend(self, st: _RequestState, d: _Decision) -> str:
        """Every reason to decline a blend hit, in order; sets ``d.credit`` / ``d.blend_plan`` / ``d.end`` when
        none applies. Returns the reason (the plan's own for a credited hit)."""
        num_local = d.num_local
        if self.blend_unavailable:
            return self.blend_unavailable
        plan = d.plan
        end = self._blend_end(plan, st.num_prompt_tokens)
        if end <= num_local:
            return DeclineReason.ENGINE_PREFIX_COVERS
        if not self.rope_exact and any(sp.delta != 0 for sp in _spans_in(plan, num_local, end)):
            return DeclineReason.ROPE_NOT_SHIFT_INVARIANT
        missing, mismatched = self._unusable_donors(st.namespace.key, plan, num_local, end)
        if missing or mismatched:
            reason = DeclineReason.KV_LAYOUT_MISMATCH if mismatched and not missing else \
                DeclineReason.DONOR_KV_EVICTED
            plan = self.pipeline.drop_donors(plan, (*missing, *mismatched))
            if not plan.is_hit:
                return reason
            end = self._blend_end(plan, st.num_prompt_tokens)
            if end <= num_local:
                return reason
        plan = plan.with_sink_recompute(num_local, end)
        min_gain = int(getattr(getattr(self.pipeline, "config", None), "chunk_size", self.block_size))
        if _reusable_tokens(plan, num_local, end) < max(1, min_gain):
            return DeclineReason.NO_GAIN
        d.blend_plan, d.end, d.credit = plan, end, end - num_local
        return plan.reason

    def _blend_end(self, plan: SemanticKvPlan, num_prompt_tokens: int) -> int:
        """End of the plan's reusable region: the last span's end, at most ``prompt_len - 1`` (vLLM computes the
        last token for fresh logits; a resumed request's output tokens are never reused), floored to a block."""
        if not plan.spans:
            return 0
        n = min(max(sp.target_end for sp in plan.spans), num_prompt_tokens - 1)
        return max(0, n - n % self.block_size)

    def _unusable_donors(self, ns_key: str, plan: SemanticKvPlan | None, lo: int, hi: int
                         ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(missing, mismatched)`` donors of the spans in ``[lo, hi)``: not held by every worker (or holding
        fewer tokens than a span reads), or stored with another ``KvSignature`` than this cache's."""
        if plan is None:
            return (), ()
        need: dict[str, int] = {}
        for sp in _spans_in(plan, lo, hi):
            donor = plan.donor_of(sp)
            read_end = sp.donor_start + (min(sp.target_end, hi) - sp.target_start)
            need[donor] = max(need.get(donor, 0), read_end)
        missing, mismatched = [], []
        for donor, tokens in need.items():
            res = self._resident.get((ns_key, donor))
            if res is None or res.votes < self.num_workers or res.num_tokens < tokens:
                missing.append(donor)
            elif self.kv_signature is not None and res.signature != self.kv_signature:
                mismatched.append(donor)
        return tuple(missing), tuple(mismatched)

    def _stage_blend(self, request: Any, st: _RequestState, d: _Decision, num_external_tokens: int) -> None:
        """One :class:`BlendSpec` for the committed range; the whole range (and all after it) is tainted."""
        bs = self.block_size
        n = d.num_local + num_external_tokens
        spec = BlendSpec(
            req_id=st.req_id, namespace_key=st.namespace.key, plan=d.blend_plan,
            token_ids=_frozen(st.prompt[:n]), num_tokens=n,
            block_ids=tuple(st.block_ids[: -(-n // bs)]), block_size=bs, local_tokens=d.num_local,
            check_layer=self.adapter.check_layer, selection=self.adapter.selection,
        )
        self._taint(request, st, d.num_local)
        st.blend_counts = None
        self._pending_loads[st.req_id] = (spec,)
        st.credited = num_external_tokens

    # ------------------------------------------------------------------ update_state_after_alloc
    def update_state_after_alloc(self, request: Any, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """vLLM allocated ``block_ids`` (all of the request's blocks, first KV-cache group) and committed
        ``num_external_tokens`` tokens after the local hit. Stage the load and protect the exact cache."""
        st = self._requests.get(request.request_id)
        if st is None:
            return
        st.block_ids = list(block_ids)
        d = st.decision
        if num_external_tokens <= 0:
            if d is not None and d.credit:
                self._record(st, d.plan, Outcome.DECLINED, DeclineReason.SCHEDULER_SKIPPED)
            return
        bs = self.block_size
        if d is not None and d.blend_plan is not None and num_external_tokens <= d.credit:
            self._stage_blend(request, st, d, num_external_tokens)
            return
        if d is None or num_external_tokens > d.credit:
            # Never expected: vLLM committed tokens we did not offer. Make the worker fail the blocks -> recompute.
            logger.warning("SemBlend: vLLM committed %d external tokens for %s but %d were offered; recomputing",
                           num_external_tokens, st.req_id, d.credit if d else 0)
            start = d.num_local if d is not None else 0
            first, last = start // bs, -(-(start + num_external_tokens) // bs)
            self._pending_loads[st.req_id] = (LoadSpec(st.req_id, st.namespace.key, None, 0, start,
                                                       num_external_tokens, tuple(st.block_ids[first:last]), bs),)
            return
        start, end = d.num_local, d.num_local + num_external_tokens
        specs = []
        for donor_start, target_start, length in d.segments:
            lo, hi = max(start, target_start), min(end, target_start + length)
            if lo >= hi:
                continue
            specs.append(LoadSpec(
                req_id=st.req_id, namespace_key=st.namespace.key, donor_id=d.donor_id,
                donor_start=donor_start + (lo - target_start), target_start=lo, num_tokens=hi - lo,
                block_ids=tuple(st.block_ids[lo // bs: -(-hi // bs)]), block_size=bs,
            ))
        approx = _approximate_from(d.segments, start, end)
        if approx is not None:
            self._taint(request, st, approx)
        self._pending_loads[st.req_id] = tuple(specs)
        st.credited = num_external_tokens

    def _taint(self, request: Any, st: _RequestState, start_token: int) -> None:
        """Committed: approximate KV goes into this request's blocks from ``start_token`` on. Keep them out of vLLM's
        exact prefix cache (module docstring) and out of the donors."""
        st.approximate = True
        if self._salted(st, start_token):
            return  # salted when the credit was offered: vLLM cached these blocks under the salted hashes
        first_block = start_token // self.block_size
        if self._block_pool is not None:
            evict = {b for b in st.block_ids[first_block:] if b is not None}
            if evict:
                self._block_pool.evict_blocks(evict)
        else:
            logger.warning("SemBlend: no block pool bound; approximate blocks of %s may stay in the prefix cache",
                           st.req_id)
        self._salt(request, st, start_token)

    def _salted(self, st: _RequestState, start_token: int) -> bool:
        """The request's hashes are already salted from the hash block holding ``start_token`` on (or earlier)."""
        return st.tainted_from_block is not None and st.tainted_from_block <= start_token // self.hash_block_size

    def _salt(self, request: Any, st: _RequestState, start_token: int) -> None:
        """Re-salt ``request.block_hashes`` from the hash block holding ``start_token`` on (idempotent)."""
        if self._salted(st, start_token):
            return  # already unique from an earlier offer or admission
        k = start_token // self.hash_block_size
        hashes = request.block_hashes
        # Each hash from block k on is XORed with a pad only this scheduler knows (its random secret, the request
        # id): no other request's honest or salted hash can equal it except by a 2^-(8 * len) accident, and blocks
        # vLLM hashes later chain on a salted parent. (A chained sha256 per block cost ~2 ms of the hit's critical
        # path at 8K tokens.) Blocks salted before are left alone: a second XOR undoes one.
        end = len(hashes) if st.tainted_from_block is None else min(st.tainted_from_block, len(hashes))
        if k < end:
            seed = b"semblend-approximate-kv" + self._secret + st.req_id.encode()
            hashes[k:end] = _xor_padded(list(hashes[k:end]), seed)
        st.tainted_from_block = k

    # ------------------------------------------------------------------ build_connector_meta
    def build_connector_meta(self, scheduler_output: Any) -> StepPlan:
        """Collect this step's loads and donor captures. Called once per step; resets the staged loads."""
        self._step += 1
        for req_id, st in list(self._finishing.items()):
            if st.finished_at_step is not None and st.finished_at_step < self._step - 1:
                # No worker result came within a step (never expected): nothing is known to be loaded.
                st.load_in_flight = None
                self._load_votes.pop(req_id, None)
                self._record(st, st.decision.plan if st.decision else st.plan, Outcome.DECLINED,
                             DeclineReason.ABORTED)
                self._finalize(st)
                del self._finishing[req_id]
        if self.discovery_only:
            return StepPlan()
        preempted = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        for req_id in preempted:
            self._on_preempted(req_id)
        num_sched = getattr(scheduler_output, "num_scheduled_tokens", {}) or {}
        captures: list[SaveSpec] = []
        for new in getattr(scheduler_output, "scheduled_new_reqs", ()) or ():
            st = self._requests.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0]) if new.block_ids else []
            self._maybe_capture(st, int(new.num_computed_tokens) + int(num_sched.get(new.req_id, 0)), captures)
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        if cached is not None:
            resumed = set(getattr(cached, "resumed_req_ids", None) or ())
            for i, req_id in enumerate(cached.req_ids):
                st = self._requests.get(req_id)
                if st is None:
                    continue
                new_ids = cached.new_block_ids[i]
                if new_ids is not None:
                    if req_id in resumed:
                        st.block_ids = list(new_ids[0])
                    else:
                        st.block_ids.extend(new_ids[0])
                done = int(cached.num_computed_tokens[i]) + int(num_sched.get(req_id, 0))
                self._maybe_capture(st, done, captures)
        loads, blends = [], []
        for req_id, specs in self._pending_loads.items():
            st = self._requests.get(req_id)
            if st is None or req_id in preempted or not specs:
                continue
            st.load_in_flight = specs
            self._load_votes[req_id] = 0
            for spec in specs:
                (blends if isinstance(spec, BlendSpec) else loads).append(spec)
        self._pending_loads.clear()
        return StepPlan(loads=tuple(loads), saves=tuple(captures), blends=tuple(blends))

    def _maybe_capture(self, st: _RequestState, tokens_done: int, out: list[SaveSpec]) -> None:
        """Capture the prompt's KV as a donor in the step its last prompt token is computed."""
        if (st.capture_issued or st.unsupported or tokens_done < st.num_prompt_tokens
                or self._registers_without_kv  # blend cannot run here: donors are registered for evidence only
                or st.approximate  # approximate KV never becomes a donor
                or st.num_prompt_tokens < max(self.adapter.min_donor_tokens, 1)):
            return
        n = st.num_prompt_tokens
        nblocks = -(-n // self.block_size)
        if len(st.block_ids) < nblocks:
            return
        st.capture_issued = True
        key = (st.namespace.key, st.req_id)
        # Identical prompts (same namespace, same tokens) are captured once: the first capture serves them all.
        content = (st.namespace.key, hashlib.sha256(np.ascontiguousarray(st.prompt[:n]).tobytes()).digest())
        holder = self._by_content.get(content)
        if holder is not None and (holder in self._awaiting_capture or holder in self._resident):
            return
        self._by_content[content] = key
        self._content_of[key] = content
        self._awaiting_capture[key] = (st.prompt, st.namespace)
        while len(self._awaiting_capture) > self.MAX_AWAITING_CAPTURE:
            old, _ = self._awaiting_capture.popitem(last=False)
            self._forget_content(old)
        out.append(SaveSpec(st.req_id, st.namespace.key, st.req_id, n, tuple(st.block_ids[:nblocks]),
                            self.block_size, tuple(np.asarray(st.prompt[:n]).tolist())))

    def _on_preempted(self, req_id: str) -> None:
        st = self._requests.get(req_id)
        self._pending_loads.pop(req_id, None)
        if st is None:
            return
        # The request will be admitted again (num_computed_tokens = 0) and re-planned; its blocks are gone.
        st.block_ids = []
        st.decision = None
        if st.load_in_flight is not None:
            st.load_in_flight = None
            self._load_votes.pop(req_id, None)

    # ------------------------------------------------------------------ worker results
    def update_connector_output(self, report: WorkerReport | None, invalid_block_ids: Iterable[int] = ()) -> None:
        """Apply the workers' report: confirmed captures become donors, evictions retire them, loads resolve."""
        if report is not None:
            for saved in report.saved:
                self._on_saved(saved.namespace_key, saved.donor_id, saved.num_tokens, saved.signature)
            for key in report.save_failed:
                self._awaiting_capture.pop(key, None)
                self._forget_content(key)
            for ns_key, donor_id in report.evicted:
                self._retire(ns_key, donor_id)
            for reason in report.blend_unavailable:
                if self.adapter.blend and not self.blend_unavailable:
                    logger.warning("SemBlend: a worker cannot run the blended prefill (%s); blend hits are declined "
                                   "from now on", reason)
                    self.blend_unavailable = reason
            for req_id, reused, recomputed in report.blended:
                st = self._requests.get(req_id) or self._finishing.get(req_id)
                if st is not None and st.load_in_flight is not None:
                    st.blend_counts = (int(reused), int(recomputed))
            for req_id in report.load_failed:
                self._on_load_result(req_id, 0, failed=True)
            for req_id, tokens in report.loaded:
                self._on_load_result(req_id, tokens, failed=False)
            for s in report.load_s:
                self.stats.load_time(s)
            for s in report.save_s:
                self.stats.save_time(s)
        invalid = set(invalid_block_ids or ())
        if invalid:
            for req_id, st in [*self._requests.items(), *self._finishing.items()]:
                if st.load_in_flight is not None and any(invalid.intersection(_credited_blocks(sp))
                                                         for sp in st.load_in_flight):
                    self._on_load_result(req_id, 0, failed=True)

    def _on_saved(self, ns_key: str, donor_id: str, num_tokens: int, signature: KvSignature) -> None:
        key = (ns_key, donor_id)
        res = self._resident.get(key)
        if res is None or res.signature != signature or res.num_tokens != num_tokens:
            res = self._resident[key] = _Resident(num_tokens, signature, 0)
        res.votes += 1
        if res.votes < self.num_workers:
            return
        pending = self._awaiting_capture.pop(key, None)
        if pending is None:
            return  # captured earlier (another worker's vote)
        tokens, namespace = pending
        try:
            self.pipeline.register_donor(donor_id, tokens, namespace=namespace)
        except SemBlendError as exc:
            logger.warning("SemBlend: donor %s not registered: %s", donor_id, exc)
            self._resident.pop(key, None)
            self._forget_content(key)

    def _forget_content(self, key: tuple[str, str]) -> None:
        content = self._content_of.pop(key, None)
        if content is not None and self._by_content.get(content) == key:
            del self._by_content[content]

    def _retire(self, ns_key: str, donor_id: str) -> None:
        self._forget_content((ns_key, donor_id))
        self._resident.pop((ns_key, donor_id), None)
        self._awaiting_capture.pop((ns_key, donor_id), None)
        store = getattr(self.pipeline, "store", None)
        if store is not None:
            store.remove(donor_id, ns_key)  # a donor without KV cannot be materialized

    def _on_load_result(self, req_id: str, tokens: int, *, failed: bool) -> None:
        st = self._requests.get(req_id) or self._finishing.get(req_id)
        if st is None or st.load_in_flight is None:
            return
        specs = st.load_in_flight
        plan = st.decision.plan if st.decision is not None else st.plan
        if failed:
            st.load_in_flight = None
            self._load_votes.pop(req_id, None)
            if plan is not None:
                self._record(st, plan, Outcome.DECLINED, DeclineReason.LOAD_FAILED)
            st.blend_counts = None
            # A donor whose KV could not be loaded is not offered again (it would be credited and fail again).
            for ns_key, donor_id in {(sp.namespace_key, donor) for sp in specs for donor in _donors_of(sp)}:
                self._retire(ns_key, donor_id)
            self._settle_finishing(req_id)
            return
        votes = self._load_votes.get(req_id, 0) + 1
        if votes < self.num_workers * len(specs):  # every worker reports every piece
            self._load_votes[req_id] = votes
            return
        st.load_in_flight = None
        self._load_votes.pop(req_id, None)
        if plan is not None:
            # The tokens SemBlend loaded (vLLM's own prefix hit before them is not SemBlend's reuse); for a blend,
            # the ones whose donor KV was kept (the workers' count; all filled tokens if they sent none).
            loaded = sum(sp.num_blended if isinstance(sp, BlendSpec) else sp.num_tokens for sp in specs)
            if st.blend_counts is not None:
                loaded = st.blend_counts[0]
            self._record(st, plan, Outcome.MATERIALIZED, None, loaded_tokens=loaded)
        self._settle_finishing(req_id)

    def _settle_finishing(self, req_id: str) -> None:
        st = self._finishing.pop(req_id, None)
        if st is not None:
            self._finalize(st)

    # ------------------------------------------------------------------ request_finished
    def request_finished(self, request: Any) -> None:
        """Release everything held for the request. In discovery mode (and in blend mode where blending cannot run)
        a fully computed prompt becomes a donor without KV."""
        req_id = request.request_id
        st = self._requests.pop(req_id, None)
        self._pending_loads.pop(req_id, None)
        if st is None:
            self._load_votes.pop(req_id, None)
            return
        if st.load_in_flight is not None:
            # The load ran in this step; its result arrives right after this call (update_connector_output).
            st.finished_at_step = self._step
            self._finishing[req_id] = st
        else:
            self._load_votes.pop(req_id, None)
            self._finalize(st)
        if ((self.discovery_only or self._registers_without_kv) and not st.unsupported
                and int(getattr(request, "num_computed_tokens", 0)) >= st.num_prompt_tokens
                and st.num_prompt_tokens >= max(self.adapter.min_donor_tokens, 1)):
            try:
                self.pipeline.register_donor(req_id, st.prompt, namespace=st.namespace)
            except SemBlendError as exc:
                logger.debug("SemBlend: donor %s not registered: %s", req_id, exc)

    # ------------------------------------------------------------------ introspection
    def resident_donors(self) -> int:
        return sum(1 for r in self._resident.values() if r.votes >= self.num_workers)


def _approximate_from(segments: Sequence[tuple[int, int, int]], start: int, end: int) -> int | None:
    """First target token of ``[start, end)`` whose loaded KV is approximate, for prefix-mode pieces
    ``(donor_start, target_start, length)``; None when all of it is context-exact. KV is context-exact only where
    donor and target share everything before it: inside the first piece, when it starts at token 0 of both. From
    the first other piece on, blocks must stay out of the exact cache."""
    if not segments:
        return None
    exact_end = segments[0][2] if segments[0][:2] == (0, 0) else 0
    starts = [max(start, target_start) for _, target_start, length in segments
              if max(start, target_start) < min(end, target_start + length)]
    approx = [lo for lo in starts if lo >= exact_end]
    return min(approx) if approx else None


def _xor_padded(hashes: list[Any], seed: bytes) -> list[Any]:
    """Each hash XORed with the pad ``shake_256(seed)`` of its length (lowest bit set, so no pad is zero), in its
    own type. vLLM's block hashes are all ``bytes`` of one length: one numpy XOR over the joined hashes instead of
    a Python int XOR per block (2,044 of them at 32K tokens, on the hit's path before the forward); anything else
    per hash."""
    pads: dict[int, bytes] = {}

    def pad(size: int) -> bytes:
        if size not in pads:
            raw = bytearray(hashlib.shake_256(seed).digest(size))
            raw[-1] |= 1
            pads[size] = bytes(raw)
        return pads[size]

    if not hashes:
        return []
    size = len(hashes[0])
    if size and all(type(h) is bytes and len(h) == size for h in hashes):
        joined = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), size)
        flat = (joined ^ np.frombuffer(pad(size), dtype=np.uint8)).tobytes()
        return [flat[i:i + size] for i in range(0, len(flat), size)]
    out = []
    for old in hashes:
        raw = bytes(old)
        new = bytes(a ^ b for a, b in zip(raw, pad(len(raw))))
        out.append(type(old)(new) if isinstance(old, (bytes, bytearray)) else new)
    return out


def _frozen(tokens: np.ndarray) -> np.ndarray:
    """A read-only int64 copy (the request's own array lives on and may be replaced; the spec must not change)."""
    out = np.array(tokens, dtype=np.int64)
    out.setflags(write=False)
    return out


def _spans_in(plan: SemanticKvPlan, lo: int, hi: int) -> list[Any]:
    """The plan's spans that reach into target ``[lo, hi)``."""
    return [sp for sp in plan.spans if sp.target_end > lo and sp.target_start < hi]


def _reusable_tokens(plan: SemanticKvPlan, lo: int, hi: int) -> int:
    """Target tokens in ``[lo, hi)`` a span covers and no mandatory recompute range claims."""
    if hi <= lo:
        return 0
    mask = np.zeros(hi - lo, dtype=bool)
    for sp in _spans_in(plan, lo, hi):
        mask[max(sp.target_start, lo) - lo: min(sp.target_end, hi) - lo] = True
    for a, b in plan.recompute_ranges:
        if b > lo and a < hi:
            mask[max(a, lo) - lo: min(b, hi) - lo] = False
    return int(mask.sum())


def _donors_of(spec: LoadSpec | BlendSpec) -> tuple[str, ...]:
    """Donors a staged load or blend reads."""
    if isinstance(spec, BlendSpec):
        plan = spec.plan
        return tuple(dict.fromkeys(plan.donor_of(sp) for sp in _spans_in(plan, spec.local_tokens, spec.num_tokens)
                                   if plan.donor_of(sp) is not None))
    return (spec.donor_id,) if spec.donor_id is not None else ()


def _credited_blocks(spec: LoadSpec | BlendSpec) -> tuple[int, ...]:
    return spec.credited_block_ids() if isinstance(spec, BlendSpec) else spec.block_ids


def _contiguous_end(segments: Sequence[tuple[int, int, int]]) -> int:
    """End of the run of pieces contiguous from target token 0."""
    covered = 0
    for _, target_start, length in segments:
        if target_start != covered:
            break
        covered += length
    return covered


def _resident_end(segments: Sequence[tuple[int, int, int]], donor_tokens: int) -> int:
    """How far from target token 0 the pieces can be loaded from a donor whose store holds ``donor_tokens``."""
    covered = 0
    for donor_start, target_start, length in segments:
        if target_start != covered:
            break
        usable = max(0, min(length, donor_tokens - donor_start))
        covered += usable
        if usable < length:
            break
    return covered


def _clip(segments: Sequence[tuple[int, int, int]], n: int) -> tuple[tuple[int, int, int], ...]:
    out = []
    for donor_start, target_start, length in segments:
        if target_start >= n:
            break
        out.append((donor_start, target_start, min(length, n - target_start)))
    return tuple(out)
