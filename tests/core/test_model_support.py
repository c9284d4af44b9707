"""The model-family allowlist and the self-check comparison (``semblend_core.model_support``): pure, no torch.

Configs are ``config.json``-style dicts, as an adapter without transformers would read them; the transformers
engine's tests (tests/integration/transformers/test_hf_model_support.py) run the same checks on real modules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from semblend_core.model_support import (
    SUPPORTED_MODEL_TYPES,
    check_model_config,
    compare_self_check,
    self_check_tolerance,
)


def config(model_type, **extra):
    base = {"model_type": model_type, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 4, "rope_theta": 10000.0, "max_position_embeddings": 4096}
    base.update(extra)
    return base


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_allowed_families_pass(model_type):
    support = check_model_config(config(model_type))
    assert support.supported and support.reason == "" and support.rope_spec.exact
    assert support.model_type == model_type


@pytest.mark.parametrize("model_type, extra", [
    ("granite", {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0}),
    ("olmo", {"clip_qkv": 8.0}),
    ("stablelm", {"partial_rotary_factor": 0.25}),
    ("mixtral", {"num_local_experts": 8}),
    ("qwen2_moe", {"num_experts": 60}),
    ("gemma2", {"final_logit_softcapping": 30.0}),
    ("cohere", {"logit_scale": 0.0625}),
    ("", {}),
])
def test_other_families_are_declined_by_name(model_type, extra):
    support = check_model_config(config(model_type, **extra))
    assert not support.supported
    assert support.reason == f"unsupported_model_type:{model_type or 'unknown'}"


@pytest.mark.parametrize("knob, value", [
    ("embedding_multiplier", 12.0), ("residual_multiplier", 0.22), ("logits_scaling", 8.0),
    ("attention_multiplier", 0.015625), ("clip_qkv", 8.0), ("num_local_experts", 8), ("num_experts", 4),
    ("qk_layernorm", True), ("use_parallel_residual", True), ("final_logit_softcapping", 30.0),
    ("logits_scaling", float("nan")), ("logits_scaling", True),
])
def test_foreign_knobs_decline_even_under_an_allowed_type(knob, value):
    support = check_model_config(config("llama", **{knob: value}))
    assert not support.supported and support.reason.startswith(f"unsupported_config:{knob}="), support.reason


@pytest.mark.parametrize("knob, value", [("logits_scaling", 1.0), ("embedding_multiplier", 1), ("clip_qkv", None),
                                         ("num_experts", 0), ("qk_layernorm", False)])
def test_neutral_knob_values_pass(knob, value):
    assert check_model_config(config("llama", **{knob: value})).supported


@pytest.mark.parametrize("extra, reason", [
    ({"sliding_window": 4096}, "sliding_window_layers"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_not_shift_invariant"),
    ({"kv_lora_rank": 512}, "mla_latent_kv"),
])
def test_layout_and_rope_declines(extra, reason):
    model_type = "mistral" if "sliding_window" in extra else "llama"
    support = check_model_config(config(model_type, **extra))
    assert not support.supported and support.reason.startswith(reason), support.reason


def test_multimodal_wrapper_needs_both_types_allowed():
    assert not check_model_config({"model_type": "llava", "text_config": config("llama")}).supported
    assert check_model_config({"model_type": "llama", "text_config": config("llama")}).supported


def test_unreadable_config_declines_without_raising():
    support = check_model_config({"model_type": "llama"})  # no head geometry
    assert not support.supported and support.reason.startswith("rope_config_unreadable:")


def test_self_check_tolerance_follows_the_dtype():
    assert self_check_tolerance("float32") < self_check_tolerance("float16") < self_check_tolerance("bfloat16")
    assert self_check_tolerance("torch.float32") == self_check_tolerance("float32")


def test_compare_self_check():
    ref = np.linspace(-3, 3, 100)
    assert compare_self_check(ref, ref + 1e-7, "float32") == ("", pytest.approx(1e-7 * 10 / np.linalg.norm(ref)))
    reason, err = compare_self_check(ref, ref * 1.01, "float32")
    assert reason == "self_check_failed:logits" and err == pytest.approx(0.01)
    assert compare_self_check(ref, ref * 1.01, "bfloat16")[0] == ""  # within bf16 rounding
    assert compare_self_check(ref, ref[:-1], "float32")[0] == "self_check_failed:logits_shape"
    bad = ref.copy()
    bad[3] = np.nan
    reason, err = compare_self_check(ref, bad, "bfloat16", what="kv")
    assert reason == "self_check_failed:kv_not_finite" and math.isinf(err)
