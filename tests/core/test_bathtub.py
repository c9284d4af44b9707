import pytest

from semblend_core.bathtub import ModelShape, layer_recompute_policy
from semblend_core.errors import ConfigError


def test_bathtub_shape_mean_equals_budget_and_edges_exceed_middle():
    policy = layer_recompute_policy(ModelShape(28, "qwen2"), 0.15)
    assert len(policy) == 28
    assert sum(policy) / 28 == pytest.approx(0.15, rel=1e-6)
    mid = policy[14]
    assert policy[0] > 2 * mid and policy[-1] > 1.5 * mid and min(policy) == pytest.approx(min(policy[5:23]))


def test_layer_count_comes_from_config_and_unknown_type_is_flat():
    assert layer_recompute_policy(None, 0.15) == ()
    flat = layer_recompute_policy(ModelShape(30, "some_new_arch"), 0.1)
    assert flat == pytest.approx((0.1,) * 30)
    assert layer_recompute_policy(ModelShape(4, "llama"), 0.1, preset="none") == ()


def test_override_must_match_layer_count():
    assert layer_recompute_policy(ModelShape(2), 0.1, override=(0.5, 0.25)) == (0.5, 0.25)
    with pytest.raises(ConfigError):
        layer_recompute_policy(ModelShape(3), 0.1, override=(0.5, 0.25))
    with pytest.raises(ConfigError):
        ModelShape(0)
