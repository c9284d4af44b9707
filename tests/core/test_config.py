import pytest

from semblend_core import ConfigError, SemBlendConfig


def test_defaults_match_documented_values():
    cfg = SemBlendConfig()
    assert cfg.min_similarity == 0.60 and cfg.min_reuse_ratio == 0.50
    assert cfg.enabled and not cfg.discovery_only and cfg.embedder == "shingle"


def test_from_env_parses_types():
    cfg = SemBlendConfig.from_env({
        "SEMBLEND_MIN_SIMILARITY": "0.7", "SEMBLEND_MAX_DONORS": "123", "SEMBLEND_DISCOVERY_ONLY": "yes",
        "SEMBLEND_EMBEDDER": "jaccard", "SEMBLEND_LAYER_RECOMPUTE": "0.1,0.2", "PATH": "/bin",
    })
    assert cfg.min_similarity == 0.7 and cfg.max_donors == 123 and cfg.discovery_only is True
    assert cfg.embedder == "jaccard" and cfg.layer_recompute == (0.1, 0.2)


def test_unknown_env_variable_names_allowed_ones():
    with pytest.raises(ConfigError) as err:
        SemBlendConfig.from_env({"SEMBLEND_MIN_SIMILARTY": "0.7"})
    assert "SEMBLEND_MIN_SIMILARITY" in str(err.value)


@pytest.mark.parametrize("key,value,allowed", [
    ("min_similarity", 1.5, "[0, 1]"),
    ("min_similarity", float("nan"), "[0, 1]"),
    ("embedder", "bert", "minilm"),
    ("max_donors", 0, "integer"),
    ("enabled", "maybe", "true"),
    ("bathtub_preset", "bathtub", "qwen2"),
    ("chunk_size", 4, "shingle_tokens"),
])
def test_bad_values_raise_value_error_naming_allowed(key, value, allowed):
    with pytest.raises(ValueError) as err:
        SemBlendConfig.from_dict({key: value})
    assert allowed in str(err.value)


def test_from_dict_rejects_unknown_keys_and_is_frozen():
    with pytest.raises(ConfigError) as err:
        SemBlendConfig.from_dict({"mode": "prefix"})
    assert "min_reuse_ratio" in str(err.value)
    cfg = SemBlendConfig()
    with pytest.raises(Exception):
        cfg.min_similarity = 0.1  # type: ignore[misc]


def test_from_dict_overrides_base():
    base = SemBlendConfig(max_donors=7)
    cfg = SemBlendConfig.from_dict({"min_reuse_ratio": "0.25"}, base=base)
    assert cfg.max_donors == 7 and cfg.min_reuse_ratio == 0.25
