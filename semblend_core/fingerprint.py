"""Token fingerprints: rolling k-gram hashes, winnowed anchors and bottom-k sketches (numpy only).

Why this shape: the common case (a shared document under a different instruction, reordered passages, a grown
chat) shares long *token* runs with a donor at arbitrary offsets. Hashing every k-gram and keeping the window
minima ("winnowing", Schleimer et al. 2003) picks the same anchors in both sequences wherever they share at least
``w + k - 1`` tokens, independent of offset. A donor is indexed by the ``bottom_k`` smallest of its anchor hashes
(a consistent sample: a globally small hash is also a local window minimum in any prompt containing the same
region), so discovery is a handful of sorted-array look-ups and needs no embedding.

All functions are pure and vectorised; cost is a few passes over the token array.
"""

from __future__ import annotations

import threading

import numpy as np

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_BASE = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads polynomial hashes over all 64 bits (so minima are uniform samples)."""
    x = x ^ (x >> _S30)
    x = x * _MIX1
    x = x ^ (x >> _S27)
    x = x * _MIX2
    return x ^ (x >> _S31)


_pow_lock = threading.Lock()
_pows: tuple[np.ndarray, np.ndarray] = (np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64))
_BASE_INV = np.uint64(pow(int(_BASE), -1, 1 << 64))


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(B^i, B^-i) mod 2^64 for i < n, cached and grown geometrically (arrays are replaced, never mutated)."""
    global _pows
    pw, inv = _pows
    if pw.shape[0] >= n:
        return pw, inv
    with _pow_lock:
        size = max(n, 2 * _pows[0].shape[0], 4096)
        with np.errstate(over="ignore"):
            pw = np.cumprod(np.full(size, _BASE, dtype=np.uint64))
            pw = np.concatenate([np.ones(1, dtype=np.uint64), pw[:-1]])
            inv = np.cumprod(np.full(size, _BASE_INV, dtype=np.uint64))
            inv = np.concatenate([np.ones(1, dtype=np.uint64), inv[:-1]])
        _pows = (pw, inv)
    return pw, inv


def kgram_hashes(tokens: np.ndarray, k: int) -> np.ndarray:
    """uint64 ``[max(0, n - k + 1)]``: hash of ``tokens[i:i+k]`` for every ``i``. Pure; a few vector passes.

    Polynomial hash mod 2^64 from one prefix sum: ``P[i] = sum_{j<i} x_j B^j`` and ``h_i = (P[i+k] - P[i]) B^-i``
    (B is odd, hence invertible mod 2^64), then a splitmix64 finaliser.
    """
    t = np.asarray(tokens)
    n = t.shape[0]
    if n < k:
        return np.zeros(0, dtype=np.uint64)
    pw, inv = _powers(n + 1)
    with np.errstate(over="ignore"):
        x = _mix64(t.astype(np.uint64) + np.uint64(1)) * pw[:n]
        prefix = np.empty(n + 1, dtype=np.uint64)
        prefix[0] = 0
        np.cumsum(x, out=prefix[1:])
        m = n - k + 1
        h = (prefix[k:k + m] - prefix[:m]) * inv[:m]
        return _mix64(h)


_POS_BITS = 24
_POS_MASK = np.uint64((1 << _POS_BITS) - 1)


def winnow(hashes: np.ndarray, w: int) -> np.ndarray:
    """Sorted int64 positions of window minima over every window of ``w`` consecutive hashes.

    Guarantee: any run of ``w`` consecutive k-grams contains at least one selected position, so two sequences
    that share ``w + k - 1`` tokens share an anchor inside the shared run. The window minimum is taken over
    ``(hash with its low 24 bits replaced by the position)`` so the argmin falls out of a min-reduction (doubling,
    ``log2 w`` passes); ordering uses the hash's top 40 bits, which is all a sample needs. Ties between equal
    40-bit prefixes resolve to the leftmost position.
    """
    m = hashes.shape[0]
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    if w <= 1:
        return np.arange(m, dtype=np.int64)
    if m >= (1 << _POS_BITS):
        raise ValueError(f"winnow supports sequences shorter than {1 << _POS_BITS} k-grams, got {m}")
    keys = (hashes & ~_POS_MASK) | np.arange(m, dtype=np.uint64)
    if m <= w:
        return np.array([int(keys.min() & _POS_MASK)], dtype=np.int64)
    span = 1
    cur = keys
    while span * 2 <= w:  # cur[i] = min(keys[i : i + 2*span])
        cur = np.minimum(cur[:-span], cur[span:])
        span *= 2
    if span < w:  # combine two overlapping power-of-two windows to cover exactly w
        rest = w - span
        cur = np.minimum(cur[: cur.shape[0] - rest], cur[rest:])
    selected = np.zeros(m, dtype=bool)
    selected[(cur & _POS_MASK).astype(np.int64)] = True
    return np.flatnonzero(selected)


def anchors(tokens: np.ndarray, k: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes uint64, positions int64) of the winnowed anchors of ``tokens``."""
    h = kgram_hashes(tokens, k)
    pos = winnow(h, w)
    return h[pos], pos


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` for 1-D arrays via sort + neighbour mask (~4x faster for the small arrays on the hot path)."""
    if values.size == 0:
        return values.copy()
    s = np.sort(values)
    keep = np.empty(s.shape[0], dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def bottom_k(anchor_hashes: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` smallest distinct anchor hashes, sorted: the donor's consistent sketch for the index."""
    return sorted_unique(anchor_hashes)[:count]
