"""Discovery finds a shared run in a long donor every time, at any donor length up to ``max_prompt_tokens``.

The index holds each donor's sketch (k-grams winnowed with window ``sketch_window``), which a prompt queries with
its own sketch: a run of ``sketch_window + k - 1`` shared tokens always shares a sketch entry, however long the
donor. (The previous bottom-256 sample found a 600-token run in a 100K-token donor 15-17 times in 20 and a
1,000-token run in a 300K-token one 9-12 times.)
"""

from __future__ import annotations

import numpy as np
import pytest

from semblend_core import SemBlendConfig, SemBlendPipeline
from semblend_core.alignment import TargetAnchors
from semblend_core.donor_store import DonorStore

K, W, SKETCH = 8, 8, 32
GUARANTEED_RUN = SKETCH + K - 1  # 39 tokens


def _tokens(rng, n):
    return rng.integers(0, 50_000, n)


def _query(tokens, store):
    return TargetAnchors.build(np.asarray(tokens), store.k, store.w, store.sketch_window).query_hashes()


@pytest.fixture(scope="module")
def long_store():
    rng = np.random.default_rng(11)
    store = DonorStore(100, shingle_tokens=K, winnow_window=W, sketch_window=SKETCH)
    donors = {n: _tokens(rng, n) for n in (100_000, 300_000, 1_000_000)}
    for n, toks in donors.items():
        store.register(f"long{n}", toks, "ns")
    for i in range(30):  # unrelated short donors compete for the candidate slots
        store.register(f"short{i}", _tokens(rng, 2_000), "ns")
    return store, donors


@pytest.mark.parametrize("n", [100_000, 300_000, 1_000_000])
def test_every_run_of_the_guaranteed_length_gets_a_vote_at_any_donor_length(long_store, n):
    store, donors = long_store
    rng = np.random.default_rng(n)
    donor = donors[n]
    for _ in range(40):
        length = int(rng.integers(GUARANTEED_RUN, 3 * GUARANTEED_RUN))
        start = int(rng.integers(0, n - length))
        prompt = np.concatenate([_tokens(rng, 25), donor[start:start + length], _tokens(rng, 25)])
        found = [store.get(c.slot).donor_id for c in store.candidates(_query(prompt, store), "ns", 4)]
        assert f"long{n}" in found, (length, start)


def test_index_memory_grows_linearly_not_with_a_fixed_sample(long_store):
    store, donors = long_store
    for n in donors:
        rec = store.lookup_id(f"long{n}", "ns")
        # ~2/(SKETCH+1) of positions are sketch anchors: ~6% of tokens, never a fixed count.
        assert 0.045 * n < rec.sketch_size < 0.075 * n, (n, rec.sketch_size)
    stats = store.stats()
    tokens = sum(donors) + 30 * 2_000
    assert stats["index_bytes"] < 2.5 * tokens  # ~1.7 bytes per donor token (see DonorStore)


@pytest.mark.parametrize("donor_len,run", [(100_000, 600), (300_000, 1_000)])
def test_plan_finds_the_long_donor_20_of_20(donor_len, run):
    rng = np.random.default_rng(donor_len + run)
    pipe = SemBlendPipeline(SemBlendConfig(embedder="shingle"))
    donor = _tokens(rng, donor_len)
    pipe.register_donor("long", donor)
    for i in range(20):
        pipe.register_donor(f"other{i}", _tokens(rng, 4_000))
    found = 0
    for _ in range(20):
        start = int(rng.integers(0, donor_len - run))
        prompt = np.concatenate([_tokens(rng, 100), donor[start:start + run]])
        plan = pipe.plan(prompt)
        if plan.is_hit and plan.donor_id == "long":
            assert plan.spans[0].donor_start == start and plan.spans[0].target_start == 100
            assert sum(s.length for s in plan.spans) == run
            found += 1
    assert found == 20
