"""Token fingerprints: rolling k-gram hashes and winnowed anchors at two densities (numpy only).

Why this shape: the common case (a shared document under a different instruction, reordered passages, a grown
chat) shares long *token* runs with a donor at arbitrary offsets. Hashing every k-gram and keeping the window
minima ("winnowing", Schleimer et al. 2003) picks the same anchors in both sequences wherever they share at least
``w + k - 1`` tokens, independent of offset. Two window sizes are used: *anchors* (``w``, ~2/(w+1) of positions)
seed the alignment, so every shared run of ``w + k - 1`` tokens (15 by default) is found once a donor is a
candidate; the sparser *sketch* (window ``W``, ~2/(W+1) of positions, a subset of the anchors) is what the donor
index holds and what a prompt queries, so every donor sharing a run of ``W + k - 1`` tokens (39 by default) gets a
vote at any donor length -- memory per donor grows linearly with it (~2/(W+1) entries per token), never with a
fixed sample that thins out on long donors.

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
    """splitmix64 finaliser: spreads polynomial hashes over all 64 bits (so minima are uniform samples).

    In place on ``x`` (callers pass a temporary) with one scratch buffer: numpy's temporaries made it 3x slower.
    """
    y = np.right_shift(x, _S30)
    x ^= y
    x *= _MIX1
    np.right_shift(x, _S27, out=y)
    x ^= y
    x *= _MIX2
    np.right_shift(x, _S31, out=y)
    x ^= y
    return x


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
        # Token ids -> well-spread 64-bit values (a bijection: odd multiply, xor-shift), so that k-grams differing
        # only in a few high token bits still differ in low hash bits; the finaliser below does the rest.
        x = t.astype(np.uint64) + np.uint64(1)
        x *= _MIX1
        x ^= x >> _S31
        x *= pw[:n]
        prefix = np.empty(n + 1, dtype=np.uint64)
        prefix[0] = 0
        np.cumsum(x, out=prefix[1:])
        m = n - k + 1
        h = prefix[k:k + m] - prefix[:m]
        h *= inv[:m]
        return _mix64(h)


_POS_BITS = 24
_POS_MASK = np.uint64((1 << _POS_BITS) - 1)


def _window_minima(keys: np.ndarray, windows: tuple[int, ...]) -> list[np.ndarray]:
    """For each ``w`` in ``windows`` (each in ``[2, len(keys)]``): ``cur[i] = min(keys[i:i+w])``.

    Doubling (``cur_{2s}[i] = min(cur_s[i], cur_s[i+s])``, one pass per power of two up to the largest window),
    then every window is two overlapping power-of-two windows; the passes are shared by all windows.
    """
    powers = {1: keys}
    span, cur = 1, keys
    while span * 2 <= max(windows):
        cur = np.minimum(cur[:-span], cur[span:])
        span *= 2
        powers[span] = cur
    out = []
    for w in windows:
        p = 1 << (w.bit_length() - 1)
        base = powers[p]
        out.append(base if p == w else np.minimum(base[: base.shape[0] - (w - p)], base[w - p:]))
    return out


def _keys(hashes: np.ndarray) -> np.ndarray:
    m = hashes.shape[0]
    if m >= (1 << _POS_BITS):
        raise ValueError(f"winnow supports sequences shorter than {1 << _POS_BITS} k-grams, got {m}")
    return (hashes & ~_POS_MASK) | np.arange(m, dtype=np.uint64)


def _selected(minima: np.ndarray) -> np.ndarray:
    """Distinct argmin positions of consecutive windows. Keys are distinct (they embed the position), so the argmin
    of window ``i + 1`` is never left of window ``i``'s: the positions come sorted and repeats are neighbours."""
    pos = (minima & _POS_MASK).astype(np.int64)
    keep = np.empty(pos.shape[0], dtype=bool)
    keep[0] = True
    np.not_equal(pos[1:], pos[:-1], out=keep[1:])
    return pos[keep]


def winnow(hashes: np.ndarray, w: int) -> np.ndarray:
    """Sorted int64 positions of window minima over every window of ``w`` consecutive hashes.

    Guarantee: any run of ``w`` consecutive k-grams contains at least one selected position, so two sequences
    that share ``w + k - 1`` tokens share an anchor inside the shared run. The window minimum is taken over
    ``(hash with its low 24 bits replaced by the position)`` so the argmin falls out of a min-reduction (doubling,
    ``log2 w`` passes); ordering uses the hash's top 40 bits, which is all a sample needs. Ties between equal
    40-bit prefixes resolve to the leftmost position.
    """
    return winnow_levels(hashes, w)[0]


def winnow_levels(hashes: np.ndarray, *windows: int) -> list[np.ndarray]:
    """``[winnow(hashes, w) for w in windows]`` with the doubling passes shared (one pass per power of two).

    A position selected for a window ``W`` is also selected for any smaller window ``w`` (a minimum of ``W``
    consecutive hashes is the minimum of every ``w``-window inside them), so larger windows give nested, sparser
    anchor sets with the same any-offset guarantee for runs of ``W + k - 1`` tokens.
    """
    m = hashes.shape[0]
    out: list[np.ndarray | None] = [None] * len(windows)
    if m == 0:
        return [np.zeros(0, dtype=np.int64) for _ in windows]
    keys = _keys(hashes)
    doubled = []
    for i, w in enumerate(windows):
        if w <= 1:
            out[i] = np.arange(m, dtype=np.int64)
        elif m <= w:
            out[i] = np.array([int(keys.min() & _POS_MASK)], dtype=np.int64)
        else:
            doubled.append(i)
    if doubled:
        minima = _window_minima(keys, tuple(windows[i] for i in doubled))
        for i, cur in zip(doubled, minima):
            out[i] = _selected(cur)
    return out  # type: ignore[return-value]


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


def sketch_hashes(hashes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Sorted distinct ``hashes[positions]``: the index entries of a donor, or the index query of a prompt."""
    return sorted_unique(hashes[positions])
