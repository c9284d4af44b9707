"""Discovery + alignment on real text (ACLSum): which earlier prompt would SemBlend reuse, and how much of it.

Used by ``semblend demo`` (when the model demo is unavailable) and ``benchmarks/aclsum_discovery.py``.

Protocol: every paper gets three aspect instructions (challenge / approach / outcome, the ACLSum summary
aspects). For each *registered* paper one instruction+paper prompt becomes a donor; the other two instructions of
the same paper are planned and must hit that donor. Prompts about *held-out* papers (no donor of theirs is
registered) are planned too and must not hit anything: any hit there is a false hit, as is a same-paper prompt
that hits another paper's donor. The instruction goes before the paper (``instruction_first``: the paper's KV is
shifted, one seam) or after it (``instruction_last``: the paper is a context-exact shared prefix).

No model runs here: this measures the planner (discovery, alignment, gates), not generation quality.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from semblend._rich import wide_console
from semblend_core.config import SemBlendConfig

logger = logging.getLogger(__name__)

__all__ = [
    "ASPECT_INSTRUCTIONS",
    "LAYOUTS",
    "DiscoveryRow",
    "paper_message",
    "render_rows",
    "run_discovery",
    "summarize_rows",
]

# One natural instruction per ACLSum aspect. Different words and lengths, so the paper's RoPE shift differs too.
ASPECT_INSTRUCTIONS = {
    "challenge": "What problem does this paper address, and why is it difficult? Answer in two or three sentences.",
    "approach": "Describe the method the authors propose in this paper.",
    "outcome": "Summarize the main results and conclusions of this research paper for a busy reader, "
               "in plain language and without jargon.",
}
LAYOUTS = ("instruction_first", "instruction_last")


def paper_message(paper_text: str, instruction: str, layout: str) -> str:
    """The user message (same layouts as :func:`semblend.assets.paper_prompt`)."""
    if layout == "instruction_first":
        return f"{instruction}\n\nPaper:\n{paper_text}"
    if layout == "instruction_last":
        return f"Paper:\n{paper_text}\n\n{instruction}"
    raise ValueError(f"layout={layout!r}; allowed: {', '.join(LAYOUTS)}")


@dataclass(frozen=True)
class DiscoveryRow:
    """One planned prompt. ``expected_donor`` is None for a held-out paper (any hit is a false hit)."""

    paper_id: str
    aspect: str
    layout: str
    registered: bool
    expected_donor: str | None
    is_hit: bool
    donor_id: str | None
    reason: str
    reuse_ratio: float
    similarity: float
    seams: int
    prompt_tokens: int
    plan_ms: float

    @property
    def correct_hit(self) -> bool:
        return self.is_hit and self.expected_donor is not None and self.donor_id == self.expected_donor

    @property
    def false_hit(self) -> bool:
        return self.is_hit and self.donor_id != self.expected_donor


def run_discovery(registered: Sequence[Any], held_out: Sequence[Any], tokenizer: Any, layout: str, *,
                  config: SemBlendConfig | None = None, query_registered: Sequence[Any] | None = None,
                  pass_text: bool = True, sections: Sequence[str] = ("abstract", "introduction"),
                  progress: bool = False) -> list[DiscoveryRow]:
    """Register one prompt per paper of ``registered`` (aspect rotating with the paper's index), then plan the
    other two aspects of every paper in ``query_registered`` (default: all of ``registered``) and all three
    aspects of every paper in ``held_out``. Papers are :class:`semblend.assets.AclsumPaper`; ``tokenizer`` a
    :class:`semblend.text_tokens.TextTokenizer`. ``pass_text`` gives the message text to ``register_donor`` and
    ``plan`` as an adapter would (the embedding path then runs when token anchors find nothing)."""
    from semblend_core.pipeline import SemBlendPipeline

    cfg = config if config is not None else SemBlendConfig()
    reg_ids = {p.id for p in registered}
    if any(p.id in reg_ids for p in held_out):
        raise ValueError("held_out papers must not be registered")
    aspects = tuple(ASPECT_INSTRUCTIONS)
    pipe = SemBlendPipeline(cfg)
    donor_aspect: dict[str, str] = {}
    for i, paper in enumerate(registered):
        aspect = aspects[i % len(aspects)]
        message = paper_message(paper.text(sections), ASPECT_INSTRUCTIONS[aspect], layout)
        pipe.register_donor(f"{paper.id}/{aspect}", tokenizer.chat(message), message if pass_text else None)
        donor_aspect[paper.id] = aspect
    jobs: list[tuple[Any, str, str | None]] = []
    for paper in (query_registered if query_registered is not None else registered):
        if paper.id not in donor_aspect:
            raise ValueError(f"query_registered paper {paper.id} is not registered")
        jobs += [(paper, a, f"{paper.id}/{donor_aspect[paper.id]}") for a in aspects if a != donor_aspect[paper.id]]
    for paper in held_out:
        jobs += [(paper, a, None) for a in aspects]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=f"plan ({layout})", leave=False, dynamic_ncols=True)
    rows = []
    for paper, aspect, expected in jobs:
        message = paper_message(paper.text(sections), ASPECT_INSTRUCTIONS[aspect], layout)
        ids = tokenizer.chat(message)
        t0 = time.perf_counter()
        plan = pipe.plan(ids, message if pass_text else None)
        ms = (time.perf_counter() - t0) * 1e3
        rows.append(DiscoveryRow(paper.id, aspect, layout, expected is not None, expected, plan.is_hit,
                                 plan.donor_id, plan.reason, round(plan.reuse_ratio, 6),
                                 round(float(plan.similarity), 6), len(plan.seams), len(ids), round(ms, 4)))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def summarize_rows(rows: Sequence[DiscoveryRow], min_reuse: float = 0.8) -> dict[str, Any]:
    """Hit rate and reuse for same-paper prompts, false-hit rate for held-out ones, plan latency."""
    same = [r for r in rows if r.registered]
    other = [r for r in rows if not r.registered]
    good = [r for r in same if r.correct_hit]
    reuse = np.array([r.reuse_ratio for r in good], dtype=np.float64)
    lat = np.array([r.plan_ms for r in rows], dtype=np.float64)
    out: dict[str, Any] = {
        "same_paper": {
            "prompts": len(same),
            "hits": len(good),
            "hit_rate": round(len(good) / len(same), 6) if same else None,
            f"hits_with_reuse_ge_{min_reuse:.2f}": int((reuse >= min_reuse).sum()),
            f"hit_rate_with_reuse_ge_{min_reuse:.2f}": round(float((reuse >= min_reuse).sum()) / len(same), 6)
            if same else None,
            "mean_reuse_ratio": round(float(reuse.mean()), 6) if reuse.size else None,
            "min_reuse_ratio": round(float(reuse.min()), 6) if reuse.size else None,
            "wrong_donor_hits": sum(1 for r in same if r.false_hit),
            "miss_reasons": dict(Counter(r.reason for r in same if not r.is_hit)),
        },
        "held_out": {
            "prompts": len(other),
            "false_hits": sum(1 for r in other if r.is_hit),
            "false_hit_rate": round(sum(1 for r in other if r.is_hit) / len(other), 6) if other else None,
            "reasons": dict(Counter(r.reason for r in other)),
        },
        "prompt_tokens": {"mean": round(float(np.mean([r.prompt_tokens for r in rows])), 1) if rows else None,
                          "min": min((r.prompt_tokens for r in rows), default=None),
                          "max": max((r.prompt_tokens for r in rows), default=None)},
        "plan_ms": {"p50": round(float(np.percentile(lat, 50)), 4), "p99": round(float(np.percentile(lat, 99)), 4)}
        if lat.size else {},
    }
    return out


def rows_to_dicts(rows: Sequence[DiscoveryRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def render_rows(rows: Sequence[DiscoveryRow], summary: Mapping[str, Any], console: Any = None,
                title: str = "SemBlend discovery on ACLSum") -> None:
    """Rich table of ``rows`` and a one-paragraph summary."""
    from rich.table import Table

    console = console or wide_console()
    table = Table(title=title)
    for col, justify in (("paper", "left"), ("asks", "left"), ("layout", "left"), ("has donor", "center"),
                         ("result", "left"), ("reuse", "right"), ("seams", "right"), ("tokens", "right"),
                         ("ms", "right")):
        table.add_column(col, justify=justify, no_wrap=col in ("paper", "asks", "layout"))
    for r in rows:
        if r.correct_hit:
            result = f"[green]hit {r.donor_id.rsplit('/', 1)[-1]} prompt[/green]"
        elif r.false_hit:
            result = f"[red]FALSE HIT {r.donor_id}[/red]"
        elif r.registered:
            result = f"[yellow]miss ({r.reason})[/yellow]"
        else:
            result = f"no hit ({r.reason})"
        table.add_row(r.paper_id, r.aspect, r.layout.replace("instruction_", "instr. "),
                      "yes" if r.registered else "no", result, f"{r.reuse_ratio:.3f}" if r.is_hit else "-",
                      str(r.seams), str(r.prompt_tokens), f"{r.plan_ms:.2f}")
    console.print(table)
    s, h = summary["same_paper"], summary["held_out"]
    console.print(
        f"same-paper prompts: {s['hits']}/{s['prompts']} hits, reuse mean {s['mean_reuse_ratio']} min "
        f"{s['min_reuse_ratio']}, wrong-donor hits {s['wrong_donor_hits']}; held-out prompts: "
        f"{h['false_hits']}/{h['prompts']} false hits; plan p50 {summary['plan_ms'].get('p50')} ms"
    )
