"""The ``semblend`` CLI through typer's CliRunner (in-process): plan, --set validation, bench-lookup, config, demo."""

from __future__ import annotations

import json
import random
import sys

import pytest

pytest.importorskip("typer")
pytest.importorskip("rich")
from typer.testing import CliRunner

from semblend.cli import app
from semblend.text_tokens import WordTokenizer, load_tokenizer

_WORDS = ("cache", "token", "model", "paper", "result", "method", "layer", "attention", "prefix", "donor", "prompt",
          "reuse", "engine", "batch", "query", "value", "key", "rotary", "position", "shift", "block", "kernel",
          "memory", "latency", "schedule", "request", "summary", "table", "figure", "section", "corpus", "data",
          "train", "test", "score", "metric", "baseline", "approach", "problem", "outcome", "network", "graph")


def _passage(seed: int, n_words: int = 400) -> str:
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentences.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 16))).capitalize() + ".")
    return " ".join(sentences)


@pytest.fixture()
def files(tmp_path):
    doc = _passage(1)
    donor = tmp_path / "donor.txt"
    donor.write_text("Summarize the following paper in three sentences.\n\n" + doc)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("What is the main contribution of this paper? Explain it briefly to a newcomer.\n\n" + doc)
    other = tmp_path / "other.txt"
    other.write_text("What is the main contribution of this paper? Explain it briefly to a newcomer.\n\n" + _passage(2))
    return donor, prompt, other


def _run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def test_plan_json_is_a_hit_with_spans_that_match_tokens(files):
    donor, prompt, _ = files
    res = _run("plan", "--donor", str(donor), "--prompt", str(prompt), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["is_hit"] is True and out["reason"] == "hit"
    assert out["donor_id"] == "donor.txt"
    assert out["tokenizer"] == "words"
    assert out["reuse_ratio"] > 0.9
    assert out["spans"], "a hit must carry spans"
    tok = WordTokenizer()
    d_ids, p_ids = tok.encode(donor.read_text()), tok.encode(prompt.read_text())
    assert out["target_len"] == len(p_ids) and out["donor_len"] == len(d_ids)
    for s in out["spans"]:
        a, b, n = s["donor_start"], s["target_start"], s["length"]
        assert d_ids[a:a + n] == p_ids[b:b + n]
        assert s["delta"] == b - a
    # The instructions differ in length, so the shared document moved: a RoPE shift and a seam to recompute.
    assert any(s["delta"] != 0 for s in out["spans"])
    assert out["recompute_ranges"] and out["recompute_ranges"][-1][1] == out["target_len"]
    assert set(out["timings_ms"]) and all(v >= 0 for v in out["timings_ms"].values())


def test_plan_table_output_and_unrelated_prompt_misses(files):
    donor, prompt, other = files
    res = _run("plan", "--donor", str(donor), "--prompt", str(prompt))
    assert res.exit_code == 0, res.output
    assert "SemBlend plan" in res.stdout and "exact spans" in res.stdout and "donor.txt" in res.stdout
    res = _run("plan", "--donor", str(donor), "--prompt", str(other), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["is_hit"] is False and out["reason"] != "hit" and out["spans"] == []
    assert out["outcome"] in ("declined", "cold")


def test_set_overrides_config(files):
    donor, prompt, _ = files
    res = _run("plan", "--donor", str(donor), "--prompt", str(prompt), "--json", "--set", "min_reuse_ratio=0.999")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["is_hit"] is False and out["reason"] == "below_min_reuse_ratio"


@pytest.mark.parametrize("bad", ["min_reuse_ratoi=0.5", "nonsense"])
def test_bad_set_key_exits_2_and_names_allowed_keys(files, bad):
    donor, prompt, _ = files
    res = _run("plan", "--donor", str(donor), "--prompt", str(prompt), "--set", bad)
    assert res.exit_code == 2
    assert "min_reuse_ratio" in res.stderr and "allowed" in res.stderr


def test_bad_set_value_and_bad_env_exit_2(files):
    donor, prompt, _ = files
    res = _run("plan", "--donor", str(donor), "--prompt", str(prompt), "--set", "min_similarity=1.5")
    assert res.exit_code == 2 and "[0, 1]" in res.stderr
    res = _run("plan", "--donor", str(donor), "--prompt", str(prompt), env={"SEMBLEND_MIN_SIMILARTY": "0.5"})
    assert res.exit_code == 2 and "SEMBLEND_MIN_SIMILARITY" in res.stderr


def test_unknown_tokenizer_exits_2(files):
    donor, prompt, _ = files
    res = _run("plan", "--donor", str(donor), "--prompt", str(prompt), "--tokenizer", "no-such-tokenizer")
    assert res.exit_code == 2 and "words" in res.stderr


def test_bytes_tokenizer_also_hits(files):
    donor, prompt, _ = files
    res = _run("plan", "--donor", str(donor), "--prompt", str(prompt), "--json", "--tokenizer", "bytes")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["is_hit"] and out["target_len"] == len(prompt.read_bytes())


def test_word_tokenizer_is_stable_and_in_range():
    tok = load_tokenizer("words")
    a = tok.encode("The cache, the CACHE and the cache!")
    assert a == tok.encode("The  cache ,the CACHE\nand the cache !")  # whitespace is not a token
    assert a[1] == a[7] and a[1] != a[4]  # same word, same id; case matters
    assert all(0 <= t < 2**31 for t in a)
    assert len(a) == 9


def test_bench_lookup_quick_json(tmp_path):
    out_path = tmp_path / "lookup.json"
    res = _run("bench-lookup", "--quick", "--json", "--no-progress", "--json-out", str(out_path))
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert json.loads(out_path.read_text()) == result
    assert result["hits"], "quick run must time hit plans"
    for row in result["hits"]:
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["plans"] == result["workload"]["plans"]
        assert row["hit_rate"] >= 0.98 and row["wrong_donor_hits"] == 0
    miss = result["miss"]
    assert miss["p50_ms"] > 0 and miss["false_hits"] == 0
    assert result["machine"]["cores_usable"] >= 1 and result["machine"]["numpy"]
    assert "Zipf" in result["workload"]["tokens"]


def test_bench_lookup_rejects_bad_matrix():
    res = _run("bench-lookup", "--quick", "--donors", "10000,1000")
    assert res.exit_code == 2 and "ascending" in res.stderr
    res = _run("bench-lookup", "--quick", "--donors", "ten")
    assert res.exit_code == 2


def test_config_shows_env_and_allowed_values():
    res = _run("config", "--json", env={"SEMBLEND_MIN_SIMILARITY": "0.7"})
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["config"]["min_similarity"] == 0.7
    assert "shingle" in out["allowed"]["embedder"] and "[0, 1]" in out["allowed"]["min_reuse_ratio"]
    res = _run("config")
    assert res.exit_code == 0 and "exact_materialization_only" in res.stdout and "SEMBLEND_" in res.stdout


def test_demo_falls_back_to_discovery_demo(monkeypatch):
    pytest.importorskip("aclsum")
    # Block the model demo so the fallback path runs (None in sys.modules makes the import raise ImportError).
    monkeypatch.setitem(sys.modules, "semblend.integration.transformers.demo", None)
    res = _run("demo", "--json", "--papers", "2")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["mode"] == "discovery" and "unavailable" in res.stderr
    s = out["summary"]
    assert s["same_paper"]["prompts"] == 8  # 2 papers x 2 other instructions x 2 layouts
    assert s["same_paper"]["hit_rate"] == 1.0 and s["same_paper"]["min_reuse_ratio"] >= 0.8
    assert s["held_out"]["prompts"] == 12 and s["held_out"]["false_hits"] == 0
    assert {r["layout"] for r in out["rows"]} == {"instruction_first", "instruction_last"}


def test_demo_runs_the_model_demo_when_importable(monkeypatch):
    # CLI wiring only: a stand-in module replaces the model demo (which needs a model and minutes of CPU); the
    # model demo itself is tested in tests/integration/transformers.
    import types

    calls = []
    fake = types.ModuleType("semblend.integration.transformers.demo")

    def run_demo(n_papers, device, as_json):
        calls.append((n_papers, device, as_json))
        return {"rows": [{"paper": "p"}], "summary": {"hits": 1}}

    fake.run_demo = run_demo
    monkeypatch.setitem(sys.modules, "semblend.integration.transformers.demo", fake)
    res = _run("demo", "--json", "--papers", "2")
    assert res.exit_code == 0, res.output
    assert calls == [(2, "cpu", True)]
    assert json.loads(res.stdout) == {"rows": [{"paper": "p"}], "summary": {"hits": 1}}
    assert _run("demo", "--device", "tpu").exit_code == 2
