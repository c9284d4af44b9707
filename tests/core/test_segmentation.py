"""Segmentation: windows cover their input end to end; words and shingles are Unicode-aware."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semblend_core.segmentation import (
    count_window_words,
    text_windows,
    token_windows,
    word_shingles,
    word_tokens,
)


def _window_params():
    return st.integers(1, 40).flatmap(lambda size: st.tuples(st.just(size), st.integers(0, size - 1)))


def _check_ranges(ranges: list[tuple[int, int]], n: int, size: int, overlap: int) -> None:
    """The coverage contract shared by both window functions, on word/token index ranges [start, end)."""
    if n == 0:
        assert ranges == []
        return
    assert ranges[0][0] == 0
    assert ranges[-1][1] == n, "the last window must reach the end: nothing silently truncated"
    for start, end in ranges:
        assert 0 <= start < end <= n
        assert end - start <= size
    for (s0, e0), (s1, e1) in itertools.pairwise(ranges):
        assert s0 < s1, "windows advance"
        assert e0 - s1 >= overlap, "consecutive windows share at least `overlap` items (hence no gap)"


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), params=_window_params(),
       seps=st.lists(st.sampled_from([" ", "\n", "  \t", " \n\n "]), min_size=1, max_size=4))
def test_text_windows_cover_every_word(n, params, seps):
    size, overlap = params
    # Distinct words, so every window maps back to exact word indices.
    words = [f"w{i}" for i in range(n)]
    text = seps[0] + "".join(w + seps[i % len(seps)] for i, w in enumerate(words))
    windows = text_windows(text, max_words=size, overlap=overlap)
    ranges = []
    for win in windows:
        assert win in text, "a window is an exact slice of the text"
        assert win == win.strip()
        idx = [int(w[1:]) for w in win.split()]
        assert idx == list(range(idx[0], idx[-1] + 1)), "a window is a run of consecutive words"
        ranges.append((idx[0], idx[-1] + 1))
    _check_ranges(ranges, n, size, overlap)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 2000), params=_window_params())
def test_token_windows_cover_every_token(n, params):
    size, overlap = params
    ranges = token_windows(list(range(n)), size, overlap)
    _check_ranges(ranges, n, size, overlap)
    covered = set()
    for s, e in ranges:
        covered.update(range(s, e))
    assert covered == set(range(n))


def test_text_windows_small_cases():
    assert text_windows("") == []
    assert text_windows(" \n\t ") == []
    assert text_windows("  one two\nthree  ") == ["one two\nthree"]
    assert text_windows("a b c d e f g", max_words=3, overlap=1) == ["a b c", "c d e", "e f g"]
    # The last window is pulled back to end at the last word instead of being a short tail.
    assert text_windows("a b c d e", max_words=3, overlap=0) == ["a b c", "c d e"]


def test_text_windows_split_cjk_by_character():
    text = "東京は日本の首都です"
    assert count_window_words(text) == len(text)
    windows = text_windows(text, max_words=4, overlap=1)
    assert windows[0] == text[:4] and windows[-1] == text[-4:]
    assert all(len(w) <= 4 and w in text for w in windows)


@pytest.mark.parametrize("size,overlap", [(0, 0), (3, 3), (3, -1), (2, 5), (True, 0)])
def test_window_arguments_are_validated(size, overlap):
    with pytest.raises(ValueError):
        text_windows("a b c", max_words=size, overlap=overlap)
    with pytest.raises(ValueError):
        token_windows([1, 2, 3], size, overlap)


def test_word_tokens_are_unicode_aware():
    assert word_tokens("Hello, WORLD! It's 2024_ok") == ["hello", "world", "it", "s", "2024", "ok"]
    assert word_tokens("Ça va TRÈS bien, naïve café") == ["ça", "va", "très", "bien", "naïve", "café"]
    # Combining marks stay inside the word (Python's \w alone would cut "नमस्ते" into pieces).
    assert word_tokens("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]
    # NFKC folds full-width forms; case folding maps ß to ss.
    assert word_tokens("ｆｕｌｌ Straße") == ["full", "strasse"]
    assert word_tokens("東京です") == ["東", "京", "で", "す"]
    assert word_tokens("привет мир") == ["привет", "мир"]
    assert word_tokens("... 🙂 !!") == []


def test_word_shingles():
    assert word_shingles("The quick brown fox") == ["the quick brown", "quick brown fox"]
    assert word_shingles("The quick brown fox", n=1) == ["the", "quick", "brown", "fox"]
    assert word_shingles("Hi there") == ["hi there"], "short texts still give one feature"
    assert word_shingles("  ?! ") == []
    with pytest.raises(ValueError):
        word_shingles("a b c", n=0)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200), n=st.integers(1, 5))
def test_word_shingles_are_built_from_word_tokens(text, n):
    words = word_tokens(text)
    shingles = word_shingles(text, n)
    if not words:
        assert shingles == []
    elif len(words) < n:
        assert shingles == [" ".join(words)]
    else:
        assert len(shingles) == len(words) - n + 1
        assert all(s.split(" ") == words[i:i + n] for i, s in enumerate(shingles))
    for w in words:
        assert w and not re.search(r"\s", w)
