"""The recompute budget means what it says: per-layer active counts of the transformers engine's layer loop.

``_nested_counts`` is pure (no torch); the end-to-end check that the loop spends these counts is
``test_hf_engine.py::test_budget_controls_active_tokens`` and the one below on a tiny random Llama.
"""

from __future__ import annotations

import pytest

from semblend.integration.transformers.blend import _nested_counts
from semblend_core import CacheNamespace, SemanticKvPlan
from semblend_core.bathtub import ModelShape, layer_recompute_policy


def _plan(budget, preset, num_layers, model_type="qwen2"):
    return SemanticKvPlan(True, "hit", 100, CacheNamespace.default(), donor_id="d", donor_len=100,
                          recompute_budget=budget,
                          layer_recompute=layer_recompute_policy(ModelShape(num_layers, model_type), budget, preset))


@pytest.mark.parametrize("preset", ["auto", "flat", "llama"])
@pytest.mark.parametrize("budget", [0.02, 0.05, 0.15, 0.25])
@pytest.mark.parametrize("num_layers,check_layer", [(28, 1), (30, 1), (4, 1), (28, 0)])
def test_mean_refreshed_fraction_after_the_check_equals_the_budget(preset, budget, num_layers, check_layer):
    candidates = 1000
    counts = _nested_counts(_plan(budget, preset, num_layers), num_layers, candidates, check_layer)
    assert len(counts) == num_layers
    assert counts[:check_layer + 1] == [candidates] * (check_layer + 1)  # the check runs every token
    post = counts[check_layer + 1:]
    assert post == sorted(post, reverse=True)  # nested: a token fresh at l was fresh below
    assert all(0 <= c <= candidates for c in post)
    assert sum(post) == round(budget * candidates * len(post))  # to the token


def test_bathtub_keeps_its_early_emphasis_and_flat_is_flat():
    qwen = _nested_counts(_plan(0.15, "auto", 28), 28, 1000, 1)[2:]
    flat = _nested_counts(_plan(0.15, "flat", 28), 28, 1000, 1)[2:]
    assert qwen[0] > qwen[-1] and qwen[0] > 150  # front-loaded
    assert max(flat) - min(flat) <= 1 and sum(flat) == sum(qwen)  # equal work, different shape


def test_zero_budget_and_saturation():
    assert _nested_counts(_plan(0.0, "auto", 28), 28, 500, 1) == [500, 500] + [0] * 26
    assert _nested_counts(_plan(1.0, "flat", 28), 28, 500, 1) == [500] * 28
    assert _nested_counts(_plan(0.5, "flat", 4), 4, 0, 1)[2:] == [0, 0]
    # The policy tuple does not match the layer count: a flat budget.
    counts = _nested_counts(_plan(0.1, "flat", 8), 28, 1000, 1)[2:]
    assert sum(counts) == round(0.1 * 1000 * 26) and max(counts) - min(counts) <= 1
