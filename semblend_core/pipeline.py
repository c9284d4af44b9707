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
quality gates (similarity, reuse ratio, exact-only, gain over the engine prefix) -> recompute ranges and the
bathtub layer policy -> frozen ``SemanticKvPlan``. Any exception inside becomes a miss with reason
``internal_error`` (rule 5); only ``register_donor`` raises, and only for bad input.
"""

from __future__ import annotations

import array
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
from semblend_core.errors import InvalidTokensError
from semblend_core.namespace import CacheNamespace
from semblend_core.plan import Outcome, PlanTimings, Reason, SemanticKvPlan, Span
from semblend_core.telemetry import Telemetry

logger = logging.getLogger(__name__)

MAX_TOKEN_ID = (1 << 31) - 1
_GOOD_ENOUGH_COVERAGE = 0.98  # stop aligning further candidates once one covers this much of the prompt


def validate_tokens(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """1-D int64 array of ids in [0, 2^31); raises ``InvalidTokensError`` naming the problem."""
    if isinstance(token_ids, (list, tuple)):
        # Engines hand over Python lists; array('q') converts them ~25% faster than np.asarray and, unlike
        # np.array(..., dtype=int64), refuses floats instead of truncating them.
        try:
            return _check_range(np.frombuffer(array.array("q", token_ids), dtype=np.int64))
        except (OverflowError, TypeError) as exc:
            raise InvalidTokensError(f"token ids must be 1-D integers below 2^63: {exc}") from None
    try:
        arr = np.asarray(token_ids)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidTokensError(f"token ids are not a sequence of integers: {exc}") from None
    if arr.ndim != 1:
        raise InvalidTokensError(f"token ids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidTokensError(f"token ids must be integers, got dtype {arr.dtype}")
    return _check_range(arr.astype(np.int64, copy=False))


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
        self._align_params = AlignParams(
            shingle_tokens=cfg.shingle_tokens, winnow_window=cfg.winnow_window, min_span=cfg.chunk_size,
            fuzzy=cfg.fuzzy_chunks, fuzzy_min_ratio=cfg.fuzzy_min_ratio,
            min_fuzzy_block=max(cfg.seam_recompute_tokens + 4, cfg.shingle_tokens),
        )

    # ------------------------------------------------------------------ donors
    def register_donor(self, donor_id: str, token_ids: Sequence[int], text: str | None = None,
                       namespace: CacheNamespace | None = None) -> None:
        """Make a finished prompt available as a donor. Raises ``InvalidTokensError`` for bad ids,
        ``DuplicateDonorError`` for an id reused with other tokens, ``StoreFullError`` if all donors are pinned."""
        if not isinstance(donor_id, str) or not donor_id:
            raise InvalidTokensError(f"donor_id must be a non-empty string, got {donor_id!r}")
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
        """Forget a donor (e.g. its KV was evicted by the engine). False if it was not registered.
        Raises ``StoreFullError`` if it is pinned by an in-flight load."""
        ns = namespace if namespace is not None else CacheNamespace.default()
        return self.store.remove(donor_id, ns.key)

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
        """Plan reuse for a prompt. Never raises; a miss carries its reason. Safe to call from many threads."""
        start = time.perf_counter()
        ns = namespace if namespace is not None else CacheNamespace.default()
        try:
            plan = self._plan(token_ids, text, ns, engine_prefix_tokens, start)
        except Exception as exc:  # rule 5: never fail inference
            logger.warning("SemBlend planning failed (%s: %s); falling back to normal prefill",
                           type(exc).__name__, exc)
            logger.debug("planning failure", exc_info=True)
            n = len(token_ids) if hasattr(token_ids, "__len__") else 0
            plan = SemanticKvPlan(False, Reason.INTERNAL_ERROR, n, ns,
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

    def stats(self) -> dict[str, Any]:
        snap = self.telemetry.snapshot()
        snap["store"] = self.store.stats()
        return snap

    # ------------------------------------------------------------------ internals
    def _miss(self, reason: str, n: int, ns: CacheNamespace, start: float, **kw: Any) -> SemanticKvPlan:
        details = tuple(kw.pop("details", {}).items())
        timings = kw.pop("timings", None) or PlanTimings()
        timings = PlanTimings(timings.discovery_s, timings.embedding_s, timings.alignment_s,
                              time.perf_counter() - start)
        return SemanticKvPlan(False, reason, n, ns, timings=timings, details=details, **kw)

    def _plan(self, token_ids: Sequence[int], text: str | None, ns: CacheNamespace, engine_prefix_tokens: int,
              start: float) -> SemanticKvPlan:
        cfg = self.config
        if not cfg.enabled:
            return self._miss(Reason.DISABLED, len(token_ids), ns, start)
        try:
            tokens = validate_tokens(token_ids)
        except InvalidTokensError as exc:
            n = len(token_ids) if hasattr(token_ids, "__len__") else 0
            return self._miss(Reason.INVALID_TOKENS, n, ns, start, details={"error": str(exc)})
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
        for cand in viable:
            rec = self.store.get(cand.slot)
            if rec is None or rec.namespace_key != ns.key:
                continue
            aln = align(rec.tokens, tokens, self._align_params, rec.hashes, target_anchors)
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
        spans = list(aln.spans)
        common = dict(donor_id=rec.donor_id, donor_len=n_d, similarity=float(similarity), discovery=discovery,
                      engine_prefix_tokens=engine_prefix_tokens, timings=timings)
        details = {"token_overlap": round(overlap, 6), "candidates": len(cands)}
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
        self.store.touch(rec)
        timings = PlanTimings(timings.discovery_s, timings.embedding_s, timings.alignment_s,
                              time.perf_counter() - start)
        common["timings"] = timings
        return SemanticKvPlan(
            True, Reason.HIT, m, ns, spans=tuple(spans), fuzzy_spans=aln.fuzzy_spans,
            recompute_ranges=recompute_ranges(spans, m, cfg.seam_recompute_tokens),
            layer_recompute=self._layer_policy, recompute_budget=cfg.recompute_budget,
            strict_prefix_boundary=cfg.strict_prefix_boundary, details=tuple(details.items()), **common,
        )
