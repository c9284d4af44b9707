"""Bad input: a demanding user's mistakes get a clear error (register_donor) or a declined plan (plan), fast.

Also the repetitive-sequence case: a constant prompt against itself must be found and fully reused.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from semblend_core import CacheNamespace, InvalidInputError, InvalidTokensError, Reason, SemBlendConfig
from semblend_core.pipeline import SemBlendPipeline, validate_tokens


@pytest.fixture
def pipe():
    return SemBlendPipeline(SemBlendConfig(min_prompt_tokens=16, chunk_size=16))


def tokens(n=200, seed=0):
    return np.random.default_rng(seed).integers(10, 50_000, size=n).tolist()


# ---------------------------------------------------------------------------------------------- length first
class CountingList(list):
    """A list that records whether anything iterated over it (conversion) rather than just asking its length."""

    iterated = False

    def __iter__(self):
        self.iterated = True
        return super().__iter__()


def test_oversized_inputs_are_refused_before_conversion(pipe):
    big = CountingList(range(2_000_000))
    plan = pipe.plan(big)
    assert plan.reason == Reason.PROMPT_TOO_LONG and plan.target_len == 2_000_000
    with pytest.raises(InvalidTokensError, match="max_prompt_tokens"):
        pipe.register_donor("big", big)
    assert not big.iterated  # array('q', list) would have walked all 2M items (0.1-0.8 s) before refusing
    t0 = time.perf_counter()
    for _ in range(10):
        pipe.plan(big)
    assert (time.perf_counter() - t0) / 10 < 0.05  # microseconds in practice; generous for a loaded CI box


# ---------------------------------------------------------------------------------------------- bools
@pytest.mark.parametrize("ids", [
    [True, False] * 50,
    [5, 6, 7] * 30 + [True],
    [0, 1, 2, False] * 25,
    np.ones(100, dtype=bool),
    (True,) * 100,
])
def test_bools_are_not_token_ids(pipe, ids):
    with pytest.raises(InvalidTokensError, match="bool"):
        validate_tokens(ids)
    with pytest.raises(InvalidTokensError):
        pipe.register_donor("b", ids)
    plan = pipe.plan(ids)
    assert plan.reason == Reason.INVALID_TOKENS and "bool" in plan.detail("error")


def test_zero_and_one_ids_still_pass():
    ids = [0, 1] * 50 + [1, 2, 3]
    assert validate_tokens(ids).tolist() == ids
    assert validate_tokens(np.array(ids, dtype=np.int32)).tolist() == ids


# ---------------------------------------------------------------------------------------------- arguments
BAD_ARGS = [
    ({"text": 123}, "text must be a str"),
    ({"text": b"bytes"}, "text must be a str"),
    ({"text": ["a", "b"]}, "text must be a str"),
    ({"namespace": "str"}, "namespace must be a CacheNamespace"),
    ({"namespace": {"model": "m"}}, "namespace must be a CacheNamespace"),
]


@pytest.mark.parametrize("kwargs, message", BAD_ARGS)
def test_register_donor_rejects_bad_arguments(pipe, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        pipe.register_donor("d", tokens(), **kwargs)
    assert len(pipe.store) == 0


@pytest.mark.parametrize("kwargs, message", BAD_ARGS + [
    ({"engine_prefix_tokens": "3"}, "engine_prefix_tokens must be an integer"),
    ({"engine_prefix_tokens": math.nan}, "engine_prefix_tokens must be an integer"),
    ({"engine_prefix_tokens": 3.0}, "engine_prefix_tokens must be an integer"),
    ({"engine_prefix_tokens": True}, "engine_prefix_tokens must be an integer"),
    ({"engine_prefix_tokens": -1}, "engine_prefix_tokens must be an integer >= 0"),
    ({"engine_prefix_tokens": None}, "engine_prefix_tokens must be an integer"),
])
def test_plan_declines_bad_arguments_with_a_reason(pipe, kwargs, message):
    ids = tokens()
    pipe.register_donor("d", ids)
    plan = pipe.plan(ids, **kwargs)
    assert not plan.is_hit and plan.reason == Reason.INVALID_INPUT
    assert message in plan.detail("error")
    assert plan.namespace == CacheNamespace.default() and plan.to_dict()["reason"] == "invalid_input"
    assert pipe.stats()["reasons"].get("invalid_input") == 1


def test_good_arguments_of_other_integer_types_pass(pipe):
    ids = tokens()
    pipe.register_donor("d", ids, text="some text", namespace=CacheNamespace.default())
    assert pipe.plan(ids, engine_prefix_tokens=np.int64(0)).is_hit
    assert pipe.plan(ids, engine_prefix_tokens=10**9).reason == Reason.EXACT_PREFIX_SUFFICIENT  # clamped to len


# ---------------------------------------------------------------------------------------------- repetition
@pytest.mark.parametrize("ids", [[7] * 5000, [7, 8] * 2500, [3, 4, 5] * 700, [7] * 40])
def test_repetitive_prompt_against_itself_is_a_full_hit(pipe, ids):
    pipe.register_donor("d", ids)
    plan = pipe.plan(ids)
    assert plan.is_hit and plan.similarity == pytest.approx(1.0), (plan.reason, plan.details)
    assert plan.reuse_ratio == pytest.approx(1.0) and plan.spans[0].context_exact


def test_constant_run_after_a_different_prefix_aligns_in_order():
    # Alignment alone (the index's vote estimate for such a donor is the discovery stage's business): a run of
    # one repeated k-gram pairs its occurrences in order instead of being dropped as "too common".
    from semblend_core.alignment import AlignParams, align

    donor = tokens(300, 1) + [7] * 3000
    target = [7] * 3000 + tokens(50, 2)
    aln = align(np.array(donor), np.array(target), AlignParams())
    assert aln.matched_tokens >= 2990
    for s in aln.spans:  # every reused span is token-identical
        assert donor[s.donor_start:s.donor_end] == target[s.target_start:s.target_end]


def test_a_line_repeated_many_times_does_not_hide_the_real_alignment(pipe):
    line = tokens(12, 3)
    doc = []
    for i in range(40):
        doc += tokens(30, 100 + i) + line
    donor = tokens(64, 4) + doc
    target = tokens(20, 5) + doc
    pipe.register_donor("d", donor)
    plan = pipe.plan(target)
    assert plan.is_hit and plan.reused_tokens >= 0.95 * len(doc)
    assert all(s.delta == 20 - 64 for s in plan.spans if s.length > 100)  # the document's own diagonal
