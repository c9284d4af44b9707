"""The per-hit guard (``HitGuard``, ``first_token_margin``): the margin it reads and when it fires."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semblend_core.recompute import HitGuard, first_token_margin


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=2, max_size=64), st.floats(-100, 100))
def test_margin_is_the_log_probability_gap_and_shift_invariant(xs, shift):
    x = np.asarray(xs)
    lp = x - np.log(np.exp(x - x.max()).sum()) - x.max()  # log-softmax
    top = np.sort(lp)[-2:]
    assert first_token_margin(x) == pytest.approx(top[1] - top[0], abs=1e-9)
    assert first_token_margin(x + shift) == pytest.approx(first_token_margin(x), abs=1e-6)
    assert first_token_margin(x) >= 0


def test_margin_edge_cases():
    assert first_token_margin([3.0, 3.0, 1.0]) == 0.0  # an exact tie
    assert first_token_margin([2.0]) == math.inf
    assert first_token_margin([1.0, float("nan")]) == -math.inf  # NaN logits are never trusted
    with pytest.raises(ValueError):
        first_token_margin([])


def test_margin_reads_torch_tensors():
    torch = pytest.importorskip("torch")
    assert first_token_margin(torch.tensor([0.5, 2.5, 1.0], dtype=torch.bfloat16)) == pytest.approx(1.5)


def test_guard_fires_below_threshold_only():
    g = HitGuard(min_margin=1.0)
    assert g.fires([0.0, 0.5, -3.0])  # margin 0.5
    assert not g.fires([0.0, 1.0, -3.0])  # margin exactly 1.0 is trusted
    assert not g.fires([0.0, 4.0])
    assert g.fires([1.0, float("nan")])
    assert not HitGuard(min_margin=0.0).fires([1.0, 1.0])  # threshold 0 never fires on finite logits


@pytest.mark.parametrize("kwargs", [{"min_margin": -1}, {"min_margin": float("nan")}, {"min_margin": True},
                                    {"action": "budget"}])
def test_guard_validation_names_allowed_values(kwargs):
    with pytest.raises(ValueError, match="allowed"):
        HitGuard(**kwargs)
