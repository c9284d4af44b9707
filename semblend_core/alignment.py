"""Alignment: which donor token runs equal which target token runs, at any offset.

Contract: ``align(donor, target, params) -> Alignment`` with

* ``spans``: exact ``Span`` s sorted by ``target_start``; donor tokens equal target tokens on every span; spans
  never overlap in the target (they may reuse one donor region twice, e.g. a repeated passage); every span is at
  least ``min_span`` long, except exact blocks recovered inside a fuzzy region (at least ``min_fuzzy_block``).
* ``fuzzy_spans``: near-identical but not identical regions (rapidfuzz Indel ratio >= ``fuzzy_min_ratio``),
  evidence only.

Method: winnowed k-gram anchors of the target are looked up among all donor k-gram hashes (sorted once); each hit
is a seed on a diagonal ``d - t``. On each of the most-seeded diagonals the equality mask of the overlapping
tokens is computed in one vector pass and its runs of at least ``min_span`` become candidate spans (maximal by
construction). Candidates are chosen longest-first without target overlap (trimming partial overlaps). Gaps
between chosen spans are then matched with rapidfuzz (``Indel.opcodes`` on the token lists) to recover short
identical blocks and to mark near-identical regions. There is deliberately no order-agnostic bag-of-tokens
fallback: reuse is only ever claimed for identical ordered runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from rapidfuzz.distance import Indel

from semblend_core.fingerprint import kgram_hashes, sorted_unique, winnow, winnow_levels
from semblend_core.plan import FuzzySpan, Span

_MAX_DIAGONALS = 64
_MAX_SEEDS_PER_ANCHOR = 8
_MAX_FUZZY_GAP = 4096


@dataclass(frozen=True)
class AlignParams:
    shingle_tokens: int = 8
    winnow_window: int = 8
    min_span: int = 16
    fuzzy: bool = True
    fuzzy_min_ratio: float = 0.8
    min_fuzzy_block: int = 8


@dataclass(frozen=True)
class Alignment:
    spans: tuple[Span, ...]
    fuzzy_spans: tuple[FuzzySpan, ...]

    @property
    def matched_tokens(self) -> int:
        return sum(s.length for s in self.spans)


@dataclass(frozen=True)
class DonorHashes:
    """Per-donor precomputation reused across alignments: the donor's winnowed anchors, sorted by hash.

    Both sides are winnowed with the same (k, w), so a region the donor shares with a prompt yields the same
    anchors in both: matching two anchor sets (~2/(w+1) of positions each) finds every shared run of at least
    ``w + k - 1`` tokens at a fraction of the cost of looking prompt anchors up among all donor k-grams.
    """

    sorted_hashes: np.ndarray
    sorted_positions: np.ndarray

    @classmethod
    def from_anchors(cls, hashes: np.ndarray, positions: np.ndarray) -> DonorHashes:
        order = np.argsort(hashes, kind="stable")
        return cls(hashes[order], positions[order].astype(np.int64))

    @classmethod
    def build(cls, donor: np.ndarray, k: int, w: int) -> DonorHashes:
        h = kgram_hashes(donor, k)
        pos = winnow(h, w)
        return cls.from_anchors(h[pos], pos)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the True runs of a boolean vector."""
    if mask.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    padded = np.concatenate(([False], mask, [False])).view(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[0::2], edges[1::2]
    return starts.astype(np.int64), (ends - starts).astype(np.int64)


_EMPTY_U64 = np.zeros(0, dtype=np.uint64)
_EMPTY_I64 = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class TargetAnchors:
    """The prompt's winnowed anchors (hash, position), computed once per plan and shared by all candidates.

    ``sketch_hashes`` / ``sketch_positions`` (position order) are the prompt's sketch for the donor index
    (``DonorStore.candidates``), filled when ``build`` is given the store's ``sketch_window``.
    """

    hashes: np.ndarray  # sorted by hash: sorted queries make searchsorted cache-friendly
    positions: np.ndarray
    sketch_hashes: np.ndarray = field(default_factory=lambda: _EMPTY_U64)
    sketch_positions: np.ndarray = field(default_factory=lambda: _EMPTY_I64)

    @classmethod
    def build(cls, target: np.ndarray, k: int, w: int, sketch_window: int | None = None) -> TargetAnchors:
        h = kgram_hashes(target, k)
        if sketch_window is None:
            pos, spos = winnow(h, w), _EMPTY_I64
        else:
            pos, spos = winnow_levels(h, w, sketch_window)
        ah = h[pos]
        order = np.argsort(ah, kind="stable")
        return cls(ah[order], pos[order], h[spos], spos)

    def unique_hashes(self) -> np.ndarray:
        if self.hashes.size == 0:
            return self.hashes
        keep = np.empty(self.hashes.shape[0], dtype=bool)
        keep[0] = True
        np.not_equal(self.hashes[1:], self.hashes[:-1], out=keep[1:])
        return self.hashes[keep]

    def query_hashes(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Sorted distinct sketch hashes of the k-grams starting in ``[start, end)``: the index query for the
        whole prompt or one region of it (k-grams starting in the region may run up to ``k - 1`` tokens past it).
        Empty when built without a sketch window."""
        pos = self.sketch_positions
        if start > 0 or end is not None:
            lo = int(np.searchsorted(pos, start))
            hi = pos.shape[0] if end is None else int(np.searchsorted(pos, end))
            return sorted_unique(self.sketch_hashes[lo:hi])
        return sorted_unique(self.sketch_hashes)


def _seed_diagonals(donor_hashes: DonorHashes, target_anchors: TargetAnchors) -> np.ndarray:
    """Distinct diagonals (donor_pos - target_pos) of verified-by-hash seeds, most-seeded first."""
    q, tpos = target_anchors.hashes, target_anchors.positions
    if q.size == 0 or donor_hashes.sorted_hashes.size == 0:
        return np.zeros(0, dtype=np.int64)
    sh = donor_hashes.sorted_hashes
    lo = np.searchsorted(sh, q, side="left")
    found = sh[np.minimum(lo, sh.shape[0] - 1)] == q
    if not found.any():
        return np.zeros(0, dtype=np.int64)
    q, lo, tpos = q[found], lo[found], tpos[found]
    nxt = np.minimum(lo + 1, sh.shape[0] - 1)
    if not np.any((sh[nxt] == q) & (nxt > lo)):  # every matched hash occurs once in the donor: one seed each
        diags = donor_hashes.sorted_positions[lo] - tpos
    else:
        counts = np.searchsorted(sh, q, side="right") - lo
        keep = counts <= _MAX_SEEDS_PER_ANCHOR
        # A k-gram with many donor occurrences (a repeated line, a constant or periodic run) would seed a diagonal
        # per occurrence pair: instead its i-th occurrence in the prompt is paired with its i-th in the donor (both
        # are sorted by position within one hash), which lines up repeated runs in order -- one seed per anchor.
        over = ~keep
        over_diags = np.zeros(0, dtype=np.int64)
        if over.any():
            q_o, lo_o, cnt_o, tpos_o = q[over], lo[over], counts[over], tpos[over]
            rank = np.arange(q_o.shape[0]) - np.searchsorted(q_o, q_o, side="left")
            ok = rank < cnt_o
            over_diags = donor_hashes.sorted_positions[lo_o[ok] + rank[ok]] - tpos_o[ok]
        lo, counts, tpos = lo[keep], counts[keep], tpos[keep]
        total = int(counts.sum())
        offsets = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total)
        diags = np.concatenate([donor_hashes.sorted_positions[offsets] - np.repeat(tpos, counts), over_diags])
        if diags.size == 0:
            return np.zeros(0, dtype=np.int64)
    diags.sort()
    first = np.empty(diags.shape[0], dtype=bool)
    first[0] = True
    np.not_equal(diags[1:], diags[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    if starts.shape[0] == 1:  # one diagonal (the common hit: one long shared run)
        return diags[:1]
    freq = np.diff(starts, append=diags.shape[0])
    order = np.argsort(-freq, kind="stable")[:_MAX_DIAGONALS]
    return diags[starts[order]]


def _candidates(donor: np.ndarray, target: np.ndarray, diagonals: np.ndarray, min_span: int) -> list[Span]:
    n, m = donor.shape[0], target.shape[0]
    out: list[Span] = []
    for diag in diagonals.tolist():
        t0, t1 = max(0, -diag), min(m, n - diag)
        if t1 - t0 < min_span:
            continue
        eq = target[t0:t1] == donor[t0 + diag:t1 + diag]
        starts, lengths = _runs(eq)
        good = lengths >= min_span
        for s, ln in zip(starts[good].tolist(), lengths[good].tolist()):
            out.append(Span(donor_start=t0 + s + diag, target_start=t0 + s, length=ln))
    return out


def _select(candidates: list[Span], min_span: int) -> list[Span]:
    """Longest-first, non-overlapping in the target; partial overlaps are trimmed to their uncovered pieces."""
    chosen: list[Span] = []
    covered: list[tuple[int, int]] = []  # sorted, disjoint target intervals
    for cand in sorted(candidates, key=lambda s: (-s.length, s.target_start, s.donor_start)):
        pieces = [(cand.target_start, cand.target_end)]
        for a, b in covered:
            nxt = []
            for x, y in pieces:
                if b <= x or a >= y:
                    nxt.append((x, y))
                    continue
                if x < a:
                    nxt.append((x, a))
                if b < y:
                    nxt.append((b, y))
            pieces = nxt
            if not pieces:
                break
        for x, y in pieces:
            if y - x >= min_span:
                chosen.append(Span(cand.donor_start + (x - cand.target_start), x, y - x))
                covered.append((x, y))
        covered.sort()
    chosen.sort(key=lambda s: s.target_start)
    return chosen


def _fuzzy_fill(donor: np.ndarray, target: np.ndarray, spans: list[Span], params: AlignParams
                ) -> tuple[list[Span], list[FuzzySpan]]:
    """Match each target gap against the donor gap between the same neighbouring spans (monotone neighbours only)."""
    extra: list[Span] = []
    fuzzy: list[FuzzySpan] = []
    n, m = donor.shape[0], target.shape[0]
    bounds = [Span(0, 0, 0)] + spans + [Span(n, m, 0)]
    for left, right in zip(bounds[:-1], bounds[1:]):
        ta, tb = left.target_end, right.target_start
        da, db = left.donor_end, right.donor_start
        if tb - ta < params.min_fuzzy_block or db - da < params.min_fuzzy_block:
            continue
        if tb - ta > _MAX_FUZZY_GAP or db - da > _MAX_FUZZY_GAP:
            continue
        if max(tb - ta, db - da) > 2 * min(tb - ta, db - da):
            continue  # lengths too different to be an edit of one another
        t_list = target[ta:tb].tolist()
        d_list = donor[da:db].tolist()
        ratio = Indel.normalized_similarity(t_list, d_list)
        if ratio < params.fuzzy_min_ratio:
            continue
        fuzzy.append(FuzzySpan(da, db, ta, tb, float(ratio)))
        for op in Indel.opcodes(t_list, d_list):
            if op.tag == "equal" and op.src_end - op.src_start >= params.min_fuzzy_block:
                extra.append(Span(da + op.dest_start, ta + op.src_start, op.src_end - op.src_start))
    return extra, fuzzy


def align(donor: np.ndarray, target: np.ndarray, params: AlignParams,
          donor_hashes: DonorHashes | None = None, target_anchors: TargetAnchors | None = None) -> Alignment:
    """Align ``donor`` to ``target`` (1-D integer arrays). Pure; cost ~O((n + m) * diagonals)."""
    donor = np.asarray(donor)
    target = np.asarray(target)
    if donor.size == 0 or target.size == 0:
        return Alignment((), ())
    if donor_hashes is None:
        donor_hashes = DonorHashes.build(donor, params.shingle_tokens, params.winnow_window)
    if target_anchors is None:
        target_anchors = TargetAnchors.build(target, params.shingle_tokens, params.winnow_window)
    diagonals = _seed_diagonals(donor_hashes, target_anchors)
    spans = _select(_candidates(donor, target, diagonals, params.min_span), params.min_span)
    fuzzy: list[FuzzySpan] = []
    if params.fuzzy:
        extra, fuzzy = _fuzzy_fill(donor, target, spans, params)
        if extra:
            spans = sorted(spans + extra, key=lambda s: s.target_start)
    return Alignment(tuple(spans), tuple(fuzzy))
