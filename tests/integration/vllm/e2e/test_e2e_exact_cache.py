"""Exact-cache safety with real execution: vLLM's prefix caching on, SemBlend's prefix mode loading moved KV.

Rule 3: KV loaded from a donor with a position shift (and everything computed after it) is not what a cold prefill
computes, so vLLM must never serve it as an exact prefix-cache hit to a later request.
"""

from __future__ import annotations

import pytest
from conftest import DOCUMENT, PREAMBLE, QUESTIONS, encode, generate, make_llm, scheduler_connector, shutdown

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def llm():
    engine = make_llm(prefix_caching=True, num_blocks=48)
    yield engine
    shutdown(engine)


def exact_hit_tokens(llm, tokens) -> int:
    """Tokens vLLM's exact prefix cache would serve to a fresh request with these tokens (no state changed)."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    core = llm.llm_engine.engine_core.engine_core
    req = Request(request_id="probe", prompt_token_ids=list(tokens), sampling_params=SamplingParams(max_tokens=1),
                  pooling_params=None, block_hasher=core.request_block_hasher)
    return core.scheduler.kv_cache_manager.get_computed_blocks(req)[1]


def test_a_later_exact_request_is_never_served_semantically_loaded_blocks(llm, tokenizer):
    from recording_connector import RecordingConnector as rec

    doc, pre = encode(tokenizer, DOCUMENT), encode(tokenizer, PREAMBLE)
    donor, target = pre + doc + encode(tokenizer, QUESTIONS[0]), doc + encode(tokenizer, QUESTIONS[1])
    generate(llm, [donor], max_tokens=2)
    # Control: the donor's own blocks are exact and shareable.
    assert exact_hit_tokens(llm, donor) >= 32 * ((len(donor) - 1) // 32)
    rec.loads.clear()
    generate(llm, [target], max_tokens=8)
    (load,) = rec.loads
    assert load.delta == -len(pre) and load.num_tokens > 0  # semantically loaded, moved KV
    # Neither the moved prefix nor what was computed after it is an exact hit for anyone.
    assert exact_hit_tokens(llm, target) == 0
    assert exact_hit_tokens(llm, doc) == 0
    # The same prompt again: vLLM computes (or SemBlend loads again) -- never an exact hit on the moved blocks.
    rec.loads.clear()
    generate(llm, [target], max_tokens=8)
    assert exact_hit_tokens(llm, target) == 0
    assert scheduler_connector(llm).scheduler_side.num_tracked_requests() == 0
