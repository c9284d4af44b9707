"""SemBlend's prefix mode in real vLLM (CPU build) with real SmolLM2 weights, vLLM's own prefix caching off.

Each test keeps its prompts in its own cache namespace (``cache_salt``), so donors of one test never serve another;
"cold" is the same prompt under a salt nobody else uses (no donor, no exact hit).
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
    generate,
    make_llm,
    read_layer_kv,
    rel_err,
    scheduler_connector,
    shutdown,
    worker_connector,
)

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def llm():
    engine = make_llm(prefix_caching=False, num_blocks=32)
    yield engine
    shutdown(engine)


@pytest.fixture()
def rec():
    from recording_connector import RecordingConnector

    RecordingConnector.reset()
    yield RecordingConnector
    RecordingConnector.reset()


def outcomes(llm) -> dict:
    return dict(scheduler_connector(llm).semblend_stats()["outcomes"])


def no_state_left(llm) -> None:
    side = scheduler_connector(llm).scheduler_side
    assert side.num_tracked_requests() == 0
    worker = worker_connector().worker_side
    assert not worker._leases._exit_callbacks  # every donor lease released


def test_the_layout_read_from_the_backend_matches_what_its_forward_writes(llm, tokenizer, rec):
    """The probed layout, applied to a cold prefill's blocks, returns exactly the K/V the model computed."""
    prompt = encode(tokenizer, DOCUMENT)[:96] + encode(tokenizer, QUESTIONS[0])
    generate(llm, [prompt], max_tokens=1, salt="layout-cold")
    (save,) = [s for s in rec.saves if s.num_tokens == len(prompt)]
    k, v = read_layer_kv(save.slots())
    fk, fv = fresh_layer0_kv(llm, prompt, range(len(prompt)))
    assert rel_err(k, fk) < 1e-5 and rel_err(v, fv) < 1e-5
    layout = worker_connector().worker_side.layout
    assert layout.source == "probe:CPUAttentionBackendImpl"
    # vLLM's CPU backend keeps K transposed inside a block: token-first reading (what the connector did before it
    # read the layout from the backend) addresses other elements.
    assert layout.strided() is None


def test_document_first_hit_is_credited_and_output_equals_cold(llm, tokenizer, rec):
    doc = encode(tokenizer, DOCUMENT)
    donor, target = doc + encode(tokenizer, QUESTIONS[0]), doc + encode(tokenizer, QUESTIONS[1])
    before = outcomes(llm)
    generate(llm, [donor], max_tokens=4, salt="docfirst")
    rec.loads.clear()
    hit = generate(llm, [target], max_tokens=12, salt="docfirst")
    (load,) = rec.loads
    assert load.delta == 0 and load.num_tokens >= 32 * (len(doc) // 32)  # the document's whole blocks
    cold = generate(llm, [target], max_tokens=12, salt="docfirst-cold")
    assert hit == cold
    after = outcomes(llm)
    assert after["materialized"] - before.get("materialized", 0) == 1
    stats = scheduler_connector(llm).semblend_stats()
    assert stats["loaded_tokens"] >= load.num_tokens
    no_state_left(llm)


def test_shifted_load_writes_fresh_layer0_kv_and_output_stays_fluent(llm, tokenizer, rec, record_property):
    """Donor had a preamble; the target starts with the document: its KV moves by -len(preamble) positions."""
    doc, pre = encode(tokenizer, DOCUMENT), encode(tokenizer, PREAMBLE)
    donor, target = pre + doc + encode(tokenizer, QUESTIONS[0]), doc + encode(tokenizer, QUESTIONS[1])
    generate(llm, [donor], max_tokens=4, salt="shift")
    rec.loads.clear()
    (hit,) = generate(llm, [target], max_tokens=24, salt="shift")
    (load,) = rec.loads
    assert load.delta == -len(pre) and load.target_start == 0 and load.num_tokens >= 32 * (len(doc) // 32)
    # Layer 0 does not depend on context: the re-rotated donor KV must be what a fresh prefill computes.
    k, v = read_layer_kv(load.slots())
    positions = range(load.target_start, load.target_start + load.num_tokens)
    fk, fv = fresh_layer0_kv(llm, target[load.target_start: load.target_start + load.num_tokens], positions)
    err_k, err_v = rel_err(k, fk), rel_err(v, fv)
    assert err_k < 1e-4 and err_v < 1e-5, (err_k, err_v)
    (cold,) = generate(llm, [target], max_tokens=24, salt="shift-cold")
    agree = next((i for i, (a, b) in enumerate(zip(hit, cold)) if a != b), len(cold))
    # Fluency: the hit's continuation scored by the cold model (mean log-prob per token).
    from vllm import SamplingParams

    scored = llm.generate([{"prompt_token_ids": target + hit, "cache_salt": "shift-score"}],
                          SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    lps = [next(iter(d.values())).logprob for d in scored.prompt_logprobs[len(target):]]
    mean_lp = sum(lps) / len(lps)
    report = {"layer0_k_rel_err": err_k, "layer0_v_rel_err": err_v, "greedy_agreement_tokens": agree,
              "greedy_tokens": len(cold), "hit_mean_logprob_under_cold": mean_lp, "delta": load.delta,
              "loaded_tokens": load.num_tokens, "hit_text": tokenizer.decode(hit), "cold_text": tokenizer.decode(cold)}
    record_property("shifted_load", json.dumps(report))
    print("\nshifted load vs cold:", json.dumps(report))
    assert mean_lp > -2.5, report  # garbage continuations score far below -5
    no_state_left(llm)


def test_load_failure_recomputes_equals_cold_and_retires_the_donor(llm, tokenizer, rec):
    doc = encode(tokenizer, DOCUMENT)
    donor, target = doc + encode(tokenizer, QUESTIONS[0]), doc + encode(tokenizer, QUESTIONS[1])
    generate(llm, [donor], max_tokens=2, salt="fail")
    before = outcomes(llm)
    rec.fail_loads = True
    out = generate(llm, [target], max_tokens=12, salt="fail")
    rec.fail_loads = False
    assert len(rec.loads) == 1  # the load was attempted, and failed
    assert out == generate(llm, [target], max_tokens=12, salt="fail-cold")
    after = outcomes(llm)
    assert after["declined"] - before.get("declined", 0) == 1
    assert scheduler_connector(llm).semblend_stats()["reasons"].get("load_failed", 0) >= 1
    # The donor whose load failed is retired: the next matching request is never sent to it again.
    failed_donor = rec.loads[0].donor_id.removesuffix("#gone")
    rec.loads.clear()
    generate(llm, [doc + encode(tokenizer, " Summary:")], max_tokens=2, salt="fail")
    assert all(s.donor_id != failed_donor for s in rec.loads)
    no_state_left(llm)


def test_abort_after_the_load_leaves_no_state_and_later_output_equals_cold(llm, tokenizer, rec):
    from vllm import SamplingParams

    doc = encode(tokenizer, DOCUMENT)
    donor, target = doc + encode(tokenizer, QUESTIONS[0]), doc + encode(tokenizer, QUESTIONS[1])
    generate(llm, [donor], max_tokens=2, salt="abort")
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    engine.add_request("abort-me", {"prompt_token_ids": target, "cache_salt": "abort"}, params)
    for _ in range(3):  # admission (load + prefill) and a couple of decode steps
        engine.step()
    assert [s.req_id for s in rec.loads if "abort-me" in s.req_id]
    engine.abort_request(["abort-me"])
    while engine.has_unfinished_requests():
        engine.step()
    no_state_left(llm)
    assert generate(llm, [target], max_tokens=12, salt="abort") == generate(llm, [target], max_tokens=12,
                                                                             salt="abort-cold")
    no_state_left(llm)


def test_preempted_hit_outputs_equal_cold_and_records_one_outcome(llm, tokenizer, rec):
    """Three hits decoding together overflow the 32-block cache: vLLM preempts and later resumes one of them."""
    doc = encode(tokenizer, DOCUMENT)
    generate(llm, [doc + encode(tokenizer, QUESTIONS[0])], max_tokens=2, salt="preempt")
    targets = [doc + encode(tokenizer, q) for q in (QUESTIONS[1], " Summary:", " Key facts:")]
    before = outcomes(llm)
    hits = generate(llm, targets, max_tokens=120, salt="preempt")
    preempted = set(rec.preempted)
    assert preempted, "the cache was large enough: no request was preempted"
    after = outcomes(llm)
    assert sum(after.values()) - sum(before.values()) == len(targets)  # one outcome per request
    colds = [generate(llm, [t], max_tokens=120, salt="preempt-cold")[0] for t in targets]
    assert hits == colds
    no_state_left(llm)
