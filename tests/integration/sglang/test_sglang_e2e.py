"""End to end on CPU: SmolLM2-135M-Instruct (real weights) through ``sgl.Engine`` with ``radix_cache_backend="semblend"``.

One engine serves every case (start-up dominates the time on CPU); the backend reaches the engine's scheduler process
through the ``sglang.srt.plugins`` entry point of the installed ``semblend``. Shown here:

* a document-first hit served from the host tier (the donor's tree nodes flushed) gives the cold output;
* a shifted hit served from SGLang's own pool (donor = instruction + document, prompt = document + question):
  layer 0's K/V that the forward reads equals SGLang's own fresh computation of the same prompt (layer 0 is
  context-free, so only the re-rotation can make it differ);
* SGLang's strict memory checks (idle: on by default; busy: ``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY=1``) raise
  in the scheduler on any leak or double free: the engine still serves afterwards.

"Cold" runs use another ``cache_salt``: a separate namespace for SemBlend and a separate part of SGLang's tree, so
they share nothing with the donors.
"""

from __future__ import annotations

import glob
import json
import os

import pytest

pytest.importorskip("sglang", reason="sglang not installed: run scripts/setup_sglang_env.sh (make test does)")
pytestmark = [pytest.mark.engine_sglang, pytest.mark.slow]

import torch  # noqa: E402

DOC = (
    "Retrieval-augmented generation systems answer questions by first searching a document collection and then "
    "conditioning a language model on the passages they find. The prompt therefore often repeats the same long "
    "passages across many requests, with only the question at the end changing. Computing the attention keys and "
    "values of those passages again for every request wastes most of the prefill time. Prefix caching helps only "
    "when the passages appear at the very start of the prompt and in the same order; a different system prompt, a "
    "reordered set of passages or an instruction placed before the documents defeats it. Semantic reuse instead "
    "finds an earlier request whose prompt contains the same passages, aligns the two token sequences, moves the "
    "cached keys to their new positions by rotating them, and recomputes only what differs."
)
DOC2 = (
    "The committee met on Tuesday to review the annual budget of the city library. Spending on new books rose by "
    "eight percent while the cost of heating the old building fell after the windows were replaced. Members asked "
    "for a longer opening time on weekends, a larger section for children, and better access for readers who use "
    "wheelchairs. The treasurer warned that the grant from the regional council will end next year, and proposed "
    "a small fee for printing to cover part of the gap. After a long discussion the plan was approved with one "
    "change: the fee will not apply to students."
)
INSTR = "You are a careful assistant. Read the text below and answer the question that follows it in one sentence."
Q1 = "\n\nQuestion: What problem does the text describe?\nAnswer:"
Q2 = "\n\nQuestion: Summarize the main idea of the text.\nAnswer:"


@pytest.fixture(scope="module")
def model_dir():
    from semblend.assets import load_smollm2, smollm2_cache_dir

    folder = smollm2_cache_dir()
    if not (folder / "semblend-converted.json").is_file():
        load_smollm2()  # converts the shipped GGUF once (cached outside the clone)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    return folder


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    import sglang as sgl

    probe = tmp_path_factory.mktemp("kv_probe")
    env = {
        "SEMBLEND_SGLANG_CONFIG": json.dumps({"mode": "prefix", "host_tier_bytes": 64 << 20, "min_donor_tokens": 32,
                                              "load_moved_prefix": True,  # the shifted hit is checked too
                                              "kv_probe_dir": str(probe)}),
        "SEMBLEND_MIN_PROMPT_TOKENS": "32",
        "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    eng = sgl.Engine(model_path=str(model_dir), device="cpu", attention_backend="torch_native", dtype="bfloat16",
                     disable_cuda_graph=True, radix_cache_backend="semblend", max_total_tokens=4096,
                     max_running_requests=4, page_size=1, log_level="warning", random_seed=0)
    try:
        yield eng, probe
    finally:
        eng.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


GREEDY = {"temperature": 0.0, "max_new_tokens": 8}


def generate(eng, ids, **kw):
    out = eng.generate(input_ids=ids, sampling_params=GREEDY, **kw)
    return out["output_ids"] if "output_ids" in out else out["text"], out["meta_info"]


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_probe(probe, kind, rid):
    matches = glob.glob(os.path.join(str(probe), f"{kind}-{rid}.pt"))
    return torch.load(matches[0]) if matches else None


def test_document_first_hit_from_host_tier_equals_cold(engine, tokenizer):
    eng, probe = engine
    target = ids_of(tokenizer, DOC + Q2)
    cold, _ = generate(eng, target, cache_salt="cold")
    generate(eng, ids_of(tokenizer, DOC + Q1))                 # the donor (registered when it finishes)
    assert eng.flush_cache().success                           # its tree nodes are gone: only the host tier has it
    hit, meta = generate(eng, target)
    load = load_probe(probe, "load", meta["id"])
    assert load is not None, "the document-first prompt was not served from the donor"
    assert load["source"] == "host" and load["positions"][0] == 0 and len(load["positions"]) >= 100
    assert meta.get("cached_tokens", len(load["positions"])) >= len(load["positions"])
    assert hit == cold


def test_shifted_hit_layer0_kv_equals_fresh_computation(engine, tokenizer):
    eng, probe = engine
    generate(eng, ids_of(tokenizer, INSTR + "\n\n" + DOC2 + Q1))  # donor: the document after an instruction
    target = ids_of(tokenizer, DOC2 + Q2)
    _, cold_meta = generate(eng, target, cache_salt="cold")      # SGLang's fresh KV of the same prompt
    _, meta = generate(eng, target)
    load = load_probe(probe, "load", meta["id"])
    fresh = load_probe(probe, "donor", cold_meta["id"])
    assert load is not None and fresh is not None
    assert load["source"] == "pool" and load["positions"][0] == 0
    pos = load["positions"]
    assert len(pos) >= 100
    assert fresh["prompt"] == target and len(fresh["positions"]) >= pos[-1] + 1
    k_fresh, v_fresh = fresh["k"][pos].float(), fresh["v"][pos].float()
    k_load, v_load = load["k"].float(), load["v"].float()
    # V is position-free: a bf16 copy of the donor's. K was rotated by the shift in fp32 and rounded to bf16 once:
    # within a few bf16 ulps of the fresh key, the same bound as two independent roundings.
    torch.testing.assert_close(v_load, v_fresh, rtol=0, atol=0)
    torch.testing.assert_close(k_load, k_fresh, rtol=2 ** -7, atol=2 ** -7 * k_fresh.abs().max().item())
    shifted_wrong = (k_load - k_fresh).abs().max().item()
    assert shifted_wrong < 0.05 * k_fresh.abs().max().item()


def test_no_leak_under_strict_memory_checks(engine, tokenizer):
    eng, probe = engine
    # After the hits above (and one more, served from the pool while the donor is in the tree) the scheduler ran its
    # idle check after every request and its busy check every step; a leak or a double free raises there and kills
    # the engine, so the next request would fail.
    _, meta = generate(eng, ids_of(tokenizer, DOC2 + Q1))
    assert load_probe(probe, "load", meta["id"]) is not None or meta.get("cached_tokens", 0) > 0
    assert eng.get_server_info() is not None
    out, _ = generate(eng, ids_of(tokenizer, "Hello, how are you today? " * 8))
    assert out
