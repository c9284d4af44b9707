"""Adapter config and namespace translation. Engine-free: vLLM config objects are stood in by namespaces."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from semblend.integration.vllm._config import (
    ADAPTER_KEYS,
    base_namespace,
    parse_extra_config,
    request_namespace,
)
from semblend_core import ConfigError


def vllm_config(**over):
    model = SimpleNamespace(model="Qwen/Qwen2.5-7B-Instruct", revision="abc", tokenizer="Qwen/Qwen2.5-7B-Instruct",
                            tokenizer_revision=None, dtype="torch.bfloat16", quantization=None,
                            hf_config={"model_type": "qwen2", "rope_theta": 1e6, "head_dim": 128})
    cache = SimpleNamespace(cache_dtype="auto", block_size=16, kv_cache_layout="LBNHC")
    parallel = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1)
    cfg = SimpleNamespace(model_config=model, cache_config=cache, parallel_config=parallel)
    for path, value in over.items():
        obj_name, attr = path.split("__")
        setattr(getattr(cfg, obj_name), attr, value)
    return cfg


def test_defaults_are_discovery_only():
    adapter, core = parse_extra_config({}, environ={})
    assert adapter.mode == "discovery_only" and core.discovery_only is True


def test_mode_prefix_and_core_keys_are_split():
    adapter, core = parse_extra_config({"mode": "prefix", "min_similarity": "0.7", "donor_kv_gpu_bytes": "1024"},
                                       environ={})
    assert (adapter.mode, adapter.donor_kv_gpu_bytes) == ("prefix", 1024)
    assert core.min_similarity == 0.7 and core.discovery_only is False


def test_load_moved_prefix_is_off_by_default_and_parses_env_style_strings():
    assert parse_extra_config({}, environ={})[0].load_moved_prefix is False
    assert parse_extra_config({"load_moved_prefix": "true"}, environ={})[0].load_moved_prefix is True
    assert parse_extra_config({"load_moved_prefix": False}, environ={})[0].load_moved_prefix is False


def test_blend_mode_keys_map_onto_the_core_and_the_executor():
    adapter, core = parse_extra_config({"mode": "blend", "recompute_ratio": 0.15, "check_layers": [3],
                                        "selection": "position"}, environ={})
    assert adapter.blend and adapter.materializes and core.discovery_only is False
    assert core.recompute_budget == 0.15                      # recompute_ratio is the core's recompute_budget
    assert adapter.check_layers == (3,) and adapter.check_layer == 3 and adapter.selection == "position"
    # Env-style strings, the seed plugin's flag style, and the same value given under both names.
    adapter, core = parse_extra_config({"mode": "blend", "recompute_ratio": "0.3", "check_layers": "2",
                                        "recompute_budget": 0.3}, environ={})
    assert core.recompute_budget == 0.3 and adapter.check_layer == 2
    assert parse_extra_config({"mode": "blend", "check_layers": []}, environ={})[0].check_layer is None
    # Without recompute_ratio the core's budget (env, then extra config) stands.
    _, core = parse_extra_config({"mode": "blend"}, environ={"SEMBLEND_RECOMPUTE_BUDGET": "0.05"})
    assert core.recompute_budget == 0.05


def test_blend_default_check_layer_is_the_transformers_engines():
    from semblend.integration.vllm._config import DEFAULT_CHECK_LAYER

    adapter, _ = parse_extra_config({"mode": "blend"}, environ={})
    assert adapter.check_layer == DEFAULT_CHECK_LAYER and adapter.selection is None
    engine = pytest.importorskip("semblend.integration.transformers.engine",
                                 reason="the transformers engine needs transformers")
    assert engine.EngineOptions().check_layer == DEFAULT_CHECK_LAYER


def test_blend_cuda_graphs_follow_enforce_eager_unless_set():
    from semblend.integration.vllm._config import blend_graph_tokens

    cfg = vllm_config(model_config__max_model_len=32768, model_config__enforce_eager=False)
    eager = vllm_config(model_config__max_model_len=32768, model_config__enforce_eager=True)

    def tokens(extra, config):
        return blend_graph_tokens(config, parse_extra_config(extra, environ={})[0])

    assert tokens({"mode": "blend"}, cfg) == 32768 and tokens({"mode": "blend"}, eager) == 0
    assert tokens({"mode": "blend", "cuda_graphs": True}, eager) == 32768
    assert tokens({"mode": "blend", "cuda_graphs": "false"}, cfg) == 0
    assert tokens({"mode": "prefix"}, cfg) == 0


def test_blend_capability_is_read_from_vllms_config():
    from semblend.integration.vllm._config import blend_decline_reason

    assert blend_decline_reason(vllm_config()) == ""
    assert blend_decline_reason(vllm_config(parallel_config__tensor_parallel_size=2)) == "blend_tensor_parallel"
    assert blend_decline_reason(vllm_config(parallel_config__pipeline_parallel_size=2)) == "blend_pipeline_parallel"
    gemma = {"model_type": "gemma2", "rope_theta": 1e4, "head_dim": 128}
    assert blend_decline_reason(vllm_config(model_config__hf_config=gemma)) == "unsupported_model_type:gemma2"
    clipped = {"model_type": "llama", "rope_theta": 1e4, "head_dim": 128, "clip_qkv": 8.0}
    assert blend_decline_reason(vllm_config(model_config__hf_config=clipped)).startswith(
        "unsupported_config:clip_qkv")


def test_env_is_the_base_and_extra_config_wins():
    _, core = parse_extra_config({"min_similarity": 0.8}, environ={"SEMBLEND_MIN_SIMILARITY": "0.5",
                                                                    "SEMBLEND_CHUNK_SIZE": "32"})
    assert core.min_similarity == 0.8 and core.chunk_size == 32


@pytest.mark.parametrize("extra,match", [
    ({"min_similarty": 0.7}, r"unknown SemBlend config key.*min_similarty.*allowed: .*min_similarity"),
    ({"mode": "blnd"}, r"mode='blnd' is not allowed; allowed: discovery_only, prefix, blend"),
    ({"donor_kv_gpu_bytes": -1}, r"donor_kv_gpu_bytes=-1"),
    ({"mode": "prefix", "discovery_only": True}, r"discovery_only=True but mode='prefix'"),
    ({"load_moved_prefix": "maybe"}, r"load_moved_prefix='maybe' is not allowed; allowed: true, false"),
    ({"mode": "blend", "recompute_ratio": 1.5}, r"recompute_ratio=1.5 is not allowed; allowed: a number in \[0, 1\]"),
    ({"mode": "blend", "recompute_ratio": "lots"}, r"recompute_ratio='lots' is not allowed"),
    ({"mode": "blend", "recompute_ratio": True}, r"recompute_ratio=True is not allowed"),
    ({"mode": "blend", "recompute_ratio": 0.1, "recompute_budget": 0.2},
     r"recompute_ratio=0.1 and recompute_budget=0.2: they are the same setting"),
    ({"mode": "blend", "check_layers": [0, 16, 32]},
     r"check_layers=\[0, 16, 32\] is not allowed: .*one layer.*allowed: an integer >= 0, a list of exactly one"),
    ({"mode": "blend", "check_layers": "0 16 32"}, r"check_layers=\[0, 16, 32\] is not allowed"),
    ({"mode": "blend", "check_layers": -1}, r"check_layers=-1 is not allowed; allowed: an integer >= 0"),
    ({"mode": "blend", "check_layers": ["x"]}, r"check_layers=\['x'\] is not allowed"),
    ({"mode": "blend", "selection": "random"}, r"selection='random' is not allowed; allowed: query, position"),
    ({"mode": "prefix", "recompute_ratio": 0.1}, r"recompute_ratio applies only to mode 'blend'"),
    ({"check_layers": 2}, r"check_layers applies only to mode 'blend'"),
    ({"mode": "prefix", "selection": "query"}, r"selection applies only to mode 'blend'"),
    ({"mode": "blend", "load_moved_prefix": True}, r"load_moved_prefix applies only to mode 'prefix'"),
    ({"mode": "blend", "recompute_rato": 0.1}, r"unknown SemBlend config key.*recompute_rato"),
    ({"mode": "blend", "cuda_graphs": "sometimes"}, r"cuda_graphs='sometimes' is not allowed; allowed: true, false"),
    ({"mode": "prefix", "cuda_graphs": True}, r"cuda_graphs applies only to mode 'blend'"),
])
def test_bad_keys_fail_naming_what_is_allowed(extra, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse_extra_config(extra, environ={})
    if "unknown" in match:
        assert all(k in str(info.value) for k in ADAPTER_KEYS)


def test_namespace_separates_everything_that_changes_kv():
    ns = base_namespace(vllm_config())
    assert ns.kv_dtype == "auto/bfloat16" and ns.kv_layout == "LBNHC" and ns.block_size == 16
    assert '"rope_theta":1000000' in ns.rope
    variants = [
        vllm_config(model_config__revision="def"),
        vllm_config(model_config__quantization="fp8"),
        vllm_config(cache_config__cache_dtype="fp8"),
        vllm_config(model_config__dtype="torch.float16"),
        vllm_config(cache_config__block_size=32),
        vllm_config(cache_config__kv_cache_layout="LBHNC"),
        vllm_config(parallel_config__tensor_parallel_size=2),
        vllm_config(parallel_config__pipeline_parallel_size=2),
        vllm_config(model_config__hf_config={"model_type": "qwen2", "rope_theta": 1e4, "head_dim": 128}),
        vllm_config(model_config__tokenizer_revision="t2"),
    ]
    keys = {base_namespace(v).key for v in variants}
    assert ns.key not in keys and len(keys) == len(variants)
    assert base_namespace(vllm_config()).key == ns.key  # and it is stable


def test_request_namespace_adds_lora_and_cache_salt():
    base = base_namespace(vllm_config())
    plain = SimpleNamespace(lora_request=None, cache_salt=None)
    assert request_namespace(base, plain) is base
    lora = SimpleNamespace(lora_request=SimpleNamespace(lora_name="sql", lora_path="/a/sql"), cache_salt=None)
    salted = SimpleNamespace(lora_request=None, cache_salt="tenant-1")
    keys = {request_namespace(base, r).key for r in (lora, salted)}
    assert len(keys) == 2 and base.key not in keys
    assert request_namespace(base, salted).cache_salt == "tenant-1"


EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "vllm"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_example_kv_transfer_configs_are_valid(path):
    cfg = json.loads(path.read_text())
    assert cfg["kv_connector"] == "SemBlendConnectorV1"
    assert cfg["kv_connector_module_path"] == "semblend.integration.vllm.connector_v1"
    assert cfg["kv_load_failure_policy"] == "recompute"
    adapter, _ = parse_extra_config(cfg["kv_connector_extra_config"], environ={})
    assert adapter.mode in path.stem


def test_every_mode_has_an_example():
    from semblend.integration.vllm import MODES

    stems = [p.stem for p in EXAMPLES.glob("*.json")]
    assert all(any(s.startswith(mode) for s in stems) for mode in MODES)


def test_register_donors_is_no_longer_accepted():
    """register_donors=false relied on an external registrar that does not exist: the key is gone and fails loudly."""
    assert "register_donors" not in ADAPTER_KEYS
    with pytest.raises(ConfigError, match="register_donors"):
        parse_extra_config({"mode": "prefix", "register_donors": False})


def test_an_engine_without_blend_refuses_it():
    """The TensorRT-LLM adapter shares these keys but offers no blend mode (``modes``)."""
    modes = ("discovery_only", "prefix")
    with pytest.raises(ConfigError, match=r"mode='blend' is not allowed; allowed: discovery_only, prefix"):
        parse_extra_config({"mode": "blend"}, environ={}, modes=modes)
    with pytest.raises(ConfigError, match=r"recompute_ratio is not allowed: this engine has no blend mode"):
        parse_extra_config({"mode": "prefix", "recompute_ratio": 0.1}, environ={}, modes=modes)
    assert parse_extra_config({"mode": "prefix"}, environ={}, modes=modes)[0].mode == "prefix"
