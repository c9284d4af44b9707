"""The scheduler side's bookkeeping without an engine: multi-worker confirmation, retirement, idempotence.

vLLM's real scheduler drives this class in test_vllm_scheduler.py; here requests are plain objects with the
attributes the scheduler side reads (a stand-in, so the TP>1 paths run without several workers).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from semblend.integration.vllm._config import VllmAdapterConfig
from semblend.integration.vllm._metadata import KvSignature, SavedDonor, WorkerReport
from semblend.integration.vllm._scheduler import DeclineReason, SchedulerSide
from semblend_core import CacheNamespace, SemBlendConfig, SemBlendPipeline

BS = 16
SIG = KvSignature("bfloat16", 4, 128)
NS = CacheNamespace(model="m", block_size=BS)


def toks(seed, n):
    return [int(x) for x in np.random.default_rng(seed).integers(10, 50_000, n)]


A, D, Q = toks(1, 64), toks(2, 192), toks(3, 64)


def request(req_id, tokens):
    return SimpleNamespace(request_id=req_id, prompt_token_ids=list(tokens), num_prompt_tokens=len(tokens),
                           lora_request=None, cache_salt=None, block_hashes=[b"h%d" % i for i in range(99)],
                           num_computed_tokens=0)


def side(num_workers=1, rope_exact=True, mode="prefix", load_moved_prefix=True):
    # Most cases here move a donor's document to the target's start (the bookkeeping under test is the same for
    # any load), so they opt in to moved prefixes; the default is tested on its own below.
    pipe = SemBlendPipeline(SemBlendConfig(discovery_only=(mode == "discovery_only")))
    s = SchedulerSide(pipe, VllmAdapterConfig(mode=mode, min_donor_tokens=32, load_moved_prefix=load_moved_prefix),
                      NS, block_size=BS,
                      rope_exact=rope_exact, kv_signature=SIG, num_workers=num_workers)
    return s


def capture(s, req_id, tokens, votes, signature=SIG):
    """Run a donor through admission and capture, then ``votes`` workers confirm it."""
    req = request(req_id, tokens)
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, list(range(100, 100 + len(tokens) // BS)), 0)
    out = SimpleNamespace(preempted_req_ids=set(), num_scheduled_tokens={req_id: len(tokens)},
                          scheduled_new_reqs=[SimpleNamespace(req_id=req_id, block_ids=(list(range(100, 116)),),
                                                              num_computed_tokens=0)],
                          scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[],
                                                                resumed_req_ids=set()))
    plan = s.build_connector_meta(out)
    (save,) = plan.saves
    for _ in range(votes):
        s.update_connector_output(WorkerReport(saved=(SavedDonor(NS.key, save.donor_id, len(tokens), signature, 0),)))
    s.request_finished(req)


def test_donor_is_plannable_only_after_every_worker_confirmed_its_capture():
    s = side(num_workers=2)
    capture(s, "donor", A + D, votes=1)
    assert s.resident_donors() == 0 and len(s.pipeline.store) == 0
    assert s.get_num_new_matched_tokens(request("t1", D + Q), 0) == (0, False)
    s.update_connector_output(WorkerReport(saved=(SavedDonor(NS.key, "donor", 256, SIG, 0),)))
    assert s.resident_donors() == 1 and len(s.pipeline.store) == 1
    assert s.get_num_new_matched_tokens(request("t2", D + Q), 0) == (192, False)


def test_one_failed_worker_fails_the_load_and_nothing_is_materialized():
    s = side(num_workers=2)
    capture(s, "donor", A + D, votes=2)
    req = request("t", D + Q)
    assert s.get_num_new_matched_tokens(req, 0) == (192, False)
    s.update_state_after_alloc(req, list(range(20)), 192)
    plan = s.build_connector_meta(SimpleNamespace(preempted_req_ids=set(), num_scheduled_tokens={},
                                                  scheduled_new_reqs=[], scheduled_cached_reqs=None))
    assert [ld.req_id for ld in plan.loads] == ["t"]
    s.update_connector_output(WorkerReport(loaded=(("t", 192),), load_failed=("t",)))  # one ok, one failed
    s.request_finished(req)  # the outcome is recorded once, when the request ends
    stats = s.pipeline.stats()
    assert stats["outcomes"]["materialized"] == 0 and stats["reasons"].get(DeclineReason.LOAD_FAILED) == 1
    assert s.num_tracked_requests() == 0


def test_mismatched_signature_and_inexact_rope_decline_before_credit():
    s = side(rope_exact=True)
    capture(s, "donor", A + D, votes=1, signature=KvSignature("float16", 4, 128))
    t = request("t", D + Q)
    assert s.get_num_new_matched_tokens(t, 0) == (0, False)
    s.request_finished(t)
    assert s.pipeline.stats()["reasons"].get(DeclineReason.KV_LAYOUT_MISMATCH) == 1

    s = side(rope_exact=False)
    capture(s, "donor", A + D, votes=1)
    t = request("t", D + Q)
    assert s.get_num_new_matched_tokens(t, 0) == (0, False)  # needs a shift of -64
    s.request_finished(t)
    assert s.pipeline.stats()["reasons"].get("rope_not_shift_invariant") == 1


def test_eviction_report_retires_the_donor_and_repeated_calls_are_idempotent():
    s = side()
    capture(s, "donor", A + D, votes=1)
    req = request("t", D + Q)
    assert s.get_num_new_matched_tokens(req, 0) == (192, False)
    assert s.get_num_new_matched_tokens(req, 0) == (192, False)  # same answer, one plan, one outcome
    s.update_connector_output(WorkerReport(evicted=((NS.key, "donor"),)))
    assert len(s.pipeline.store) == 0
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)    # the waiting request re-checks residency
    s.request_finished(req)
    stats = s.pipeline.stats()
    assert stats["reasons"].get(DeclineReason.DONOR_KV_EVICTED) == 1 and s.num_tracked_requests() == 0


def test_discovery_registers_only_fully_computed_prompts():
    s = side(mode="discovery_only")
    done, cut = request("done", A + D), request("cut", toks(9, 200))
    for r in (done, cut):
        assert s.get_num_new_matched_tokens(r, 0) == (0, False)
    done.num_computed_tokens = 256
    cut.num_computed_tokens = 50  # aborted mid-prefill
    s.request_finished(done)
    s.request_finished(cut)
    assert len(s.pipeline.store) == 1 and s.num_tracked_requests() == 0


def _image(ident, offset=70, length=16):
    return SimpleNamespace(modality="image", identifier=ident, mm_position=SimpleNamespace(offset=offset,
                                                                                          length=length))


def test_multimodal_prompts_share_kv_only_with_the_same_media():
    """Image placeholder tokens are equal for every image: the media hashes must be part of the namespace (before,
    two prompts with different images and equal token ids were credited against each other at delta 0)."""
    s = side()
    donor = request("donor", A + D)
    donor.mm_features = [_image("img-A")]
    s.get_num_new_matched_tokens(donor, 0)
    s.update_state_after_alloc(donor, list(range(100, 116)), 0)
    out = SimpleNamespace(preempted_req_ids=set(), num_scheduled_tokens={"donor": 256},
                          scheduled_new_reqs=[SimpleNamespace(req_id="donor", block_ids=(list(range(100, 116)),),
                                                              num_computed_tokens=0)],
                          scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[],
                                                                resumed_req_ids=set()))
    (save,) = s.build_connector_meta(out).saves
    s.update_connector_output(WorkerReport(saved=(SavedDonor(save.namespace_key, "donor", 256, SIG, 0),)))
    s.request_finished(donor)
    other_image, same_image = request("b", A + D[:128] + Q), request("a", A + D[:128] + Q)
    other_image.mm_features, same_image.mm_features = [_image("img-B")], [_image("img-A")]
    assert s.get_num_new_matched_tokens(other_image, 0) == (0, False)
    assert s.get_num_new_matched_tokens(same_image, 0) == (192, False)
    for r in (other_image, same_image):
        s.request_finished(r)
    assert s.num_tracked_requests() == 0


def test_prompt_embeds_and_unhashed_media_are_declined_and_never_captured():
    s = side()
    capture(s, "donor", A + D, votes=1)
    embeds, unhashed = request("e", D + Q), request("u", D + Q)
    embeds.prompt_embeds = object()
    unhashed.mm_features = [_image("")]
    for r in (embeds, unhashed):
        assert s.get_num_new_matched_tokens(r, 0) == (0, False)
        assert s.get_num_new_matched_tokens(r, 0) == (0, False)  # idempotent: one outcome
        s.update_state_after_alloc(r, list(range(20)), 0)
    out = SimpleNamespace(preempted_req_ids=set(), num_scheduled_tokens={"e": 256, "u": 256},
                          scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(list(range(20)),),
                                                              num_computed_tokens=0) for r in ("e", "u")],
                          scheduled_cached_reqs=None)
    assert s.build_connector_meta(out).saves == ()
    for r in (embeds, unhashed):
        s.request_finished(r)
    assert s.pipeline.stats()["reasons"].get(DeclineReason.MULTIMODAL_PROMPT) == 2
    assert s.num_tracked_requests() == 0


def test_discovery_reports_what_prefix_mode_would_credit_per_request():
    """discovery_only counted every hit; prefix mode declines some (no prefix at token 0, RoPE). The stats now carry
    the would-be-credited tokens per request, and a hit prefix would decline carries prefix's reason."""
    s = side(mode="discovery_only")
    donor = request("donor", A + D)
    s.get_num_new_matched_tokens(donor, 0)
    donor.num_computed_tokens = 256
    s.request_finished(donor)
    doc_first, doc_moved_inside = request("t1", D + Q), request("t2", Q + D)
    for r in (doc_first, doc_moved_inside):
        assert s.get_num_new_matched_tokens(r, 0) == (0, False)
        s.request_finished(r)
    window = s.stats.take()
    assert window["would_credit"] == [0, 192, 0]  # donor (miss), D at token 0, D at token 64 (no prefix)
    assert window["would_credit_tokens"] == 192
    reasons = {k for k in window["outcomes"] if k.startswith("discovery_only:")}
    assert "discovery_only:no_reusable_prefix" in reasons


def test_a_moved_first_block_is_declined_by_default_unless_it_is_exact():
    """A load whose first block would hold KV from elsewhere in the donor (the attention-sink tokens) is declined
    before credit: on real weights such hits diverge (top-1 0.60 in vLLM on the H200). A first block that is
    context-exact in the donor, or already vLLM's own, keeps the load."""
    s = side(load_moved_prefix=False)
    capture(s, "donor", A + D, votes=1)
    t = request("t", D + Q)
    assert s.get_num_new_matched_tokens(t, 0) == (0, False)
    s.request_finished(t)
    assert s.pipeline.stats()["reasons"].get(DeclineReason.MOVED_FIRST_BLOCK) == 1
    # The same donor for a prompt that starts like it: the first block is context-exact, the load goes ahead.
    t2 = request("t2", A + D[:128] + Q)
    assert s.get_num_new_matched_tokens(t2, 0) == (192, False)
    s.request_finished(t2)
