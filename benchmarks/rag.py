"""RAG benchmark: multi-donor vs single-donor plans on real text (ACLSum abstracts as retrieved passages).

Workload: a pool of passages (ACLSum abstracts, title + abstract, truncated to ``--max-words``). Each request is
the SmolLM2 chat template around one system prompt, 3-5 passages drawn from the pool in random order (one
``Document:`` block each) and a question drawn from a few templates. Donors are earlier requests: the passages of
one prompt typically live in several donors, each of which also holds passages this prompt does not use.

Three parts, each recorded in the JSON:

* ``stream``: requests arrive one by one; each is planned by two pipelines holding the same donors (every earlier
  request), ``max_donors_per_plan=1`` (single-donor, the behaviour before multi-donor plans) and the default 4.
  Coverage (planned reused tokens / prompt tokens, 0 for a miss), hit rate, reuse ratio of hits, donors per hit.
  Run for a small "hot" pool and the whole pool.
* ``latency``: ``plan()`` wall time (p50 / p99, hits and misses apart) with 1K and 10K donors from the same
  generator, single vs multi, and the multi-donor stage's own share (``PlanTimings.multi_donor_s``).
* ``quality`` (real SmolLM2-135M-Instruct weights through ``SemBlendEngine``, CPU): requests go through the engine
  (cold prompts donate their KV); for every materialized hit, teacher-forced top-1 agreement with the cold greedy
  answer, greedy agreement of SemBlend's own ``--answer-tokens`` answer with cold's, first-token match, recomputed
  fraction; plus the assembly cost of one ``rerotate_scatter`` per donor vs stacking the donors' entries first.

Run::

    python benchmarks/rag.py                       # CPU: writes benchmarks/results/rag_cpu.json and .png
    python benchmarks/rag.py --quick --out /tmp    # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS_DIR, setup_logging, write_json

SYSTEM = ("You are a research assistant. Answer the question using only the documents provided. Cite the "
          "documents you use by their title, and say so when the documents do not contain the answer.")
QUESTIONS = (
    "Which of these documents is most relevant to machine translation? Explain briefly.",
    "Summarize the main contribution of each document in one sentence.",
    "Which document proposes a new dataset, if any?",
    "Compare the evaluation methods used in these documents.",
    "Which of these papers would you read first to learn about neural summarization, and why?",
    "List the tasks studied in these documents.",
    "Do any of these documents report results on English only? Answer briefly.",
    "What problem do the first two documents have in common?",
)


@dataclasses.dataclass(frozen=True)
class Request:
    passages: tuple[int, ...]
    question: int
    ids: tuple[int, ...]


def load_passages(max_words: int) -> list[str]:
    from semblend import assets

    papers = [p for split in ("train", "val", "test") for p in assets.load_aclsum(split)]
    return [p.text(sections=("abstract",), max_words=max_words) for p in papers]


def make_requests(tok: Any, passages: list[str], pool: int, n: int, seed: int, k: tuple[int, int] = (3, 5)
                  ) -> list[Request]:
    """``n`` requests over the first ``pool`` passages, 3-5 each in random order, one question each."""
    rng = np.random.default_rng(seed)
    specs = []
    for _ in range(n):
        count = int(rng.integers(k[0], k[1] + 1))
        specs.append((tuple(int(i) for i in rng.choice(pool, size=count, replace=False)),
                      int(rng.integers(len(QUESTIONS)))))
    texts = []
    for chosen, q in specs:
        body = "\n\n".join(f"Document:\n{passages[i]}" for i in chosen) + f"\n\n{QUESTIONS[q]}"
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": body}]
        texts.append(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    enc = tok(texts, add_special_tokens=False)["input_ids"]  # batched: the fast tokenizer runs it in Rust
    return [Request(c, q, tuple(ids)) for (c, q), ids in zip(specs, enc)]


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs), q)) if xs else None


def _pipelines(**kw: Any) -> dict[str, Any]:
    from semblend_core import SemBlendConfig
    from semblend_core.pipeline import SemBlendPipeline

    return {name: SemBlendPipeline(SemBlendConfig(max_donors_per_plan=mdp, **kw))
            for name, mdp in (("single", 1), ("multi", 4))}


def run_stream(tok: Any, passages: list[str], pool: int, n: int, seed: int, warmup: int) -> dict[str, Any]:
    reqs = make_requests(tok, passages, pool, n, seed)
    pipes = _pipelines()
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in pipes}
    for i, r in enumerate(reqs):
        for name, pipe in pipes.items():
            if i >= warmup:
                plan = pipe.plan(list(r.ids))
                rows[name].append({"hit": plan.is_hit, "reason": plan.reason, "tokens": len(r.ids),
                                   "reused": plan.reused_tokens if plan.is_hit else 0,
                                   "donors": len(plan.donor_ids), "plan_ms": plan.timings.total_s * 1e3})
            pipe.register_donor(f"r{i}", list(r.ids))
    out: dict[str, Any] = {"pool": pool, "requests": n, "warmup": warmup,
                           "prompt_tokens_mean": statistics.fmean(len(r.ids) for r in reqs)}
    for name, rs in rows.items():
        hits = [x for x in rs if x["hit"]]
        out[name] = {
            "planned": len(rs), "hit_rate": len(hits) / len(rs),
            "coverage": sum(x["reused"] for x in rs) / sum(x["tokens"] for x in rs),
            "reuse_ratio_hits": statistics.fmean(x["reused"] / x["tokens"] for x in hits) if hits else 0.0,
            "donors_per_hit": {str(d): sum(1 for x in hits if x["donors"] == d) for d in range(1, 5)},
            "reasons": {k: sum(1 for x in rs if x["reason"] == k) for k in sorted({x["reason"] for x in rs})},
            "plan_ms_p50": _pct([x["plan_ms"] for x in rs], 50),
        }
    return out


def run_latency(tok: Any, passages: list[str], donors: int, plans: int, seed: int) -> dict[str, Any]:
    reqs = make_requests(tok, passages, len(passages), donors + plans, seed)
    pipes = _pipelines(max_donors=max(10_000, donors))
    t0 = time.perf_counter()
    for i, r in enumerate(reqs[:donors]):
        for pipe in pipes.values():
            pipe.register_donor(f"r{i}", list(r.ids))
    register_s = (time.perf_counter() - t0) / (2 * donors)
    out: dict[str, Any] = {"donors": donors, "plans": plans, "register_ms_mean": register_s * 1e3}
    targets = [list(r.ids) for r in reqs[donors:]]
    for pipe in pipes.values():
        for t in targets[:10]:
            pipe.plan(t)  # warm-up
    # Interleaved (single, multi on the same target, alternating which goes first) so machine load hits both
    # alike; wall time and this thread's CPU time per plan (CPU time is what a loaded host cannot inflate much).
    raw: dict[str, dict[str, list[float]]] = {n: {"hit": [], "miss": [], "cpu": [], "multi": [], "cov": []}
                                              for n in pipes}
    names = list(pipes)
    for j, t in enumerate(targets):
        for name in names if j % 2 == 0 else names[::-1]:
            c0, t0 = time.thread_time(), time.perf_counter()
            plan = pipes[name].plan(t)
            ms, cpu_ms = (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3
            r = raw[name]
            r["hit" if plan.is_hit else "miss"].append(ms)
            r["cpu"].append(cpu_ms)
            r["multi"].append(plan.timings.multi_donor_s * 1e3)
            r["cov"].append(plan.reuse_ratio if plan.is_hit else 0.0)
    for name, r in raw.items():
        all_ms = r["hit"] + r["miss"]
        out[name] = {"p50_ms": _pct(all_ms, 50), "p99_ms": _pct(all_ms, 99),
                     "cpu_p50_ms": _pct(r["cpu"], 50), "cpu_p99_ms": _pct(r["cpu"], 99),
                     "hit_p50_ms": _pct(r["hit"], 50), "hit_p99_ms": _pct(r["hit"], 99),
                     "miss_p50_ms": _pct(r["miss"], 50), "miss_p99_ms": _pct(r["miss"], 99),
                     "multi_donor_stage_p50_ms": _pct(r["multi"], 50),
                     "multi_donor_stage_p99_ms": _pct(r["multi"], 99),
                     "hit_rate": len(r["hit"]) / len(targets), "coverage": statistics.fmean(r["cov"])}
    return out


def _stacked_assembly(plan: Any, entries: dict[str, Any], prefix_len: int, spec: Any) -> tuple[Any, float]:
    """The alternative to one rerotate_scatter per donor: concatenate the donors' entries along the token axis,
    then one call with every span's source moved by its entry's offset (each span keeps its own RoPE delta).
    Returns the assembled keys and the seconds it took, copy included."""
    import torch

    from semblend_core.kv_layout import HF_CONTIGUOUS, KvCacheView
    from semblend_core.triton_kernels import rerotate_scatter

    t0 = time.perf_counter()
    offsets, at = {}, 0
    for d in plan.donor_ids:
        offsets[d], at = at, at + entries[d].shape[2]
    stacked = torch.cat([entries[d] for d in plan.donor_ids], dim=2)
    num_layers, _, _, heads, dim = stacked.shape
    k_store = torch.zeros((num_layers, heads, plan.target_len, dim), dtype=stacked.dtype)
    v_store = torch.zeros_like(k_store)
    src, dst, delta = [], [], []
    for s in plan.spans:
        t1 = min(s.target_end, prefix_len)
        if t1 <= s.target_start:
            continue
        n, start = t1 - s.target_start, s.donor_start + offsets[plan.donor_of(s)]
        src.append(np.arange(start, start + n))
        dst.append(np.arange(s.target_start, t1))
        delta.append(np.full(n, s.delta))
    view = KvCacheView.from_separate(HF_CONTIGUOUS, [k_store[i][None] for i in range(num_layers)],
                                     [v_store[i][None] for i in range(num_layers)])
    rerotate_scatter(KvCacheView.from_donor_store(stacked), view, torch.as_tensor(np.concatenate(src)),
                     torch.as_tensor(np.concatenate(dst)), torch.as_tensor(np.concatenate(delta)), spec,
                     validate_indices=False)
    return k_store.transpose(1, 2), time.perf_counter() - t0


def run_quality(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from semblend import assets
    from semblend.integration.transformers import SemBlendEngine
    from semblend.integration.transformers.blend import assemble_kv
    from semblend.integration.transformers.metrics import rouge_l, teacher_forced_logits, top1_agreement
    from semblend_core import SemBlendConfig

    torch.set_num_threads(max(1, args.threads))
    model, tok = assets.load_smollm2()
    passages = load_passages(args.quality_words)
    reqs = make_requests(tok, passages, args.quality_pool, args.quality_requests, args.seed + 7, k=(3, 4))
    eng = SemBlendEngine(model, tok, SemBlendConfig())
    records: list[dict[str, Any]] = []
    assembly: list[dict[str, float]] = []
    t_start = time.perf_counter()
    for i, r in enumerate(reqs):
        if len([x for x in records if x["outcome"] == "materialized"]) >= args.quality_hits:
            break
        if time.perf_counter() - t_start > args.quality_budget_s:
            break
        ids = list(r.ids)
        pre = eng.prefill(ids, register=True)  # a cold prompt donates its KV; a materialized one does not
        rec: dict[str, Any] = {"request": i, "prompt_tokens": len(ids), "outcome": pre.outcome, "reason": pre.reason}
        if pre.outcome != "materialized":
            records.append(rec)
            continue
        plan = pre.plan
        cold = eng.cold_prefill(ids)
        cold_first = int(cold.logits.argmax())
        cold_answer = [cold_first] + eng.decode(eng.fork(cold), cold_first, args.answer_tokens - 1)
        first = int(pre.logits.argmax())
        sb_answer = [first] + eng.decode(eng.fork(pre), first, args.answer_tokens - 1)
        tf = teacher_forced_logits(model, pre, cold_answer)
        agree = sum(1 for a, b in zip(sb_answer, cold_answer) if a == b) / max(len(cold_answer), 1)
        rec.update({
            "donors": len(plan.donor_ids), "reuse_ratio": plan.reuse_ratio, "seams": len(plan.seams),
            "recomputed_fraction": pre.recomputed_fraction, "top1_agreement": top1_agreement(tf, cold_answer),
            "greedy_agreement": agree, "exact_answer": sb_answer == cold_answer,
            "first_token_match": first == cold_first,
            "rouge_l": rouge_l(tok.decode(cold_answer, skip_special_tokens=True),
                               tok.decode(sb_answer, skip_special_tokens=True)),
            "ttft_cold_s": cold.timings["total"], "ttft_semblend_s": pre.timings["total"],
        })
        records.append(rec)
        if plan.multi_donor and len(assembly) < args.assembly_samples:
            # per-donor rerotate_scatter (the engine's path) vs stacking the entries first
            entries = {d: eng.kv_store.get(eng.namespace.key, d).kv for d in plan.donor_ids}
            reps = 2
            t0 = time.perf_counter()
            for _ in range(reps):
                k_a, _ = assemble_kv(plan, entries, len(ids) - 1, eng.rope_spec, total_len=len(ids))
            per_donor = (time.perf_counter() - t0) / reps
            stacked_s = []
            for _ in range(reps):
                k_b, sec = _stacked_assembly(plan, entries, len(ids) - 1, eng.rope_spec)
                stacked_s.append(sec)
            assert torch.equal(k_a[:, : len(ids) - 1], k_b[:, : len(ids) - 1])  # the same KV either way
            assembly.append({"donors": len(plan.donor_ids), "per_donor_ms": per_donor * 1e3,
                             "stacked_ms": statistics.fmean(stacked_s) * 1e3})
    hits = [x for x in records if x["outcome"] == "materialized"]

    def mean(key: str, rs: list[dict[str, Any]]) -> float | None:
        return statistics.fmean(float(x[key]) for x in rs) if rs else None

    groups = {"all": hits, "multi_donor": [x for x in hits if x["donors"] > 1],
              "single_donor": [x for x in hits if x["donors"] == 1]}
    summary = {name: {"hits": len(rs), **{k: mean(k, rs) for k in (
        "top1_agreement", "greedy_agreement", "exact_answer", "first_token_match", "rouge_l", "reuse_ratio",
        "recomputed_fraction", "donors")}} for name, rs in groups.items()}
    for name, rs in groups.items():
        if rs:
            summary[name]["speedup_median"] = statistics.median(x["ttft_cold_s"] / x["ttft_semblend_s"] for x in rs)
    return {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32; real weights)", "device": "cpu",
        "torch_threads": torch.get_num_threads(), "pool": args.quality_pool, "max_words": args.quality_words,
        "answer_tokens": args.answer_tokens, "requests_run": len(records),
        "outcomes": {k: sum(1 for x in records if x["outcome"] == k) for k in sorted({x["outcome"] for x in records})},
        "reasons": {k: sum(1 for x in records if x["reason"] == k) for k in sorted({x["reason"] for x in records})},
        "summary": summary, "assembly": {
            "n": len(assembly),
            "per_donor_ms_median": statistics.median(a["per_donor_ms"] for a in assembly) if assembly else None,
            "stacked_ms_median": statistics.median(a["stacked_ms"] for a in assembly) if assembly else None,
        },
        "wall_s": time.perf_counter() - t_start, "records": records,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    labels, width = [f"pool {s['pool']}" for s in result["stream"]], 0.2
    x = np.arange(len(labels))
    for j, (name, key, hatch) in enumerate((("single", "coverage", ""), ("multi", "coverage", ""),
                                            ("single", "hit_rate", "//"), ("multi", "hit_rate", "//"))):
        vals = [s[name][key] for s in result["stream"]]
        ax.bar(x + (j - 1.5) * width, vals, width, label=f"{name}: {key}", hatch=hatch,
               color="tab:gray" if name == "single" else "tab:blue", alpha=0.6 if hatch else 1.0)
    ax.set_xticks(x, labels)
    ax.set(ylim=(0, 1), title="RAG stream: coverage and hit rate")
    ax.legend(fontsize=7)
    ax = axes[1]
    cells = result["latency"]
    x = np.arange(len(cells))
    for j, (name, key) in enumerate((("single", "cpu_p50_ms"), ("multi", "cpu_p50_ms"), ("single", "cpu_p99_ms"),
                                     ("multi", "cpu_p99_ms"))):
        ax.bar(x + (j - 1.5) * width, [c[name][key] for c in cells], width, label=f"{name} {key[4:7]}",
               color="tab:gray" if name == "single" else "tab:blue", alpha=1.0 if "p50" in key else 0.5)
    ax.set_xticks(x, [f"{c['donors']} donors" for c in cells])
    ax.set(ylabel="ms (thread CPU time)", title="plan() latency, 1K / 10K donors")
    ax.legend(fontsize=7)
    ax = axes[2]
    q = result.get("quality")
    if q:
        hits = [r for r in q["records"] if r["outcome"] == "materialized"]
        for key, marker in (("top1_agreement", "o"), ("greedy_agreement", "x")):
            ax.scatter([r["reuse_ratio"] for r in hits], [r[key] for r in hits], marker=marker, label=key)
        ax.set(xlabel="reuse ratio of the hit", ylim=(-0.05, 1.05),
               title=f"SmolLM2 quality vs cold ({len(hits)} hits, {q['answer_tokens']} tokens)")
        ax.legend(fontsize=7)
    fig.suptitle("SemBlend multi-donor plans on ACLSum abstracts as RAG passages (CPU)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-words", type=int, default=120, help="passage length cap (stream and latency)")
    ap.add_argument("--stream-requests", type=int, default=400)
    ap.add_argument("--pools", default="40,250", help="passage pool sizes of the stream part")
    ap.add_argument("--latency-donors", default="1000,10000")
    ap.add_argument("--latency-plans", type=int, default=200)
    ap.add_argument("--quality-pool", type=int, default=10)
    ap.add_argument("--quality-words", type=int, default=70)
    ap.add_argument("--quality-requests", type=int, default=120)
    ap.add_argument("--quality-hits", type=int, default=24)
    ap.add_argument("--quality-budget-s", type=float, default=420.0, help="stop the quality part after this")
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated parts (stream, latency, quality) to (re)run; the "
                                                 "others are kept from an existing result file")
    ap.add_argument("--assembly-samples", type=int, default=4, help="multi-donor hits whose assembly is timed")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    setup_logging(args.verbose)
    if args.quick:
        args.stream_requests, args.pools, args.latency_donors, args.latency_plans = 80, "20", "200", 30
        args.quality_hits, args.quality_requests = 3, 20
    from semblend import assets

    t0 = time.perf_counter()
    _, tok = assets.load_smollm2()
    passages = load_passages(args.max_words)
    result: dict[str, Any] = {
        "benchmark": "rag", "dataset": f"ACLSum abstracts ({len(passages)} papers, title + abstract, <= "
                                       f"{args.max_words} words)", "tokenizer": "SmolLM2-135M-Instruct",
        "workload": "system prompt + 3-5 passages in random order + one of 8 questions, SmolLM2 chat template; "
                    "donors are earlier requests", "config": {"max_donors_per_plan": [1, 4], "other": "defaults"},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"rag_{args.tag}.json"
    parts = {"stream": lambda: [run_stream(tok, passages, int(p), args.stream_requests, args.seed, warmup=20)
                                for p in args.pools.split(",")],
             "latency": lambda: [run_latency(tok, passages, int(d), args.latency_plans, args.seed + 1)
                                 for d in args.latency_donors.split(",")],
             "quality": lambda: run_quality(args)}
    if args.skip_quality:
        parts.pop("quality")
    if args.only:
        keep = set(args.only.split(","))
        if path.is_file():
            old = json.loads(path.read_text())
            result.update({k: v for k, v in old.items() if k in ("stream", "latency", "quality", "part_wall_s")
                           and k not in keep})
        parts = {k: v for k, v in parts.items() if k in keep}
    for name, run in parts.items():
        tp = time.perf_counter()
        result[name] = run()
        result.setdefault("part_wall_s", {})[name] = time.perf_counter() - tp
        result["wall_s"] = time.perf_counter() - t0
        write_json(result, path)  # after every part: a long run leaves what it measured
    print(f"wrote {path}")
    plot(result, args.out / f"rag_{args.tag}.png")
    for s in result["stream"]:
        print(f"pool {s['pool']}: single cov {s['single']['coverage']:.3f} hit {s['single']['hit_rate']:.2f} | "
              f"multi cov {s['multi']['coverage']:.3f} hit {s['multi']['hit_rate']:.2f}")
    for c in result["latency"]:
        print(f"{c['donors']} donors: single cpu p50/p99 {c['single']['cpu_p50_ms']:.2f}/{c['single']['cpu_p99_ms']:.2f}"
              f" ms | multi {c['multi']['cpu_p50_ms']:.2f}/{c['multi']['cpu_p99_ms']:.2f} ms; hit rate single "
              f"{c['single']['hit_rate']:.2f} multi {c['multi']['hit_rate']:.2f}")
    if "quality" in result:
        print(result["quality"]["summary"], result["quality"]["assembly"])


if __name__ == "__main__":
    main()
