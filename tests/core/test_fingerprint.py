import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from semblend_core.fingerprint import anchors, kgram_hashes, winnow


def test_kgram_hash_depends_only_on_the_window():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 1000, 500)
    shifted = np.concatenate([rng.integers(0, 1000, 37), t])
    assert np.array_equal(kgram_hashes(t, 8), kgram_hashes(shifted, 8)[37:])
    h = kgram_hashes(t, 8)
    assert len(np.unique(h)) > 480  # windows differ -> hashes differ (no systematic collisions)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**40), min_size=1, max_size=200), st.integers(1, 20))
def test_winnow_matches_bruteforce_and_covers_every_window(values, w):
    h = np.array(values, dtype=np.uint64)
    pos = winnow(h, w)
    keys = (h & ~np.uint64((1 << 24) - 1)) | np.arange(len(h), dtype=np.uint64)
    if len(h) <= w:
        expected = {int(np.argmin(keys))} if w > 1 else set(range(len(h)))
    else:
        expected = {i + int(np.argmin(keys[i:i + w])) for i in range(len(h) - w + 1)} if w > 1 else set(range(len(h)))
    assert set(pos.tolist()) == expected
    for i in range(max(1, len(h) - w + 1)):  # every window holds an anchor
        assert any(i <= p < i + w for p in pos.tolist())


def test_shared_region_shares_anchors_at_any_offset():
    rng = np.random.default_rng(2)
    doc = rng.integers(0, 50000, 3000)
    a = np.concatenate([rng.integers(0, 50000, 11), doc])
    b = np.concatenate([rng.integers(0, 50000, 503), doc, rng.integers(0, 50000, 40)])
    ha, _ = anchors(a, 8, 8)
    hb, _ = anchors(b, 8, 8)
    shared = np.intersect1d(ha, hb)
    assert len(shared) > 0.9 * len(np.unique(ha)) * 3000 / len(a)
