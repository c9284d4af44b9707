"""``semblend demo``: SemBlend vs cold prefill on a real model and real papers, offline, on CPU in minutes.

For each of ``n_papers`` ACLSum papers and each of three instruction phrasings (instruction first, then the
paper: a new phrasing moves the whole paper by a few positions):

1. cold: a plain prefill and a greedy answer of ``answer_tokens`` tokens (the reference; never a donor);
2. SemBlend: the engine plans against the prompts it has seen; the first phrasing finds no donor (runs cold and
   becomes the donor), the next two reuse its KV with RoPE re-rotation and selective recompute;
3. agreement: teacher-forced top-1 agreement of the SemBlend prefill with the cold answer's tokens.

``run_demo`` returns ``{"rows": [...], "summary": {...}, "model": ..., "device": ...}`` (JSON-able) and prints a
rich table unless ``as_json``.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from semblend._rich import wide_console

logger = logging.getLogger(__name__)

__all__ = ["run_demo"]

MAX_WORDS = 400  # ~550-token prompts: long enough to show reuse, short enough for two CPU cores


def _fmt_rows(result: dict[str, Any], console: Any = None) -> None:
    from rich.table import Table

    console = console or wide_console()
    table = Table(title=f"SemBlend demo: {result['model']} on ACLSum ({result['device']})")
    for col, just in (("paper", "left"), ("phrasing", "right"), ("prompt tok", "right"), ("outcome", "left"),
                      ("reason", "left"),
                      ("reuse", "right"), ("recomputed", "right"), ("TTFT cold", "right"),
                      ("TTFT SemBlend", "right"), ("speedup", "right"), ("agreement", "right")):
        table.add_column(col, justify=just)
    for r in result["rows"]:
        table.add_row(
            r["paper"], str(r["phrasing"]), str(r["prompt_tokens"]), r["outcome"],
            "" if r["outcome"] == "materialized" else r["reason"], f"{r['reuse_ratio']:.0%}",
            f"{r['recomputed_fraction']:.0%}", f"{r['ttft_cold_s'] * 1e3:.0f} ms",
            f"{r['ttft_semblend_s'] * 1e3:.0f} ms", f"{r['speedup']:.2f}x", f"{r['agreement']:.0%}",
        )
    console.print(table)
    s = result["summary"]
    if s["hits"]:
        console.print(
            f"{s['hits']}/{s['prompts']} prompts reused donor KV: median TTFT speedup {s['median_speedup']:.2f}x, "
            f"mean reuse {s['mean_reuse_ratio']:.0%}, mean recomputed {s['mean_recomputed_fraction']:.0%}, "
            f"top-1 agreement with cold {s['mean_agreement']:.1%} (total {s['total_s']:.0f} s)"
        )
    else:
        console.print(f"no prompt reused donor KV ({s['prompts']} prompts, total {s['total_s']:.0f} s)")


def run_demo(n_papers: int = 3, device: str = "cpu", as_json: bool = False, *, answer_tokens: int = 24,
             max_words: int = MAX_WORDS, console: Any = None) -> dict[str, Any]:
    """Run the demo (see the module docstring) and return its rows and summary.

    Args:
        n_papers: ACLSum test papers to use (three prompts each).
        device: ``"cpu"`` or ``"cuda"``.
        as_json: return only; no table is printed (the CLI prints the JSON).
        answer_tokens: length of the cold greedy answer that agreement is measured over.
        max_words: paper text truncation (prompt length control).
    """
    import torch

    from semblend import assets
    from semblend.integration.transformers.engine import SemBlendEngine
    from semblend.integration.transformers.metrics import teacher_forced_logits, top1_agreement
    from semblend_core import SemBlendConfig

    if n_papers < 1:
        raise ValueError(f"n_papers must be >= 1, got {n_papers}")
    t_start = time.perf_counter()
    model, tok = assets.load_smollm2(device=device)
    papers = assets.load_aclsum("test", n=n_papers)
    engine = SemBlendEngine(model, tok, SemBlendConfig())
    prompts = [[assets.paper_prompt(tok, p.text(max_words=max_words), ins) for ins in assets.INSTRUCTION_PHRASINGS]
               for p in papers]
    # Warm-up on a scratch engine: first-call allocations and code paths (cold and blended) stay out of the timings.
    scratch = SemBlendEngine(model, tok, SemBlendConfig())
    scratch.prefill(prompts[0][0])
    scratch.prefill(prompts[0][1], register=False)
    del scratch

    rows: list[dict[str, Any]] = []
    for paper, paper_prompts in zip(papers, prompts):
        for phrasing, ids in enumerate(paper_prompts):
            cold = engine.generate(ids, max_new_tokens=answer_tokens, force_cold=True)
            answer = list(cold.token_ids)
            # Two timings each, the faster kept: a shared 2-core machine has hiccups of hundreds of ms.
            ttft_cold = min(cold.timings["total"], engine.cold_prefill(ids).timings["total"])
            first = engine.prefill(ids, register=False)
            pre = engine.prefill(ids)  # same donors as `first`; a miss runs cold and donates, a hit reuses KV
            logits = teacher_forced_logits(model, pre, answer)
            ttft_sb = min(first.timings["total"], pre.timings["total"])
            rows.append({
                "paper": paper.id, "phrasing": phrasing, "outcome": pre.outcome, "reason": pre.reason,
                "prompt_tokens": pre.prompt_tokens, "reuse_ratio": round(pre.reuse_ratio, 4),
                "recomputed_fraction": round(pre.recomputed_fraction, 4),
                "ttft_cold_s": round(ttft_cold, 5), "ttft_semblend_s": round(ttft_sb, 5),
                "speedup": round(ttft_cold / ttft_sb, 3) if ttft_sb > 0 else 0.0,
                "agreement": round(top1_agreement(logits, answer), 4),
                "timings_ms": {k: round(v * 1e3, 2) for k, v in pre.timings.items()},
            })
            logger.info("demo %s phrasing %d: %s", paper.id, phrasing, pre.outcome)

    hits = [r for r in rows if r["outcome"] == "materialized"]
    summary = {
        "prompts": len(rows), "hits": len(hits),
        "median_speedup": round(statistics.median(r["speedup"] for r in hits), 3) if hits else None,
        "mean_reuse_ratio": round(statistics.fmean(r["reuse_ratio"] for r in hits), 4) if hits else None,
        "mean_recomputed_fraction": round(statistics.fmean(r["recomputed_fraction"] for r in hits), 4)
        if hits else None,
        "mean_agreement": round(statistics.fmean(r["agreement"] for r in hits), 4) if hits else None,
        "answer_tokens": answer_tokens, "total_s": round(time.perf_counter() - t_start, 2),
        "torch_threads": torch.get_num_threads(),
    }
    result = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized fp32)", "dataset": "ACLSum test",
              "device": str(device), "rows": rows, "summary": summary}
    if not as_json:
        _fmt_rows(result, console)
    return result
