import threading
import time

import numpy as np
import pytest

from semblend_core import (
    CacheNamespace, InvalidTokensError, Outcome, Reason, SemBlendConfig, SemBlendPipeline,
)
from semblend_core.bathtub import ModelShape
from semblend_core.embedder import Embedder

RNG = np.random.default_rng(0)


def doc(seed, n=600):
    return np.random.default_rng(seed).integers(1000, 50000, n)


def instr(seed, n=12):
    return np.random.default_rng(10**6 + seed).integers(50000, 60000, n)


def pipe(**kw):
    return SemBlendPipeline(SemBlendConfig(**kw))


def test_instruction_variant_of_same_document_hits_with_exact_spans():
    p = pipe(min_prompt_tokens=8)
    donor = np.concatenate([instr(1), doc(1)])
    p.register_donor("req-1", donor)
    for other in range(2, 6):
        p.register_donor(f"req-{other}", np.concatenate([instr(1), doc(other)]))
    target = np.concatenate([instr(2, 20), doc(1)])
    plan = p.plan(target)
    assert plan.is_hit and plan.reason == Reason.HIT and plan.donor_id == "req-1"
    assert plan.reuse_ratio == pytest.approx(600 / 620)
    assert plan.similarity >= 0.9
    for s in plan.spans:
        assert np.array_equal(donor[s.donor_start:s.donor_end], target[s.target_start:s.target_end])
    assert plan.position_deltas == (8,)
    rec = plan.recompute_positions
    assert set(range(20)) <= set(rec.tolist())                    # uncovered instruction
    assert set(range(20, 24)) <= set(rec.tolist())                # seam tokens (seam_recompute_tokens=4)
    assert rec[-1] == len(target) - 1 and not rec.flags.writeable  # last token always fresh; read-only
    assert plan.seams == (20,)
    with pytest.raises(Exception):
        plan.is_hit = False  # frozen


def test_unrelated_prompt_is_cold_and_other_namespace_is_invisible():
    p = pipe(min_prompt_tokens=8)
    ns_a, ns_b = CacheNamespace(model="a"), CacheNamespace(model="b")
    p.register_donor("d", doc(1), namespace=ns_a)
    assert p.plan(doc(2)).reason == Reason.NO_CANDIDATE
    assert p.plan(doc(1), namespace=ns_b).reason == Reason.NO_CANDIDATE
    assert p.plan(doc(1), namespace=ns_a).is_hit
    assert p.stats()["outcomes"][Outcome.COLD] == 2


def test_exact_prefix_stays_authoritative():
    p = pipe(min_prompt_tokens=8)
    d = doc(1)
    p.register_donor("d", d)
    target = np.concatenate([d, instr(3, 40)])
    assert p.plan(target, engine_prefix_tokens=len(target) - 3).reason == Reason.EXACT_PREFIX_SUFFICIENT
    # The engine already has the donor's whole prefix: SemBlend adds nothing beyond it.
    assert p.plan(target, engine_prefix_tokens=len(d)).reason == Reason.NO_GAIN_OVER_EXACT_PREFIX
    assert p.plan(target, engine_prefix_tokens=0).is_hit
    assert p.stats()["outcomes"][Outcome.EXACT] == 2


def test_quality_gates_decline_with_reasons():
    p = pipe(min_prompt_tokens=8)
    p.register_donor("d", doc(1, 200))
    small_overlap = np.concatenate([doc(1, 200)[:100], doc(9, 400)])
    plan = p.plan(small_overlap)
    assert not plan.is_hit and plan.reason == Reason.BELOW_MIN_SIMILARITY or plan.reason == Reason.BELOW_MIN_REUSE_RATIO
    q = pipe(min_prompt_tokens=8, min_similarity=0.0)
    q.register_donor("d", doc(1, 200))
    plan = q.plan(small_overlap)
    assert plan.reason == Reason.BELOW_MIN_REUSE_RATIO and plan.donor_id == "d"
    assert q.stats()["outcomes"][Outcome.DECLINED] == 1


def test_exact_materialization_only_keeps_only_context_exact_prefix():
    d = doc(1)
    shared_prefix = np.concatenate([d, instr(5, 30)])
    shifted = np.concatenate([instr(6, 30), d])
    p = pipe(min_prompt_tokens=8, exact_materialization_only=True)
    p.register_donor("d", d)
    plan = p.plan(shared_prefix)
    assert plan.is_hit and all(s.context_exact for s in plan.spans) and plan.seams == ()
    assert p.plan(shifted).reason == Reason.NOT_CONTEXT_EXACT


def test_prefix_view_is_block_aligned_and_strict_boundary_stops_at_first_seam():
    a, b = doc(1, 300), doc(2, 300)
    donor = np.concatenate([a, instr(1, 50), b])
    target = np.concatenate([a, b, instr(2, 5)])
    for strict, expected in ((True, 288), (False, 592)):
        p = pipe(min_prompt_tokens=8, strict_prefix_boundary=strict)
        p.register_donor("d", donor)
        plan = p.plan(target)
        assert plan.is_hit and len(plan.spans) == 2
        assert plan.prefix_reusable_tokens(16) == expected
        assert plan.prefix_reusable_tokens(1) <= len(target) - 1
    assert p.plan(doc(3)).prefix_reusable_tokens(16) == 0


def test_discovery_only_records_evidence_not_reuse_and_adapter_reports_loads():
    p = pipe(min_prompt_tokens=8, discovery_only=True)
    p.register_donor("d", doc(1))
    plan = p.plan(np.concatenate([instr(1), doc(1)]))
    assert plan.is_hit
    stats = p.stats()
    assert stats["outcomes"][Outcome.DISCOVERY_ONLY] == 1 and stats["loaded_tokens"] == 0
    q = pipe(min_prompt_tokens=8)
    q.register_donor("d", doc(1))
    plan = q.plan(np.concatenate([instr(1), doc(1)]))
    assert q.stats()["outcomes"][Outcome.MATERIALIZED] == 0  # a plan alone is not reuse (rule 2)
    q.record_outcome(plan, Outcome.MATERIALIZED, loaded_tokens=512)
    q.record_outcome(plan, Outcome.MATERIALIZED, loaded_tokens=0)  # nothing actually loaded -> declined
    s = q.stats()
    assert s["outcomes"][Outcome.MATERIALIZED] == 1 and s["loaded_tokens"] == 512
    assert s["reasons"]["nothing_loaded"] == 1


def test_layer_policy_comes_from_model_shape():
    p = SemBlendPipeline(SemBlendConfig(min_prompt_tokens=8, recompute_budget=0.15), model_shape=ModelShape(30, "llama"))
    p.register_donor("d", doc(1))
    plan = p.plan(np.concatenate([instr(1), doc(1)]))
    assert len(plan.layer_recompute) == 30 and plan.layer_recompute[0] > plan.layer_recompute[15]


@pytest.mark.parametrize("tokens,reason", [
    ([], Reason.EMPTY_PROMPT),
    ([5], Reason.BELOW_MIN_PROMPT_TOKENS),
    ([1, 2, -3] * 20, Reason.INVALID_TOKENS),
    ([1, 2, 2**40] * 20, Reason.INVALID_TOKENS),
    ([1, 2, 10**30] * 20, Reason.INVALID_TOKENS),
    ([1.5, 2.0] * 40, Reason.INVALID_TOKENS),
])
def test_bad_prompts_are_declined_with_reason_never_raise(tokens, reason):
    p = pipe()
    plan = p.plan(tokens)
    assert not plan.is_hit and plan.reason == reason


def test_bad_donors_raise_clear_errors_and_lose_nothing():
    p = pipe(min_prompt_tokens=8)
    p.register_donor("good", doc(1))
    for bad in ([], [-1] * 40, [2**40] * 40, [[1, 2], [3, 4]]):
        with pytest.raises(InvalidTokensError):
            p.register_donor("bad", bad)
    with pytest.raises(InvalidTokensError):
        p.register_donor("", doc(2))
    assert p.plan(np.concatenate([instr(1), doc(1)])).donor_id == "good"


def test_million_token_prompt_is_planned_and_longer_is_declined():
    p = pipe(min_prompt_tokens=8)
    big = np.random.default_rng(3).integers(0, 50000, 1_000_000)
    p.register_donor("big-donor", big[200_000:400_000])
    t = time.perf_counter()
    plan = p.plan(big)
    assert time.perf_counter() - t < 10.0
    assert plan.reason == Reason.BELOW_MIN_REUSE_RATIO and plan.donor_id == "big-donor"  # found, but covers 20%
    over = p.plan(np.zeros((1 << 20) + 1, dtype=np.int64))
    assert over.reason == Reason.PROMPT_TOO_LONG


class _BrokenEmbedder(Embedder):
    def __init__(self, value):
        self.value = value

    @property
    def dim(self):
        return 8

    def embed(self, texts):
        return np.full((len(texts), 8), self.value, dtype=np.float32)


@pytest.mark.parametrize("value", [float("nan"), 0.0])
def test_nan_or_zero_embeddings_fall_back_to_token_discovery(value):
    p = SemBlendPipeline(SemBlendConfig(min_prompt_tokens=8), embedder=_BrokenEmbedder(value))
    p.register_donor("d", doc(1), text="some text")
    assert p.plan(np.concatenate([instr(1), doc(1)]), text="other text").donor_id == "d"
    assert p.plan(doc(2), text="unrelated").reason == Reason.NO_CANDIDATE


def test_internal_errors_become_misses(monkeypatch):
    p = pipe(min_prompt_tokens=8)
    p.register_donor("d", doc(1))

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr("semblend_core.pipeline.align", boom)
    plan = p.plan(np.concatenate([instr(1), doc(1)]))
    assert not plan.is_hit and plan.reason == Reason.INTERNAL_ERROR and "kaboom" in plan.detail("error")
    assert p.stats()["reasons"][Reason.INTERNAL_ERROR] == 1


def test_disabled_pipeline_never_hits():
    p = pipe(enabled=False, min_prompt_tokens=8)
    p.register_donor("d", doc(1))
    assert p.plan(doc(1)).reason == Reason.DISABLED


def test_register_and_plan_from_8_threads():
    p = pipe(min_prompt_tokens=8, max_donors=500)
    failures = []

    def worker(t):
        for i in range(25):
            d = doc(t * 100 + i, 300)
            p.register_donor(f"t{t}-{i}", d)
            plan = p.plan(np.concatenate([instr(t), d]))
            if not (plan.is_hit and plan.donor_id == f"t{t}-{i}"):
                failures.append((t, i, plan.reason, plan.donor_id))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures
    assert p.stats()["planned_hits"] == 200 and p.stats()["store"]["donors"] == 200


def test_remove_donor_and_list_input_validation():
    p = pipe(min_prompt_tokens=8)
    d = doc(1)
    p.register_donor("d", d.tolist())
    assert p.plan(np.concatenate([instr(1), d]).tolist()).donor_id == "d"
    assert p.remove_donor("d") and not p.remove_donor("d")
    assert p.plan(np.concatenate([instr(1), d]).tolist()).reason == Reason.NO_CANDIDATE
    assert p.plan([1, 2, 3.0] * 20).reason == Reason.INVALID_TOKENS
    assert p.plan((True, 2) * 20).reason != Reason.INTERNAL_ERROR
