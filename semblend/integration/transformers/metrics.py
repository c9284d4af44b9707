"""Answer-fidelity metrics of a SemBlend prefill against a cold one (demo and ``benchmarks/quality.py``).

All compare the next-token distributions that two prefills of the same prompt give over the *cold* run's answer:

* :func:`teacher_forced_logits`: logits ``[len(answer), vocab]`` for each answer position, the answer fed in as
  context (the prefill's cache is extended in place: call once per prefill);
* :func:`top1_agreement`: fraction of answer positions where a prefill's greedy choice equals the cold answer's
  token (1.0 for the cold prefill itself when the answer is its greedy decode);
* :func:`perplexity`: ``exp(mean NLL)`` of the answer under the logits;
* :func:`kl_divergence`: ``KL(p_cold || p)`` of two next-token distributions;
* :func:`rouge_l`: ROUGE-L F1 of two texts (``rouge-score``; a plain LCS fallback when it is missing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["kl_divergence", "perplexity", "rouge_l", "rouge_l_tokens", "teacher_forced_logits", "top1_agreement"]


def teacher_forced_logits(model: Any, prefill: Any, answer_ids: Sequence[int]) -> Any:
    """float32 logits ``[len(answer_ids), vocab]``: row ``j`` predicts ``answer_ids[j]`` given the prompt (through
    ``prefill.cache``) and ``answer_ids[:j]``. Row 0 is ``prefill.logits``. Extends ``prefill.cache`` in place."""
    import torch

    answer = [int(t) for t in answer_ids]
    if not answer:
        return prefill.logits.new_zeros((0, prefill.logits.shape[-1]))
    rows = [prefill.logits.float()[None]]
    if len(answer) > 1:
        device = prefill.logits.device
        ids = torch.tensor([answer[:-1]], device=device)
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=prefill.cache, use_cache=True)
        rows.append(out.logits[0].float().to(device))
    return torch.cat(rows, dim=0)


def top1_agreement(logits: Any, answer_ids: Sequence[int]) -> float:
    """Fraction of rows whose argmax equals the answer token (1.0 for an empty answer)."""
    import torch

    if len(answer_ids) == 0:
        return 1.0
    target = torch.tensor([int(t) for t in answer_ids], device=logits.device)
    return float((logits.argmax(dim=-1) == target).float().mean())


def perplexity(logits: Any, answer_ids: Sequence[int]) -> float:
    """``exp`` of the mean negative log-likelihood of ``answer_ids`` under ``logits`` (1.0 for an empty answer)."""
    import torch

    if len(answer_ids) == 0:
        return 1.0
    target = torch.tensor([int(t) for t in answer_ids], device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits.float(), target)
    return float(math.exp(float(nll)))


def kl_divergence(cold_logits: Any, logits: Any) -> float:
    """``KL(softmax(cold) || softmax(logits))`` in nats for one next-token distribution ``[vocab]``."""
    import torch

    p = torch.log_softmax(cold_logits.float(), dim=-1)
    q = torch.log_softmax(logits.float(), dim=-1)
    return max(0.0, float((p.exp() * (p - q)).sum()))


def _lcs(a: Sequence[Any], b: Sequence[Any]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_tokens(reference: Sequence[Any], candidate: Sequence[Any]) -> float:
    """ROUGE-L F1 over two token sequences (words or token ids; 1.0 when both are empty, no stemming)."""
    if not reference and not candidate:
        return 1.0
    if not reference or not candidate:
        return 0.0
    lcs = _lcs(reference, candidate)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference`` (1.0 when both are empty)."""
    if not reference.strip() and not candidate.strip():
        return 1.0
    try:
        from rouge_score import rouge_scorer
    except ImportError:  # same definition on whitespace tokens, without stemming
        return rouge_l_tokens(reference.lower().split(), candidate.lower().split())
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(scorer.score(reference, candidate)["rougeL"].fmeasure)
