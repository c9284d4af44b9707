"""Which models the transformers engine serves from donor KV: the family allowlist plus the start-up self-check.

Tiny random-weight models of each family (CPU, seconds) stand in for real checkpoints: the loop's correctness
does not depend on the weights' values, and a family the loop does not implement fails on random weights too.
SmolLM2 (a real Llama checkpoint) runs the same self-check on real weights.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import VOCAB, ByteTokenizer

from semblend.integration.transformers import EngineOptions, SemBlendEngine
from semblend.integration.transformers import engine as engine_mod
from semblend.integration.transformers.blend import model_support
from semblend_core import SemBlendConfig
from semblend_core import model_support as ms

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
ALLOWED = {"llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {"head_dim": 16}}
DECLINED = {
    # Granite scales embeddings, residual branches and logits; the loop implements none of them.
    "granite": {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0,
                "attention_multiplier": 0.015625},
    "olmo": {"clip_qkv": 0.05},  # clamps q/k/v after the projections
    "stablelm": {},              # LayerNorm, partial rotary, optional parallel residual and qk-layernorm
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},  # sparse MoE MLP
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32},
}


def tiny(model_type, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**BASE, **extra})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def make_engine(model, **options):
    cfg = SemBlendConfig(min_prompt_tokens=16, chunk_size=16)
    return SemBlendEngine(model, ByteTokenizer(), cfg, EngineOptions(**options))


def rand_ids(n, seed):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_allowlist_and_class_stems_agree():
    assert set(ALLOWED) == set(ms.SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(ALLOWED))
def test_allowed_family_passes_the_self_check_and_serves_exact_hits(model_type):
    model = tiny(model_type, **ALLOWED[model_type])
    eng = make_engine(model, suffix_tokens=4)
    assert eng.supported, eng.unsupported_reason
    report = eng.self_check_report
    for key in ("exact_prefix_logits", "exact_prefix_suffix_kv", "recompute_path_logits", "recompute_path_suffix_kv"):
        assert 0.0 <= report[key] <= report["tolerance"], report
    ids = rand_ids(96, 1)
    first = eng.prefill(ids)
    second = eng.prefill(ids, register=False)
    assert first.outcome == "cold" and second.outcome == "materialized"
    torch.testing.assert_close(second.logits, first.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", sorted(DECLINED))
def test_other_families_are_declined_and_never_materialized(model_type):
    model = tiny(model_type, **DECLINED[model_type])
    ok, reason, _ = model_support(model)
    assert not ok and reason == f"unsupported_model_type:{model_type}"
    eng = make_engine(model)
    assert not eng.supported and eng.unsupported_reason == reason
    ids = rand_ids(64, 2)
    runs = [eng.prefill(ids), eng.prefill(ids)]
    assert [r.outcome for r in runs] == ["declined", "declined"] and runs[1].reason == reason
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].float()
    torch.testing.assert_close(runs[1].logits, ref, atol=1e-5, rtol=0)
    assert len(eng.kv_store) == 0  # an unsupported model never donates


def test_self_check_catches_a_family_wrongly_allowlisted(monkeypatch):
    # Pretend Granite were allowlisted: its modules have the Llama structure, so only the self-check on the real
    # forward can tell that the loop ignores its multipliers.
    monkeypatch.setitem(ms.SUPPORTED_MODEL_TYPES, "granite", "Granite")
    monkeypatch.setattr(ms, "FOREIGN_KNOBS", {})
    model = tiny("granite", **DECLINED["granite"])
    assert model_support(model)[0]
    eng = make_engine(model)
    assert not eng.supported and eng.unsupported_reason == "self_check_failed:exact_prefix_logits"
    assert eng.self_check_report["exact_prefix_logits"] > 100 * eng.self_check_report["tolerance"]
    ids = rand_ids(64, 3)
    eng.prefill(ids)
    assert eng.prefill(ids, register=False).outcome == "declined"


def test_self_check_catches_a_broken_loop(monkeypatch):
    real = engine_mod.run_blended_prefill

    def off_by_a_little(*args, **kwargs):  # a loop bug of the size the review measured for OLMo (8.5e-4)
        stats, logits = real(*args, **kwargs)
        return stats, logits + 1e-3 * logits.abs().max()

    monkeypatch.setattr(engine_mod, "run_blended_prefill", off_by_a_little)
    eng = make_engine(tiny("llama"))
    assert not eng.supported and eng.unsupported_reason.startswith("self_check_failed:")
    # and one that crashes is a decline too, not a failed start-up
    monkeypatch.setattr(engine_mod, "run_blended_prefill", lambda *a, **k: 1 / 0)
    eng = make_engine(tiny("llama"))
    assert not eng.supported and eng.unsupported_reason == "self_check_failed:ZeroDivisionError"


def test_subclass_with_extra_math_is_declined():
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):  # e.g. a custom model registered under model_type "llama"
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    base = tiny("llama")
    model = ScaledLlama(base.config).eval()
    ok, reason, _ = model_support(model)
    assert not ok and reason == "unsupported_layer_structure:model_class:ScaledLlama"


def test_self_check_runs_once_per_model(monkeypatch):
    model = tiny("llama")
    calls = []
    real = SemBlendEngine._self_check
    monkeypatch.setattr(SemBlendEngine, "_self_check", lambda self: calls.append(1) or real(self))
    make_engine(model)
    make_engine(model)
    assert len(calls) == 1
    make_engine(model, check_layer=2)  # another loop path: checked again
    assert len(calls) == 2
    make_engine(model, self_check=False)
    assert len(calls) == 2


@pytest.mark.slow
def test_smollm2_passes_the_self_check_on_real_weights(smollm2):
    model, tok = smollm2
    eng = SemBlendEngine(model, tok, SemBlendConfig())
    assert eng.supported, (eng.unsupported_reason, dict(eng.self_check_report))
    assert eng.self_check_report["exact_prefix_logits"] < eng.self_check_report["tolerance"]
