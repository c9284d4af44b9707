"""``SemBlendPipeline``: register donors, plan reuse for new prompts. The engine-agnostic entry point.

Call order for one request (adapters do exactly this)::

    plan = pipe.plan(prompt_ids, text, namespace, engine_prefix_tokens=n)   # never raises
    if plan.is_hit and not config.discovery_only:
        loaded = <adapter loads donor KV per plan>                           # may fail -> normal prefill
        pipe.record_outcome(plan, "materialized", loaded_tokens=loaded)      # or "declined", reason=...
    ... after the request finishes ...
    pipe.register_donor(request_id, prompt_ids, text, namespace)

``plan`` stages, in order: validate -> exact-prefix check (rule 1: when the engine's own prefix cache leaves fewer
than ``chunk_size`` tokens to compute, nothing semantic runs) -> anchor discovery (``donor_store.candidates``) ->
alignment of the top candidates -> embedding discovery only when anchors found nothing and text is given ->
further donors for the regions the best one leaves uncovered (``max_donors_per_plan > 1``, see ``_fill_gaps``) ->
quality gates on the union of all donors' spans (similarity, reuse ratio, exact-only, gain over the engine
prefix) -> recompute ranges and the bathtub layer policy -> frozen ``SemanticKvPlan``. Any exception inside
becomes a miss with reason ``internal_error`` (rule 5); only ``register_donor`` raises, and only for bad input.
"""

from __future__ import annotations

import array
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from semblend_core._logging import warning_once
from semblend_core.alignment import AlignParams, Alignment, TargetAnchors, align
from semblend_core.bathtub import ModelShape, layer_recompute_policy
from semblend_core.config import SemBlendConfig
from semblend_core.donor_store import DonorRecord, DonorStore
from semblend_core.errors import InvalidInputError, InvalidTokensError
from semblend_core.namespace import CacheNamespace
from semblend_core.plan import FuzzySpan, Outcome, PlanTimings, Reason, SemanticKvPlan, Span
from semblend_core.telemetry import Telemetry

logger = logging.getLogger(__name__)

MAX_TOKEN_ID = (1 << 31) - 1
_GOOD_ENOUGH_COVERAGE = 0.98  # stop aligning further candidates once one covers this much of the prompt
# A further donor is aligned only if the index estimates it shares at least this many chunks' worth of k-grams
# with the uncovered regions (half a chunk leaves room for the sketch's sampling noise).
_GAP_SCORE_FLOOR = 0.5
# When the main donor alone passes the gates, further donors are looked for only if the gaps of >= chunk_size
# tokens add up to this fraction of the prompt: smaller gaps are not worth a second index query on the hot path
# (a 64-token fresh instruction in a 2K prompt cost +0.15 ms p50 for nothing in the lookup benchmark).
_WORTH_FILLING = 0.04


def validate_tokens(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """1-D int64 array of ids in [0, 2^31); raises ``InvalidTokensError`` naming the problem."""
    if isinstance(token_ids, (list, tuple)):
        # Engines hand over Python lists; array('q') converts them ~25% faster than np.asarray and, unlike
        # np.array(..., dtype=int64), refuses floats instead of truncating them.
        try:
            arr = np.frombuffer(array.array("q", token_ids), dtype=np.int64)
        except (OverflowError, TypeError) as exc:
            raise InvalidTokensError(f"token ids must be 1-D integers below 2^63: {exc}") from None
        # array('q') takes True/False as 1/0. A bool is never a token id (a mask passed by mistake): only the
        # entries that converted to 0 or 1 can be one, so only those few are inspected.
        for i in np.flatnonzero(arr <= 1).tolist():
            if isinstance(token_ids[i], bool):
                raise InvalidTokensError(f"token ids must be integers, got a bool at position {i}")
        return _check_range(arr)
    try:
        arr = np.asarray(token_ids)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidTokensError(f"token ids are not a sequence of integers: {exc}") from None
    if arr.ndim != 1:
        raise InvalidTokensError(f"token ids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer):  # bool is not an integer dtype
        raise InvalidTokensError(f"token ids must be integers, got dtype {arr.dtype}")
    return _check_range(arr.astype(np.int64, copy=False))


def _declared_length(token_ids: Any) -> int | None:
    """``len(token_ids)`` without converting anything (None for objects without a length)."""
    try:
        return len(token_ids)
    except TypeError:
        return None


def check_request_args(text: Any = None, namespace: Any = None, engine_prefix_tokens: Any = 0) -> str:
    """``""`` when the non-token arguments of ``plan``/``register_donor`` are usable, else what is wrong.

    ``text``: a ``str`` or None. ``namespace``: a ``CacheNamespace`` or None. ``engine_prefix_tokens``: an
    integer >= 0 (Python or numpy; not a bool, a float or a string).
    """
    if text is not None and not isinstance(text, str):
        return f"text must be a str or None, got {type(text).__name__}"
    if namespace is not None and not isinstance(namespace, CacheNamespace):
        return f"namespace must be a CacheNamespace or None, got {type(namespace).__name__} {namespace!r:.40}"
    if isinstance(engine_prefix_tokens, (bool, np.bool_)) or not isinstance(engine_prefix_tokens,
                                                                              (int, np.integer)):
        return (f"engine_prefix_tokens must be an integer >= 0, got {type(engine_prefix_tokens).__name__} "
                f"{engine_prefix_tokens!r:.40}")
    if engine_prefix_tokens < 0:
        return f"engine_prefix_tokens must be an integer >= 0, got {engine_prefix_tokens}"
    return ""


def _check_range(arr: np.ndarray) -> np.ndarray:
    if arr.size == 0:
        return arr
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > MAX_TOKEN_ID:
        raise InvalidTokensError(f"token ids must lie in [0, {MAX_TOKEN_ID}], got range [{lo}, {hi}]")
    return arr


def recompute_ranges(spans: Sequence[Span], target_len: int, seam_tokens: int) -> tuple[tuple[int, int], ...]:
    """Half-open target ranges to compute fresh: uncovered, the first ``seam_tokens`` of every seam, last token."""
    reuse: list[tuple[int, int]] = []
    for s in spans:
        start = s.target_start if s.context_exact else s.target_start + seam_tokens
        end = min(s.target_end, target_len - 1)  # the last prompt token always runs fresh (it makes the logits)
        if start < end:
            reuse.append((start, end))
    out: list[tuple[int, int]] = []
    cursor = 0
    for a, b in reuse:  # spans are sorted and disjoint
        if a > cursor:
            out.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < target_len:
        out.append((cursor, target_len))
    return tuple(out)


def _coverage(spans: Sequence[Span], m: int) -> np.ndarray:
    """Boolean ``[m]``: target positions some span covers."""
    covered = np.zeros(m, dtype=bool)
    for s in spans:
        covered[s.target_start:s.target_end] = True
    return covered


def _uncovered_pieces(span: Span, covered: np.ndarray, min_len: int) -> list[Span]:
    """The parts of ``span`` (same diagonal, same donor) over uncovered target positions, each >= ``min_len``."""
    free = ~covered[span.target_start:span.target_end]
    if free.all():
        return [span] if span.length >= min_len else []
    padded = np.concatenate(([False], free, [False])).view(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    out = []
    for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist()):
        if b - a >= min_len:
            out.append(Span(span.donor_start + a, span.target_start + a, b - a, span.donor_id))
    return out


def _fuzzy_outside(fuzzy: Sequence[FuzzySpan], spans: Sequence[Span], main_donor: str) -> tuple[FuzzySpan, ...]:
    """The main donor's fuzzy regions that no other donor's exact span now covers (evidence stays unambiguous)."""
    others = [s for s in spans if s.donor_id != main_donor]
    return tuple(f for f in fuzzy
                 if not any(s.target_start < f.target_end and f.target_start < s.target_end for s in others))


class SemBlendPipeline:
    """Thread-safe planner over a donor store. See the module docstring for the call order."""

    def __init__(self, config: SemBlendConfig | None = None, *, model_shape: ModelShape | None = None,
                 embedder: Any = None) -> None:
        self.config = config if config is not None else SemBlendConfig.from_env()
        self.model_shape = model_shape
        cfg = self.config
        # Fail at start-up, not on the first request: build the embedder and the layer policy now.
        if embedder is None and cfg.enabled:
            from semblend_core.embedder import create_embedder

            embedder = create_embedder(cfg)
        self.embedder = embedder
        self._layer_policy = layer_recompute_policy(model_shape, cfg.recompute_budget, cfg.bathtub_preset,
                                                    cfg.layer_recompute)
        self.store = DonorStore(
            cfg.max_donors, shingle_tokens=cfg.shingle_tokens, winnow_window=cfg.winnow_window,
            embedding_dim=getattr(embedder, "dim", None), ann_backend=cfg.ann_backend,
        )
        self.telemetry = Telemetry()
        self.kv_store: Any = None  # the donors' KV, once an adapter attaches it (attach_kv_store)
        self.store.add_eviction_listener(self._donor_left)
        self._align_params = AlignParams(
            shingle_tokens=cfg.shingle_tokens, winnow_window=cfg.winnow_window, min_span=cfg.chunk_size,
            fuzzy=cfg.fuzzy_chunks, fuzzy_min_ratio=cfg.fuzzy_min_ratio,
            min_fuzzy_block=max(cfg.seam_recompute_tokens + 4, cfg.shingle_tokens),
        )

    # ------------------------------------------------------------------ donors
    def register_donor(self, donor_id: str, token_ids: Sequence[int], text: str | None = None,
                       namespace: CacheNamespace | None = None) -> None:
        """Make a finished prompt available as a donor. Raises ``InvalidTokensError`` for bad ids,
        ``InvalidInputError`` for a ``text`` or ``namespace`` of the wrong type, ``DuplicateDonorError`` for an id
        reused with other tokens, ``StoreFullError`` if all donors are pinned."""
        if not isinstance(donor_id, str) or not donor_id:
            raise InvalidTokensError(f"donor_id must be a non-empty string, got {donor_id!r}")
        problem = check_request_args(text, namespace)
        if problem:
            raise InvalidInputError(problem)
        n = _declared_length(token_ids)
        if n is not None and n > self.config.max_prompt_tokens:  # refuse before converting millions of ids
            raise InvalidTokensError(f"donor has {n} tokens; max_prompt_tokens is {self.config.max_prompt_tokens}")
        tokens = validate_tokens(token_ids)
        if tokens.size == 0:
            raise InvalidTokensError("cannot register an empty donor")
        if tokens.size > self.config.max_prompt_tokens:
            raise InvalidTokensError(f"donor has {tokens.size} tokens; max_prompt_tokens is "
                                     f"{self.config.max_prompt_tokens}")
        ns = namespace if namespace is not None else CacheNamespace.default()
        embedding = self._embed(text) if text else None
        self.store.register(donor_id, tokens, ns.key, text=text, embedding=embedding)

    def remove_donor(self, donor_id: str, namespace: CacheNamespace | None = None) -> bool:
        """Forget a donor, and its KV in the attached KV store. False if it was not registered.
        Raises ``StoreFullError`` if it is pinned by an in-flight load."""
        ns = namespace if namespace is not None else CacheNamespace.default()
        return self.store.remove(donor_id, ns.key)

    # ------------------------------------------------------------------ donor lifetime
    def attach_kv_store(self, kv_store: Any) -> None:
        """Make ``kv_store`` the home of these donors' KV: from now on a donor lives exactly as long in both.

        ``kv_store``: a ``semblend_core.kv_tensor_store.KvTensorStore`` (or anything with
        ``add_eviction_listener(fn)`` and ``evict(ns_key, donor_id, token_ids=...)``). When the KV store drops an
        entry (capacity, explicit evict) the planner forgets that donor, so no plan names a donor whose KV is
        gone and no hit keeps a dead donor hottest; when the planner drops a donor (its LRU, ``remove_donor``)
        its KV is evicted. Both sides match donors by id *and* tokens, so a reused id never retires another
        donor. Several engines sharing this pipeline share this one KV store. Raises ``ValueError`` if another
        store is attached already.
        """
        if self.kv_store is kv_store:
            return
        if self.kv_store is not None:
            raise ValueError("this pipeline already has a KV store attached; engines sharing a pipeline share it")
        self.kv_store = kv_store
        kv_store.add_eviction_listener(self._kv_left)

    def _kv_left(self, ns_key: str, donor_id: str, token_ids: np.ndarray) -> None:
        # The KV is gone: the donor cannot be served any more, even by an in-flight planner pin (force).
        self.store.remove(donor_id, ns_key, tokens=token_ids, force=True)

    def _donor_left(self, ns_key: str, donor_id: str, tokens: np.ndarray) -> None:
        if self.kv_store is not None:
            self.kv_store.evict(ns_key, donor_id, token_ids=tokens)

    def _embed(self, text: str) -> np.ndarray | None:
        """Unit vector or None (no embedder, content-free text, or a NaN/zero embedding — logged once)."""
        if self.embedder is None:
            return None
        vec = np.asarray(self.embedder.embed([text]), dtype=np.float32)
        if vec.ndim != 2 or vec.shape[0] != 1:
            warning_once(logger, "embedder returned shape %s for one text; ignoring embeddings", vec.shape)
            return None
        row = vec[0]
        norm = float(np.linalg.norm(row)) if np.all(np.isfinite(row)) else float("nan")
        if not np.isfinite(norm) or norm < 1e-6:
            warning_once(logger, "embedder produced a NaN/inf/zero vector; the text is discoverable by tokens only")
            return None
        return row / norm

    # ------------------------------------------------------------------ planning
    def plan(self, token_ids: Sequence[int], text: str | None = None, namespace: CacheNamespace | None = None,
             *, engine_prefix_tokens: int = 0) -> SemanticKvPlan:
        """Plan reuse for a prompt. Never raises; a miss carries its reason. Safe to call from many threads.

        Arguments of the wrong type (``text`` not a str, ``namespace`` not a ``CacheNamespace``,
        ``engine_prefix_tokens`` not an integer >= 0) give a miss with reason ``invalid_input`` and the problem in
        ``details["error"]``; such a plan carries the default namespace."""
        start = time.perf_counter()
        problem = check_request_args(text, namespace, engine_prefix_tokens)
        ns = namespace if namespace is not None and not problem else CacheNamespace.default()
        try:
            plan = self._plan(token_ids, text, ns, engine_prefix_tokens, start, problem)
        except Exception as exc:  # rule 5: never fail inference
            logger.warning("SemBlend planning failed (%s: %s); falling back to normal prefill",
                           type(exc).__name__, exc)
            logger.debug("planning failure", exc_info=True)
            plan = SemanticKvPlan(False, Reason.INTERNAL_ERROR, _declared_length(token_ids) or 0, ns,
                                  timings=PlanTimings(total_s=time.perf_counter() - start),
                                  details=(("error", f"{type(exc).__name__}: {exc}"),))
        self.telemetry.record_plan(plan.is_hit, plan.timings.total_s, plan.target_len)
        if not plan.is_hit:
            outcome = {Reason.NO_CANDIDATE: Outcome.COLD, Reason.DISABLED: Outcome.COLD,
                       Reason.EXACT_PREFIX_SUFFICIENT: Outcome.EXACT,
                       Reason.NO_GAIN_OVER_EXACT_PREFIX: Outcome.EXACT}.get(plan.reason, Outcome.DECLINED)
            self.telemetry.record(outcome, plan.reason)
        elif self.config.discovery_only:
            self.telemetry.record(Outcome.DISCOVERY_ONLY, plan.reason)
        return plan

    def record_outcome(self, plan: SemanticKvPlan, outcome: str, loaded_tokens: int = 0,
                       reason: str | None = None) -> None:
        """Adapters report what the backend actually did with a hit: ``materialized`` (with the number of prompt
        tokens whose KV was loaded) or ``declined`` with a reason. Only this counts as reuse (rule 2)."""
        if outcome == Outcome.MATERIALIZED and loaded_tokens <= 0:
            outcome, reason = Outcome.DECLINED, reason or "nothing_loaded"
        self.telemetry.record(outcome, reason or plan.reason, loaded_tokens if outcome == Outcome.MATERIALIZED else 0)

    def drop_donors(self, plan: SemanticKvPlan, donor_ids: Sequence[str]) -> SemanticKvPlan:
        """``plan`` without the spans of ``donor_ids`` (e.g. their KV is gone), with the quality gates re-applied.

        Pure (no telemetry, no store access); adapters call it between planning and loading. The result is a hit
        whose recompute ranges, main donor (the remaining donor covering the most) and union similarity are
        recomputed, or a miss whose reason names the gate that failed (``details["dropped_donors"]`` lists what
        was removed). A plan that uses none of ``donor_ids`` comes back unchanged.
        """
        drop = set(donor_ids)
        if not plan.is_hit or not drop.intersection(plan.donor_ids):
            return plan
        cfg = self.config
        m = plan.target_len
        spans = [dataclasses.replace(s, donor_id=plan.donor_of(s)) for s in plan.spans
                 if plan.donor_of(s) not in drop]
        lens = dict(plan.detail("donor_lens") or {})
        if plan.donor_id is not None:
            lens.setdefault(plan.donor_id, plan.donor_len)
        per_donor: dict[str, int] = {}
        for sp in spans:
            per_donor[sp.donor_id] = per_donor.get(sp.donor_id, 0) + sp.length
        details = dict(plan.details)
        details["dropped_donors"] = sorted(drop.intersection(plan.donor_ids))
        fuzzy = plan.fuzzy_spans if plan.donor_id not in drop else ()
        base = {"engine_prefix_tokens": plan.engine_prefix_tokens, "timings": plan.timings,
                "strict_prefix_boundary": plan.strict_prefix_boundary, "discovery": plan.discovery}
        if not spans:
            return SemanticKvPlan(False, Reason.BELOW_MIN_REUSE_RATIO, m, plan.namespace,
                                  details=tuple(details.items()), **base)
        main = max(per_donor, key=lambda d: (per_donor[d], d == plan.donor_id))
        n_d = int(lens.get(main, 0)) or max(s.donor_end for s in spans if s.donor_id == main)
        overlap = per_donor[main] / max(1, min(m, n_d))
        union = sum(per_donor.values()) / m
        similarity = overlap if len(per_donor) == 1 else max(overlap, union)  # token evidence, as in ``plan``
        common = dict(donor_id=main, donor_len=n_d, similarity=float(similarity), **base)
        reused = sum(per_donor.values())
        if similarity < cfg.min_similarity:
            reason = Reason.BELOW_MIN_SIMILARITY
        elif reused / m < cfg.min_reuse_ratio:
            reason = Reason.BELOW_MIN_REUSE_RATIO
        elif sum(max(0, s.target_end - max(s.target_start, plan.engine_prefix_tokens)) for s in spans) \
                < cfg.chunk_size:
            reason = Reason.NO_GAIN_OVER_EXACT_PREFIX
        else:
            return SemanticKvPlan(
                True, Reason.HIT, m, plan.namespace, spans=tuple(spans), fuzzy_spans=fuzzy,
                recompute_ranges=recompute_ranges(spans, m, cfg.seam_recompute_tokens),
                layer_recompute=plan.layer_recompute, recompute_budget=plan.recompute_budget,
                details=tuple(details.items()), **common,
            )
        details["reuse_ratio"] = round(reused / m, 6)
        return SemanticKvPlan(False, reason, m, plan.namespace, details=tuple(details.items()), **common)

    def stats(self) -> dict[str, Any]:
        snap = self.telemetry.snapshot()
        snap["store"] = self.store.stats()
        return snap

    # ------------------------------------------------------------------ internals
    def _fill_gaps(self, tokens: np.ndarray, target_anchors: TargetAnchors, spans: list[Span], main: DonorRecord,
                   ns: CacheNamespace, aligned: dict[int, tuple[DonorRecord, Alignment]], min_gap_total: int = 0
                   ) -> tuple[list[Span], list[DonorRecord]]:
        """Further donors for the target regions ``spans`` (the main donor's) leave uncovered.

        Only gaps of at least ``chunk_size`` tokens count; when there are none, or they add up to fewer than
        ``min_gap_total`` tokens (the common single-donor hit), this returns at once. Otherwise the anchor index is
        queried with the gaps' own anchors, so candidates are ranked by what they share with the *uncovered* part
        (their score estimates it). Donors are then added greedily, each time the one whose spans cover the most
        still-uncovered tokens (trimmed to those tokens), until ``max_donors_per_plan`` donors are used, no gap of
        ``chunk_size`` is left, or no donor adds ``chunk_size`` tokens. Alignment is lazy: a candidate is aligned
        (diagonals seeded from gap anchors only, no fuzzy fill: fuzzy regions stay the main donor's evidence) only
        while its score could beat the best gain in hand; ``aligned`` (slot -> alignment of the main loop's
        candidates against the whole prompt) is reused as is. Returns the union of spans (target order, each
        naming its donor) and the added donors in selection order.
        """
        cfg = self.config
        m = int(tokens.shape[0])
        covered = _coverage(spans, m)
        gap_anchors = self._gap_anchors(target_anchors, covered, min_gap_total)
        if gap_anchors is None:
            return spans, []
        limit = max(cfg.max_candidates, 2 * (cfg.max_donors_per_plan - 1))
        floor = _GAP_SCORE_FLOOR * cfg.chunk_size
        cands = [c for c in self.store.candidates(gap_anchors.unique_hashes(), ns.key, limit + 1)
                 if c.slot != main.slot and c.score >= floor][:limit]
        params = dataclasses.replace(self._align_params, fuzzy=False)
        pending = list(cands)  # by score, best first: aligned on demand
        pool: list[tuple[DonorRecord, tuple[Span, ...]]] = []
        for slot, (rec, aln) in aligned.items():
            if slot != main.slot and aln.spans:
                pool.append((rec, tuple(dataclasses.replace(s, donor_id=rec.donor_id) for s in aln.spans)))
        in_pool = {rec.slot for rec, _ in pool}
        pending = [c for c in pending if c.slot not in in_pool]
        added: list[DonorRecord] = []
        out = list(spans)
        while 1 + len(added) < cfg.max_donors_per_plan:
            best_i, best_pieces, best_gain = -1, [], 0
            for i, (_, cand_spans) in enumerate(pool):
                pieces = [p for s in cand_spans for p in _uncovered_pieces(s, covered, cfg.chunk_size)]
                gain = sum(p.length for p in pieces)
                if gain > best_gain:
                    best_i, best_pieces, best_gain = i, pieces, gain
            # The index score estimates shared k-grams with the gaps as first queried (~ tokens - k + 1 per run):
            # align the next candidate only if it might still beat what is in hand.
            if pending and pending[0].score + cfg.shingle_tokens > best_gain:
                cand = pending.pop(0)
                rec = self.store.get(cand.slot)
                if rec is not None and rec.namespace_key == ns.key and rec.donor_id != main.donor_id:
                    aln = align(rec.tokens, tokens, params, rec.hashes, gap_anchors)
                    if aln.spans:
                        pool.append((rec, tuple(dataclasses.replace(s, donor_id=rec.donor_id) for s in aln.spans)))
                continue
            if best_gain < cfg.chunk_size:
                break
            rec, _ = pool.pop(best_i)
            for p in best_pieces:
                covered[p.target_start:p.target_end] = True
            out.extend(best_pieces)
            added.append(rec)
            if self._gap_anchors(target_anchors, covered) is None:
                break  # nothing worth filling is left
        if added:
            out.sort(key=lambda s: s.target_start)
        return out, added

    def _gap_anchors(self, target_anchors: TargetAnchors, covered: np.ndarray, min_total: int = 0
                     ) -> TargetAnchors | None:
        """The prompt's anchors lying wholly inside uncovered runs of >= ``chunk_size`` tokens (None: no such gap,
        the gaps total fewer than ``min_total`` tokens, or the prompt is covered to ``_GOOD_ENOUGH_COVERAGE``)."""
        cfg = self.config
        m = covered.shape[0]
        if covered.sum() >= _GOOD_ENOUGH_COVERAGE * m:
            return None
        padded = np.concatenate(([False], ~covered, [False])).view(np.int8)
        edges = np.flatnonzero(np.diff(padded))
        starts, ends = edges[0::2], edges[1::2]
        keep = ends - starts >= cfg.chunk_size
        if not keep.any() or int((ends - starts)[keep].sum()) < min_total:
            return None
        marks = np.zeros(m + 1, dtype=np.int64)  # +1 at gap starts, -1 at gap ends: the prefix sum marks gap tokens
        np.add.at(marks, starts[keep], 1)
        np.add.at(marks, ends[keep], -1)
        gap_mask = np.cumsum(marks[:m]) > 0
        gap_id = np.cumsum(~gap_mask)  # constant across one gap: an anchor lies inside one gap iff both ends agree
        pos = target_anchors.positions
        last = np.minimum(pos + cfg.shingle_tokens - 1, m - 1)
        sel = gap_mask[pos] & gap_mask[last] & (gap_id[pos] == gap_id[last])
        if not sel.any():
            return None
        return TargetAnchors(target_anchors.hashes[sel], pos[sel])  # still sorted by hash

    def _miss(self, reason: str, n: int, ns: CacheNamespace, start: float, **kw: Any) -> SemanticKvPlan:
        details = tuple(kw.pop("details", {}).items())
        timings = kw.pop("timings", None) or PlanTimings()
        timings = dataclasses.replace(timings, total_s=time.perf_counter() - start)
        return SemanticKvPlan(False, reason, n, ns, timings=timings, details=details, **kw)

    def _plan(self, token_ids: Sequence[int], text: str | None, ns: CacheNamespace, engine_prefix_tokens: int,
              start: float, problem: str = "") -> SemanticKvPlan:
        cfg = self.config
        declared = _declared_length(token_ids)
        if not cfg.enabled:
            return self._miss(Reason.DISABLED, declared or 0, ns, start)
        if problem:
            return self._miss(Reason.INVALID_INPUT, declared or 0, ns, start, details={"error": problem})
        if declared is not None and declared > cfg.max_prompt_tokens:  # refuse before converting millions of ids
            return self._miss(Reason.PROMPT_TOO_LONG, declared, ns, start,
                              details={"max_prompt_tokens": cfg.max_prompt_tokens})
        try:
            tokens = validate_tokens(token_ids)
        except InvalidTokensError as exc:
            return self._miss(Reason.INVALID_TOKENS, declared or 0, ns, start, details={"error": str(exc)})
        m = int(tokens.shape[0])
        if m == 0:
            return self._miss(Reason.EMPTY_PROMPT, 0, ns, start)
        if m > cfg.max_prompt_tokens:
            return self._miss(Reason.PROMPT_TOO_LONG, m, ns, start, details={"max_prompt_tokens": cfg.max_prompt_tokens})
        if m < cfg.min_prompt_tokens:
            return self._miss(Reason.BELOW_MIN_PROMPT_TOKENS, m, ns, start)
        engine_prefix_tokens = max(0, min(int(engine_prefix_tokens), m))
        if m - engine_prefix_tokens < cfg.chunk_size:
            return self._miss(Reason.EXACT_PREFIX_SUFFICIENT, m, ns, start, engine_prefix_tokens=engine_prefix_tokens)

        # --- discovery by token anchors (no embedding on the common path)
        t0 = time.perf_counter()
        target_anchors = TargetAnchors.build(tokens, cfg.shingle_tokens, cfg.winnow_window, self.store.sketch_window)
        query = target_anchors.query_hashes()
        cands = self.store.candidates(query, ns.key, cfg.max_candidates)
        t1 = time.perf_counter()
        best: tuple[DonorRecord, Alignment] | None = None
        # The sketch estimates how many prompt k-grams a candidate shares; one far below the reuse gate cannot pass
        # it, so it is not worth aligning (half the gate leaves ample room for sampling noise).
        floor = 0.5 * cfg.min_reuse_ratio * max(1, m - cfg.shingle_tokens + 1)
        viable = [c for c in cands if c.score >= floor]
        multi = cfg.max_donors_per_plan > 1 and not cfg.exact_materialization_only
        if multi and not viable and cands and cands[0].score >= _GAP_SCORE_FLOOR * cfg.chunk_size \
                and sum(c.score for c in cands[:cfg.max_donors_per_plan]) >= floor:
            # No donor alone can pass the reuse gate, but several together might (a RAG prompt whose passages
            # earlier requests used in other mixes): align the strongest, and let gap filling below decide.
            viable = cands[:1]
        aligned: dict[int, tuple[DonorRecord, Alignment]] = {}  # slot -> alignment, for gap filling
        for cand in viable:
            rec = self.store.get(cand.slot)
            if rec is None or rec.namespace_key != ns.key:
                continue
            aln = align(rec.tokens, tokens, self._align_params, rec.hashes, target_anchors)
            aligned[rec.slot] = (rec, aln)
            if best is None or aln.matched_tokens > best[1].matched_tokens:
                best = (rec, aln)
            if best[1].matched_tokens >= _GOOD_ENOUGH_COVERAGE * m:
                break
        t2 = time.perf_counter()
        discovery = "anchors"
        cosine: float | None = None
        embed_s = 0.0
        if (best is None or best[1].matched_tokens == 0) and text and self.embedder is not None:
            # --- paraphrase path: embedding similarity finds donors that share little literal token content.
            te = time.perf_counter()
            vec = self._embed(text)
            embed_s = time.perf_counter() - te
            if vec is not None:
                for slot, cos in self.store.nearest(vec, ns.key, cfg.max_candidates):
                    rec = self.store.get(slot)
                    if rec is None or rec.namespace_key != ns.key:
                        continue
                    aln = align(rec.tokens, tokens, self._align_params, rec.hashes, target_anchors)
                    if best is None or aln.matched_tokens > best[1].matched_tokens or cosine is None:
                        best, cosine, discovery = (rec, aln), cos, "embedding"
            t2 = time.perf_counter()
        timings = PlanTimings(discovery_s=t1 - t0, embedding_s=embed_s, alignment_s=t2 - t1 - embed_s)
        if best is None and cands:
            top = self.store.get(cands[0].slot)
            return self._miss(Reason.BELOW_MIN_REUSE_RATIO, m, ns, start, timings=timings,
                              donor_id=top.donor_id if top else None, discovery="anchors",
                              details={"candidates": len(cands), "estimated_shared_kgrams": round(cands[0].score, 1)})
        if best is None:
            return self._miss(Reason.NO_CANDIDATE, m, ns, start, timings=timings,
                              details={"candidates": len(cands)})
        rec, aln = best
        n_d = int(rec.tokens.shape[0])
        overlap = aln.matched_tokens / max(1, min(m, n_d))
        similarity = cosine if discovery == "embedding" and cosine is not None else overlap
        spans = [dataclasses.replace(s, donor_id=rec.donor_id) for s in aln.spans]  # every span names its donor
        fuzzy_spans = aln.fuzzy_spans
        extra: list[DonorRecord] = []
        if multi:
            tg = time.perf_counter()
            # Worth a second index query only if the main donor alone fails a gate, or leaves enough uncovered.
            main_passes = similarity >= cfg.min_similarity and aln.matched_tokens >= cfg.min_reuse_ratio * m
            spans, extra = self._fill_gaps(tokens, target_anchors, spans, rec, ns, aligned,
                                           min_gap_total=int(_WORTH_FILLING * m) if main_passes else 0)
            if extra:
                covered = sum(s.length for s in spans)
                similarity = max(similarity, covered / m)  # the union's similarity: the target fraction covered
                fuzzy_spans = _fuzzy_outside(fuzzy_spans, spans, rec.donor_id)
            gap_s = time.perf_counter() - tg
            timings = dataclasses.replace(timings, alignment_s=timings.alignment_s + gap_s, multi_donor_s=gap_s)
        common = dict(donor_id=rec.donor_id, donor_len=n_d, similarity=float(similarity), discovery=discovery,
                      engine_prefix_tokens=engine_prefix_tokens, timings=timings)
        details = {"token_overlap": round(overlap, 6), "candidates": len(cands)}
        if extra:
            details["donor_lens"] = {r.donor_id: int(r.tokens.shape[0]) for r in (rec, *extra)}
        if cosine is not None:
            details["cosine"] = round(float(cosine), 6)
        if similarity < cfg.min_similarity:
            return self._miss(Reason.BELOW_MIN_SIMILARITY, m, ns, start, details=details, **common)
        if cfg.exact_materialization_only:
            spans = [s for s in spans if s.context_exact]
            if not spans:
                return self._miss(Reason.NOT_CONTEXT_EXACT, m, ns, start, details=details, **common)
        reused = sum(s.length for s in spans)
        if reused / m < cfg.min_reuse_ratio:
            details["reuse_ratio"] = round(reused / m, 6)
            return self._miss(Reason.BELOW_MIN_REUSE_RATIO, m, ns, start, details=details, **common)
        # Rule 1: the engine's exact prefix stays authoritative; SemBlend must add something beyond it.
        gain = sum(max(0, s.target_end - max(s.target_start, engine_prefix_tokens)) for s in spans)
        if gain < cfg.chunk_size:
            return self._miss(Reason.NO_GAIN_OVER_EXACT_PREFIX, m, ns, start, details=details, **common)
        for r in (rec, *extra):
            self.store.touch(r)
        common["timings"] = dataclasses.replace(timings, total_s=time.perf_counter() - start)
        return SemanticKvPlan(
            True, Reason.HIT, m, ns, spans=tuple(spans), fuzzy_spans=fuzzy_spans,
            recompute_ranges=recompute_ranges(spans, m, cfg.seam_recompute_tokens),
            layer_recompute=self._layer_policy, recompute_budget=cfg.recompute_budget,
            strict_prefix_boundary=cfg.strict_prefix_boundary, details=tuple(details.items()), **common,
        )
