import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semblend_core.alignment import AlignParams, align

PARAMS = AlignParams(shingle_tokens=4, winnow_window=4, min_span=8, fuzzy=True, fuzzy_min_ratio=0.8,
                     min_fuzzy_block=6)


def _check_invariants(donor, target, aln):
    covered = np.zeros(len(target), dtype=int)
    prev_end = 0
    for s in aln.spans:
        assert s.length > 0
        assert 0 <= s.donor_start and s.donor_end <= len(donor)      # inside the donor
        assert 0 <= s.target_start and s.target_end <= len(target)   # inside the target
        assert np.array_equal(donor[s.donor_start:s.donor_end], target[s.target_start:s.target_end])
        assert s.target_start >= prev_end                             # sorted, no overlap
        prev_end = s.target_end
        covered[s.target_start:s.target_end] += 1
    assert covered.max(initial=0) <= 1
    assert aln.matched_tokens <= len(target)                          # coverage <= 1
    for f in aln.fuzzy_spans:
        assert 0 <= f.target_start < f.target_end <= len(target) and 0 <= f.donor_start < f.donor_end <= len(donor)
        assert PARAMS.fuzzy_min_ratio <= f.ratio <= 1.0


pieces = st.lists(st.tuples(st.sampled_from(["copy", "noise", "repeat"]), st.integers(1, 60), st.integers(0, 400)),
                  min_size=1, max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 400), pieces, st.integers(0, 2**32 - 1), st.integers(3, 50))
def test_alignment_invariants_hold_on_arbitrary_inputs(donor_len, recipe, seed, vocab):
    rng = np.random.default_rng(seed)
    donor = rng.integers(0, vocab, donor_len)  # small vocab -> many accidental and repeated matches
    parts = []
    for kind, length, offset in recipe:
        if kind == "copy":
            parts.append(donor[offset % donor_len: offset % donor_len + length])
        elif kind == "repeat":
            parts.append(np.full(length, offset % vocab))
        else:
            parts.append(rng.integers(0, vocab, length))
    target = np.concatenate(parts)
    _check_invariants(donor, target, align(donor, target, PARAMS))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 300), st.integers(0, 300), st.integers(30, 600))
def test_a_shared_run_at_any_offset_is_found_whole(seed, pre_d, pre_t, run):
    rng = np.random.default_rng(seed)
    shared = rng.integers(1000, 10**6, run)  # large vocab: no accidental matches outside the run
    donor = np.concatenate([rng.integers(1000, 10**6, pre_d), shared, rng.integers(1000, 10**6, 20)])
    target = np.concatenate([rng.integers(1000, 10**6, pre_t), shared, rng.integers(1000, 10**6, 20)])
    aln = align(donor, target, PARAMS)
    _check_invariants(donor, target, aln)
    assert aln.matched_tokens >= run
    assert any(s.target_start <= pre_t and s.target_end >= pre_t + run and s.delta == pre_t - pre_d
               for s in aln.spans)


def test_reordered_passages_each_map_to_their_donor_offset():
    rng = np.random.default_rng(3)
    a, b, c = (rng.integers(1000, 10**6, 300) for _ in range(3))
    donor = np.concatenate([a, b, c])
    target = np.concatenate([rng.integers(1000, 10**6, 5), c, a, b])
    aln = align(donor, target, PARAMS)
    # a+b stay adjacent, so they form one maximal span; c moved in front of them.
    assert [(s.donor_start, s.target_start, s.length) for s in aln.spans] == [(600, 5, 300), (0, 305, 600)]


def test_no_bag_of_tokens_fallback():
    rng = np.random.default_rng(4)
    donor = rng.integers(1000, 10**6, 500)
    target = rng.permutation(donor)  # same multiset of tokens, different order
    aln = align(donor, target, PARAMS)
    assert aln.matched_tokens < 0.05 * len(target)


def test_near_identical_chunk_is_marked_fuzzy_and_its_identical_parts_recovered():
    rng = np.random.default_rng(5)
    donor = rng.integers(1000, 10**6, 400)
    target = donor.copy()
    target[200] = 7  # one substituted token
    target[230] = 8  # and another, so the middle gap is short
    aln = align(donor, target, PARAMS)
    _check_invariants(donor, target, aln)
    assert 200 not in {p for s in aln.spans for p in range(s.target_start, s.target_end)}
    assert aln.matched_tokens == 398
    params = AlignParams(shingle_tokens=4, winnow_window=4, min_span=64, fuzzy=True, min_fuzzy_block=6)
    aln2 = align(donor, target, params)
    assert aln2.fuzzy_spans and aln2.fuzzy_spans[0].target_start <= 200 < aln2.fuzzy_spans[0].target_end
    assert aln2.matched_tokens == 398  # the 29-token run between the edits came back through the fuzzy pass
    no_fuzzy = align(donor, target, AlignParams(shingle_tokens=4, winnow_window=4, min_span=64, fuzzy=False))
    assert no_fuzzy.matched_tokens < aln2.matched_tokens and not no_fuzzy.fuzzy_spans


def test_empty_inputs():
    assert align(np.zeros(0, dtype=np.int64), np.arange(10), PARAMS).spans == ()
    assert align(np.arange(10), np.zeros(0, dtype=np.int64), PARAMS).spans == ()
