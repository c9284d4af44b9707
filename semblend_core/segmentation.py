"""Segmentation: cut text and token sequences into overlapping windows and word shingles.

The first stage of the data path. Nothing here truncates: every window list covers its input end to end, and the
last window always ends at the last word (or token). Three functions, all pure and thread-safe:

* :func:`text_windows` -- overlapping word windows of a text, for embedders whose model has a length limit;
* :func:`token_windows` -- the same over a token-id sequence, as ``(start, end)`` ranges;
* :func:`word_shingles` -- lower-cased, Unicode-aware word n-grams, the features of the shingle embedder.

What a "word" is differs on purpose between the two text functions:

* for windows (:func:`text_windows`) a word is a run of non-space characters, so a window is an exact slice of the
  original text (punctuation, case and line breaks kept: the model sees what the user wrote);
* for shingles (:func:`word_tokens`) a word is a run of letters, digits and combining marks after NFKC
  normalisation and case folding, so ``"Café,"`` and ``"café"`` are the same feature.

In both, each CJK ideograph and kana counts as a word of its own: those scripts do not separate words with spaces,
and without this a whole Chinese paragraph would be a single word.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Sized

# Hiragana, Katakana, CJK Unified Ideographs Extension A, CJK Unified Ideographs, CJK Compatibility Ideographs.
# Hangul is absent on purpose: Korean separates words with spaces.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WINDOW_WORD_RE = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")


@functools.cache
def _word_token_re() -> re.Pattern[str]:
    """The shingle word pattern, built on first use (~0.1 s, once per process).

    Python's ``\\w`` does not match combining marks, so it would cut Devanagari, Thai or decomposed Latin words in
    pieces (``"नमस्ते"`` -> ``["नमस", "त"]``). The character class of every Unicode mark (category M*) fixes that;
    ``re`` has no ``\\p{M}``, so the class is built from ``unicodedata`` once.
    """
    ranges: list[str] = []
    start = prev = -2
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp))[0] == "M":
            if cp != prev + 1:
                if start >= 0:
                    ranges.append(_char_range(start, prev))
                start = cp
            prev = cp
    if start >= 0:
        ranges.append(_char_range(start, prev))
    marks = "".join(ranges)
    # A single CJK character, or a run of (word characters except "_" and CJK) and marks.
    return re.compile(rf"[{_CJK}]|(?:[^\W_{_CJK}]|[{marks}])+")


def _char_range(lo: int, hi: int) -> str:
    return re.escape(chr(lo)) if lo == hi else f"{re.escape(chr(lo))}-{re.escape(chr(hi))}"


def _check_window(size: int, overlap: int, size_name: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{size_name} must be an integer >= 1, got {size!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not (0 <= overlap < size):
        raise ValueError(f"overlap must be an integer in [0, {size_name}={size}), got {overlap!r}")


def _window_starts(n: int, size: int, overlap: int) -> list[int]:
    """Start offsets of windows of ``size`` over ``n`` items, stepping by ``size - overlap``.

    The last window is pulled back to end exactly at ``n`` (rather than being a short tail), so every window has
    ``size`` items when ``n >= size`` and consecutive windows overlap by at least ``overlap``.
    """
    if n == 0:
        return []
    if n <= size:
        return [0]
    step = size - overlap
    starts = list(range(0, n - size, step))
    starts.append(n - size)
    return starts


def text_windows(text: str, max_words: int = 200, overlap: int = 50) -> list[str]:
    """Overlapping windows of at most ``max_words`` words that together cover ``text`` end to end.

    Each window is an exact slice of ``text`` from the first character of its first word to the last character of
    its last word (whitespace inside is kept, leading/trailing whitespace is not). Consecutive windows share at
    least ``overlap`` words; the first starts at the first word and the last ends at the last word.

    Returns ``[]`` for empty or whitespace-only text and ``[text.strip()]`` when the text has at most
    ``max_words`` words. Raises ``ValueError`` unless ``max_words >= 1`` and ``0 <= overlap < max_words``.
    """
    _check_window(max_words, overlap, "max_words")
    spans = [m.span() for m in _WINDOW_WORD_RE.finditer(text)]
    return [
        text[spans[s][0]:spans[min(s + max_words, len(spans)) - 1][1]]
        for s in _window_starts(len(spans), max_words, overlap)
    ]


def count_window_words(text: str) -> int:
    """How many words :func:`text_windows` sees in ``text`` (non-space runs; each CJK character counts as one)."""
    return sum(1 for _ in _WINDOW_WORD_RE.finditer(text))


def token_windows(token_ids: Sized, window: int, overlap: int) -> list[tuple[int, int]]:
    """Half-open ranges ``[(start, end), ...]`` of at most ``window`` tokens that cover ``token_ids`` end to end.

    Only ``len(token_ids)`` is used (a list, array or tensor of shape ``[num_tokens]`` all work). The same rule as
    :func:`text_windows`: the first range starts at 0, the last ends at ``len(token_ids)``, consecutive ranges
    overlap by at least ``overlap`` tokens. Empty input gives ``[]``. Raises ``ValueError`` unless ``window >= 1``
    and ``0 <= overlap < window``.
    """
    _check_window(window, overlap, "window")
    n = len(token_ids)
    return [(s, min(s + window, n)) for s in _window_starts(n, window, overlap)]


def word_tokens(text: str) -> list[str]:
    """Lower-cased Unicode words of ``text``: NFKC-normalised, case-folded runs of letters, digits and marks.

    Punctuation, symbols, emoji and ``_`` separate words and are dropped; each CJK ideograph or kana is a word.
    ``[]`` means the text has no content (what the embedders map to an all-zero vector).
    """
    return _word_token_re().findall(unicodedata.normalize("NFKC", text).casefold())


def word_shingles(text: str, n: int = 3) -> list[str]:
    """Word n-grams of :func:`word_tokens`, each joined by single spaces, in text order (duplicates kept).

    A text with fewer than ``n`` (but at least one) words gives one shingle of all its words, so short texts still
    have a feature; a content-free text gives ``[]``. Raises ``ValueError`` unless ``n >= 1``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    words = word_tokens(text)
    if not words:
        return []
    if len(words) < n:
        return [" ".join(words)]
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
