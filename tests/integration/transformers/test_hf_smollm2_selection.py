"""Selection strategies on a real model: SmolLM2-135M-Instruct (offline GGUF) on one ACLSum paper, moved by a
new instruction. Full budget equals cold for every strategy; the probe's cost is accounted. Marked slow."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("aclsum")

from semblend import assets
from semblend.integration.transformers import EngineOptions, SemBlendEngine
from semblend_core import SemBlendConfig
from semblend_core.recompute import SelectionStrategy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def case(smollm2):
    model, tok = smollm2
    paper = assets.load_aclsum("test", n=1)[0]
    text = paper.text(max_words=200)
    donor, target = (assets.paper_prompt(tok, text, ins) for ins in assets.INSTRUCTION_PHRASINGS[:2])
    eng = SemBlendEngine(model, tok, SemBlendConfig())
    k, v = eng.donor_kv(eng.prefill(donor))
    return model, tok, eng, target, k, v, eng.cold_prefill(target)


@pytest.mark.parametrize("selection", [SelectionStrategy("query"), SelectionStrategy("position", probe_layers=0)])
def test_full_budget_equals_cold_on_smollm2(case, selection):
    model, tok, planner, target, k, v, cold = case
    plan = planner.pipeline.plan(target, namespace=planner.namespace)
    assert plan.is_hit and any(s.delta for s in plan.spans)
    import dataclasses

    plan = dataclasses.replace(plan, recompute_budget=1.0)
    eng = SemBlendEngine(model, tok, SemBlendConfig(), EngineOptions(selection=selection))
    res = eng.prefill_with_plan(target, plan, k, v)
    torch.testing.assert_close(res.logits, cold.logits, atol=2e-3, rtol=0)
    assert int(res.logits.argmax()) == int(cold.logits.argmax())


def test_small_budget_costs_what_it_says(case):
    model, tok, planner, target, k, v, _ = case
    import dataclasses

    plan = planner.pipeline.plan(target, namespace=planner.namespace)
    costs = {}
    for budget in (0.0, 0.02, 0.05):
        eng = SemBlendEngine(model, tok, SemBlendConfig(), EngineOptions(selection=SelectionStrategy("query")))
        res = eng.prefill_with_plan(target, dataclasses.replace(plan, recompute_budget=budget), k, v)
        costs[budget] = res.recomputed_fraction
        if budget:
            assert res.stats.probe_token_layers > 0
    base = costs[0.0]
    for budget in (0.02, 0.05):
        # The budgeted rows plus the 2-layer probe of the mandatory rows, and nothing else.
        assert base < costs[budget] <= base + budget + 2 * base / 30 + 1e-9, costs
