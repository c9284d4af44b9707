"""ROUGE-L over token sequences: the definition both the text fallback and the vLLM benchmark use."""

from __future__ import annotations

import pytest

from semblend.integration.transformers.metrics import rouge_l, rouge_l_tokens


@pytest.mark.parametrize(("reference", "candidate", "expected"), [
    ([1, 2, 3, 4], [1, 2, 3, 4], 1.0),
    ([1, 2, 3], [1, 3], 2 * (2 / 2) * (2 / 3) / (2 / 2 + 2 / 3)),  # LCS 2: precision 1, recall 2/3
    ([1, 2, 3], [3, 2, 1], 2 * (1 / 3) * (1 / 3) / (2 / 3)),       # order matters: LCS 1
    ([1, 2], [5, 6], 0.0),
    ([], [], 1.0),
    ([1], [], 0.0),
])
def test_rouge_l_tokens(reference, candidate, expected):
    assert rouge_l_tokens(reference, candidate) == pytest.approx(expected)


def test_text_rouge_l_agrees_with_the_token_definition_on_plain_words():
    # rouge_score (when installed) and the fallback tokenise plain lowercase words alike.
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(
        rouge_l_tokens("the cat sat on the mat".split(), "the cat lay on a mat".split()))
