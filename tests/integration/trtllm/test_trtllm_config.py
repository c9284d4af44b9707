"""Settings, start-up checks and the namespace, from stand-in ``llm_args`` / requests (TensorRT-LLM cannot be
installed here; the attribute names are ``TorchLlmArgs`` / ``KvCacheConfig``'s)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import trtllm_standins as S

from semblend.integration.trtllm._config import (
    CONFIG_ENV,
    base_namespace,
    check_materializing,
    load_settings,
    request_namespace,
    request_salt,
    tokens_per_block,
)
from semblend_core import ConfigError


def test_defaults_are_discovery_only():
    adapter, core = load_settings({})
    assert adapter.mode == "discovery_only" and core.discovery_only


def test_json_and_file_settings(tmp_path):
    cfg = {"mode": "prefix", "min_similarity": 0.7, "donor_kv_gpu_bytes": 1024}
    adapter, core = load_settings({CONFIG_ENV: json.dumps(cfg)})
    assert (adapter.mode, adapter.donor_kv_gpu_bytes, core.min_similarity, core.discovery_only) == \
        ("prefix", 1024, 0.7, False)
    path = tmp_path / "semblend.json"
    path.write_text(json.dumps(cfg))
    assert load_settings({CONFIG_ENV: str(path)})[0].mode == "prefix"
    # SEMBLEND_* variables are the base the JSON is applied on.
    assert load_settings({CONFIG_ENV: '{"mode": "prefix"}', "SEMBLEND_MIN_SIMILARITY": "0.8"})[1].min_similarity == 0.8


@pytest.mark.parametrize("text,match", [
    ('{"mode": "blend"}', "allowed: discovery_only, prefix"),
    ('{"min_simlarity": 0.7}', "allowed:.*min_similarity"),
    ("[1, 2]", "JSON object"),
    ("{not json", "not valid JSON"),
    ("/nonexistent/semblend.json", "neither a JSON object nor a readable file"),
])
def test_bad_settings_fail_at_start_up_naming_what_is_allowed(text, match):
    with pytest.raises(ConfigError, match=match):
        load_settings({CONFIG_ENV: text})


def test_check_materializing_accepts_the_supported_deployment():
    for backend in ("TRTLLM", "VANILLA"):
        check_materializing(S.llm_args(attn_backend=backend))


@pytest.mark.parametrize("kw,match", [
    ({"enable_block_reuse": False}, "ignores the KV cache connector"),
    ({"host_cache_size": 4096}, "host offloading"),
    ({"tensor_parallel_size": 4}, "tensor_parallel_size=1"),
    ({"pipeline_parallel_size": 2}, "pipeline_parallel_size=1"),
    ({"enable_attention_dp": True}, "enable_attention_dp"),
    ({"attn_backend": "TRTLLM_SPARSE"}, "allowed: TRTLLM, VANILLA"),
    ({"attn_backend": "FLASHINFER"}, "allowed: TRTLLM, VANILLA"),
])
def test_check_materializing_refuses(kw, match):
    with pytest.raises(ConfigError, match=match):
        check_materializing(S.llm_args(**kw))


def test_kv_cache_manager_v2_is_refused():
    args = S.llm_args()
    args.kv_cache_config.use_kv_cache_manager_v2 = True
    with pytest.raises(ConfigError, match="V1 only"):
        check_materializing(args)


def test_tokens_per_block_and_namespace():
    args = S.llm_args(tokens_per_block=64)
    assert tokens_per_block(args) == 64
    hf = SimpleNamespace(model_type="llama", rope_theta=500000.0, num_attention_heads=4, head_dim=8)
    ns = base_namespace(args, hf)
    assert ns.block_size == 64 and ns.kv_layout == "trtllm/HND" and "500000" in ns.rope
    assert base_namespace(S.llm_args(attn_backend="VANILLA"), hf).kv_layout == "trtllm/NHD"
    other_model = S.llm_args(tokens_per_block=64, model="other/model")
    assert base_namespace(other_model, hf).key != ns.key
    salted = request_namespace(ns, S.LlmRequest(1, [1], cache_salt="tenant-a"))
    assert salted.cache_salt == "tenant-a" and salted.key != ns.key
    assert request_namespace(ns, S.LlmRequest(1, [1], cache_salt_id=42)).cache_salt == "42"
    assert request_namespace(ns, S.LlmRequest(1, [1], lora_task_id=3)).lora == "task:3"
    assert request_namespace(ns, S.LlmRequest(1, [1])) is ns
    assert request_salt(S.LlmRequest(1, [1])) == "" and request_salt(S.LlmRequest(1, [1], salt_bound=False)) is None
