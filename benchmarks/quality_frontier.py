"""Quality-vs-recompute frontier of the recompute selection strategies, on real models, against cold prefill.

Documents: ``--dataset lee`` (default; held out: the Lee news corpus from gensim's test data, see ``_heldout.py``)
or ``aclsum`` (ACLSum test papers, the corpus earlier settings were chosen on; it has reference summaries, so the
task-quality columns exist only there). Every target prompt has donors the planner finds by itself. Layouts:

* ``instruction_first``: instruction, then the document. Donor: phrasing 0; targets: phrasings 1 and 2 (the
  document moves by the instruction's length difference: RoPE re-rotation and a seam; the new instruction is
  fresh).
* ``instruction_last``: the document, then the instruction, under another system prompt. Donor: no system
  prompt, phrasing 0; targets: two other system prompts with phrasings 1 and 2 (the document moves with the
  system prompt; the question after it is fresh and must read the reused document).
* ``rag`` (Lee only): three donors, each a prompt over three news reports; each target holds all nine reports in
  a new shuffled order with a new question (a multi-donor plan; every report that lost its left neighbour is a
  seam).

With ``--dataset lee`` a document is ``--doc-articles`` consecutive reports (8: ~2K tokens) so that the mandatory
tokens (new instruction, seam heads, suffix) are a small fraction of the prompt.

Strategies (``Variant``): ``mandatory`` (no budgeted tokens: uncovered, suffix and seam heads only), ``no_seams``,
``deviation`` (the CacheBlend check at layer 1 with the bathtub layer counts: all tokens through layers 0-1),
``query`` (``SelectionStrategy('query')``: the tokens the last prompt tokens attend to most in a 2-layer probe of
the mandatory tokens over the reused KV, kept fresh at every layer), ``position`` (first tokens of every reused
span, no probe), ``full`` (every reused token at every layer: must equal cold).

Per hit and strategy, against the cold run's greedy answer of ``--answer-tokens`` tokens: teacher-forced top-1,
greedy positional agreement and exact answers, ROUGE-L of the answers, first-token KL, perplexity ratio, ROUGE-L of
each answer vs the reference summary where the dataset has one (task quality, cold and SemBlend side by side),
recomputed token-layers (the engine's ``recomputed_fraction``: every fresh row x layer, mandatory, probe and suffix
included, over a cold prefill's). Greedy answers are derived from the teacher-forced pass: while its argmax follows
the cold answer the greedy decode is the cold answer; after the first disagreement the SemBlend cache is decoded
for real.

Guards (``guard_eval``, simulated per hit from the recorded margins and the other strategies' records of the same
hit, no extra model runs): a hit whose first-token top-1/top-2 log-probability margin (of the blended logits) is
below a threshold is sent to extra work -- a cold prefill (``cold``) or the ``full`` / a larger-budget strategy
-- and served from that. Catch rate = divergent hits (answer differs from cold) flagged / divergent hits; cost =
flagged hits / hits and the extra token-layers (over a cold prefill's) per hit. The ``decode`` guard switches to
a cold prefill of prompt + answer-so-far at the first decode step whose margin is below the threshold.

Cold runs (answer, first-token logits, perplexity) are cached on disk per model and prompt under
``~/.cache/semblend/bench-cold`` and reused across strategies and reruns.

Run (CPU; the full runs are on the H200, ``--device cuda``)::

    python benchmarks/quality_frontier.py --model smollm2 --items 4 --strategies core
    python benchmarks/quality_frontier.py --model qwen05 --items 4 --strategies core
    python benchmarks/quality_frontier.py --dataset aclsum --papers 25   # the earlier ACLSum frontier

Each run updates its model's entry in ``<out>/quality_frontier_<tag>.json`` and redraws ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS_DIR, write_json

ASPECTS = ("challenge", "approach", "outcome")
SYSTEMS = (None, "You are a helpful research assistant.",
           "You are an expert reviewer of NLP papers. Answer precisely and concisely.")
GUARD_THRESHOLDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
# Held-out (Lee news) prompts: three phrasings of one instruction, and the RAG layout's questions.
NEWS_INSTRUCTIONS = (
    "Summarize the following news reports in a few sentences.",
    ("Read the news reports below, then write a short summary of the main events they describe and of the "
     "people involved."),
    "Give a brief overview of the news stories below: what happened, where, and who was involved.",
)
NEWS_SYSTEMS = (None, "You are a helpful news assistant.",
                "You are an experienced news editor. Answer precisely and concisely.")
RAG_QUESTIONS = (
    "Which of these documents are about Australia? Answer briefly.",
    "Summarize the main event of each document in one sentence.",
    "What do these documents have in common? Answer briefly.",
)
TARGETS = {"smollm2": {"top1": 0.99, "greedy": 0.9}, "qwen05": {"top1": 0.995, "greedy": 0.95},
           "max_recomputed": 0.05, "task_rouge_delta": 0.01}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    strategy: str  # mandatory | deviation | query | position | full
    budget: float = 0.0
    seam_tokens: int = 4
    probe_layers: int = 2
    query_tokens: int = 8
    depth: float = 1.0
    chunk_heads: int = 0


def variant_set(which: str) -> list[Variant]:
    core = [
        Variant("mandatory", "mandatory"),
        Variant("no_seams", "mandatory", seam_tokens=0),
        Variant("deviation_5", "deviation", 0.05),
        Variant("deviation_15", "deviation", 0.15),
        Variant("query_2", "query", 0.02),
        Variant("query_5", "query", 0.05),
        Variant("query_10", "query", 0.10),
        Variant("position_5", "position", 0.05),
        Variant("full", "query", 1.0),
    ]
    extra = [
        Variant("query_1", "query", 0.01),
        Variant("query_2_no_seams", "query", 0.02, seam_tokens=0),
        Variant("position_2", "position", 0.02),
        # Larger budgets, for layouts the cheap points leave far from cold (RAG over several donors).
        Variant("position_15", "position", 0.15),
        Variant("position_30", "position", 0.30),
        Variant("query_2_probe1", "query", 0.02, probe_layers=1),
        Variant("query_2_probe4", "query", 0.02, probe_layers=4),
        Variant("query_5_half_depth", "query", 0.05, depth=0.5),
        # Every reused token fresh at layers 0-1 and nothing deeper: the deviation check's own pass, no selection.
        Variant("wide_2_layers_smollm2", "position", 2 / 30, depth=2 / 30),
        Variant("wide_2_layers_qwen05", "position", 2 / 24, depth=2 / 24),
    ]
    if which == "core":
        return core
    if which == "all":
        return core + extra
    names = set(which.split(","))
    out = [v for v in core + extra if v.name in names]
    if len(out) != len(names):
        raise SystemExit(f"unknown variants: {names - {v.name for v in out}}")
    return out


DESCRIPTIONS = {"smollm2": "SmolLM2-135M-Instruct (llama, 30 layers; GGUF Q4_1 dequantized)",
                "qwen05": "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers; GGUF dequantized)"}


def load_model(name: str, dtype: str, device: str = "cpu", model_dir: str | None = None) -> tuple[Any, Any, str]:
    """``(model, tokenizer, description)``; ``model_dir`` loads a converted folder (config, safetensors, tokenizer:
    what ``_smollm2_parts.py unpack`` and the tokenizer files give on an offline GPU machine)."""
    import torch

    from semblend import assets

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if name not in DESCRIPTIONS:
        raise SystemExit(f"--model {name!r}; allowed: {', '.join(DESCRIPTIONS)}")
    if model_dir:
        model, tok = assets._load_converted(Path(model_dir), device, dt)
    elif name == "smollm2":
        model, tok = assets.load_smollm2(device=device, dtype=dt)
    else:
        model, tok = assets.load_qwen25_coder_05b(device=device, dtype=dt)
    return model, tok, DESCRIPTIONS[name]


def build_work(tok: Any, layout: str, papers: list[Any], max_words: int) -> list[dict[str, Any]]:
    from semblend import assets

    out = []
    ph = assets.INSTRUCTION_PHRASINGS
    for paper in papers:
        text = paper.text(max_words=max_words)
        reference = " ".join(paper.summaries[a] for a in ASPECTS)
        if layout == "instruction_first":
            prompts = [assets.paper_prompt(tok, text, ins) for ins in ph]
        elif layout == "instruction_last":
            prompts = [assets.chat_prompt_ids(tok, f"Paper:\n{text}\n\n{ph[j]}", system=SYSTEMS[j]) for j in range(3)]
        else:
            raise SystemExit(f"layout {layout!r}; allowed: instruction_first, instruction_last")
        out.append({"id": paper.id, "donors": [("donor", prompts[0])], "targets": prompts[1:],
                    "reference": reference})
    return out


def build_work_lee(tok: Any, layout: str, articles: list[str], doc_articles: int, items: int,
                   rag_articles: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Held-out work items (no reference summaries). ``instruction_first`` / ``instruction_last``: a document of
    ``doc_articles`` consecutive reports, donor + two targets as in the module docstring. ``rag``: three donors of
    ``rag_articles`` reports each (one question each); two targets with all their reports shuffled and a new
    question."""
    import random

    from semblend import assets

    out = []
    if layout in ("instruction_first", "instruction_last"):
        for i in range(min(items, len(articles) // doc_articles)):
            doc = "\n\n".join(articles[i * doc_articles:(i + 1) * doc_articles])
            if layout == "instruction_first":
                prompts = [assets.chat_prompt_ids(tok, f"{ins}\n\nNews:\n{doc}") for ins in NEWS_INSTRUCTIONS]
            else:
                prompts = [assets.chat_prompt_ids(tok, f"News:\n{doc}\n\n{NEWS_INSTRUCTIONS[j]}",
                                                  system=NEWS_SYSTEMS[j]) for j in range(3)]
            out.append({"id": f"lee-{i}", "donors": [("donor", prompts[0])], "targets": prompts[1:],
                        "reference": None})
        return out
    if layout != "rag":
        raise SystemExit(f"layout {layout!r}; allowed: instruction_first, instruction_last, rag")
    per, k = 3, int(rag_articles)  # donors per target, reports per donor
    for i in range(min(items, len(articles) // (per * k))):
        group = articles[i * per * k:(i + 1) * per * k]
        donors = [(f"d{j}", assets.multi_passage_prompt(tok, group[j * k:(j + 1) * k], range(k), RAG_QUESTIONS[j]))
                  for j in range(per)]
        rng = random.Random(seed * 1000 + i)
        targets = []
        for t in range(2):
            order = list(range(per * k))
            while order == sorted(order):
                rng.shuffle(order)
            targets.append(assets.multi_passage_prompt(tok, group, order, RAG_QUESTIONS[(t + 1 + i) % 3]))
        out.append({"id": f"lee-rag-{i}", "donors": donors, "targets": targets, "reference": None})
    return out


class ColdCache:
    """Cold greedy answer, first-token logits and answer perplexity per (model, prompt), on disk."""

    def __init__(self, model_key: str, answer_tokens: int) -> None:
        self.dir = Path(os.path.expanduser("~")) / ".cache" / "semblend" / "bench-cold" / model_key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.answer_tokens = answer_tokens

    def path(self, ids: list[int]) -> Path:
        h = hashlib.sha256(repr((ids, self.answer_tokens)).encode()).hexdigest()[:24]
        return self.dir / f"{h}.pt"

    def get(self, engine: Any, ids: list[int], eos: set[int]) -> dict[str, Any]:
        import torch

        from semblend.integration.transformers.metrics import perplexity, teacher_forced_logits

        p = self.path(ids)
        if p.is_file():
            return torch.load(p)
        cold = engine.cold_prefill(ids)
        first = int(cold.logits.argmax())
        answer = greedy(engine.model, engine.fork(cold).cache, first, self.answer_tokens - 1, eos)
        tf = teacher_forced_logits(engine.model, cold, answer)
        entry = {"answer": answer, "logits0": cold.logits.float().clone(), "ppl": perplexity(tf, answer),
                 "ttft_s": cold.timings["total"]}
        torch.save(entry, p)
        return entry


def greedy(model: Any, cache: Any, first: int, steps: int, eos: set[int]) -> list[int]:
    """``first`` plus up to ``steps`` greedy tokens from ``cache`` (extended in place); stops after an EOS. A plain
    loop: ``model.generate``'s per-step overhead dominates a 135M model's decode on a shared CPU."""
    import torch

    out, tok = [int(first)], int(first)
    for _ in range(steps):
        if tok in eos:
            break
        logits = model(input_ids=torch.tensor([[tok]], device=model.device), past_key_values=cache,
                       use_cache=True).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
    return out


def margins(logits: Any) -> list[float]:
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, 2, dim=-1).values
    return [float(x) for x in (top[:, 0] - top[:, 1])]


def run_layout(model: Any, tok: Any, model_name: str, layout: str, work: list[dict[str, Any]], vs: list[Variant],
               args: argparse.Namespace, cold_cache: ColdCache, flush: Any = None) -> list[dict[str, Any]]:
    import torch

    from semblend.integration.transformers import EngineOptions, SemBlendEngine
    from semblend.integration.transformers.metrics import (
        kl_divergence,
        perplexity,
        rouge_l,
        teacher_forced_logits,
    )
    from semblend_core import SemBlendConfig
    from semblend_core.bathtub import ModelShape
    from semblend_core.pipeline import SemBlendPipeline
    from semblend_core.recompute import SelectionStrategy

    shape = ModelShape(model.config.num_hidden_layers, model.config.model_type)
    base = SemBlendEngine(model, tok, SemBlendConfig(max_prompt_tokens=1 << 16))

    def engine_for(v: Variant) -> Any:
        if v.strategy in ("query", "position", "full"):
            sel = SelectionStrategy(v.strategy if v.strategy != "full" else "query", probe_layers=v.probe_layers,
                                    query_tokens=v.query_tokens, depth=v.depth, chunk_heads=v.chunk_heads)
            return SemBlendEngine(model, tok, SemBlendConfig(), EngineOptions(selection=sel))
        return SemBlendEngine(model, tok, SemBlendConfig(), EngineOptions(check_layer=1 if v.strategy == "deviation"
                                                                          else None))

    engines = {v.name: engine_for(v) for v in vs}
    records: list[dict[str, Any]] = []
    eos = base._eos_ids()
    t_layout = time.perf_counter()
    for i, item in enumerate(work):
        donor_kv = {}
        for name, ids in item["donors"]:
            donor_pre = base.cold_prefill(ids)
            donor_kv[name] = base.donor_kv(donor_pre)
            del donor_pre
        pipes = {}
        for v in vs:
            cfg = SemBlendConfig(recompute_budget=v.budget, seam_recompute_tokens=v.seam_tokens,
                                 max_prompt_tokens=1 << 16)
            pipes[v.name] = SemBlendPipeline(cfg, model_shape=shape)
            for name, ids in item["donors"]:
                pipes[v.name].register_donor(name, ids)
        reference = item.get("reference")
        for t_idx, target in enumerate(item["targets"]):
            cold = cold_cache.get(base, target, eos)
            cold_answer = cold["answer"]
            cold_text = tok.decode(cold_answer, skip_special_tokens=True)
            cold_task = rouge_l(reference, cold_text) if reference else None
            for v in vs:
                plan = pipes[v.name].plan(target)
                rec: dict[str, Any] = {"layout": layout, "id": item["id"], "target": t_idx, "variant": v.name,
                                       "prompt_tokens": len(target), "hit": plan.is_hit, "reason": plan.reason}
                if not plan.is_hit:
                    records.append(rec)
                    continue
                eng = engines[v.name]
                pre = eng.prefill_with_plan(target, plan, {d: donor_kv[d] for d in plan.donor_ids})
                tf = teacher_forced_logits(model, pre, cold_answer)  # extends pre.cache by cold_answer[:-1]
                agree = (tf.argmax(dim=-1).cpu() == torch.tensor(cold_answer)).tolist()
                first_div = next((j for j, a in enumerate(agree) if not a), None)
                if first_div is None:
                    answer = list(cold_answer)
                else:
                    # Greedy equals cold up to the first disagreement; decode the SemBlend cache from there.
                    drop = len(cold_answer) - 1 - first_div  # the cache holds prompt + cold_answer[:-1]
                    if drop:
                        pre.cache.crop(-drop)  # negative: remove that many (transformers 4.x and 5.x alike)
                    answer = list(cold_answer[:first_div]) + greedy(
                        model, pre.cache, int(tf[first_div].argmax()), args.answer_tokens - first_div - 1, eos)
                text = tok.decode(answer, skip_special_tokens=True)
                pos_agree = sum(a == b for a, b in zip(answer, cold_answer)) / max(len(cold_answer), 1)
                m = margins(tf)
                rec.update({
                    "reuse_ratio": plan.reuse_ratio, "seams": len(plan.seams), "donors": len(plan.donor_ids),
                    "recomputed_fraction": pre.recomputed_fraction,
                    "probe_token_layers": pre.stats.probe_token_layers if pre.stats else 0,
                    "first_token_match": bool(agree[0]),
                    "first_token_kl": kl_divergence(cold["logits0"].to(pre.logits.device), pre.logits),
                    "top1_agreement": sum(agree) / len(agree), "greedy_agreement": pos_agree,
                    "exact_answer": answer == list(cold_answer), "first_divergence": first_div,
                    "ppl_ratio": perplexity(tf, cold_answer) / cold["ppl"],
                    "rouge_l": rouge_l(cold_text, text),
                    "task_rouge_cold": cold_task,
                    "task_rouge_semblend": rouge_l(reference, text) if reference else None,
                    "margins": m, "ttft_cold_s": cold["ttft_s"], "ttft_semblend_s": pre.timings["total"],
                })
                records.append(rec)
        done = i + 1
        el = time.perf_counter() - t_layout
        print(f"[{model_name}/{layout}] {done}/{len(work)} items, {el:.0f} s", file=sys.stderr, flush=True)
        if flush is not None:
            flush(records)
    return records


def guard_eval(hits: list[dict[str, Any]]) -> dict[str, Any]:
    """Catch rate and cost of the first-token and decode-time margin guards at each threshold."""
    divergent = sum(not r["exact_answer"] for r in hits)
    out: dict[str, Any] = {"divergent": divergent, "hits": len(hits)}
    for kind in ("first_token", "decode"):
        rows = []
        for tau in GUARD_THRESHOLDS:
            fired = caught = 0
            greedy, exact = [], []
            for r in hits:
                m = r["margins"]
                if kind == "first_token":
                    catch = fire = m[0] < tau
                else:
                    # The decode-time margins equal the teacher-forced ones up to the first disagreement.
                    upto = len(m) if r["first_divergence"] is None else r["first_divergence"] + 1
                    catch = any(x < tau for x in m[:upto])
                    fire = catch or not r["exact_answer"]  # an uncaught divergent hit may fire later: count it
                fired += fire
                caught += catch and not r["exact_answer"]
                greedy.append(1.0 if catch else r["greedy_agreement"])
                exact.append(1.0 if (catch or r["exact_answer"]) else 0.0)
            rows.append({"threshold": tau, "fire_rate": fired / len(hits),
                         "catch_rate": caught / divergent if divergent else None,
                         "greedy_agreement": statistics.fmean(greedy), "exact_answer": statistics.fmean(exact)})
        out[kind] = rows
    return out


GUARD_BASES = ("mandatory", "query_2", "position_5")
GUARD_FALLBACKS = ("cold", "full", "query_10", "deviation_15")


def guard_fallback_eval(records: list[dict[str, Any]], base: str, fallback: str) -> list[dict[str, Any]]:
    """The first-token margin guard on ``base``'s hits of one layout, hits it flags served by ``fallback``.

    Per threshold: ``fire_rate`` (flagged / hits), ``catch_rate`` (divergent hits flagged / divergent hits),
    ``false_alarm_rate`` (exact hits flagged / hits), quality after the guard (top-1, greedy mean and min, exact
    answers) and ``recomputed_fraction`` including the extra work: a flagged hit pays ``base``'s blended prefill
    *and* the fallback's (a cold prefill is 1.0). ``cold`` serves the cold answer exactly.
    """
    by_key = {(r["id"], r["target"], r["variant"]): r for r in records if r.get("hit")}
    hits = [r for r in records if r.get("hit") and r["variant"] == base]
    if fallback != "cold":
        hits = [r for r in hits if (r["id"], r["target"], fallback) in by_key]
    if not hits:
        return []
    divergent = sum(not r["exact_answer"] for r in hits)
    rows = []
    for tau in GUARD_THRESHOLDS:
        fired = caught = 0
        top1, greedy_a, exact, rec = [], [], [], []
        for r in hits:
            fire = r["margins"][0] < tau
            served = r
            if fire:
                fired += 1
                caught += not r["exact_answer"]
                served = None if fallback == "cold" else by_key[(r["id"], r["target"], fallback)]
            top1.append(1.0 if served is None else served["top1_agreement"])
            greedy_a.append(1.0 if served is None else served["greedy_agreement"])
            exact.append(1.0 if served is None else float(served["exact_answer"]))
            extra = 0.0 if not fire else (1.0 if served is None else served["recomputed_fraction"])
            rec.append(r["recomputed_fraction"] + extra)
        rows.append({"threshold": tau, "fire_rate": fired / len(hits),
                     "catch_rate": caught / divergent if divergent else None, "divergent": divergent,
                     "false_alarm_rate": (fired - caught) / len(hits),
                     "top1_agreement": statistics.fmean(top1), "greedy_agreement": statistics.fmean(greedy_a),
                     "greedy_agreement_min": min(greedy_a), "exact_answer": statistics.fmean(exact),
                     "recomputed_fraction": statistics.fmean(rec)})
    return rows


def summarize(records: list[dict[str, Any]], vs: list[Variant]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = {v.name for v in vs}
    for layout in sorted({r["layout"] for r in records}):
        lay_records = [r for r in records if r["layout"] == layout]
        for v in vs:
            rs = [r for r in lay_records if r["variant"] == v.name]
            hits = [r for r in rs if r.get("hit")]
            e: dict[str, Any] = {"n": len(rs), "hits": len(hits), **dataclasses.asdict(v)}
            if not hits and rs:
                e["reasons"] = sorted({str(r.get("reason")) for r in rs})
            if hits:
                for key in ("top1_agreement", "greedy_agreement", "rouge_l", "ppl_ratio", "first_token_kl",
                            "recomputed_fraction", "reuse_ratio", "prompt_tokens", "seams"):
                    e[key] = statistics.fmean(r[key] for r in hits)
                e["greedy_agreement_min"] = min(r["greedy_agreement"] for r in hits)
                e["top1_agreement_min"] = min(r["top1_agreement"] for r in hits)
                e["recomputed_fraction_max"] = max(r["recomputed_fraction"] for r in hits)
                e["exact_answer"] = statistics.fmean(float(r["exact_answer"]) for r in hits)
                e["first_token_match"] = statistics.fmean(float(r["first_token_match"]) for r in hits)
                if all(r.get("task_rouge_cold") is not None for r in hits):
                    e["task_rouge_cold"] = statistics.fmean(r["task_rouge_cold"] for r in hits)
                    e["task_rouge_semblend"] = statistics.fmean(r["task_rouge_semblend"] for r in hits)
                    e["task_rouge_delta"] = e["task_rouge_semblend"] - e["task_rouge_cold"]
                e["speedup_median"] = statistics.median(r["ttft_cold_s"] / r["ttft_semblend_s"] for r in hits)
                e["guard"] = guard_eval(hits)
                if v.name in GUARD_BASES:
                    e["guard_fallback"] = {f: guard_fallback_eval(lay_records, v.name, f) for f in GUARD_FALLBACKS
                                           if f == "cold" or f in names}
            out.setdefault(layout, {})[v.name] = e
    return out


def meets(model: str, e: dict[str, Any]) -> bool:
    t = TARGETS[model]
    return bool(e.get("hits", 0) >= 50 and e["recomputed_fraction"] <= TARGETS["max_recomputed"]
                and e["top1_agreement"] >= t["top1"] and e["greedy_agreement"] >= t["greedy"]
                and abs(e.get("task_rouge_delta", 0.0)) <= TARGETS["task_rouge_delta"])


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, lay) for m, entry in result["models"].items() for lay in entry["summary"]]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.6 * len(panels)), squeeze=False)
    colors = {"mandatory": "k", "deviation": "tab:red", "query": "tab:blue", "position": "tab:green"}
    for row, (m, lay) in enumerate(panels):
        summ = result["models"][m]["summary"][lay]
        for col, (key, label) in enumerate((("top1_agreement", "teacher-forced top-1"),
                                            ("greedy_agreement", "greedy agreement"))):
            ax = axes[row][col]
            for strat in ("mandatory", "deviation", "query", "position"):
                pts = sorted((e["recomputed_fraction"] * 100, e[key], name) for name, e in summ.items()
                             if e.get("hits") and e["strategy"] == strat and e["budget"] < 1.0
                             and e["probe_layers"] == 2 and e["depth"] == 1.0 and e["seam_tokens"] == 4)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[strat], label=strat)
            for name, e in summ.items():
                if e.get("hits") and (e["seam_tokens"] != 4 or e["probe_layers"] != 2 or e["depth"] != 1.0):
                    ax.scatter([e["recomputed_fraction"] * 100], [e[key]], marker="x", color="gray")
                    ax.annotate(name, (e["recomputed_fraction"] * 100, e[key]), fontsize=6)
            t = TARGETS[result["models"][m].get("model_key", m)]["top1" if col == 0 else "greedy"]
            ax.axhline(t, color="gray", ls="--", lw=0.8)
            ax.axvline(5, color="gray", ls=":", lw=0.8)
            ax.set(xlabel="recomputed token-layers (% of cold prefill)", title=f"{m} / {lay}: {label}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _rounded(value: Any, digits: int = 4) -> Any:
    """Floats of per-hit records to ``digits`` significant digits (they are measurements: the summary is computed
    before rounding; a re-merge summarizes the rounded records). Halves the files of a 50-hit frontier."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    return value


def merge(out_path: Path, inputs: list[Path]) -> dict[str, Any]:
    """Join result files of one model entry split by layout (parallel runs) into one file, re-summarized."""
    import json

    merged: dict[str, Any] | None = None
    for path in inputs:
        part = json.loads(path.read_text())
        if merged is None:
            merged = {k: v for k, v in part.items() if k != "models"}
            merged["models"] = {}
        for key, entry in part["models"].items():
            have = merged["models"].get(key)
            if have is None:
                merged["models"][key] = entry
                continue
            have["records"] += entry["records"]
            have["wall_s"] = max(have["wall_s"], entry["wall_s"])
    assert merged is not None, "nothing to merge"
    for key, entry in merged["models"].items():
        names = list(dict.fromkeys(r["variant"] for r in entry["records"]))
        vs = [v for v in variant_set("all") if v.name in names]
        entry["summary"] = summarize(entry["records"], vs)
        entry["records"] = _rounded(entry["records"])
        entry["meets_targets"] = {lay: sorted(n for n, e in s.items() if meets(entry["model_key"], e))
                                  for lay, s in entry["summary"].items()}
    write_json(merged, out_path, compact=True)
    plot(merged, out_path.with_suffix(".png"))
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=tuple(DESCRIPTIONS))
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-dir", default=None, help="a converted model folder (offline GPU machine)")
    ap.add_argument("--dataset", default="lee", choices=("lee", "aclsum"))
    ap.add_argument("--lee-dir", default=None, help="folder with lee_background.cor and lee.cor (see _heldout.py)")
    ap.add_argument("--layouts", default=None, help="default: instruction_first,instruction_last[,rag for lee]")
    ap.add_argument("--items", type=int, default=25, help="Lee documents (or RAG groups) per layout, 2 targets each")
    ap.add_argument("--doc-articles", type=int, default=8, help="Lee reports per document (8: ~2K tokens)")
    ap.add_argument("--rag-articles", type=int, default=3, help="Lee reports per RAG donor (3 donors)")
    ap.add_argument("--papers", type=int, default=25, help="ACLSum test papers per layout (2 targets each)")
    ap.add_argument("--max-words", type=int, default=250, help="ACLSum paper length")
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--strategies", default="core", help="core | all | comma-separated variant names")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", str(RESULTS_DIR)))
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--key", default=None, help="entry name in the JSON (default: <model>-<dtype>)")
    ap.add_argument("--no-plot", action="store_true", help="write the JSON only (plot it later from the file)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="FILE",
                    help="OUT.json IN.json...: join per-layout result files into OUT.json (and its .png), then exit")
    args = ap.parse_args()
    if args.merge:
        merge(Path(args.merge[0]), [Path(p) for p in args.merge[1:]])
        return

    import json

    import torch

    from semblend import assets

    torch.set_num_threads(args.threads)
    model, tok, desc = load_model(args.model, args.dtype, args.device, args.model_dir)
    vs = variant_set(args.strategies)
    layouts = (args.layouts or ("instruction_first,instruction_last" + (",rag" if args.dataset == "lee" else "")))
    if args.dataset == "lee":
        from _heldout import lee_articles

        articles = lee_articles(args.lee_dir)
        dataset = "Lee news corpus (gensim 4.4.0 test data: lee_background.cor + lee.cor), held out"
    else:
        papers = assets.load_aclsum("test", n=args.papers)
        dataset = "ACLSum test split (aclsum package)"
    cold_cache = ColdCache(f"{args.model}-{args.dtype}-{args.device.split(':')[0]}", args.answer_tokens)
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    key = args.key or f"{args.model}-{args.dtype}"

    def write(all_records: list[dict[str, Any]], final: bool = False) -> dict[str, Any]:
        summary = summarize(all_records, vs)
        entry = {
            "rag_articles": args.rag_articles, "model": desc, "model_key": args.model, "dtype": args.dtype, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "dataset": dataset, "items": args.items, "doc_articles": args.doc_articles,
            "papers": args.papers, "max_words": args.max_words,
            "answer_tokens": args.answer_tokens, "wall_s": time.perf_counter() - t0, "summary": summary,
            "meets_targets": {lay: sorted(n for n, e in s.items() if meets(args.model, e))
                              for lay, s in summary.items()},
            "records": _rounded(all_records),
        }
        out = Path(args.out)
        path = out / f"quality_frontier_{args.tag}.json"
        result = json.loads(path.read_text()) if path.is_file() else {
            "benchmark": "quality_frontier", "dataset": dataset, "targets": TARGETS, "models": {}}
        result["models"][key] = entry
        write_json(result, path, compact=True)
        if final and not args.no_plot:
            plot(result, out / f"quality_frontier_{args.tag}.png")
        return summary

    with torch.no_grad():
        for layout in layouts.split(","):
            if args.dataset == "lee":
                work = build_work_lee(tok, layout, articles, args.doc_articles, args.items, args.rag_articles)
            else:
                work = build_work(tok, layout, papers, args.max_words)
            done = list(records)
            records += run_layout(model, tok, args.model, layout, work, vs, args, cold_cache,
                                  flush=lambda rs, done=done: write(done + rs))
    summary = write(records, final=True)
    for lay, s in summary.items():
        for name, e in s.items():
            if e.get("hits"):
                task = (f" task={e['task_rouge_cold']:.3f}->{e['task_rouge_semblend']:.3f}"
                        if "task_rouge_cold" in e else "")
                print(f"{key:14s} {lay:18s} {name:14s} hits={e['hits']:3d} tok={e['prompt_tokens']:.0f} "
                      f"rec={e['recomputed_fraction']:.3f} top1={e['top1_agreement']:.4f} "
                      f"greedy={e['greedy_agreement']:.3f} (min {e['greedy_agreement_min']:.2f}) "
                      f"exact={e['exact_answer']:.2f} rougeL={e['rouge_l']:.3f} kl={e['first_token_kl']:.4f} "
                      f"ppl={e['ppl_ratio']:.4f}{task}")
            else:
                print(f"{key:14s} {lay:18s} {name:14s} hits=0/{e['n']} {e.get('reasons', '')}")


if __name__ == "__main__":
    main()
