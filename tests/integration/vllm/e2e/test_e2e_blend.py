"""SemBlend's blend mode in real vLLM (CPU build) with real SmolLM2 weights: the blended prefill runs inside vLLM,
before the forward, with vLLM's own model modules (reached through SemBlend's model plugin), and vLLM computes the
rest of the prompt. vLLM's prefix caching is on (the production setting), so the tests also cover a blend on top
of vLLM's own exact hit; each test keeps its prompts in its own namespace (``cache_salt``), and "cold" is the same
prompt under a salt nobody else uses.

What is shown here, on real execution:

* the executor over :class:`~semblend.integration.vllm._model_view.VllmModelView` recomputing every position of a
  prompt writes the KV vLLM's own prefill wrote for it (the view is vLLM's math);
* an instruction-before-document prompt whose document a donor holds (the layout ``prefix`` mode cannot reuse at
  all) is credited > 90% of its tokens, and its greedy output agrees with cold at least as well as the
  transformers engine's blended prefill does at the same settings on the same weights;
* a blend whose span is the donor's exact prefix gives the no-connector output token for token;
* a blend on top of vLLM's own exact hit leaves those blocks alone and fills the rest;
* every worker decline (donor evicted between scheduling and loading, the model plugin absent, a model the view
  does not support) ends in vLLM's normal prefill: output equals cold.
"""

from __future__ import annotations

import json

import pytest
from conftest import (
    DOCUMENT,
    PREAMBLE,
    QUESTIONS,
    encode,
    fresh_layer0_kv,
    full_recompute_errors,
    generate,
    make_llm,
    read_layer_kv,
    rel_err,
    scheduler_connector,
    shutdown,
    worker_connector,
)

torch = pytest.importorskip("torch")

RATIO = 0.15  # recompute_ratio of this module's engine (and of the transformers engine it is compared with)
CHECK_LAYER = 1
# The new instruction before the document (18 tokens: the document then ends on a block boundary, where the
# scheduler's credit ends; see docs/vllm.md).
INSTRUCTION = "Read the report below, then answer the question that follows it in one short sentence.\n\n"
# A shared system prompt longer than a block: vLLM's own prefix cache holds its first block once a request used it.
SYSTEM = ("You are a careful assistant for a city newspaper. You answer questions about the reports you are given, "
          "using only the facts in the report, and you say so when a report does not contain the answer. Keep each "
          "answer to one sentence and quote numbers exactly as the report gives them.\n\n")
MAX_TOKENS = 16  # the quality comparison's continuation (HF decode on 2 CPU cores is the slow part)
SHORT = 8  # equal-to-cold checks of the decline paths (a wrong KV shows in the first tokens; CI time is short)


@pytest.fixture(scope="module")
def llm():
    engine = make_llm(prefix_caching=True, num_blocks=48,
                      extra={"mode": "blend", "recompute_ratio": RATIO, "check_layers": [CHECK_LAYER]})
    yield engine
    shutdown(engine)


@pytest.fixture()
def rec():
    from recording_connector import RecordingConnector

    RecordingConnector.reset()
    yield RecordingConnector
    RecordingConnector.reset()


def stats(llm) -> dict:
    return scheduler_connector(llm).semblend_stats()


def no_state_left(llm) -> None:
    assert scheduler_connector(llm).scheduler_side.num_tracked_requests() == 0
    assert not worker_connector().worker_side._leases._exit_callbacks  # every donor lease released


def agreement(a, b) -> int:
    """Leading tokens two greedy continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def prompt_slots(prompt_len: int, spec) -> list[int]:
    return spec.slots()[:prompt_len]


# ---------------------------------------------------------------------------------------------- the view
def test_executor_full_recompute_equals_vllm_prefill_kv(llm, tokenizer, rec):
    """Every position mandatory: the shared executor, run on vLLM's modules through the view, must write the K/V
    vLLM's own forward wrote for the same prompt (all 30 layers; fp32, so only summation order differs)."""
    prompt = encode(tokenizer, DOCUMENT)[:120] + encode(tokenizer, QUESTIONS[0])
    generate(llm, [prompt], max_tokens=1, salt="view")
    (save,) = [s for s in rec.saves if s.num_tokens == len(prompt)]
    errs = full_recompute_errors(llm, prompt, save.slots())
    assert len(errs) == 30
    # Layer 0 sees the same inputs; only the norm kernel may differ (the view calls _C.rms_norm where vLLM's CPU
    # build picks its native norm): rounding-level differences, no more.
    assert max(errs[0]) < 1e-6, errs[0]
    worst = max(max(e) for e in errs)
    assert worst < 1e-4, errs


def test_direct_kernels_are_chosen_only_where_they_reproduce_the_modules(llm):
    """The view calls vLLM's kernels directly (no module dispatch) only where they give the modules' output: on
    this engine the layer computed through the chosen kernels equals the layer computed through the modules, and
    a module whose forward the kernel does not reproduce (here: a post-attention norm scaled by 1.5) keeps the
    module call for that kind while the other kinds stay direct."""
    from semblend.integration.vllm._model_view import Kernels, choose_kernels

    view = worker_connector().worker_side.blend_view
    assert view is not None
    chosen = view.kernels
    assert chosen == choose_kernels(view)  # deterministic: what build_view chose at start-up
    assert chosen.rms_norm, chosen  # vLLM's CPU build has _C.rms_norm (its oneDNN-packed linears stay modules)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, view._layers[0].input_layernorm.weight.shape[0], generator=gen)
    attn_out = torch.randn(7, view.num_heads * view.head_dim, generator=gen)
    outputs = {}
    with torch.inference_mode():
        for kernels in (chosen, Kernels()):
            view.kernels = kernels
            outputs[kernels] = (*view.qkv(5, hidden), view.finish_layer(5, attn_out, hidden))
    view.kernels = chosen
    for got, want in zip(outputs[chosen], outputs[Kernels()]):
        assert rel_err(got, want) < 1e-6

    norm = view._layers[0].post_attention_layernorm
    module_forward = type(norm).forward

    def scaled(x, residual=None):
        return module_forward(norm, x) * 1.5

    try:
        norm.forward = scaled
        with torch.inference_mode():
            broken = choose_kernels(view)
        assert not broken.rms_norm and broken.linear == chosen.linear
    finally:
        del norm.forward
        view.kernels = chosen


# ---------------------------------------------------------------------------------------------- hits
def test_instruction_before_document_is_credited_and_agrees_with_cold_like_the_transformers_engine(
        llm, tokenizer, rec, smollm2, record_property):
    """The review's layout: the new instruction comes first, the document a donor holds after it (prefix mode
    reuses none of it). Blend credits the prompt up to the document's end; vLLM computes the question."""
    doc = encode(tokenizer, DOCUMENT)
    donor = encode(tokenizer, PREAMBLE) + doc + encode(tokenizer, QUESTIONS[0])
    target = encode(tokenizer, INSTRUCTION) + doc + encode(tokenizer, QUESTIONS[1])
    generate(llm, [donor], max_tokens=2, salt="instr")
    before = stats(llm)
    rec.blends.clear()
    (hit,) = generate(llm, [target], max_tokens=MAX_TOKENS, salt="instr")
    (spec,) = rec.blends
    after = stats(llm)
    credited = spec.num_tokens - spec.local_tokens  # what the scheduler credited and the worker filled
    reused = after["loaded_tokens"] - before.get("loaded_tokens", 0)  # the part of it that kept donor KV
    assert spec.local_tokens == 0
    assert credited > 0.9 * len(target), (credited, len(target))
    assert 0 < reused < credited  # reused = credited minus what the executor recomputed (seams, checked tokens)
    assert after["outcomes"].get("materialized", 0) - before["outcomes"].get("materialized", 0) == 1
    # Layer 0 is context-free: the blended rows (re-rotated donor KV and recomputed tokens alike) must be what a
    # fresh prefill computes at these positions.
    k, v = read_layer_kv(spec.slots())
    fk, fv = fresh_layer0_kv(llm, target[: spec.num_tokens], range(spec.num_tokens))
    assert rel_err(k, fk) < 1e-4 and rel_err(v, fv) < 1e-5
    (cold,) = generate(llm, [target], max_tokens=MAX_TOKENS, salt="instr-cold")

    # The transformers engine on the same weights and prompts, at the same settings (core config, check layer).
    from semblend.integration.transformers import EngineOptions, SemBlendEngine
    from semblend_core.plan import Outcome

    model, hf_tok = smollm2
    engine = SemBlendEngine(model, hf_tok, config=scheduler_connector(llm).core_config,
                            options=EngineOptions(check_layer=CHECK_LAYER))
    engine.prefill(donor)
    hf_hit = engine.generate(target, max_new_tokens=MAX_TOKENS)
    hf_cold = engine.generate(target, max_new_tokens=MAX_TOKENS, force_cold=True)
    assert hf_hit.outcome == Outcome.MATERIALIZED, hf_hit.reason
    ours, theirs = agreement(hit, cold), agreement(hf_hit.token_ids, hf_cold.token_ids)
    side = worker_connector().worker_side
    _, blend_stats, blend_times = side.recent_blends[-1]
    report = {"prompt_tokens": len(target), "credited_tokens": credited, "credited_fraction": credited / len(target),
              "reused_tokens": reused,
              "vllm_agreement": ours, "transformers_agreement": theirs, "max_tokens": MAX_TOKENS,
              "recompute_ratio": RATIO, "token_layers": blend_stats.token_layers,
              "executor_s": blend_times["executor_s"],
              "hit_text": tokenizer.decode(hit), "cold_text": tokenizer.decode(cold),
              "transformers_hit_text": hf_tok.decode(hf_hit.token_ids)}
    record_property("instruction_first_blend", json.dumps(report))
    print("\ninstruction-first blend vs cold:", json.dumps(report))
    assert ours >= min(theirs, len(cold)), report
    no_state_left(llm)


def test_exact_prefix_blend_equals_no_connector_output(llm, tokenizer, rec):
    """The donor's own prefix (context-exact: the same tokens from position 0): nothing is recomputed, the copied
    KV is bit-for-bit a cold prefill's, so the output is the no-connector output token for token."""
    doc = encode(tokenizer, DOCUMENT)
    donor, target = doc + encode(tokenizer, QUESTIONS[0]), doc + encode(tokenizer, QUESTIONS[1])
    generate(llm, [donor], max_tokens=2, salt="exact")
    llm.reset_prefix_cache()  # vLLM's own cache would serve the document itself (and then blend has no gain)
    rec.blends.clear()
    (hit,) = generate(llm, [target], max_tokens=16, salt="exact")
    (spec,) = rec.blends
    assert spec.local_tokens == 0 and spec.num_tokens >= 32 * (len(doc) // 32)
    assert all(s.context_exact for s in spec.plan.spans if s.target_start < spec.num_tokens)
    (cold,) = generate(llm, [target], max_tokens=16, salt="exact-cold")
    assert hit == cold
    no_state_left(llm)


def test_blend_on_top_of_vllms_own_exact_hit_keeps_those_blocks(llm, tokenizer, rec):
    """A shared system prompt vLLM's prefix cache holds, then the instruction, then the donor's document: the
    blend's fixed prefix is vLLM's hit (never rewritten), the rest is filled."""
    doc = encode(tokenizer, DOCUMENT)
    system = encode(tokenizer, SYSTEM)
    assert len(system) >= 32
    donor = system + doc + encode(tokenizer, QUESTIONS[0])
    target = system + encode(tokenizer, INSTRUCTION) + doc + encode(tokenizer, QUESTIONS[1])
    generate(llm, [donor], max_tokens=2, salt="local")
    rec.blends.clear()
    (hit,) = generate(llm, [target], max_tokens=12, salt="local")
    (spec,) = rec.blends
    assert spec.local_tokens == 32 * (len(system) // 32) > 0
    k, v = read_layer_kv(spec.slots())
    fk, fv = fresh_layer0_kv(llm, target[: spec.num_tokens], range(spec.num_tokens))
    assert rel_err(k, fk) < 1e-4 and rel_err(v, fv) < 1e-5
    (cold,) = generate(llm, [target], max_tokens=12, salt="local-cold")
    assert agreement(hit, cold) >= 4, (tokenizer.decode(hit), tokenizer.decode(cold))
    no_state_left(llm)


# ---------------------------------------------------------------------------------------------- declines
def _hit_pair(tokenizer):
    doc = encode(tokenizer, DOCUMENT)
    donor = encode(tokenizer, PREAMBLE) + doc + encode(tokenizer, QUESTIONS[0])
    target = encode(tokenizer, INSTRUCTION) + doc + encode(tokenizer, QUESTIONS[1])
    return donor, target


def test_donor_evicted_between_schedule_and_load_recomputes_equals_cold(llm, tokenizer, rec):
    donor, target = _hit_pair(tokenizer)
    generate(llm, [donor], max_tokens=2, salt="evict")
    before = stats(llm)
    rec.evict_before_blend = True
    (out,) = generate(llm, [target], max_tokens=SHORT, salt="evict")
    rec.evict_before_blend = False
    assert len(rec.blends) == 1  # the blend was scheduled, and its donor was gone when the worker ran it
    assert out == generate(llm, [target], max_tokens=SHORT, salt="evict-cold")[0]
    after = stats(llm)
    assert after["outcomes"].get("declined", 0) - before["outcomes"].get("declined", 0) == 1
    assert after["reasons"].get("load_failed", 0) > before["reasons"].get("load_failed", 0)
    no_state_left(llm)


def test_model_plugin_absent_fails_blend_mode_at_start_up(llm):
    """Without the plugin the worker could never reach the model: a blend-mode worker connector refuses to start
    and says how to enable it (the real constructor with this engine's real config)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from semblend.integration.vllm import _plugin
    from semblend.integration.vllm.connector_v1 import SemBlendConnectorV1
    from semblend_core import ConfigError

    worker = worker_connector()
    _plugin._registered = False
    try:
        with pytest.raises(ConfigError, match=r"semblend\.integration\.vllm\.register\(\)"):
            SemBlendConnectorV1(worker._vllm_config, KVConnectorRole.WORKER, worker._kv_cache_config)
    finally:
        _plugin._registered = True


def test_unsupported_model_structure_is_declined_with_a_reason(llm):
    """The structural check on the real model: a layer whose RoPE is not rotate-half (what e.g. GPT-J-style
    models use) is declined, naming the layer."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from semblend.integration.vllm import _plugin
    from semblend.integration.vllm._model_view import build_view

    (model,) = _plugin.live_models()
    attn = model.model.layers[3].self_attn
    original = attn.rotary_emb
    try:
        with set_current_vllm_config(worker_connector()._vllm_config):
            attn.rotary_emb = get_rope(original.head_size, max_position=original.max_position_embeddings,
                                       is_neox_style=False)
        view, reason = build_view(model)
        assert view is None and reason == "unsupported_layer_structure:layer3.rotary:not_neox_style"
    finally:
        attn.rotary_emb = original
    view, reason = build_view(model)
    assert view is not None and reason == ""


def test_worker_without_a_model_view_declines_every_blend(llm, tokenizer, rec):
    """A worker that cannot run the executor (plugin not active in its process, model not supported): the first
    hit it was sent fails on the worker (vLLM recomputes the credited blocks), the worker reports why, and the
    scheduler declines every later hit before crediting it. Output equals cold throughout."""
    side = worker_connector().worker_side
    sched = scheduler_connector(llm).scheduler_side
    view = side.blend_view
    donor, target = _hit_pair(tokenizer)
    generate(llm, [donor], max_tokens=2, salt="noview")
    (cold,) = generate(llm, [target], max_tokens=SHORT, salt="noview-cold")
    before = stats(llm)
    try:
        side.set_blend_view(None, "model_not_recorded: test")
        rec.blends.clear()
        (first,) = generate(llm, [target], max_tokens=SHORT, salt="noview")
        (second,) = generate(llm, [target], max_tokens=SHORT, salt="noview")
        assert first == cold and second == cold
        after = stats(llm)
        assert sched.blend_unavailable == "model_not_recorded"
        assert after["reasons"].get("model_not_recorded", 0) - before["reasons"].get("model_not_recorded", 0) >= 1
        assert after["outcomes"].get("materialized", 0) == before["outcomes"].get("materialized", 0)
    finally:
        side.set_blend_view(view, "")
        sched.blend_unavailable = ""
    no_state_left(llm)
