"""Real weights through the adapter: SmolLM2-135M-Instruct's own KV, in TensorRT-LLM's pool layout.

TensorRT-LLM cannot run here, so transformers computes the KV (the model TensorRT-LLM would serve, same weights) and
the emulated forward of ``trtllm_standins.Executor`` writes it into a ``[num_blocks, 30, 2, 3 * 16 * 64]`` pool,
where TensorRT-LLM's attention would have written it. The checks compare what the adapter put into the pool with a
fresh computation of the *target* prompt:

* layer 0 is context-free (its K/V depend only on the token and its position), so a donor's layer-0 keys moved by
  the worker from the donor's positions to the target's must equal the target's own layer-0 keys: re-rotation in
  TensorRT-LLM's layout, checked against the model, at the shift the planner found;
* a context-exact prefix, credited by the scheduler and loaded by the worker, must equal the target's own prefill at
  every layer.

Marked slow: the first run converts the GGUF (~50 s on two cores, cached afterwards).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("aclsum")

import trtllm_standins as S

from semblend import assets
from semblend.integration.vllm._metadata import LoadSpec, StepPlan
from semblend_core import SemBlendConfig, SemBlendPipeline

pytestmark = pytest.mark.slow
T = 16


@pytest.fixture(scope="module")
def paper_text():
    return assets.load_aclsum("test", n=1)[0].text(max_words=120)


def kv_of(model):
    """``tokens -> [num_layers, 2, n, num_kv_heads, head_dim]``: the model's post-RoPE KV cache for a prompt."""
    cache: dict[tuple, torch.Tensor] = {}

    def fn(tokens):
        key = tuple(int(t) for t in tokens)
        if key not in cache:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([key]), use_cache=True)
            pkv = out.past_key_values
            layers = [(la.keys, la.values) for la in pkv.layers] if hasattr(pkv, "layers") else \
                list(zip(pkv.key_cache, pkv.value_cache))
            cache[key] = torch.stack([torch.stack([k[0].transpose(0, 1), v[0].transpose(0, 1)])
                                      for k, v in layers]).float()
        return cache[key]

    return fn


def test_shifted_layer0_kv_written_by_the_worker_equals_a_fresh_computation(monkeypatch, smollm2, paper_text):
    model, tok = smollm2
    donor = assets.paper_prompt(tok, paper_text, assets.INSTRUCTION_PHRASINGS[0], "instruction_first")
    target = assets.paper_prompt(tok, paper_text, assets.INSTRUCTION_PHRASINGS[1], "instruction_first")
    pipe = SemBlendPipeline(SemBlendConfig())
    pipe.register_donor("d", donor)
    plan = pipe.plan(target)
    assert plan.is_hit, plan.reason
    span = max(plan.spans, key=lambda s: s.length)
    assert span.delta != 0, "the paper must move between the two prompts"

    kv = kv_of(model)
    ex = S.Executor(monkeypatch, model.config, kv, num_blocks=64, tokens_per_block=T)
    g = ex.geom
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.block_order) == (30, 3, 64, "HND")
    ex.worker.side.store.put("ns", "d", kv(donor), donor)
    ids = tuple(range(40, 40 + (-(-(span.target_end) // T) - span.target_start // T)))
    before = ex.pool.clone()
    spec = LoadSpec("t", "ns", "d", span.donor_start, span.target_start, span.length, ids, T)
    ex.worker.bind_connector_meta(StepPlan(loads=(spec,)))
    ex.worker.start_load_kv(None)

    fresh = kv(target)[0, :, span.target_start: span.target_end]  # [2, n, H, D], target positions
    got_k, got_v = (S.read_tokens(ex.pool, g.block_order, ids, span.target_start, span.length, 0, which,
                                  g.num_kv_heads, T, g.head_dim) for which in (0, 1))
    raw_k = kv(donor)[0, 0, span.donor_start: span.donor_end]  # the donor's keys, not moved
    scale = fresh[0].abs().max().item()
    err = (got_k - fresh[0]).abs().max().item()
    assert err <= 1e-4 * scale, f"re-rotated layer-0 K differs from the model's by {err} (scale {scale})"
    assert (raw_k - fresh[0]).abs().max().item() > 100 * err  # the check can fail: unmoved keys are far off
    torch.testing.assert_close(got_v, fresh[1], rtol=0, atol=1e-5 * fresh[1].abs().max().item())
    untouched = torch.ones(ex.pool.shape[0], dtype=torch.bool)
    untouched[list(ids)] = False
    assert torch.equal(ex.pool[untouched], before[untouched])


def test_context_exact_prefix_credited_and_loaded_equals_the_targets_own_prefill(monkeypatch, smollm2, paper_text):
    model, tok = smollm2
    donor = assets.paper_prompt(tok, paper_text, assets.INSTRUCTION_PHRASINGS[0], "instruction_last")
    target = assets.paper_prompt(tok, paper_text, assets.INSTRUCTION_PHRASINGS[1], "instruction_last")
    kv = kv_of(model)
    ex = S.Executor(monkeypatch, model.config, kv, num_blocks=96, tokens_per_block=T)
    assert ex.run(S.LlmRequest(1, donor))[0] == 0
    req = S.LlmRequest(2, target)
    n, ids = ex.admit(req)
    shared = next(i for i, (a, b) in enumerate(zip(donor, target)) if a != b)
    assert n == shared - shared % T and n >= 8 * T, (n, shared)
    ex.step(req, ids, 0, n)
    ex.sched.request_finished(req, ids)
    fresh = kv(target)
    worst = 0.0
    for layer in range(ex.geom.num_layers):
        for which in range(2):
            got = ex.read(ids, 0, n, layer, which)
            want = fresh[layer, which, :n]
            worst = max(worst, (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6))
    assert worst <= 1e-4, f"loaded prefix differs from the target's prefill by {worst} (relative)"
    stats = ex.stats()
    assert stats["outcomes"]["materialized"] == 1 and stats["loaded_tokens"] == n
    # The same paper moved behind another instruction: only the context-exact part (the chat template's shared
    # system prefix) is loaded; the shifted paper is declined (rule 3: see _scheduler), never loaded.
    moved = assets.paper_prompt(tok, paper_text, assets.INSTRUCTION_PHRASINGS[2], "instruction_first")
    common = next(i for i, (a, b) in enumerate(zip(donor, moved)) if a != b)
    n_moved, ids_moved, meta = ex.run(S.LlmRequest(3, moved))
    assert n_moved == common - common % T
    assert all(ld.delta == 0 and ld.target_start + ld.num_tokens <= common for ld in meta.loads)
    if n_moved:
        torch.testing.assert_close(ex.read(ids_moved, 0, n_moved, 29, 0), kv(moved)[29, 0, :n_moved],
                                   rtol=1e-4, atol=1e-4)
    assert ex.sched.side.num_tracked_requests() == 0
