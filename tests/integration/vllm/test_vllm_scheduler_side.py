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


# ------------------------------------------------------------------------------------------------ blend mode
X, D1, Y, D2, I, Q16 = toks(11, 64), toks(12, 320), toks(13, 64), toks(14, 160), toks(15, 32), toks(16, 16)


def blend_side(num_workers=1, rope_exact=True, blend_unavailable="", **core):
    pipe = SemBlendPipeline(SemBlendConfig(discovery_only=False, **core))
    return SchedulerSide(pipe, VllmAdapterConfig(mode="blend", min_donor_tokens=32), NS, block_size=BS,
                         rope_exact=rope_exact, kv_signature=SIG, num_workers=num_workers,
                         blend_unavailable=blend_unavailable)


def make_resident(s, donor_id, tokens, votes=1, signature=SIG):
    """A donor whose capture every worker confirmed (what update_connector_output does after a real capture)."""
    s._awaiting_capture[(NS.key, donor_id)] = (np.asarray(tokens), NS)
    for _ in range(votes):
        s.update_connector_output(WorkerReport(saved=(SavedDonor(NS.key, donor_id, len(tokens), signature, 0),)))


def step_out():
    return SimpleNamespace(preempted_req_ids=set(), num_scheduled_tokens={}, scheduled_new_reqs=[],
                           scheduled_cached_reqs=None)


def reasons(s):
    return s.pipeline.stats()["reasons"]


def test_blend_credits_to_the_end_of_the_reusable_region_across_donors():
    s = blend_side()
    make_resident(s, "d1", X + D1)
    make_resident(s, "d2", Y + D2)
    target = I + D1 + D2 + Q16                               # 528 tokens: instruction, two passages, question
    req = request("t", target)
    assert s.get_num_new_matched_tokens(req, 0) == (512, False)  # last span ends at 512; instruction included
    s.update_state_after_alloc(req, list(range(33)), 512)
    plan = s.build_connector_meta(step_out())
    assert plan.loads == () and len(plan.blends) == 1
    (b,) = plan.blends
    assert (b.num_tokens, b.local_tokens, b.num_blended, b.check_layer, b.selection) == (512, 0, 512, 1, None)
    assert b.token_ids.tolist() == list(target[:512]) and b.block_ids == tuple(range(32))
    assert b.plan.donor_ids == ("d1", "d2")
    assert [(sp.donor_id, sp.donor_start, sp.target_start, sp.length) for sp in b.plan.spans] == [
        ("d1", 64, 32, 320), ("d2", 64, 352, 160)]
    # Uncovered instruction and seam heads are mandatory (the sink positions lie inside the uncovered range).
    assert b.plan.recompute_ranges[:2] == ((0, 36), (352, 356))
    s.update_connector_output(WorkerReport(loaded=(("t", 512),), blended=(("t", 470, 42),)))
    s.request_finished(req)
    stats = s.pipeline.stats()
    assert stats["outcomes"]["materialized"] == 1 and stats["loaded_tokens"] == 470  # reuse = donor KV kept
    window = s.stats.take()
    assert window["blend_hits"] == [[470, 42]] and window["credited_tokens"] == 512
    assert s.num_tracked_requests() == 0


def test_blend_drops_a_missing_donor_and_regates_the_plan():
    s = blend_side()
    make_resident(s, "d1", X + D1)
    s._awaiting_capture[(NS.key, "d2")] = (np.asarray(Y + D2), NS)  # registered in the planner, KV not resident:
    s.pipeline.register_donor("d2", Y + D2, namespace=NS)            # the plan uses it, the workers lack it
    req = request("t", I + D1 + D2 + Q16)
    assert s.get_num_new_matched_tokens(req, 0) == (352, False)     # d1's passage only
    assert s._requests["t"].plan.donor_ids == ("d1", "d2")          # the pipeline's plan is kept as planned
    s.update_state_after_alloc(req, list(range(33)), 352)
    (b,) = s.build_connector_meta(step_out()).blends
    assert b.plan.donor_ids == ("d1",) and b.plan.detail("dropped_donors") == ["d2"]
    s.request_finished(req)

    # Without d1 the rest fails the quality gates: declined before any credit.
    s2 = blend_side()
    make_resident(s2, "d2", Y + D2)
    s2.pipeline.register_donor("d1", X + D1, namespace=NS)
    req = request("t", I + D1 + D2 + Q16)
    assert s2.get_num_new_matched_tokens(req, 0) == (0, False)
    s2.request_finished(req)
    assert reasons(s2).get(DeclineReason.DONOR_KV_EVICTED) == 1


def test_blend_declines_before_credit_with_one_reason_each():
    target = I + D1 + Q16

    def decline(s, num_local=0, req_id="t", tokens=target):
        req = request(req_id, tokens)
        if num_local:  # planned on a first admission, re-admitted with a longer local hit (the plan is kept)
            assert s.get_num_new_matched_tokens(req, 0)[0] > 0
        assert s.get_num_new_matched_tokens(req, num_local) == (0, False)
        s.update_state_after_alloc(req, list(range(40)), 0)
        assert s.build_connector_meta(step_out()).blends == ()
        s.request_finished(req)
        return s.pipeline.stats()

    for unavailable in ("blend_tensor_parallel", "blend_pipeline_parallel", "unsupported_model_type:gemma2"):
        s = blend_side(blend_unavailable=unavailable)
        make_resident(s, "d1", X + D1)
        assert decline(s)["reasons"].get(unavailable) == 1

    s = blend_side(rope_exact=False)                          # the span moves by -32: needs exact re-rotation
    make_resident(s, "d1", X + D1)
    assert decline(s)["reasons"].get(DeclineReason.ROPE_NOT_SHIFT_INVARIANT) == 1

    s = blend_side()
    make_resident(s, "d1", X + D1, signature=KvSignature("float16", 4, 128))
    assert decline(s)["reasons"].get(DeclineReason.KV_LAYOUT_MISMATCH) == 1

    s = blend_side()
    make_resident(s, "d1", X + D1, votes=1)
    s.num_workers = 2                                          # one worker of two holds it: not resident
    assert decline(s)["reasons"].get(DeclineReason.DONOR_KV_EVICTED) == 1

    # vLLM's own hit reaches the end of the reusable region (a re-admission with a longer local hit).
    s = blend_side()
    make_resident(s, "d1", X + D1)
    stats = decline(s, num_local=352)
    assert stats["reasons"].get(DeclineReason.ENGINE_PREFIX_COVERS) == 1 and stats["outcomes"]["exact"] == 1
    # ... or leaves fewer than chunk_size reusable tokens beyond it (16 < 32).
    s = blend_side(chunk_size=32)
    make_resident(s, "d1", X + D1)
    assert decline(s, num_local=336)["reasons"].get(DeclineReason.NO_GAIN) == 1


def test_a_worker_that_cannot_blend_stops_further_credit():
    s = blend_side()
    make_resident(s, "d1", X + D1)
    waiting = request("w", I + D1 + Q16)
    assert s.get_num_new_matched_tokens(waiting, 0) == (352, False)  # credited while it waits for a slot
    s.update_connector_output(WorkerReport(blend_unavailable=("self_check_failed:blend_kv",)))
    assert s.get_num_new_matched_tokens(waiting, 0) == (0, False)   # re-checked before vLLM commits it
    req = request("t", I + D1 + Q16)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    for r in (waiting, req):
        s.request_finished(r)
    assert reasons(s).get("self_check_failed:blend_kv") == 2


def test_blend_recomputes_sink_tokens_unless_context_exact_or_local():
    """The moved-first-block rule does not decline a blend: positions [0, SINK_TOKENS) become mandatory recompute
    when their KV would be moved donor KV, and stay reusable when the donor's first span is context-exact or vLLM's
    own hit covers them."""
    from semblend_core.plan import SINK_TOKENS

    def blend_of(tokens, num_local=0):
        s = blend_side()
        make_resident(s, "d1", X + D1)
        req = request("t", tokens)
        credit, _ = s.get_num_new_matched_tokens(req, num_local)
        assert credit > 0
        s.update_state_after_alloc(req, list(range(40)), credit)
        (b,) = s.build_connector_meta(step_out()).blends
        s.request_finished(req)
        return b

    moved = blend_of(D1 + Q16)                                 # the passage moved to the prompt's start
    assert moved.plan.spans[0].target_start == 0 and not moved.plan.spans[0].context_exact
    assert moved.plan.recompute_ranges[0] == (0, SINK_TOKENS)
    exact = blend_of(X + D1[:200] + Q16)                       # starts like the donor: context-exact
    assert exact.plan.spans[0].context_exact and all(a >= SINK_TOKENS for a, _ in exact.plan.recompute_ranges)
    local = blend_of(D1 + Q16, num_local=16)                  # vLLM's own block holds the first 16 tokens
    assert local.local_tokens == 16
    assert not any(b > 16 and a < SINK_TOKENS + 16 for a, b in local.plan.recompute_ranges), \
        local.plan.recompute_ranges                            # nothing mandatory right after vLLM's block


def test_failed_blend_reports_only_credited_blocks_and_retires_its_donors():
    s = blend_side()
    make_resident(s, "d1", X + D1)
    make_resident(s, "d2", Y + D2)
    req = request("t", I + D1 + D2 + Q16)
    assert s.get_num_new_matched_tokens(req, 32) == (480, False)  # vLLM's own hit: the first two blocks
    s.update_state_after_alloc(req, list(range(33)), 480)
    (b,) = s.build_connector_meta(step_out()).blends
    assert b.local_tokens == 32 and b.credited_block_ids() == tuple(range(2, 32))
    s.update_connector_output(None, invalid_block_ids=set(b.credited_block_ids()))
    s.request_finished(req)
    assert reasons(s).get(DeclineReason.LOAD_FAILED) == 1
    assert s.resident_donors() == 0 and len(s.pipeline.store) == 0
    assert s.num_tracked_requests() == 0


def test_block_hash_taint_is_a_seeded_xor_pad_in_each_hashs_own_type():
    import hashlib

    from semblend.integration.vllm._scheduler import _xor_padded

    hashes = [hashlib.sha256(b"%d" % i).digest() for i in range(300)]
    seed = b"semblend-approximate-kv" + b"secret" + b"req-1"
    tainted = _xor_padded(hashes, seed)
    # The numpy path is the per-block big-endian int XOR with the pad (lowest bit set: the pad is never zero).
    pad = int.from_bytes(hashlib.shake_256(seed).digest(32), "big") | 1
    assert tainted == [(int.from_bytes(h, "big") ^ pad).to_bytes(32, "big") for h in hashes]
    assert all(type(t) is bytes for t in tainted) and len(set(tainted)) == 300
    assert not set(tainted) & set(hashes)
    assert _xor_padded(tainted, seed) == hashes  # an involution: why tainted blocks are never tainted twice
    assert _xor_padded(hashes, seed + b"x") != tainted  # another request's pad
    # Mixed lengths and bytes subclasses go through the per-hash path, keeping their type.
    class Hash(bytes):
        pass

    odd = [Hash(b"abc"), b"defgh"]
    out = _xor_padded(odd, seed)
    assert type(out[0]) is Hash and len(out[1]) == 5 and _xor_padded(out, seed) == odd
    assert _xor_padded([], seed) == []
