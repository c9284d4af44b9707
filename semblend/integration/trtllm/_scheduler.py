"""Scheduler side of the TensorRT-LLM connector: plan, decide, credit tokens, stage loads and donor captures.

Lifecycle, in the order TensorRT-LLM calls it (rank 0, the executor thread)::

    get_num_new_matched_tokens(request, num_computed_tokens)  # from KVCacheManager.addSequence, once per
                                                              # allocation; every decline is decided here
    update_state_after_alloc(request, block_ids)              # the request's blocks
    build_connector_meta(scheduler_output)                    # once per step -> StepPlan for the workers
    request_finished(request, cache_block_ids) -> False       # once per request; all state released

Modes
-----
* ``discovery_only`` (default): every request is planned once and its outcome recorded; ``(0, False)`` always,
  the metadata is always empty. Finished prompts are registered as donors (tokens only).
* ``prefix``: the reusable prefix of a hit beyond TensorRT-LLM's own block-reuse hit is credited and loaded from the
  worker's donor KV store into the request's own blocks. Donors are prompts whose KV the worker captured.

Exact-cache safety (rule 3)
---------------------------
TensorRT-LLM stores every context block of every request for reuse (``KVCacheManager.update_resources`` ->
``store_context_blocks``; ``removeSequence`` -> ``releaseBlocks``), keyed by the request's tokens, LoRA task and
cache salt, and the connector has no way to mark a block non-reusable; with ``enable_block_reuse=False`` it ignores
the connector altogether. KV loaded from a donor with a position shift is not what a cold prefill computes, so
loading it would publish approximate KV as an exact hit. The scheduler therefore credits **context-exact** spans
only (donor and target share tokens ``[0, n)``: the donor's KV is what this prompt's prefill computes) and declines
every other hit with ``approximate_kv_not_isolable`` before crediting. The worker's loader re-rotates shifted KV
correctly (tests show it); it is the pool's publication rule, not the math, that keeps shifted loads off here.

Every other reason to decline is also checked before tokens are credited: a partial-block engine hit, a request
whose binding exposes no cache salt (neither ``cache_salt`` nor ``cache_salt_id``: its namespace is unknown), the
donor's KV not resident (or its worker unusable), fewer stored tokens than the span. The donor's store entry is leased from
the moment tokens are credited until the worker loaded it, so it cannot be evicted in between.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from semblend.integration.trtllm._config import AdapterConfig, request_namespace, request_salt
from semblend.integration.trtllm._shared import SharedState
from semblend.integration.vllm._metadata import LoadSpec, SaveSpec, StepPlan
from semblend_core import CacheNamespace, Outcome, SemanticKvPlan
from semblend_core.errors import SemBlendError

logger = logging.getLogger(__name__)

__all__ = ["DeclineReason", "SchedulerSide"]


class DeclineReason:
    """Adapter-side reasons to decline a planned hit (stable strings, like ``semblend_core.Reason``)."""

    NO_REUSABLE_PREFIX = "no_reusable_prefix"
    ENGINE_PREFIX_COVERS = "engine_prefix_covers"
    ENGINE_PARTIAL_BLOCK = "engine_partial_block"
    APPROXIMATE_KV_NOT_ISOLABLE = "approximate_kv_not_isolable"
    DONOR_KV_EVICTED = "donor_kv_evicted"
    WORKER_UNAVAILABLE = "worker_unavailable"
    CACHE_SALT_UNKNOWN = "cache_salt_unknown"
    NOT_SCHEDULED = "load_not_scheduled"
    LOAD_FAILED = "load_failed"
    ABORTED = "aborted"


@dataclass
class _Decision:
    num_local: int
    plan: SemanticKvPlan
    credit: int = 0
    reason: str = ""
    donor_start: int = 0
    donor_id: str | None = None  # the first span's donor (in a multi-donor plan, not always plan.donor_id)


@dataclass
class _RequestState:
    req_id: str
    namespace: CacheNamespace
    prompt: np.ndarray
    num_prompt_tokens: int
    salt_known: bool = True
    decision: _Decision | None = None
    plan: SemanticKvPlan | None = None
    outcome_recorded: bool = False
    block_ids: list[int] = field(default_factory=list)
    load_issued: bool = False
    load_done: bool = False
    capture_issued: bool = False
    captured_tokens: int = 0  # the worker confirmed the capture of this many prompt tokens


_DONOR_PREFIX = "trtllm-"


def donor_id_of(req_id: str) -> str:
    """The donor id a captured request is stored and registered under."""
    return _DONOR_PREFIX + req_id


class SchedulerSide:
    """All scheduler-side state of one connector. TensorRT-LLM objects are read by attribute only.

    ``pipeline``: a ``SemBlendPipeline``. ``base_namespace``: from ``_config.base_namespace``. ``shared``: the
    :class:`~semblend.integration.trtllm._shared.SharedState` shared with rank 0's worker. ``tokens_per_block``:
    ``kv_cache_config.tokens_per_block``.
    """

    def __init__(self, pipeline: Any, adapter: AdapterConfig, base_namespace: CacheNamespace, *,
                 tokens_per_block: int, shared: SharedState) -> None:
        if tokens_per_block <= 0:
            raise ValueError(f"tokens_per_block must be positive, got {tokens_per_block}")
        self.pipeline = pipeline
        self.adapter = adapter
        self.base_namespace = base_namespace
        self.tokens_per_block = int(tokens_per_block)
        self.shared = shared
        self._requests: dict[str, _RequestState] = {}

    @property
    def discovery_only(self) -> bool:
        return not self.adapter.materializes

    # ------------------------------------------------------------------ state
    def _state(self, request: Any) -> _RequestState:
        req_id = str(request.request_id)
        st = self._requests.get(req_id)
        if st is None:
            tokens = request.get_tokens(0)
            n = getattr(request, "prompt_len", None)
            n = len(tokens) if n is None else int(n)
            prompt = np.fromiter(tokens[:n], dtype=np.int64, count=n)
            st = _RequestState(req_id, request_namespace(self.base_namespace, request), prompt, n,
                               salt_known=request_salt(request) is not None)
            self._requests[req_id] = st
        return st

    def _record(self, st: _RequestState, plan: SemanticKvPlan, outcome: str, reason: str | None = None,
                loaded_tokens: int = 0) -> None:
        """One outcome per request (rule 2: ``materialized`` only after the worker reported the load)."""
        if st.outcome_recorded:
            return
        st.outcome_recorded = True
        self.pipeline.record_outcome(plan, outcome, loaded_tokens=loaded_tokens, reason=reason)

    def num_tracked_requests(self) -> int:
        """Requests with state here, plus pinned donors (0 when idle: nothing leaks)."""
        return len(self._requests) + self.shared.num_pins()

    # ------------------------------------------------------------------ get_num_new_matched_tokens
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` (TensorRT-LLM's own reuse hit) the worker will load.

        Synchronous loads only (``False``): the KV is written in ``start_load_kv`` before the forward pass that
        computes the rest of the prompt. Idempotent for a repeated call with the same ``num_computed_tokens``.
        Never raises: an error is a normal prefill.
        """
        try:
            st = self._state(request)
            if self.discovery_only:
                if st.plan is None:
                    st.plan = self._plan(st, num_computed_tokens)
                    st.outcome_recorded = True  # the pipeline recorded the miss / discovery hit itself
                return 0, False
            return self._decide(st, int(num_computed_tokens)).credit, False
        except Exception as exc:  # noqa: BLE001 -- rule 5: never fail inference
            logger.warning("SemBlend: planning for request %s failed (%s: %s); normal prefill",
                           getattr(request, "request_id", "?"), type(exc).__name__, exc)
            self.shared.unpin(str(getattr(request, "request_id", "")))
            return 0, False

    def _plan(self, st: _RequestState, num_computed_tokens: int) -> SemanticKvPlan:
        return self.pipeline.plan(st.prompt, namespace=st.namespace, engine_prefix_tokens=num_computed_tokens)

    def _decide(self, st: _RequestState, num_local: int) -> _Decision:
        d = st.decision
        if d is not None and d.num_local == num_local:
            return d
        self.shared.unpin(st.req_id)  # a new allocation: any earlier decision is void
        plan = self._plan(st, num_local)
        d = _Decision(num_local=num_local, plan=plan)
        st.decision, st.plan = d, plan
        if not plan.is_hit:
            st.outcome_recorded = True  # the pipeline recorded the miss in its telemetry
            d.reason = plan.reason
            return d
        bs = self.tokens_per_block
        # Only the prompt counts, and never its last token (the engine must compute fresh logits).
        n = min(plan.prefix_reusable_tokens(bs), st.num_prompt_tokens - 1)
        n -= n % bs
        span = plan.spans[0] if plan.spans else None
        if span is not None:
            # One load reads one donor entry at the first span's (zero) shift: never run into a later span, whose
            # KV has another shift or donor (possible with strict_prefix_boundary=false).
            n = min(n, span.target_end)
            n -= n % bs
        if span is None or n <= 0 or span.target_start != 0:
            d.reason = DeclineReason.NO_REUSABLE_PREFIX
        elif num_local % bs:
            d.reason = DeclineReason.ENGINE_PARTIAL_BLOCK  # the boundary block is half computed on device
        elif n <= num_local:
            d.reason = DeclineReason.ENGINE_PREFIX_COVERS
        elif not span.context_exact:
            d.reason = DeclineReason.APPROXIMATE_KV_NOT_ISOLABLE  # module docstring: rule 3
        elif not st.salt_known:
            d.reason = DeclineReason.CACHE_SALT_UNKNOWN  # the request could belong to another salt (rule 4)
        elif self.shared.unusable_reason is not None:
            d.reason = DeclineReason.WORKER_UNAVAILABLE
        else:
            d.donor_id = plan.donor_of(span)
            donor = self.shared.pin(st.req_id, st.namespace.key, d.donor_id)
            avail = 0 if donor is None else donor.num_tokens - span.donor_start
            n = min(n, avail - avail % bs)
            if donor is None or n <= num_local:
                self.shared.unpin(st.req_id)
                d.reason = DeclineReason.DONOR_KV_EVICTED
            else:
                d.donor_start = span.donor_start
                d.credit = n - num_local
        if not d.credit:
            outcome = Outcome.EXACT if d.reason == DeclineReason.ENGINE_PREFIX_COVERS else Outcome.DECLINED
            self._record(st, plan, outcome, d.reason)
        return d

    # ------------------------------------------------------------------ update_state_after_alloc
    def update_state_after_alloc(self, request: Any, block_ids: Sequence[int]) -> None:
        """The request's blocks (first allocation). The load itself is staged in ``build_connector_meta``."""
        st = self._requests.get(str(request.request_id))
        if st is not None:
            st.block_ids = [int(b) for b in block_ids]

    # ------------------------------------------------------------------ build_connector_meta
    def build_connector_meta(self, scheduler_output: Any) -> StepPlan:
        """This step's loads (requests scheduled for the first time with credited tokens) and donor captures
        (requests whose last prompt token is computed in this step). Called once per step."""
        self._apply_reports()
        if self.discovery_only:
            return StepPlan()
        loads: list[LoadSpec] = []
        saves: list[SaveSpec] = []
        for rd in getattr(scheduler_output, "new_requests", ()) or ():
            st = self._requests.get(str(rd.request_id))
            if st is None:
                continue
            if rd.new_block_ids:
                st.block_ids = [int(b) for b in rd.new_block_ids]
            d = st.decision
            external = d.credit if d is not None else 0
            if external and not st.load_issued:
                spec = self._load_spec(st, d)
                if spec is None:  # never expected: TensorRT-LLM allocated fewer blocks than the prompt needs
                    raise SemBlendError(f"request {st.req_id}: {len(st.block_ids)} blocks cannot hold the "
                                        f"{d.num_local + d.credit} credited tokens")
                st.load_issued = True
                loads.append(spec)
            # ``computed_position`` excludes the connector's tokens (TensorRT-LLM subtracts them for new requests).
            done = int(rd.computed_position) + external + int(rd.num_scheduled_tokens)
            self._maybe_capture(st, done, saves)
        for rd in getattr(scheduler_output, "cached_requests", ()) or ():
            st = self._requests.get(str(rd.request_id))
            if st is None:
                continue
            if rd.new_block_ids:
                st.block_ids.extend(int(b) for b in rd.new_block_ids)
            self._maybe_capture(st, int(rd.computed_position) + int(rd.num_scheduled_tokens), saves)
        return StepPlan(loads=tuple(loads), saves=tuple(saves))

    def _load_spec(self, st: _RequestState, d: _Decision) -> LoadSpec | None:
        bs = self.tokens_per_block
        start, n = d.num_local, d.credit
        first, last = start // bs, -(-(start + n) // bs)
        if len(st.block_ids) < last:
            return None
        return LoadSpec(req_id=st.req_id, namespace_key=st.namespace.key, donor_id=d.donor_id,
                        donor_start=d.donor_start + start, target_start=start, num_tokens=n,
                        block_ids=tuple(st.block_ids[first:last]), block_size=bs)

    def _maybe_capture(self, st: _RequestState, tokens_done: int, out: list[SaveSpec]) -> None:
        """Capture the prompt's KV as a donor in the step its last prompt token is computed."""
        n = st.num_prompt_tokens
        if (st.capture_issued or tokens_done < n
                or n < max(self.adapter.min_donor_tokens, 1)):
            return
        nblocks = -(-n // self.tokens_per_block)
        if len(st.block_ids) < nblocks:
            return
        st.capture_issued = True
        out.append(SaveSpec(st.req_id, st.namespace.key, donor_id_of(st.req_id), n,
                            tuple(st.block_ids[:nblocks]), self.tokens_per_block, tuple(st.prompt.tolist())))

    # ------------------------------------------------------------------ worker reports
    def _apply_reports(self) -> None:
        reports = self.shared.take_reports()
        for req_id, tokens in reports.loaded:
            st = self._requests.get(req_id)
            if st is not None and st.decision is not None:
                st.load_done = True
                self._record(st, st.decision.plan, Outcome.MATERIALIZED,
                             loaded_tokens=st.decision.num_local + tokens)
        for req_id in reports.load_failed:
            st = self._requests.get(req_id)
            if st is not None and st.decision is not None:
                self._record(st, st.decision.plan, Outcome.DECLINED, DeclineReason.LOAD_FAILED)
        for ns_key, donor_id, tokens in reports.captured:
            st = self._requests.get(donor_id.removeprefix(_DONOR_PREFIX))
            if st is not None and st.namespace.key == ns_key:
                st.captured_tokens = tokens
        for ns_key, donor_id in reports.evicted:
            st = self._requests.get(donor_id.removeprefix(_DONOR_PREFIX))
            if st is not None:
                st.captured_tokens = 0
            store = getattr(self.pipeline, "store", None)
            if store is not None:
                try:
                    store.remove(donor_id, ns_key)  # a donor without KV cannot be materialized
                except SemBlendError as exc:
                    logger.debug("SemBlend: donor %s not removed: %s", donor_id, exc)

    # ------------------------------------------------------------------ request_finished
    def request_finished(self, request: Any, cache_block_ids: Sequence[int] = ()) -> bool:
        """Release everything held for the request; register it as a donor when it qualifies. Returns False: the
        connector never saves asynchronously (captures finish in ``wait_for_save`` of the step that computed
        them), so TensorRT-LLM may free the blocks at once."""
        self._apply_reports()
        req_id = str(request.request_id)
        self.shared.unpin(req_id)
        st = self._requests.pop(req_id, None)
        if st is None:
            return False
        d = st.decision
        if d is not None and d.credit and not st.load_done:
            reason = DeclineReason.ABORTED if st.load_issued else DeclineReason.NOT_SCHEDULED
            self._record(st, d.plan, Outcome.DECLINED, reason)
        self._register_donor(st, request)
        return False

    def _register_donor(self, st: _RequestState, request: Any) -> None:
        if st.num_prompt_tokens < max(self.adapter.min_donor_tokens, 1):
            return
        if self.discovery_only:
            if int(getattr(request, "context_current_position", st.num_prompt_tokens)) < st.num_prompt_tokens:
                return  # aborted before its prompt was computed
            donor_id, tokens = donor_id_of(st.req_id), st.prompt
        else:
            donor_id = donor_id_of(st.req_id)
            if not st.captured_tokens or not self.shared.resident(st.namespace.key, donor_id):
                return  # never captured, or already evicted: a donor without KV would only be declined
            tokens = st.prompt[: st.captured_tokens]
        try:
            self.pipeline.register_donor(donor_id, tokens, namespace=st.namespace)
        except SemBlendError as exc:
            logger.debug("SemBlend: donor %s not registered: %s", donor_id, exc)
