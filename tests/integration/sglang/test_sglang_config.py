"""SGLang adapter, engine-free parts: configuration, namespace, plan -> prefix load, launcher arguments.

These run in the core environment (no SGLang); the engine tests are in test_sglang_cache.py / test_sglang_e2e.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from semblend.integration.sglang import CONFIG_ENV, DeclineReason, parse_config, prefix_load
from semblend.integration.sglang._config import base_namespace, request_namespace
from semblend.integration.sglang.launch import split_args
from semblend_core import CacheNamespace, ConfigError
from semblend_core.plan import SINK_TOKENS, Reason, SemanticKvPlan, Span


# ------------------------------------------------------------------------------------------------ config
def test_defaults_are_prefix_mode():
    adapter, core = parse_config(environ={})
    assert adapter.mode == "prefix" and adapter.materializes
    assert core.discovery_only is False


def test_env_and_json_option_combine_json_wins():
    env = {"SEMBLEND_MIN_SIMILARITY": "0.7", "SEMBLEND_CHUNK_SIZE": "32",
           CONFIG_ENV: json.dumps({"mode": "discovery_only", "chunk_size": 64, "host_tier_bytes": "1024"})}
    adapter, core = parse_config(environ=env)
    assert adapter.mode == "discovery_only" and adapter.host_tier_bytes == 1024
    assert core.min_similarity == 0.7 and core.chunk_size == 64 and core.discovery_only is True


def test_json_option_from_file(tmp_path):
    path = tmp_path / "semblend.json"
    path.write_text(json.dumps({"register_donors": False, "min_donor_tokens": 8}))
    adapter, _ = parse_config(environ={CONFIG_ENV: f"@{path}"})
    assert adapter.register_donors is False and adapter.min_donor_tokens == 8


@pytest.mark.parametrize("env, fragment", [
    ({CONFIG_ENV: '{"mood": "prefix"}'}, "mood"),                       # unknown JSON key
    ({"SEMBLEND_MIN_SIMILARTY": "0.7"}, "SEMBLEND_MIN_SIMILARTY"),     # unknown variable
    ({CONFIG_ENV: '{"mode": "blend"}'}, "allowed: discovery_only, prefix"),
    ({CONFIG_ENV: '{"host_tier_bytes": -1}'}, "host_tier_bytes"),
    ({CONFIG_ENV: "[1, 2]"}, "JSON object"),
    ({CONFIG_ENV: "{not json"}, "not valid JSON"),
    ({CONFIG_ENV: "@/nonexistent/semblend.json"}, "cannot read"),
    ({CONFIG_ENV: '{"mode": "prefix", "discovery_only": true}'}, "set only mode"),
])
def test_bad_config_fails_naming_what_is_allowed(env, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(environ=env)
    assert fragment in str(info.value)


def test_unknown_key_message_lists_adapter_keys():
    with pytest.raises(ConfigError) as info:
        parse_config(environ={CONFIG_ENV: '{"mood": 1}'})
    assert "host_tier_bytes" in str(info.value) and "min_similarity" in str(info.value)


# ------------------------------------------------------------------------------------------------ namespace
def _model_config(**kw):
    hf = SimpleNamespace(model_type="llama", rope_theta=100000.0, head_dim=64, max_position_embeddings=8192,
                         num_attention_heads=9)
    base = dict(model_path="/models/smollm2", revision=None, dtype="torch.bfloat16", quantization=None, hf_config=hf)
    base.update(kw)
    return SimpleNamespace(**base)


def test_namespace_reads_model_config_and_differs_on_every_field():
    args = SimpleNamespace(model_path="/models/smollm2", kv_cache_dtype="auto", tokenizer_path=None, pp_size=1)
    ns = base_namespace(args, _model_config(), kv_dtype="torch.bfloat16", tp_size=1, page_size=1)
    assert ns.model == "/models/smollm2" and ns.kv_dtype == "bfloat16/bfloat16" and ns.block_size == 1
    assert '"rope_theta":100000' in ns.rope
    others = [
        base_namespace(args, _model_config(model_path="/models/other"), kv_dtype="torch.bfloat16"),
        base_namespace(args, _model_config(), kv_dtype="torch.float16"),
        base_namespace(args, _model_config(quantization="fp8"), kv_dtype="torch.bfloat16"),
        base_namespace(args, _model_config(), kv_dtype="torch.bfloat16", tp_size=2),
        base_namespace(args, _model_config(), kv_dtype="torch.bfloat16", page_size=16),
        base_namespace(args, _model_config(hf_config=SimpleNamespace(model_type="llama", rope_theta=1e4,
                                                                     num_attention_heads=9)),
                       kv_dtype="torch.bfloat16"),
    ]
    assert len({ns.key, *(o.key for o in others)}) == 1 + len(others)


def test_request_namespace_separates_lora_extra_key_and_salt():
    base = CacheNamespace(model="m")
    plain = request_namespace(base, SimpleNamespace(lora_id=None, extra_key=None, cache_salt=None))
    assert plain == base
    keys = {request_namespace(base, SimpleNamespace(lora_id=lora, extra_key=extra, cache_salt=salt)).key
            for lora, extra, salt in [(None, None, None), ("a", "a", None), ("b", "b", None), (None, "x", None),
                                      (None, None, "s"), (None, "x", "s")]}
    assert len(keys) == 6


# ------------------------------------------------------------------------------------------------ prefix load
def _plan(spans, target_len=200, strict=True):
    return SemanticKvPlan(True, Reason.HIT, target_len, CacheNamespace(), donor_id="d", donor_len=300,
                          spans=tuple(spans), strict_prefix_boundary=strict)


def test_context_exact_prefix_beyond_exact_match():
    load = prefix_load(_plan([Span(0, 0, 150)]), exact=40, limit=199, page_size=1, rope_exact=False)
    assert not isinstance(load, str)
    assert (load.exact, load.num_tokens, load.context_exact, load.shifted) == (40, 110, True, False)
    assert np.array_equal(load.donor_positions, np.arange(40, 150))
    assert load.donor_tokens_needed == 150


def test_shifted_prefix_needs_exact_rope():
    plan = _plan([Span(30, 0, 120)])
    assert prefix_load(plan, 0, 199, 1, rope_exact=False, load_moved_prefix=True) == \
        DeclineReason.ROPE_NOT_SHIFT_INVARIANT
    load = prefix_load(plan, 0, 199, 1, rope_exact=True, load_moved_prefix=True)
    assert not isinstance(load, str)
    assert np.array_equal(load.donor_positions, np.arange(30, 150)) and set(load.deltas.tolist()) == {-30}
    assert not load.context_exact and load.donor_tokens_needed == 150


def test_a_moved_first_block_is_declined_by_default_unless_sglang_holds_it():
    """Moved KV in the prompt's first tokens (the attention sinks) makes answers diverge on real weights, so by
    default such a load is declined before anything is allocated; once SGLang's own exact match covers the first
    SINK_TOKENS, the rest may be served moved."""
    plan = _plan([Span(30, 0, 120)])
    assert prefix_load(plan, 0, 199, 1, rope_exact=True) == DeclineReason.MOVED_FIRST_BLOCK
    assert prefix_load(plan, SINK_TOKENS - 1, 199, 1, rope_exact=True) == DeclineReason.MOVED_FIRST_BLOCK
    load = prefix_load(plan, SINK_TOKENS, 199, 1, rope_exact=True)
    assert not isinstance(load, str) and load.exact == SINK_TOKENS and set(load.deltas.tolist()) == {-30}


def test_a_multi_donor_prefix_reads_only_the_first_spans_donor():
    """The prefix may start with a span of a donor other than the plan's main one: the load names that donor and
    stops where the donor changes (reading it from the main donor would serve another prompt's KV)."""
    plan = SemanticKvPlan(True, Reason.HIT, 200, CacheNamespace(), donor_id="main", donor_len=300,
                          spans=(Span(0, 0, 40, donor_id="other"), Span(40, 40, 100, donor_id="main")),
                          strict_prefix_boundary=False)
    load = prefix_load(plan, 0, 199, 1, rope_exact=True)
    assert not isinstance(load, str)
    assert load.donor_id == "other" and load.num_tokens == 40 and load.context_exact


def test_prefix_across_seams_when_not_strict_has_per_span_deltas():
    plan = _plan([Span(0, 0, 20), Span(50, 20, 80)], strict=False)
    load = prefix_load(plan, 10, 199, 1, rope_exact=True)
    assert not isinstance(load, str)
    assert load.num_tokens == 90
    assert np.array_equal(load.deltas, np.r_[np.zeros(10, np.int64), np.full(80, -30)])
    assert np.array_equal(load.donor_positions, np.r_[np.arange(10, 20), np.arange(50, 130)])
    strict = prefix_load(_plan([Span(0, 0, 20), Span(50, 20, 80)]), 10, 199, 1, rope_exact=True)
    assert not isinstance(strict, str) and strict.num_tokens == 10  # stops at the seam


@pytest.mark.parametrize("spans, exact, limit, page, reason", [
    ([Span(0, 5, 100)], 0, 199, 1, DeclineReason.NO_REUSABLE_PREFIX),       # does not start at token 0
    ([Span(0, 0, 100)], 100, 199, 1, DeclineReason.ENGINE_PREFIX_COVERS),   # SGLang's match covers it
    ([Span(0, 0, 100)], 96, 199, 16, DeclineReason.ENGINE_PREFIX_COVERS),   # page-floored to 96
    ([Span(0, 0, 10)], 0, 199, 16, DeclineReason.NO_REUSABLE_PREFIX),       # less than one page
])
def test_declines(spans, exact, limit, page, reason):
    assert prefix_load(_plan(spans), exact, limit, page, rope_exact=True) == reason


def test_limit_and_page_alignment():
    load = prefix_load(_plan([Span(0, 0, 200)], target_len=201), 16, 150, 16, rope_exact=True)
    assert not isinstance(load, str) and (load.exact, load.num_tokens) == (16, 128)


def test_miss_passes_its_reason():
    miss = SemanticKvPlan(False, Reason.NO_CANDIDATE, 100, CacheNamespace())
    assert prefix_load(miss, 0, 99, 1, rope_exact=True) == Reason.NO_CANDIDATE


# ------------------------------------------------------------------------------------------------ launcher
def test_launcher_adds_backend_and_takes_its_option():
    option, rest = split_args(["--model-path", "m", "--semblend-config", '{"mode": "prefix"}', "--port", "1"])
    assert option == '{"mode": "prefix"}'
    assert rest == ["--model-path", "m", "--port", "1", "--radix-cache-backend", "semblend"]
    option, rest = split_args(["--semblend-config=@x.json", "--radix-cache-backend=other"])
    assert option == "@x.json" and rest == ["--radix-cache-backend=other"]
    with pytest.raises(SystemExit):
        split_args(["--semblend-config"])


# ------------------------------------------------------------------------------------------------ factory checks
def test_rope_of_accepts_plain_llama_and_refuses_length_dependent_rope():
    from semblend.integration.sglang.factory import rope_of

    llama = {"model_type": "llama", "rope_theta": 100000.0, "head_dim": 64, "num_attention_heads": 9,
             "hidden_size": 576, "num_hidden_layers": 30}
    spec, reason = rope_of(llama)
    assert spec is not None and spec.exact and reason == ""
    dynamic = dict(llama, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    spec, reason = rope_of(dynamic)
    assert spec is None and reason


def _ctx(**kw):
    base = dict(disable_radix_cache=False, is_hybrid_swa=False, is_hybrid_ssm=False, is_dsa=False,
                enable_hierarchical_cache=False, params=SimpleNamespace(is_eagle=False))
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("kw, fragment", [
    ({}, None),
    ({"disable_radix_cache": True}, "--disable-radix-cache"),
    ({"is_hybrid_swa": True}, "hybrid"),
    ({"is_hybrid_ssm": True}, "hybrid"),
    ({"enable_hierarchical_cache": True}, "hierarchical"),
    ({"params": SimpleNamespace(is_eagle=True)}, "EAGLE"),
])
def test_factory_refuses_features_it_cannot_serve(kw, fragment):
    from semblend.integration.sglang.factory import _refuse

    reason = _refuse(_ctx(**kw))
    assert (reason is None) if fragment is None else (fragment in reason)


def test_package_import_does_not_import_sglang_or_torch():
    import subprocess
    import sys

    code = ("import sys\nfor m in ('sglang', 'torch', 'triton'): sys.modules[m] = None\n"
            "import semblend.integration.sglang as s, semblend.integration.sglang.factory, "
            "semblend.integration.sglang.launch\nassert s.BACKEND_NAME == 'semblend'\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_outcome_counters_reach_prometheus_with_enable_metrics():
    prom = pytest.importorskip("prometheus_client")
    from semblend.integration.sglang.factory import _exporter
    from semblend_core import SemBlendConfig, SemBlendPipeline

    pipeline = SemBlendPipeline(SemBlendConfig())
    assert _exporter(pipeline, SimpleNamespace(enable_metrics=False)) is None
    exporter = _exporter(pipeline, SimpleNamespace(enable_metrics=True))
    assert exporter is _exporter(pipeline, SimpleNamespace(enable_metrics=True))  # one per pipeline and process
    plan = SemanticKvPlan(True, Reason.HIT, 100, CacheNamespace())
    pipeline.record_outcome(plan, "materialized", loaded_tokens=64, reason="pool_prefix")
    registry = prom.REGISTRY
    assert registry.get_sample_value("semblend_requests_total",
                                     {"outcome": "materialized", "reason": "pool_prefix"}) == 1.0
    assert registry.get_sample_value("semblend_loaded_tokens_total") == 64.0
